"""The quickstart pipeline end to end on a tiny recipe: every stage runs and the report's figures are real."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tinylm.cli import main
from tinylm.data.tinytales import corpus_stats
from tinylm.evals.perplexity import evaluate
from tinylm.formats.checkpoint import load
from tinylm.stages import quickstart

TINY_RECIPE = """
model: {preset: 260k, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2}
data: {seq_len: 64, batch_tokens: 1024, micro_batch: 16}
optim: {lr: 3.0e-3}
schedule: {kind: wsd, steps: 40, warmup_steps: 10, decay_fraction: 0.2}
run: {eval_every: 0, eval_tokens: 2048, ckpt_every: 0, compile: false, progress: false}
"""


def _fewer(monkeypatch, name: str, key: str, asked: list[int]) -> None:
    """quickstart.`name` records the number of samples it is asked for (`key`) and draws 3 (a fast test)."""
    real = getattr(quickstart, name)

    def three(*args, **kwargs):
        if key in kwargs:
            asked.append(kwargs[key])
            kwargs[key] = 3
        else:  # sample_tinytales(model, tokenizer, n, ...)
            asked.append(args[2])
            args = (*args[:2], 3, *args[3:])
        return real(*args, **kwargs)
    monkeypatch.setattr(quickstart, name, three)


def test_quickstart_end_to_end(tmp_path, monkeypatch):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "qs"
    asked: list[int] = []
    _fewer(monkeypatch, "sample_tinytales", "n", asked)
    # a budget the reserve for evaluation uses up: the run trains its minimum steps (fast, on any machine)
    code = main(["quickstart", "--out", str(out), "--minutes", "0.5", "--reserve-s", "60", "--stories", "300",
                 "--vocab-size", "300", "--recipe", str(recipe)])
    assert code == 0
    assert asked == [200]  # the default --samples for TinyTales: 200 stories scored
    report = json.loads((out / "report.json").read_text())
    corpus = corpus_stats(300, seed=0)  # the default seed's corpus, generated again in memory
    assert report["corpus"] == {k: corpus[k] for k in ("stories", "bytes", "distinct_words", "bits_per_byte")}
    assert report["train"]["steps"] >= 24  # at least probe + 20 steps, whatever the machine's speed
    final = load(Path(report["final"])).model
    ev = report["eval"]
    assert ev == evaluate(final, out / "data", split="val")  # the final model's figures
    # it learned: below the bits per byte of a uniform guess over the vocabulary (where training starts)
    assert ev["bits_per_byte"] < math.log2(final.config.vocab_size) * ev["tokens"] / ev["bytes"]
    assert report["stories"]["stories"] == 3
    text = (out / "REPORT.md").read_text()
    assert "entropy bound" in text and "loss.png" in text
    assert (out / "train" / "final" / "model.safetensors").is_file()
    assert (out / "train" / "loss.png").is_file()


@pytest.mark.slow
def test_quickstart_on_own_text(tmp_path, monkeypatch):
    from pydoc_data.topics import topics  # real English that ships with CPython

    from tinylm.train import loop

    docs = [p for text in topics.values() for p in text.split("\n\n") if len(p) > 200][:400]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.replace("compile: false", "compile: false, peak_flops: 1.0e+10")
                      .replace("eval_every: 0", "eval_every: 4")
                      .replace("micro_batch: 16}", "micro_batch: 16, batch_warmup_tokens: 8192, document_rows: 1.0, "
                               "document_rows_tokens: 4096}")  # as quickstart.yaml
                      .replace("optim: {", "optim: {name: muon, "))
    validate = loop.validate  # a run that overfits after step 12 (it trains at least 24 steps): the val loss
    monkeypatch.setattr(loop, "validate", lambda run, fn: {**validate(run, fn), "val_loss": 1 + abs(run.step - 12)})
    out = tmp_path / "qs"
    asked: list[int] = []
    _fewer(monkeypatch, "generate", "n", asked)
    code = main(["quickstart", "--out", str(out), "--data", str(tmp_path / "docs.jsonl"), "--minutes", "0.5",
                 "--reserve-s", "60", "--vocab-size", "300", "--recipe", str(recipe)])
    assert code == 0
    assert asked == [20]  # the default --samples for a user's text
    report = json.loads((out / "report.json").read_text())
    assert "stories" not in report and len(report["samples"]) == 3
    assert 0.8 * len(docs) < report["corpus"]["documents"] <= len(docs)  # less the (near-)duplicates
    assert not (out / "tinytales.txt").exists()
    final = load(Path(report["final"]))
    assert Path(report["final"]) == out / "train" / "best" and final.meta["step"] == 12  # the lowest val loss
    assert report["train"]["best"] == {"step": 12, "tokens": final.meta["tokens"], "val_loss": 1.0,
                                       "final_val_loss": 1.0 + report["train"]["steps"] - 12}
    assert report["eval"] == evaluate(final.model, out / "data", split="val")  # the report's figures are its
    trained = final.meta["config"]  # the rule's batch, lr, warmup and decay are what trained
    rule = report["recipe"]
    assert trained["data"]["batch_tokens"] == rule["data.batch_tokens"] and trained["optim"]["lr"] == rule["optim.lr"]
    assert trained["schedule"]["warmup_steps"] == rule["schedule.warmup_steps"]
    assert trained["data"]["batch_warmup_tokens"] == 0  # the rule's batch from the first step: the ramp is TinyTales'
    assert trained["optim"]["name"] == "adamw"  # the rule's optimizer: Muon is TinyTales'
    assert trained["data"]["document_rows"] == 0  # rows from anywhere: the story-start rows are TinyTales'
    assert rule["data.batch_tokens"] % 64 == 0 and (rule["data.batch_tokens"] // 64) % trained["data"]["micro_batch"] == 0
    assert report["train"]["steps"] >= 24
    text = (out / "REPORT.md").read_text()
    assert "Three samples" in text and "validator" not in text and "entropy bound" not in text
    assert f"lowest validation loss, step 12 of {report['train']['steps']}" in text
    assert "schedule.tokens" not in rule and "capped" not in text  # ~5 epochs in this budget: not capped


@pytest.mark.slow
def test_quickstart_on_little_text_stops_at_the_epoch_cap(tmp_path):
    from pydoc_data.topics import topics

    from tinylm.train.rules import MAX_EPOCHS

    docs = [p for text in topics.values() for p in text.split("\n\n") if len(p) > 200][:60]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    # a peak that promises far more tokens than 16.4 epochs of this text, and a budget 4x what the capped run
    # takes here (~1 min), so that the cap and not the clock ends it; 64-token windows fit its small val split
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE.replace("compile: false", "compile: false, peak_flops: 1.0e+13")
                      .replace("n_kv_heads: 2}", "n_kv_heads: 2, max_seq_len: 64}"))
    out = tmp_path / "qs"
    code = main(["quickstart", "--out", str(out), "--data", str(tmp_path / "docs.jsonl"), "--minutes", "5",
                 "--vocab-size", "300", "--samples", "1", "--recipe", str(recipe)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    cap = report["recipe"]["schedule.tokens"]
    assert cap == math.ceil(MAX_EPOCHS * report["tokens"]["train"])
    trained = load(out / "train" / "final").meta
    assert trained["config"]["schedule"]["tokens"] == cap
    assert cap <= report["train"]["tokens"] < cap + trained["config"]["data"]["batch_tokens"]  # stopped at the cap
    assert f"capped at {cap:,} tokens" in (out / "REPORT.md").read_text()


def test_quickstart_bad_budget_is_one_line_error(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "q"), "--minutes", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinylm: error:") and len(err.splitlines()) == 1


def test_quickstart_bad_recipe_fails_before_writing(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: {preset: 260k, widht: 32}\n")
    out = tmp_path / "q"
    assert main(["quickstart", "--out", str(out), "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinylm: error:") and len(err.splitlines()) == 1 and "widht" in err
    assert not out.exists()


def _figures(consistent: float, builtin: bool) -> dict:
    """What quickstart() hands write_report: a 2M-token run of 500 s in a 540 s pipeline."""
    return {"builtin_recipe": builtin, "total_s": 540.0, "final": "runs/q/train/final",
            "eval": {"loss": 0.61, "perplexity": 1.84, "bits_per_byte": 0.22},
            "train": {"parameters": 1_066_112, "steps": 500, "tokens": 2_000_000, "seconds": 500.0,
                      "precision": "fp32"},
            "corpus": {"stories": 30000, "bytes": 16_600_000, "bits_per_byte": 0.114},
            "stories": {"valid_fraction": 0.97, "sentences": 3000, "consistent_valid_fraction": consistent,
                        "stories": 200, "samples": ["Once upon a time."]}}


def test_report_names_the_budget_a_short_run_lacked(tmp_path, capsys):
    quickstart.write_report(tmp_path, _figures(0.0, builtin=True), tmp_path / "tinytales.txt")
    # 4.0M tokens at this run's 4,000 tokens/s take 1,000 s, plus the 40 s outside training: 17.3 -> 18 min
    assert quickstart.NAMED_TOKENS == 4_000_000
    assert "`tinylm quickstart --minutes 18`" in (tmp_path / "REPORT.md").read_text()
    assert "try --minutes 18" in capsys.readouterr().out
    for consistent, builtin in ((0.85, True), (0.0, False)):  # goal met; a recipe of the user's own
        quickstart.write_report(tmp_path, _figures(consistent, builtin), tmp_path / "tinytales.txt")
        assert "--minutes" not in (tmp_path / "REPORT.md").read_text()
