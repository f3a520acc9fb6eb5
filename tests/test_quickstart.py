"""The quickstart pipeline end to end on a tiny recipe: every stage runs and the report's figures are real."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tinylm.cli import main
from tinylm.data.tinytales import corpus_stats
from tinylm.evals.perplexity import evaluate
from tinylm.formats.checkpoint import load

TINY_RECIPE = """
model: {preset: 260k, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2}
data: {seq_len: 64, batch_tokens: 1024, micro_batch: 16}
optim: {lr: 3.0e-3}
schedule: {kind: wsd, steps: 40, warmup_steps: 10, decay_fraction: 0.2}
run: {eval_every: 0, eval_tokens: 2048, ckpt_every: 0, compile: false, progress: false}
"""


def test_quickstart_end_to_end(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "qs"
    code = main(["quickstart", "--out", str(out), "--minutes", "0.5", "--stories", "300", "--vocab-size", "300",
                 "--samples", "3", "--recipe", str(recipe)])
    assert code == 0
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
