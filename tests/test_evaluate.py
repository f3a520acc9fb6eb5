"""Evaluation: loss / perplexity / bits per byte against a direct computation with the model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_data, tiny_model

from tinylm import cli
from tinylm.core.errors import TinylmError
from tinylm.data import tinytales
from tinylm.data.tokenizer import train_tokenizer
from tinylm.data.tokens import TokenData
from tinylm.evals.perplexity import evaluate
from tinylm.evals.tinytales import sample_tinytales
from tinylm.formats import checkpoint
from tinylm.model.config import ModelConfig
from tinylm.model.llama import Llama


def direct_nats(model: Llama, ids: torch.Tensor, seq_len: int) -> tuple[float, int]:
    """Summed NLL (float64) of ids (N,) read in windows of seq_len + 1 with stride seq_len, one at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, seq_len):
            w = ids[i:i + seq_len + 1]
            logp = F.log_softmax(model(w[None, :-1])[0].double(), dim=-1)  # (T, V)
            total -= logp.gather(1, w[1:, None]).sum().item()
            count += len(w) - 1
    return total, count


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("evaldata"), n_val=1000)


def test_data_dir_matches_direct_computation(data: Path) -> None:
    model, seq_len = tiny_model(), 32
    r = evaluate(model, data, split="val", max_tokens=640, seq_len=seq_len, batch_size=3)
    val = TokenData.open(data, "val")
    ids = torch.from_numpy(val._read(0, 20 * seq_len + 1))  # 640 predicted tokens = 20 windows
    nats, count = direct_nats(model, ids, seq_len)
    n_bytes = val.n_bytes * count / val.n_tokens
    assert r["tokens"] == count == 640
    assert r["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)


def test_whole_split_and_errors(data: Path, tmp_path: Path) -> None:
    r = evaluate(tiny_model(), data, seq_len=64)
    assert r["tokens"] == (1000 - 1) // 64 * 64
    with pytest.raises(TinylmError, match="no split"):
        evaluate(tiny_model(), data, split="test")
    with pytest.raises(TinylmError, match="larger than the model"):
        evaluate(tiny_model(vocab_size=32), data)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    stories = list(tinytales.generate(40, seed=3))
    tok = train_tokenizer(stories, vocab_size=300)
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4,
                              max_seq_len=64, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id))
    root = tmp_path_factory.mktemp("textmodel")
    checkpoint.save(model, root / "model", tok)
    text = root / "val.txt"
    text.write_text("\n\n".join(stories[:3]) + " caf\u00e9 \u2603\n", encoding="utf-8")
    return root / "model", text


def test_text_file_counts_bytes_exactly(text_model: tuple[Path, Path]) -> None:
    src, text_path = text_model
    loaded = checkpoint.load(src)
    text = text_path.read_text(encoding="utf-8")
    ids = torch.tensor(loaded.tokenizer.encode(text, add_bos=True))
    nats, count = direct_nats(loaded.model, ids, 48)
    r = evaluate(loaded.model, text_path, loaded.tokenizer, seq_len=48, batch_size=4)
    assert r["tokens"] == count == len(ids) - 1
    assert r["bytes"] == len(text.encode("utf-8"))
    assert r["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(nats / (math.log(2) * len(text.encode("utf-8"))), rel=1e-5)


def test_cli_eval_json_and_tinytales(text_model: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    src, text_path = text_model
    assert cli.main(["eval", str(src), "--data", str(text_path), "--seq-len", "48", "--json",
                     "--tinytales", "2", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    loaded = checkpoint.load(src)
    direct = evaluate(loaded.model, text_path, loaded.tokenizer, seq_len=48)
    assert r["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    t = r["tinytales"]
    again = tinytales.check_many(t["samples"])
    assert t["stories"] == 2 and t["sentences"] == again.n_sentences
    assert t["valid_fraction"] == pytest.approx(again.fraction if again.n_sentences else 0.0)
    assert cli.main(["eval", str(src), "--data", str(text_path.parent / "missing.txt")]) == 2
    assert "no data at" in capsys.readouterr().err


def test_sample_tinytales_is_seeded(text_model: tuple[Path, Path]) -> None:
    loaded = checkpoint.load(Path(text_model[0]))
    a = sample_tinytales(loaded.model, loaded.tokenizer, 2, seed=5, max_new_tokens=20)
    b = sample_tinytales(loaded.model, loaded.tokenizer, 2, seed=5, max_new_tokens=20)
    assert a == b
