"""Tests for tinylm.data: the batch loader, corpus preparation, dedup, and the CLI's bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tinylm.data.tokens import FORMAT, TokenData, read_meta

# ----- loader on a hand-written data dir (the stream is arange, so every window is checkable) ---------

def _write_stream(d: Path, shard_sizes: list[int], dtype: str = "uint16") -> np.ndarray:
    """A data dir whose train split is arange(sum(shard_sizes)) cut into shards of the given sizes."""
    d.mkdir(parents=True, exist_ok=True)
    stream = np.arange(sum(shard_sizes)) % 60000
    shards, pos = [], 0
    for k, n in enumerate(shard_sizes):
        stream[pos:pos + n].astype(dtype).tofile(d / f"train_{k:04d}.bin")
        shards.append({"file": f"train_{k:04d}.bin", "tokens": n, "documents": 1})
        pos += n
    split = {"documents": len(shard_sizes), "tokens": int(pos), "bytes": 3 * int(pos), "shards": shards}
    meta = {"format": FORMAT, "dtype": dtype, "vocab_size": 60000, "bos_id": None, "eos_id": None,
            "splits": {"train": split, "val": {"documents": 0, "tokens": 0, "bytes": 0, "shards": []}}}
    (d / "meta.json").write_text(json.dumps(meta))
    return stream


@pytest.fixture
def stream_dir(tmp_path: Path) -> tuple[Path, np.ndarray]:
    d = tmp_path / "tokens"
    return d, _write_stream(d, [1000, 7, 2500])


def test_windows_match_offsets_across_shards(stream_dir):
    d, stream = stream_dir
    data = TokenData.open(d)
    assert data.n_tokens == len(stream) and data.n_bytes == 3 * len(stream)
    w = data.windows(step=3, seed=5, global_batch=64, seq_len=32)
    assert w.shape == (64, 33) and w.dtype == torch.int64
    offs = np.random.default_rng([5, 3]).integers(0, len(stream) - 33, 64)
    want = np.stack([stream[o:o + 33] for o in offs])
    np.testing.assert_array_equal(w.numpy(), want)
    # a window crossing the 1000 / 1007 shard boundaries reads straight through
    spanning = TokenData.open(d)._read(995, 20)
    np.testing.assert_array_equal(spanning, stream[995:1015])


def test_windows_deterministic_and_rank_slices_concatenate(stream_dir):
    d, _ = stream_dir
    a, b = TokenData.open(d), TokenData.open(d)
    full = a.windows(7, 1, 12, 16)
    assert torch.equal(full, b.windows(7, 1, 12, 16))
    assert not torch.equal(full, a.windows(8, 1, 12, 16))
    assert not torch.equal(full, a.windows(7, 2, 12, 16))
    # 2 ranks x 2 micro-steps x micro-batch 3: slices concatenate to the 1-process batch
    parts = [a.windows(7, 1, 12, 16, start=s, count=3) for s in range(0, 12, 3)]
    assert torch.equal(torch.cat(parts), full)
    assert torch.equal(torch.cat([a.windows(7, 1, 12, 16, count=6), a.windows(7, 1, 12, 16, start=6)]), full)


def test_sequential_windows(stream_dir):
    d, stream = stream_dir
    data = TokenData.open(d)
    span = len(stream) - 9
    for step in (0, 40):
        w = data.windows(step, 0, 4, 8, sequential=True).numpy()
        for i in range(4):
            o = ((step * 4 + i) * 8) % span
            np.testing.assert_array_equal(w[i], stream[o:o + 9])


def _write_documents(d: Path, lengths: list[int], shard_at: int) -> np.ndarray:
    """A data dir of documents BOS (id 1), then ids 10.. of its own; the stream cut into two shards at shard_at."""
    stream = np.concatenate([np.r_[1, 10 + np.arange(n - 1) % 50000] for n in lengths])
    _write_stream(d, [shard_at, len(stream) - shard_at])
    for k, (a, b) in enumerate([(0, shard_at), (shard_at, len(stream))]):
        stream[a:b].astype("uint16").tofile(d / f"train_{k:04d}.bin")
    meta = json.loads((d / "meta.json").read_text())
    meta["bos_id"] = 1
    (d / "meta.json").write_text(json.dumps(meta))
    return stream


def test_document_rows_start_rows_at_documents(tmp_path):
    lengths = [int(n) for n in np.random.default_rng(0).integers(5, 40, 300)]
    stream = _write_documents(tmp_path / "docs", lengths, shard_at=1234)
    data = TokenData.open(tmp_path / "docs")
    starts = np.flatnonzero(stream == 1)
    np.testing.assert_array_equal(data.document_starts(16), starts[starts < len(stream) - 17])
    # 0: exactly the windows the loader has always read (the same draws: a resumed run reads its batches)
    offs = np.random.default_rng([3, 9]).integers(0, len(stream) - 17, 64)
    np.testing.assert_array_equal(data.windows(9, 3, 64, 16, documents=0.0).numpy(),
                                  np.stack([stream[o:o + 17] for o in offs]))
    # 1: every row starts at a document's BOS and reads on through the stream (across the shard cut)
    w = data.windows(9, 3, 64, 16, documents=1.0).numpy()
    assert (w[:, 0] == 1).all()
    assert all(any(np.array_equal(stream[o:o + 17], row) for o in starts) for row in w)
    # a share: about that many rows, each drawn on its own; slices of the batch are the batch's slices
    big = data.windows(2, 0, 2000, 16, documents=0.5)
    share = (big[:, 0] == 1).float().mean().item()
    assert 0.5 <= share < 0.5 + 0.04 + 0.05  # plus the random rows that happen to start at a BOS (~3.4%)
    assert torch.equal(torch.cat([data.windows(2, 0, 2000, 16, 0, 700, documents=0.5),
                                  data.windows(2, 0, 2000, 16, 700, documents=0.5)]), big)


def test_document_rows_need_documents(stream_dir):
    d, _ = stream_dir  # no BOS id in its meta
    with pytest.raises(TinylmError, match="document_rows"):
        TokenData.open(d).windows(0, 0, 4, 8, documents=0.5)
    assert TokenData.open(d).windows(0, 0, 4, 8, documents=0.0).shape == (4, 9)


def test_eval_windows_cover_stream_once(stream_dir):
    d, stream = stream_dir
    ws = list(TokenData.open(d).eval_windows(100))
    assert len(ws) == (len(stream) - 1) // 100
    targets = np.concatenate([w[1:].numpy() for w in ws])
    np.testing.assert_array_equal(targets, stream[1:1 + len(targets)])
    assert len(list(TokenData.open(d).eval_windows(100, max_windows=3))) == 3


def test_loader_errors(stream_dir, tmp_path):
    d, _ = stream_dir
    with pytest.raises(TinylmError):
        TokenData.open(d).windows(0, 0, 2, 10_000)
    with pytest.raises(TinylmError):
        TokenData.open(d, split="val").windows(0, 0, 2, 8)
    with pytest.raises(TinylmError):
        read_meta(tmp_path / "nothing")
    (d / "train_0001.bin").write_bytes(b"\0")
    with pytest.raises(TinylmError):
        TokenData.open(d)


# ----- prepare ------------------------------------------------------------------------------------------

import random  # noqa: E402
import sys  # noqa: E402

from tinylm.cli import main  # noqa: E402
from tinylm.core.errors import TinylmError
from tinylm.data.dedup import NearDedup
from tinylm.data.prepare import PrepareConfig, prepare
from tinylm.data.sources import clean_text
from tinylm.data.tokenizer import Tokenizer, train_tokenizer

WORDS = ["the", "cat", "sat", "on", "a", "mat", "Lily", "Tom", "happy", "tree", "ran", "park", "über", "café",
         "said", "played", "with", "ball", "sun", "big", "red", "dog", "jumped", "over", "fence"]


def _docs(n: int, seed: int = 0, words: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(_docs(300), vocab_size=320).save(d)
    return d


def _write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def _stream_docs(out: Path, split: str, tok: Tokenizer) -> list[str]:
    """The documents of a split, decoded back from its shards (BOS ... EOS each)."""
    meta = read_meta(out)
    ids = np.concatenate([np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]]
                         or [np.zeros(0, dtype=meta["dtype"])]).tolist()
    docs, cur = [], []
    for i in ids:
        if i == tok.bos_id:
            cur = []
        elif i == tok.eos_id:
            docs.append(tok.decode(cur))
        else:
            cur.append(i)
    return docs


def test_prepare_meta_matches_shards_and_documents(tmp_path, tok_dir):
    docs = _docs(400, seed=1)
    txt = _write_txt(tmp_path / "a.txt", docs[:250])
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[250:]))
    meta = prepare(PrepareConfig([str(txt), str(jsonl)], str(tok_dir), str(tmp_path / "out"), text_field="body",
                                 val_fraction=0.2, shard_tokens=2000, near_dedup_threshold=0))
    out, tok = tmp_path / "out", Tokenizer.load(tmp_path / "out" / "tokenizer")
    assert meta == read_meta(out) and meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size
    total_docs = 0
    for split, info in meta["splits"].items():
        shards = info["shards"]
        assert sum(s["tokens"] for s in shards) == info["tokens"] == TokenData.open(out, split).n_tokens
        assert sum(s["documents"] for s in shards) == info["documents"]
        for s in shards:
            assert (out / s["file"]).stat().st_size == 2 * s["tokens"]
        decoded = _stream_docs(out, split, tok)
        assert len(decoded) == info["documents"]
        assert info["bytes"] == sum(len(d.encode()) for d in decoded)
        total_docs += info["documents"]
    assert len(meta["splits"]["train"]["shards"]) > 1  # shard_tokens cut the stream
    train, val = _stream_docs(out, "train", tok), _stream_docs(out, "val", tok)
    assert sorted(train + val) == sorted(set(docs)) and total_docs == len(set(docs))
    assert 0.1 < len(val) / total_docs < 0.3


def test_prepare_is_deterministic_and_split_is_by_document(tmp_path, tok_dir):
    docs = _docs(300, seed=2)
    txt = _write_txt(tmp_path / "a.txt", docs)
    cfg = dict(tokenizer=str(tok_dir), val_fraction=0.3, seed=4)
    prepare(PrepareConfig([str(txt)], out=str(tmp_path / "o1"), **cfg))
    prepare(PrepareConfig([str(txt)], out=str(tmp_path / "o2"), **cfg))
    files = sorted(p.name for p in (tmp_path / "o1").glob("*.bin"))
    assert files and files == sorted(p.name for p in (tmp_path / "o2").glob("*.bin"))
    for name in files + ["meta.json"]:
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes()
    tok = Tokenizer.load(tok_dir)
    train, val = set(_stream_docs(tmp_path / "o1", "train", tok)), set(_stream_docs(tmp_path / "o1", "val", tok))
    assert val and not train & val
    # the same document lands in the same split whatever else is in the corpus
    _write_txt(tmp_path / "b.txt", list(reversed(docs)) + _docs(50, seed=99))
    prepare(PrepareConfig([str(tmp_path / "b.txt")], out=str(tmp_path / "o3"), **cfg))
    assert val <= set(_stream_docs(tmp_path / "o3", "val", tok))


def test_clean_text():
    assert clean_text("  Cafe\u0301\r\nline\rtwo\x00\x1b[0m\tend\x7f\u200b  ") == "Café\nline\ntwo[0m\tend\u200b"


def test_filters_and_near_dedup(tmp_path, tok_dir):
    base = _docs(60, seed=3, words=200)
    rng = random.Random(5)
    near = []
    for d in base[:20]:  # one word in 200 changed: word 5-gram Jaccard ~ 0.95, found with p ~ 0.98
        w = d.split()
        w[rng.randrange(len(w))] = "zebra"
        near.append(" ".join(w))
    docs = base + near + [base[0], base[1] + "\n", "short", "x" * 5000, "   "]
    _write_txt(tmp_path / "a.txt", docs)
    meta = prepare(PrepareConfig([str(tmp_path / "a.txt")], str(tok_dir), str(tmp_path / "out"),
                                 min_chars=10, max_chars=4000, val_fraction=0))
    f = meta["filters"]
    assert (f["exact_dup"], f["min_chars"], f["max_chars"]) == (2, 1, 1)
    # LSH is probabilistic; distinct documents (few shared 5-grams) are never dropped
    assert 18 <= f["near_dup"] <= 20 and meta["splits"]["train"]["documents"] == 60 + 20 - f["near_dup"]
    meta = prepare(PrepareConfig([str(tmp_path / "a.txt")], str(tok_dir), str(tmp_path / "out2"), dedup=False,
                                 val_fraction=0))
    assert meta["splits"]["train"]["documents"] == len(docs) - 1  # only the blank one (not a document)


def test_minhash_signatures_equal_datasketch():
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    nd = NearDedup(0.7)
    texts = _docs(40, seed=6, words=25) + ["one two", "a b c d e f"]
    shingles, starts = nd.shingle_hashes(texts)
    sig = nd.signatures(texts)
    ends = list(starts[1:]) + [len(shingles)]
    for i in range(len(texts)):
        m = MinHash(num_perm=nd.num_perm, seed=1, scheme="affine32", hashfunc=int)
        m.update_batch([int(x) for x in shingles[starts[i]:ends[i]]])
        assert np.array_equal(m.hashvalues, sig[i])
    # duplicate decisions equal MinHashLSH query-then-insert on the same signatures
    docs = texts + [t.replace("cat", "dog", 1) for t in texts[:20]]
    ours = NearDedup(0.7).duplicates(docs)
    lsh, theirs = MinHashLSH(threshold=0.7, num_perm=nd.num_perm), []
    for i, s in enumerate(NearDedup(0.7).signatures(docs)):
        m = LeanMinHash(seed=1, hashvalues=s, scheme="affine32")
        theirs.append(bool(lsh.query(m)))
        if not theirs[-1]:
            lsh.insert(i, m)
    assert ours == theirs and any(ours) and not all(ours)


def test_parquet_and_saved_dataset_inputs(tmp_path, tok_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = _docs(30, seed=7)
    pq.write_table(pa.table({"text": docs[:15], "n": list(range(15))}), tmp_path / "a.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs[15:]}).save_to_disk(str(tmp_path / "hf"))
    meta = prepare(PrepareConfig([str(tmp_path / "a.parquet"), str(tmp_path / "hf")], str(tok_dir),
                                 str(tmp_path / "out"), val_fraction=0, near_dedup_threshold=0))
    assert meta["splits"]["train"]["documents"] == len(set(docs))


def test_hub_dataset_loads_without_running_remote_code(tmp_path, monkeypatch):
    # The hub is replaced by a local dir (datasets reads it as JSON Lines); the real load_dataset runs.
    datasets = pytest.importorskip("datasets")
    from tinylm.data import sources

    docs = _docs(5, seed=8)
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    real, calls = datasets.load_dataset, []

    def load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return real(str(tmp_path / "repo"), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(sources, "_hub_reachable", lambda: True)
    assert list(sources.iter_texts(["someone/stories"])) == [clean_text(d) for d in docs]
    assert [(name, kwargs.get("trust_remote_code")) for name, kwargs in calls] == [("someone/stories", False)]


def test_tinytales_input(tmp_path, tok_dir):
    from tinylm.data import tinytales

    meta = prepare(PrepareConfig(["tinytales:50"], str(tok_dir), str(tmp_path / "out"), seed=3, val_fraction=0,
                                 dedup=False))
    assert meta["splits"]["train"]["documents"] == 50
    tok = Tokenizer.load(tok_dir)
    assert _stream_docs(tmp_path / "out", "train", tok) == [clean_text(s) for s in tinytales.generate(50, 3)]


# ----- bad input: one-line error, exit 2, nothing left behind --------------------------------------------

def _big_vocab_tokenizer(d: Path) -> Path:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from tinylm.data.tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode())}
    vocab.update({f"tok{i}": 256 + i for i in range(70_000 - 256)})
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    Tokenizer(backend).save(d)
    return d


def _run_cli(args: list[str], out: Path, capsys) -> str:
    code = main(["data", "prepare", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("tinylm: error: ") and err.count("\n") == 1, err
    assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())  # no temporary left
    return err


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, tok_dir, capsys):
    out = tmp_path / "out"
    tok = ["--tokenizer", str(tok_dir)]
    good = _write_txt(tmp_path / "good.txt", _docs(5))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "binary.bin").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" * 10)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    assert "no documents" in _run_cli([str(tmp_path / "empty.txt"), *tok], out, capsys)
    assert "no such file" in _run_cli([str(tmp_path / "missing.txt"), *tok], out, capsys)
    assert "binary" in _run_cli([str(tmp_path / "binary.bin"), str(tmp_path / "latin1.txt"), *tok], out, capsys)
    assert "nofield.jsonl:2" in _run_cli([str(tmp_path / "nofield.jsonl"), *tok], out, capsys)
    big = _big_vocab_tokenizer(tmp_path / "bigtok")
    assert "uint16" in _run_cli([str(good), "--tokenizer", str(big), "--dtype", "uint16"], out, capsys)
    assert "tokenizer" in _run_cli([str(good), "--tokenizer", str(tmp_path)], out, capsys)
    assert not out.exists()
    # binary / non-UTF-8 files are skipped and counted when other input remains
    assert main(["data", "prepare", str(good), str(tmp_path / "binary.bin"), str(tmp_path / "latin1.txt"), *tok,
                 "--out", str(out)]) == 0
    assert len(read_meta(out)["skipped_files"]) == 2
    before = (out / "meta.json").read_bytes()
    assert "already exists" in _run_cli([str(good), *tok], out, capsys)
    assert (out / "meta.json").read_bytes() == before  # untouched
    assert main(["data", "prepare", str(good), *tok, "--out", str(out), "--overwrite", "--dtype", "uint32"]) == 0
    assert read_meta(out)["dtype"] == "uint32"
    # the big vocabulary is fine in uint32 (auto)
    meta = prepare(PrepareConfig([str(good)], str(big), str(tmp_path / "big_out")))
    assert meta["dtype"] == "uint32"


def test_missing_data_extra_is_a_one_line_error(tmp_path, tok_dir, capsys, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "state.json").write_text("{}")
    for module in ("pyarrow", "pyarrow.parquet", "datasets"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it raises ImportError
    tok = ["--tokenizer", str(tok_dir)]
    for source in (tmp_path / "a.parquet", tmp_path / "hf"):
        err = _run_cli([str(source), *tok], tmp_path / "out", capsys)
        assert f"{source}: reading it needs" in err and "pip install 'tinylm[data]'" in err, err
    assert not (tmp_path / "out").exists()


def test_directory_input_is_recursive_and_sorted(tmp_path, tok_dir):
    docs = _docs(6, seed=8)
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    _write_txt(tmp_path / "corpus" / "b.txt", docs[2:4])
    _write_txt(tmp_path / "corpus" / "a.txt", docs[:2])
    _write_txt(tmp_path / "corpus" / "sub" / "c.txt", docs[4:])
    prepare(PrepareConfig([str(tmp_path / "corpus")], str(tok_dir), str(tmp_path / "out"), val_fraction=0, dedup=False))
    assert _stream_docs(tmp_path / "out", "train", Tokenizer.load(tok_dir)) == docs
