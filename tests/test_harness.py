"""tinylm as an lm-evaluation-harness backend: local task YAMLs over tiny JSONL files, run offline by
lm-eval itself (in-process `simple_evaluate`, and its command line with the import hook that an installed
wheel's .pth file runs); every figure is checked against a direct computation with the model."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, tiny_model, write_jsonl

from tinylm.data.tokenizer import train_tokenizer
from tinylm.formats import checkpoint
from tinylm.infer.generate import generate_ids

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTIONS = [
    {"question": "The sky on a clear day is", "choices": ["blue", "green", "made of cheese"], "label": 0},
    {"question": "Cats like to chase", "choices": ["mice", "the moon"], "label": 0},
    {"question": "Water freezes at zero degrees", "choices": ["Fahrenheit", "Celsius", "Kelvin", "Rankine"],
     "label": 1},
    {"question": "A week has", "choices": ["five days", "seven days", "ten days"], "label": 1},
    {"question": "The opposite of hot is", "choices": ["cold", "warm"], "label": 0},
]
TEXTS = [{"text": "Once upon a time there was a small cat who liked to chase mice in the old barn. " * 3},
         {"text": "Rain fell on the quiet town, and the children watched it from the window."}]
PROMPTS = [{"prompt": "Once upon a time", "answer": "x"}, {"prompt": "The cat", "answer": "y"}]

TASKS = {
    "tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]},
    "tiny_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                 "metric_list": [{"metric": "bits_per_byte"}]},
    "tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
                 "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False},
                 "metric_list": [{"metric": "exact_match"}]},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint (context 32, so the long text takes several rolling windows) and the three tasks."""
    import yaml

    root = tmp_path_factory.mktemp("harness")
    corpus = [q["question"] + " " + c for q in QUESTIONS for c in q["choices"]] + [t["text"] for t in TEXTS]
    tok = train_tokenizer(corpus * 3 + [p["prompt"] for p in PROMPTS], vocab_size=300)
    checkpoint.save(tiny_model(vocab_size=tok.vocab_size, max_seq_len=32, bos_token_id=tok.bos_id,
                               eos_token_id=tok.eos_id), root / "ck", tok)
    rows = {"tiny_mc": QUESTIONS, "tiny_ppl": TEXTS, "tiny_gen": PROMPTS}
    for name, spec in TASKS.items():
        data = write_jsonl(root / f"{name}.jsonl", rows[name])
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **spec}
        (root / "tasks").mkdir(exist_ok=True)
        (root / "tasks" / f"{name}.yaml").write_text(yaml.safe_dump(task))
    return root


def _nll_windows(model, ids: list[int], prefix: int, length: int) -> float:
    """The summed log-likelihood of ids in disjoint windows of `length` predictions, the first conditioned on
    `prefix`, each later one on the `length` tokens before its last (lm-eval's rolling windows, spelt out)."""
    seq = [prefix] + ids  # seq[j] is ids[j - 1]
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), length):
            end = min(start + length, len(ids))
            x = seq[max(0, end - length):end]  # the model reads x and predicts ids[start:end] at its last places
            logp = model(torch.tensor([x]))[0].double().log_softmax(-1)  # (T, V)
            rows = torch.arange(len(x) - (end - start), len(x))
            total += float(logp[rows, torch.tensor(ids[start:end])].sum())
    return total


def _direct_answers(workspace: Path) -> dict[str, object]:
    """acc of tiny_mc, bits per byte of tiny_ppl and the greedy texts of tiny_gen, computed with the model."""
    loaded = checkpoint.load(workspace / "ck")
    model, tok = loaded.model, loaded.tokenizer
    correct = 0
    for q in QUESTIONS:
        lls = []
        for choice in q["choices"]:
            ctx = tok.encode(q["question"])
            whole = tok.encode(q["question"] + " " + choice)
            with torch.no_grad():
                logp = model(torch.tensor([whole[:-1]]))[0].double().log_softmax(-1)
            lls.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
        correct += max(range(len(lls)), key=lambda i: (lls[i], -i)) == q["label"]
    lls = [_nll_windows(model, tok.encode(t["text"]), tok.bos_id, model.config.max_seq_len) for t in TEXTS]
    n_bytes = sum(len(t["text"].encode()) for t in TEXTS)
    texts = []
    for p in PROMPTS:
        out = tok.decode(generate_ids(model, tok.encode(p["prompt"]), max_new_tokens=6, temperature=0.0,
                                      stop_ids=(tok.eos_id,)))
        texts.append(min((out.split(s)[0] for s in ("\n", ".")), key=len).replace(tok.eos_token, ""))
    return {"acc": correct / len(QUESTIONS), "bits_per_byte": -sum(lls) / (math.log(2) * n_bytes), "texts": texts}


@pytest.mark.slow
def test_simple_evaluate_matches_direct_computation(workspace: Path) -> None:
    from lm_eval.tasks import TaskManager

    import tinylm.evals.harness  # noqa: F401  (registers "tinylm")

    manager = TaskManager(include_path=str(workspace / "tasks"), include_defaults=False)
    out = lm_eval.simple_evaluate(model="tinylm", model_args=f"pretrained={workspace / 'ck'},device=cpu",
                                  tasks=list(TASKS), task_manager=manager, batch_size=3, log_samples=True)
    want = _direct_answers(workspace)
    results = out["results"]
    assert results["tiny_mc"]["acc,none"] == pytest.approx(want["acc"])
    assert results["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(want["bits_per_byte"], rel=1e-5)
    got_texts = [s["resps"][0][0] for s in sorted(out["samples"]["tiny_gen"], key=lambda s: s["doc_id"])]
    assert got_texts == want["texts"]


@pytest.mark.slow
def test_lm_eval_command_line_finds_tinylm_through_the_import_hook(workspace: Path, tmp_path: Path) -> None:
    # what an installed wheel puts in site-packages; site.addsitedir runs its .pth as the interpreter does
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    for name in ("tinylm-lm-eval.pth", "_tinylm_lm_eval.py"):
        shutil.copy(REPO / name, site_dir / name)
    out = tmp_path / "out"
    argv = ["lm_eval", "--model", "tinylm", "--model_args", f"pretrained={workspace / 'ck'}",
            "--tasks", "tiny_mc", "--include_path", str(workspace / "tasks"), "--output_path", str(out)]
    script = ("import site, sys; site.addsitedir(sys.argv[1]); sys.argv = sys.argv[2:]\n"
              "from lm_eval.__main__ import cli_evaluate; cli_evaluate()")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(site_dir), *argv], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written, = out.rglob("results_*.json")
    acc = json.loads(written.read_text())["results"]["tiny_mc"]["acc,none"]
    assert acc == pytest.approx(_direct_answers(workspace)["acc"])
