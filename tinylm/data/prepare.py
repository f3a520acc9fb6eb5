"""Corpus ingestion into memmap-able token shards, and the batch loader that training reads them with.

A data dir holds:

    DIR/meta.json               {"format": "tinylm-tokens-v1", "dtype", "vocab_size", "splits", ...}; each
                                split records its shards and its largest token id (max_token_id)
    DIR/{split}_{k:04d}.bin     raw little-endian token arrays (uint16 or uint32), no header
    DIR/tokenizer/              the tokenizer that produced the ids (Tokenizer.save)

Every document is stored as BOS + ids + EOS (when the tokenizer has them), so the concatenation of a
split's shards is one token stream in which documents stay separated.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from tinylm.core.errors import TinylmError
from tinylm.core.fs import atomic_dir, check_out
from tinylm.core.recipe import Check, Count, Fraction, Interval, Seed, one_of, validate
from tinylm.data.dedup import NearDedup, _hash64
from tinylm.data.sources import clean_text, read_documents, resolve_inputs
from tinylm.data.tokenizer import Tokenizer
from tinylm.data.tokens import FORMAT

# ----- prepare: documents -> token shards --------------------------------------------------------------

@dataclass
class PrepareConfig:
    """What `tinylm data prepare` does: clean, dedup, split and tokenise a corpus into token shards."""

    # .txt (blank-line separated documents), .jsonl, .parquet, dirs of these, a datasets.save_to_disk dir,
    # tinytales:<n>, or a hub dataset name
    inputs: list[str]
    tokenizer: str  # a dir with tokenizer.json, or any model source (.gguf, checkpoint dir, alias)
    out: str  # the data dir to write (atomically)
    text_field: str = "text"  # JSON field / column holding the text
    val_fraction: Annotated[float, Check(ge=0, lt=1)] = 0.01  # share of documents that go to the val split (by a hash of text and seed)
    seed: Seed = 0  # split seed (and seed of generated corpora)
    min_chars: Interval = 1  # drop documents shorter than this (characters, after cleaning)
    max_chars: Count | None = None  # drop documents longer than this (none: no limit)
    dedup: bool = True  # drop exact duplicates and (near_dedup_threshold > 0) MinHash near-duplicates
    near_dedup_threshold: Fraction = 0.8  # drop above this MinHash Jaccard similarity of word 5-grams (0: no near-dedup)
    near_dedup_window: Count = 250_000  # documents the near-dedup index holds (bounds its ~400 bytes per document)
    workers: Count | None = None  # threads of the Rust tokenizer (RAYON_NUM_THREADS); none: all cores
    shard_tokens: Count = 100_000_000  # a shard is closed after the document that takes it to this many tokens
    dtype: one_of("auto", "uint16", "uint32") = "auto"  # auto (uint16 when the vocabulary fits, else uint32), uint16 or uint32
    overwrite: bool = False  # replace an existing out
    batch_docs: Count = 1000  # documents per tokenizer batch
    progress: bool | None = None  # a tqdm bar of documents read on stderr (none: when stderr is a terminal)


def _progress(cfg: PrepareConfig) -> bool:
    return sys.stderr.isatty() if cfg.progress is None else cfg.progress


def load_tokenizer_source(source: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a dir holding tokenizer.json (or a data dir's tokenizer/), else from a model
    source via tinylm.checkpoint.

    Args:
        source: tokenizer dir, data dir, checkpoint dir, .gguf file or alias.
    """
    for d in (Path(source), Path(source) / "tokenizer"):
        if (d / "tokenizer.json").is_file():
            return Tokenizer.load(d)
    try:
        from tinylm.formats.checkpoint import load_tokenizer
    except ImportError:
        raise TinylmError(f"{source}: not a tokenizer dir (no tokenizer.json)") from None
    return load_tokenizer(source)


def _token_dtype(dtype: str, vocab_size: int) -> str:
    if dtype == "auto":
        return "uint16" if vocab_size <= 2**16 else "uint32"
    if dtype not in ("uint16", "uint32"):
        raise TinylmError(f"--dtype must be auto, uint16 or uint32, got {dtype!r}")
    if dtype == "uint16" and vocab_size > 2**16:
        raise TinylmError(f"a vocabulary of {vocab_size} tokens does not fit in uint16; use --dtype uint32")
    return dtype


