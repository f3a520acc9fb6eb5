"""Every `tinylm` command line of README.md runs, in order, as written, on tiny inputs.

The README's pipeline block is read from the file itself, so a command that stops working (or a README
line that drifts from the CLI) fails here. The lines run in a scratch directory where `recipes/` is the
package's recipes; SHRINK makes the workloads tiny (fewer stories, steps and tokens) by textual
substitutions and by options appended at the end, where the command line wins over the recipe.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

import pytest
from helpers import REPO, needs_smollm2, readme_commands

from tinylm.cli import main

TRAIN = ("--schedule.steps 40 --schedule.tokens none --schedule.warmup_steps 2 --schedule.decay_fraction 0.2 "
         "--data.seq_len 32 --data.batch_tokens 256 --data.micro_batch 8 --run.eval_every 0 --run.eval_tokens 512 "
         "--run.ckpt_every 10 --run.keep_last 10 --run.progress false --run.compile false --run.plot false")
# (pattern, replacement) on the README line, then options appended for lines whose verb matches.
SHRINK = [
    (r"--stories \d+", "--stories 300"),
    (r"--vocab-size \d+", "--vocab-size 300"),
    (r"tinytales:\d+", "tinytales:60"),
    (r"--tinytales \d+", "--tinytales 2"),
    (r"step_\d+", "step_0000020"),  # a stable-phase checkpoint of the 40-step run
    (r"--preset 5m", "--preset 260k"),
    (r"tinytales-instruct --n \d+", "tinytales-instruct --n 16"),
    (r"--max-tokens \d+", "--max-tokens 8"),  # data check --model: 16 answers of 8 tokens
]
# distillation runs 4 steps of 64 tokens: the teacher (SmolLM2-135M) is the slow part
DISTILL = ("--schedule.steps 4 --schedule.tokens none --schedule.warmup_steps 1 --data.seq_len 32 "
           "--data.batch_tokens 64 --data.micro_batch 2 --run.eval_every 0 --run.eval_tokens 64 --run.ckpt_every 0 "
           "--run.progress false --run.compile false --run.plot false")
APPEND = {
    "pretrain": TRAIN + " --model.preset 260k",
    "distill": DISTILL,
    "distill cache": DISTILL + " --batch-size 2",
    # 2 LoRA steps on SmolLM2-135M over 256-token rows (the instruction examples are ~200 tokens)
    "sft": DISTILL.replace("--schedule.steps 4", "--schedule.steps 2").replace("--data.seq_len 32", "--data.seq_len 256")
                  .replace("--data.batch_tokens 64", "--data.batch_tokens 256"),
    "generate": "--max-tokens 8",
    "eval": "--max-tokens 2048",
    "prune": "--calib-batches 1 --batch-size 2 --seq-len 32",
}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"]}


def shrink(line: str) -> list[str]:
    words = shlex.split(line, comments=True)[1:]
    text = shlex.join(words)
    for pattern, replacement in SHRINK:
        text = re.sub(pattern, replacement, text)
    verb = "distill cache" if words[:2] == ["distill", "cache"] else words[0]
    return shlex.split(text) + shlex.split(APPEND.get(verb, ""))


def test_readme_block_is_found() -> None:
    lines = readme_commands()
    assert len(lines) >= 25 and lines[0].startswith("tinylm info")


@pytest.mark.slow
@needs_smollm2
def test_every_readme_command_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(REPO / "tinylm" / "recipes")
    (tmp_path / "my_docs").mkdir()
    (tmp_path / "my_docs" / "a.txt").write_text("Tom had a red ball.\n\nSue saw a big dog.\n")
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": "Max ran to the park."}) + "\n")
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    for line in readme_commands():
        argv = shrink(line)
        start = time.perf_counter()
        assert main(argv) == 0, f"README line failed: {line}\n  ran: tinylm {shlex.join(argv)}"
        print(f"{time.perf_counter() - start:6.1f} s  tinylm {shlex.join(argv)}")  # shown when the test fails
    assert (tmp_path / "runs" / "tt1m" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "tt.gguf").is_file() and (tmp_path / "tt.onnx").is_file()
