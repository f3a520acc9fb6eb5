"""GRPO after SFT on the function-calling task, against more SFT for the same wall clock (issue 16's benchmark).

1. `tinylm data task function-calling`: --train training requests, --test held-out ones (never a training prompt).
2. SFT of --model on the training requests (--peft lora: merged afterwards) -> the SFT model; its exact-match
   accuracy on the held-out requests (`tinylm data check --model`, greedy).
3. From the SFT model: `tinylm grpo --reward checker` on the same training requests for --grpo-steps steps
   (timed), then its accuracy.
   (--sft-model DIR: an SFT model made earlier on the same --train requests, e.g. bench_tasks.sh fc's merged LoRA
   model, is used instead, and step 2 only scores it.)
4. From the SFT model again: more SFT on the same requests for the wall clock GRPO took (`--run.minutes`),
   then its accuracy.

Prints one line per model (accuracy, seconds) and appends them to WORK/results.txt. Sizes are flags:

    python bench/bench_grpo.py --model smollm2-135m --train 256 --test 100 --grpo-steps 30 --group-size 8 \\
        --prompts-per-step 4 --max-tokens 64 --peft lora
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

QUIET = ["--run.progress", "false", "--run.plot", "false", "--run.ckpt_every", "0"]


def tl(args: argparse.Namespace, *words: object, log: str) -> float:
    """Run `tinylm WORDS`, its output to WORK/log; returns its wall-clock seconds (a failure prints the log's tail)."""
    path = Path(args.work) / f"{log}.log"
    t0 = time.perf_counter()
    with open(path, "w") as f:
        code = subprocess.run([sys.executable, "-m", "tinylm", *map(str, words)], stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        print("".join(path.read_text().splitlines(keepends=True)[-20:]), file=sys.stderr)
        sys.exit(f"tinylm {words[0]} failed (exit {code}); log: {path}")
    return time.perf_counter() - t0


def accuracy(args: argparse.Namespace, name: str, model: Path | str) -> str:
    """MODEL's exact-match on the held-out requests, as `tinylm data check` prints it."""
    tl(args, "data", "check", "function-calling", "--data", Path(args.work) / "test.jsonl", "--model", model,
       "--max-tokens", args.check_tokens, "--save", Path(args.work) / f"answers-{name}.jsonl", "--overwrite",
       log=f"check-{name}")
    text = (Path(args.work) / f"check-{name}.log").read_text()
    found = re.search(r"function-calling: (\d+)/(\d+) correct \(([\d.]+)%\)", text)
    return f"{found.group(1)}/{found.group(2)} ({found.group(3)}%)" if found else "?"


def peft_flags(args: argparse.Namespace, lr: float) -> list[object]:
    lora = ["--peft.method", "lora", "--peft.r", 16, "--peft.alpha", 32] if args.peft == "lora" else []
    return [*lora, "--optim.lr", lr, "--run.device", args.device, "--optim.width_scaling", "false"]


def merged(args: argparse.Namespace, run: Path) -> Path:
    """The run's final model, its LoRA adapter folded in (full fine-tuning: the final dir itself)."""
    if args.peft != "lora":
        return run / "final"
    out = run.with_name(run.name + "-merged")
    shutil.rmtree(out, ignore_errors=True)
    tl(args, "merge", run / "final", "--adapter", run / "final", "--out", out, log=f"merge-{run.name}")
    return out


def sft(args: argparse.Namespace, name: str, model: Path | str, *extra: object) -> tuple[Path, float]:
    run = Path(args.work) / name
    shutil.rmtree(run, ignore_errors=True)
    seconds = tl(args, "sft", model, "--data", Path(args.work) / "train.jsonl", "--out", run, *QUIET,
                 "--data.seq_len", 1024, "--data.batch_tokens", 2048, "--data.micro_batch", 2,
                 "--schedule.warmup_steps", 3, *peft_flags(args, args.sft_lr), *extra, log=name)
    return merged(args, run), seconds


def grpo(args: argparse.Namespace, model: Path) -> tuple[Path, float]:
    run = Path(args.work) / "grpo"
    shutil.rmtree(run, ignore_errors=True)
    rows = args.prompts_per_step * args.group_size
    seconds = tl(args, "grpo", model, "--data", Path(args.work) / "train.jsonl", "--out", run, "--reward", "checker",
                 *QUIET, "--data.seq_len", args.seq_len, "--data.batch_tokens", rows * args.seq_len,
                 "--data.micro_batch", args.micro_batch, "--grpo.group_size", args.group_size,
                 "--grpo.max_tokens", args.max_tokens, "--grpo.beta", args.beta, "--schedule.steps",
                 args.grpo_steps, "--schedule.warmup_steps", 1, "--run.log_every", 1,
                 *peft_flags(args, args.grpo_lr), log="grpo")
    return merged(args, run), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="the model to fine-tune (any tinylm model source)")
    p.add_argument("--work", default="bench-work/grpo", help="where runs, answers and results.txt go")
    p.add_argument("--train", type=int, default=256, help="function-calling training requests")
    p.add_argument("--test", type=int, default=100, help="held-out requests scored")
    p.add_argument("--peft", choices=("lora", "none"), default="lora", help="LoRA (r 16, merged) or full fine-tuning")
    p.add_argument("--sft-epochs", type=float, default=1.0, help="epochs of the first SFT")
    p.add_argument("--sft-model", default=None,
                   help="start from this SFT model (made on the same --train requests) instead of training one")
    p.add_argument("--sft-lr", type=float, default=1e-3, help="SFT learning rate (1e-3 suits LoRA, 5e-5 full)")
    p.add_argument("--grpo-steps", type=int, default=30)
    p.add_argument("--grpo-lr", type=float, default=2e-5)
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64, help="the longest completion (a call is ~30 tokens)")
    p.add_argument("--seq-len", type=int, default=384, help="prompt + completion tokens (the prompt is ~290)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (DeepSeekMath: 0.04)")
    p.add_argument("--check-tokens", type=int, default=80, help="max tokens of a checked answer")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tl(args, "data", "task", "function-calling", "--n", args.train, "--out", work / "train.jsonl", "--overwrite",
       log="data-train")
    tl(args, "data", "task", "function-calling", "--split", "test", "--n", args.test, "--out", work / "test.jsonl",
       "--overwrite", log="data-test")
    lines = []

    def result(name: str, model: Path, seconds: float) -> None:
        line = f"{name:<12} exact-match {accuracy(args, name, model):<16} {seconds:7.0f} s"
        print(line, flush=True)
        lines.append(line)

    if args.sft_model:  # an SFT model made earlier on the same requests (bench_tasks.sh fc): its time is not known here
        base, t_sft = Path(args.sft_model), float("nan")
    else:
        base, t_sft = sft(args, "sft", args.model, "--chat.epochs", args.sft_epochs)
    result("sft", base, t_sft)
    tuned, t_grpo = grpo(args, base)
    result("sft+grpo", tuned, t_grpo)
    # as much more SFT as GRPO's wall clock (a cap of many epochs; the time budget ends it)
    more, t_more = sft(args, "sft-more", base, "--chat.epochs", 1000, "--run.minutes", max(t_grpo / 60, 0.1))
    result("sft+sft", more, t_more)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with open(work / "results.txt", "a") as f:
        f.write(f"{stamp} python {' '.join(sys.argv)}\n" + "".join(f"  {line}\n" for line in lines))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