class _SplitWriter:
    """Appends documents' tokens to DIR/{split}_{k:04d}.bin shards; a shard closes after the document
    that takes it to `shard_tokens` tokens, so no document is cut across shards."""

    def __init__(self, directory: Path, split: str, dtype: str, shard_tokens: int) -> None:
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shards: list[dict[str, Any]] = []
        self.documents = self.tokens = self.bytes = 0
        self.max_token_id: int | None = None  # recorded in meta.json: readers check it against a model's vocabulary
        self._file: Any = None

    def write(self, tokens: np.ndarray, doc_lengths: np.ndarray, n_bytes: int) -> None:
        """Append documents: `tokens` is their concatenation, `doc_lengths` (n_docs,) their token counts."""
        self.documents += len(doc_lengths)
        self.tokens += len(tokens)
        self.bytes += n_bytes
        if len(tokens):
            self.max_token_id = max(int(tokens.max()), self.max_token_id or 0)
        ends = np.cumsum(doc_lengths)
        done = 0  # documents written so far
        while done < len(doc_lengths):
            if self._file is None:
                name = f"{self.split}_{len(self.shards):04d}.bin"
                self._file = open(self.directory / name, "wb")
                self.shards.append({"file": name, "tokens": 0, "documents": 0})
            shard = self.shards[-1]
            base = ends[done - 1] if done else 0
            # the first document after `done` at which this shard reaches shard_tokens, or the last one
            last = int(np.searchsorted(ends, base + self.shard_tokens - shard["tokens"], side="left"))
            last = min(last, len(doc_lengths) - 1)
            self._file.write(tokens[base:ends[last]].astype(self.dtype, copy=False).tobytes())
            shard["tokens"] += int(ends[last] - base)
            shard["documents"] += last + 1 - done
            done = last + 1
            if shard["tokens"] >= self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def info(self) -> dict[str, Any]:
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes,
                "max_token_id": self.max_token_id, "shards": self.shards}


class _Filters:
    """Length filters and dedup, with a count of what each removed."""

    def __init__(self, cfg: PrepareConfig) -> None:
        self.cfg = cfg
        self.removed = {"empty": 0, "min_chars": 0, "max_chars": 0, "exact_dup": 0, "near_dup": 0}
        self._seen: set[int] = set()  # exact dedup: ~80 bytes per kept document (an int in a set)
        self.near = (NearDedup(cfg.near_dedup_threshold, window=cfg.near_dedup_window)
                     if cfg.dedup and cfg.near_dedup_threshold > 0 else None)

    def keep(self, text: str) -> bool:
        """Length and exact-duplicate checks of one cleaned document."""
        reason = ("empty" if not text else "min_chars" if len(text) < self.cfg.min_chars else
                  "max_chars" if self.cfg.max_chars is not None and len(text) > self.cfg.max_chars else None)
        if reason is None and self.cfg.dedup:
            h = _hash64(text.encode("utf-8"))
            reason = "exact_dup" if h in self._seen else None
            self._seen.add(h)
        if reason:
            self.removed[reason] += 1
        return reason is None

    def drop_near_duplicates(self, texts: list[str]) -> list[str]:
        """The documents of a batch that are not near-duplicates of an earlier kept one."""
        if self.near is None or not texts:
            return texts
        kept = [t for t, dup in zip(texts, self.near.duplicates(texts)) if not dup]
        self.removed["near_dup"] += len(texts) - len(kept)
        return kept


def _split_of(text: str, seed: int, val_fraction: float) -> str:
    """"val" for a deterministic `val_fraction` of documents: a hash of the text keyed by the seed."""
    u = _hash64(text.encode("utf-8"), key=seed.to_bytes(8, "little", signed=True)) / 2**64
    return "val" if u < val_fraction else "train"


def _encode_documents(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """BOS + ids + EOS of each document, concatenated (int64), and each document's length (n_docs,)."""
    bos = [tok.bos_id] if tok.bos_id is not None else []
    eos = [tok.eos_id] if tok.eos_id is not None else []
    ids = tok.encode_batch(texts)  # parallel in the Rust backend
    lengths = np.fromiter((len(x) + len(bos) + len(eos) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(bos, x, eos) for x in ids),
                       dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


class _BackgroundWriter:
    """Tokenises and writes batches on one background thread while the main thread reads, cleans and
    dedups the next batch (encode_batch releases the GIL). Batches are written in submission order, so
    the shards do not depend on timing; at most two batches are in flight, so memory stays bounded."""

    def __init__(self, tok: Tokenizer, writers: dict[str, _SplitWriter]) -> None:
        self.tok, self.writers = tok, writers
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: deque[Future] = deque()

    def submit(self, parts: dict[str, list[str]]) -> None:
        """Queue one batch: documents per split."""
        while len(self._pending) >= 2:
            self._pending.popleft().result()  # re-raises the worker's exception here
        self._pending.append(self._pool.submit(self._write, parts))

    def _write(self, parts: dict[str, list[str]]) -> None:
        for split, texts in parts.items():
            if texts:
                tokens, lengths = _encode_documents(self.tok, texts)
                self.writers[split].write(tokens, lengths, sum(len(t.encode("utf-8")) for t in texts))

    def __enter__(self) -> "_BackgroundWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            while self._pending and exc[0] is None:  # after an error or a signal, queued batches are dropped
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            for w in self.writers.values():
                w.close()


def _split_batch(texts: list[str], filters: _Filters, cfg: PrepareConfig) -> dict[str, list[str]]:
    """Near-dedup a batch, then assign each document to its split."""
    parts: dict[str, list[str]] = {"train": [], "val": []}
    for text in filters.drop_near_duplicates(texts):
        parts[_split_of(text, cfg.seed, cfg.val_fraction)].append(text)
    return parts


def _check_config(cfg: PrepareConfig) -> None:
    validate(cfg)  # the declared ranges, also for a config built in Python (quickstart builds one)
    if cfg.workers is not None:
        # read by the Rust thread pool when it first starts (i.e. before the first encode_batch)
        os.environ["RAYON_NUM_THREADS"] = str(cfg.workers)
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if cfg.workers > 1 else "false"


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Read, clean, filter, dedup, split and tokenise a corpus into a data dir, streaming.

    Memory stays bounded whatever the corpus size: one batch of documents at a time, plus the exact-dedup
    set (~80 bytes per kept document) and the near-dedup index (~400 bytes per document, at most
    `near_dedup_window` documents). The output appears atomically: a temporary sibling dir is renamed
    to `cfg.out` at the end, and removed on any error.

    Args:
        cfg: the PrepareConfig.

    Returns:
        the meta dict written to meta.json.
    """
    from tqdm import tqdm


    _check_config(cfg)
    check_out(cfg.out, cfg.overwrite)
    tok = load_tokenizer_source(cfg.tokenizer)
    dtype = _token_dtype(cfg.dtype, tok.vocab_size)
    sources = resolve_inputs(cfg.inputs)
    filters, skipped = _Filters(cfg), []
    with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
        tok.save(tmp / "tokenizer")
        writers = {s: _SplitWriter(tmp, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
        with _BackgroundWriter(tok, writers) as background:
            batch: list[str] = []
            docs = read_documents(sources, cfg.text_field, cfg.seed, skipped)
            for raw in tqdm(docs, unit=" docs", mininterval=2, disable=not _progress(cfg), desc="prepare"):
                text = clean_text(raw)
                if filters.keep(text):
                    batch.append(text)
                if len(batch) >= cfg.batch_docs:
                    background.submit(_split_batch(batch, filters, cfg))
                    batch = []
            background.submit(_split_batch(batch, filters, cfg))
        if writers["train"].documents + writers["val"].documents == 0:
            raise TinylmError(f"no documents left in {', '.join(cfg.inputs)}" +
                              (f" ({len(skipped)} binary or non-UTF-8 files skipped)" if skipped else ""))
        meta = {"format": FORMAT, "dtype": dtype, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                "eos_id": tok.eos_id, "tokenizer_sha256": _sha256(tmp / "tokenizer" / "tokenizer.json"),
                "seed": cfg.seed, "val_fraction": cfg.val_fraction, "sources": list(cfg.inputs),
                "filters": filters.removed, "skipped_files": skipped,
                "splits": {s: w.info() for s, w in writers.items()}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return meta


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
