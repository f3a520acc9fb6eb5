"""Corpus ingestion into memmap-able token shards, and the batch loader that training reads them with.

A data dir holds:

    DIR/meta.json               {"format": "tinylm-tokens-v1", "dtype", "vocab_size", "splits", ...}
    DIR/{split}_{k:04d}.bin     raw little-endian token arrays (uint16 or uint32), no header
    DIR/tokenizer/              the tokenizer that produced the ids (Tokenizer.save)

Every document is stored as BOS + ids + EOS (when the tokenizer has them), so the concatenation of a
split's shards is one token stream in which documents stay separated.
"""

from __future__ import annotations

import codecs
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
import hashlib
import itertools
import json
import os
import re
import socket
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tinylm.config import TinylmError, atomic_dir
from tinylm.tokenizer import Tokenizer, _read_json, tokenizer_stats, train_tokenizer, trim_tokenizer

FORMAT = "tinylm-tokens-v1"


# ----- reading: the batch loader ---------------------------------------------------------------------

def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed meta.json of a data dir written by `prepare`.

    Args:
        directory: the data dir.
    """
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise TinylmError(f"{directory} is not a tinylm data dir (no meta.json); make one with `tinylm data prepare`")
    meta = _read_json(path)
    if meta.get("format") != FORMAT:
        raise TinylmError(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT!r})")
    return meta


class TokenData:
    """One split of a data dir as a single token stream, memory-mapped (nothing is copied into RAM).

    Batches are a pure function of (seed, step, global_batch, seq_len), so one process and N DDP ranks
    (each reading its own slice of the global batch) see the same tokens, and a resumed run sees the
    batches it would have seen.
    """

    def __init__(self, meta: dict[str, Any], shards: list[np.ndarray], split: str) -> None:
        self.meta = meta
        self.split = split
        self.shards = shards
        info = meta["splits"][split]
        self.n_tokens = int(sum(len(s) for s in shards))
        self.n_bytes = int(info["bytes"])
        self.vocab_size = int(meta["vocab_size"])
        # starts[k] = position of shard k's first token in the concatenated stream; starts[-1] = n_tokens
        self._starts = np.cumsum([0] + [len(s) for s in shards])

    @classmethod
    def open(cls, directory: str | os.PathLike, split: str = "train") -> "TokenData":
        """Memory-map the shards of `split` in a data dir.

        Args:
            directory: a data dir written by `prepare`.
            split: "train" or "val".
        """
        d = Path(directory)
        meta = read_meta(d)
        if split not in meta["splits"]:
            raise TinylmError(f"{d}: no split {split!r} (has {', '.join(meta['splits'])})")
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        shards = []
        for shard in meta["splits"][split]["shards"]:
            path = d / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise TinylmError(f"{path}: missing or not {shard['tokens']} tokens long; prepare the data again")
            if shard["tokens"]:  # np.memmap refuses empty files
                shards.append(np.memmap(path, dtype=dtype, mode="r"))
        return cls(meta, shards, split)

    def _read(self, pos: int, length: int) -> np.ndarray:
        """Tokens [pos, pos + length) of the concatenated stream; a window may span shards."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        k = int(np.searchsorted(self._starts, pos, side="right")) - 1
        while filled < length:
            local = pos + filled - int(self._starts[k])
            piece = self.shards[k][local:local + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            k += 1
        return out

    def _check_len(self, seq_len: int) -> int:
        span = self.n_tokens - seq_len - 1  # number of valid window starts
        if seq_len < 1 or span < 1:
            raise TinylmError(f"the {self.split} split has {self.n_tokens} tokens, too few for windows of "
                              f"seq_len {seq_len}; use more data or a shorter --seq-len")
        return span

    def offsets(self, step: int, seed: int, global_batch: int, seq_len: int,
                sequential: bool = False) -> np.ndarray:
        """Start positions (global_batch,) of the windows of step `step`'s global batch."""
        span = self._check_len(seq_len)
        if sequential:
            i = np.arange(global_batch, dtype=np.int64)
            return ((step * global_batch + i) * seq_len) % span
        return np.random.default_rng([seed, step]).integers(0, span, global_batch)

    def windows(self, step: int, seed: int, global_batch: int, seq_len: int, start: int = 0,
                count: int | None = None, sequential: bool = False) -> torch.Tensor:
        """Windows [start, start + count) of the global batch of step `step`, as (count, seq_len + 1) int64.

        Inputs are `w[:, :-1]`, targets `w[:, 1:]`. DDP rank r with micro-batch b of grad-accum
        micro-step m reads its own slice (start = (m * world + r) * b, count = b, or any fixed layout),
        so every layout reads the same global batch.

        Args:
            step: optimizer step; the batch depends only on (seed, step, global_batch, seq_len).
            seed: data seed.
            global_batch: windows per step over all ranks and micro-steps.
            seq_len: tokens per input row; a window holds seq_len + 1 tokens.
            start, count: the slice of the global batch to return (count None: to the end).
            sequential: consecutive windows through the stream instead of uniformly random ones;
                window i of step s starts at ((s * global_batch + i) * seq_len) mod (n_tokens - seq_len - 1).
        """
        count = global_batch - start if count is None else count
        if start < 0 or count < 0 or start + count > global_batch:
            raise TinylmError(f"windows [{start}, {start + count}) are outside a global batch of {global_batch}")
        offs = self.offsets(step, seed, global_batch, seq_len, sequential)[start:start + count]
        out = np.stack([self._read(int(o), seq_len + 1) for o in offs]) if count else np.empty((0, seq_len + 1))
        return torch.from_numpy(out.astype(np.int64, copy=False))

    def eval_windows(self, seq_len: int, max_windows: int | None = None) -> Iterator[torch.Tensor]:
        """Non-overlapping consecutive (seq_len + 1,) windows from the start of the stream (stride seq_len).

        Window j covers tokens [j * seq_len, j * seq_len + seq_len + 1), so every token after the first
        is predicted exactly once.

        Args:
            seq_len: tokens per input row.
            max_windows: stop after this many windows (None: the whole split).
        """
        self._check_len(seq_len)
        n = (self.n_tokens - 1) // seq_len
        if max_windows is not None:
            n = min(n, max_windows)
        for j in range(n):
            yield torch.from_numpy(self._read(j * seq_len, seq_len + 1))


# ----- reading documents -------------------------------------------------------------------------------
# Input kinds: .txt (documents separated by blank lines: a line that is empty or only whitespace ends a
# document; TinyTales writes stories this way), .jsonl/.ndjson/.json (one JSON object per line, the
# text in a field), .parquet (a text column), directories of these (recursive, sorted; any other file
# is read as text), a `datasets.save_to_disk` dir, `tinytales:<n>` and, online, a hub dataset name.

_JSONL = (".jsonl", ".ndjson", ".json")  # HF writes JSON Lines as .json too
_HF_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
_HUB_NAME = re.compile(r"(hf:)?[A-Za-z0-9][\w.-]*/[\w.-]+")
# Cc characters other than \t and \n (\r is turned into \n first): C0 controls, DEL, C1 controls.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass
class Source:
    """One input: kind is "txt", "jsonl", "parquet", "hf_disk", "hub" or "tinytales"; name is its path
    or spec as the user wrote it."""

    kind: str
    name: str


def _file_source(path: Path) -> Source:
    suffix = path.suffix.lower()
    kind = "jsonl" if suffix in _JSONL else "parquet" if suffix == ".parquet" else "txt"
    return Source(kind, str(path))


def resolve_inputs(inputs: list[str]) -> list[Source]:
    """Expand the user's inputs into sources, in order; a missing path is a one-line error.

    Args:
        inputs: paths, dirs, `tinytales:<n>` or hub dataset names.
    """
    if not inputs:
        raise TinylmError("no inputs given")
    sources = []
    for spec in inputs:
        path = Path(spec)
        if spec.startswith("tinytales:"):
            sources.append(Source("tinytales", spec))
        elif path.is_dir() and any((path / m).is_file() for m in _HF_DISK_MARKERS):
            sources.append(Source("hf_disk", spec))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(path).parts))
            sources.extend(_file_source(p) for p in files)
        elif path.exists():
            sources.append(_file_source(path))
        elif _HUB_NAME.fullmatch(spec) and path.suffix.lower() not in (".txt", ".parquet", *_JSONL):
            sources.append(Source("hub", spec.removeprefix("hf:")))
        else:
            raise TinylmError(f"no such file or directory: {spec}")
    if not sources:
        raise TinylmError(f"no input files in {', '.join(inputs)}")
    return sources


def _is_utf8_text(path: Path) -> bool:
    """True when the file decodes as UTF-8 and has no NUL byte in its first 8 KiB (a binary file)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            head = f.read(8192)
            if b"\0" in head:
                return False
            decoder.decode(head)
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    except OSError as e:
        raise TinylmError(f"cannot read {path}: {e.strerror}") from None
    return True


def _read_txt(path: str) -> Iterator[str]:
    lines: list[str] = []
    # utf-8-sig drops a byte-order mark; universal newlines turn \r\n and \r into \n
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines)
                lines = []
    if lines:
        yield "".join(lines)


def _read_jsonl(path: str, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TinylmError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise TinylmError(f"{path}:{lineno}: no field {field!r} (choose one with --text-field)")
            if not isinstance(record[field], str):
                raise TinylmError(f"{path}:{lineno}: field {field!r} is not a string")
            yield record[field]


def _read_parquet(path: str, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for corrupt files
        raise TinylmError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    if field not in pf.schema_arrow.names:
        raise TinylmError(f"{path}: no column {field!r} (has {', '.join(pf.schema_arrow.names)}; use --text-field)")
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _read_datasets(ds: Any, name: str, field: str) -> Iterator[str]:
    """Documents of a `datasets` Dataset / DatasetDict (the "train" split when there is one)."""
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict: pick splits
        parts = [ds["train"]] if "train" in ds else [ds[k] for k in sorted(ds)]
    else:
        parts = [ds]
    for part in parts:
        names = part.column_names or []
        if field not in names:
            raise TinylmError(f"{name}: no column {field!r} (has {', '.join(names)}; use --text-field)")
        for row in part:
            if isinstance(row[field], str):
                yield row[field]


def _hub_reachable() -> bool:
    """False when offline (HF_HUB_OFFLINE set, or huggingface.co does not resolve), to fail in
    milliseconds instead of after datasets' retries."""
    if any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return False
    return True


def _read_hub(name: str, field: str) -> Iterator[str]:
    if not _hub_reachable():
        raise TinylmError(f"{name}: no such file or directory, and the Hugging Face hub is unreachable (offline)")
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
        yield from _read_datasets(ds, name, field)
    except TinylmError:
        raise
    except Exception as e:  # offline, unknown name, gated: datasets raises many types
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise TinylmError(f"{name}: not a file, and loading it from the Hugging Face hub failed "
                          f"(offline? {first})") from None


def _read_tinytales(spec: str, seed: int) -> Iterator[str]:
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        raise TinylmError(f"{spec}: expected tinytales:<number of stories>") from None
    try:
        from tinylm.tinytales import generate
    except ImportError:
        raise TinylmError("tinytales: the TinyTales generator (tinylm.tinytales) is not available") from None
    for story in generate(n, seed):
        yield story["text"] if isinstance(story, dict) else str(story)


def read_documents(sources: list[Source], text_field: str = "text", seed: int = 0,
                   skipped: list[str] | None = None) -> Iterator[str]:
    """Stream the raw documents of `sources` in order, one at a time (memory stays bounded).

    Args:
        sources: from `resolve_inputs`.
        text_field: the JSON field / parquet or datasets column holding the text.
        seed: seed of generated corpora (tinytales).
        skipped: binary or non-UTF-8 files are skipped and appended here (None: they are an error).
    """
    for src in sources:
        if src.kind in ("txt", "jsonl") and not _is_utf8_text(Path(src.name)):
            if skipped is None:
                raise TinylmError(f"{src.name}: binary or not UTF-8 text")
            skipped.append(src.name)
            continue
        if src.kind == "txt":
            yield from _read_txt(src.name)
        elif src.kind == "jsonl":
            yield from _read_jsonl(src.name, text_field)
        elif src.kind == "parquet":
            yield from _read_parquet(src.name, text_field)
        elif src.kind == "hf_disk":
            import datasets

            yield from _read_datasets(datasets.load_from_disk(src.name), src.name, text_field)
        elif src.kind == "hub":
            yield from _read_hub(src.name, text_field)
        else:
            yield from _read_tinytales(src.name, seed)


def clean_text(text: str) -> str:
    """Unicode NFC, \\r\\n and \\r turned into \\n, control characters other than \\n and \\t removed,
    surrounding whitespace stripped."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)  # returns the input at once when already NFC
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    return text.strip()


def iter_texts(inputs: list[str], text_field: str = "text", seed: int = 0) -> Iterator[str]:
    """Cleaned, non-empty documents of the user's inputs (for tokenizer training and statistics).

    Args:
        inputs: as for `prepare`.
        text_field: the JSON field / column holding the text.
        seed: seed of generated corpora.
    """
    skipped: list[str] = []
    n = 0
    for raw in read_documents(resolve_inputs(inputs), text_field, seed, skipped):
        text = clean_text(raw)
        if text:
            n += 1
            yield text
    if n == 0:
        why = " (only binary or non-UTF-8 files)" if skipped else ""
        raise TinylmError(f"no documents in {', '.join(inputs)}{why}")


# ----- dedup ---------------------------------------------------------------------------------------------

def _hash64(data: bytes, key: bytes = b"") -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "little")


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (Appleby), the pre-mix datasketch's "affine32" MinHash applies."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class _WordHashes(dict):
    """word -> 32-bit CRC, memoised (a corpus repeats its words); "" is the padding word, hash 0."""

    def __missing__(self, word: str) -> int:
        if len(self) > 1_000_000:  # bound the cache (~100 MB) on corpora with huge vocabularies
            self.clear()
            self[""] = 0
        h = self[word] = zlib.crc32(word.encode("utf-8"))
        return h


class NearDedup:
    """MinHash near-duplicate filter over word 5-gram shingles, with LSH banding.

    Signatures are datasketch's "affine32" MinHash (fmix32 of each shingle hash, then h -> a*h + b mod
    2^32 with datasketch's own permutations), computed for a whole batch at once in numpy instead of
    datasketch's per-shingle Python loop. The (bands, rows) split is the one datasketch's `MinHashLSH`
    picks for the threshold (minimising false positives + negatives), and a document is a candidate
    duplicate exactly when `MinHashLSH.query` would return an earlier kept document: one band equal.
    The band index is written here (one Python set of 64-bit band hashes per band) because
    `MinHashLSH.insert`/`query` cost ~200 us and ~2 KB per document (datasketch 2.0, measured), which
    would dominate `prepare`; this index costs ~1 us and ~80 bytes per band (5 bands at 64 permutations).

    With 64 permutations datasketch picks 5 bands of 11 rows: a pair of Jaccard similarity s is caught
    with probability 1 - (1 - s^11)^5: 0.99 at s = 0.95, 0.75 at 0.88, 0.36 at 0.8, 0.02 at 0.6.

    Memory: the index is emptied every `window` kept documents (default 250,000, about 100 MB), so
    near-duplicates are caught within such windows; exact duplicates are caught everywhere.

    Args:
        threshold: Jaccard similarity above which a document counts as a near-duplicate.
        num_perm: MinHash permutations.
        window: documents the index holds before it is emptied.
        seed: seed of the MinHash permutations.
    """

    SHINGLE = 5  # word 5-grams, as in Gopher's / RefinedWeb's fuzzy dedup (Rae et al. 2021; Penedo et al. 2023)

    def __init__(self, threshold: float = 0.8, num_perm: int = 64, window: int = 250_000, seed: int = 1) -> None:
        from datasketch import MinHash, MinHashLSH

        self.num_perm, self.window = num_perm, window
        self._a, self._b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.bands, self.rows = lsh.b, lsh.r
        self._buckets: list[set[int]] = [set() for _ in range(self.bands)]
        self._indexed = 0
        self._words = _WordHashes({"": 0})
        rng = np.random.default_rng(seed)
        # multilinear string hashing (Lemire & Kaser 2018): odd random 64-bit keys, arithmetic mod 2^64
        self._keys = rng.integers(1, 2**63, self.SHINGLE, dtype=np.uint64) | np.uint64(1)
        self._band_keys = rng.integers(1, 2**63, self.rows, dtype=np.uint64) | np.uint64(1)

    def shingle_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """32-bit hashes of every document's word 5-grams, concatenated (S,), and each document's first
        index into them (n_docs,). A document of fewer than 5 words is one shingle, padded."""
        words: list[str] = []
        n = np.empty(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            w = text.lower().split()
            n[i] = len(w)
            words.extend(w)
            words.extend(("",) * (self.SHINGLE - 1))  # padding keeps 5-grams inside their document
        w = np.fromiter(map(self._words.__getitem__, words), dtype=np.uint64, count=len(words))
        per_doc = np.maximum(n - (self.SHINGLE - 1), 1)  # (n_docs,) shingles per document
        starts = np.concatenate([[0], np.cumsum(per_doc)[:-1]])
        word_start = np.concatenate([[0], np.cumsum(n + self.SHINGLE - 1)[:-1]])
        pos = np.repeat(word_start - starts, per_doc) + np.arange(per_doc.sum())  # (S,) first word of each
        h = np.zeros(len(pos), dtype=np.uint64)
        for k in range(self.SHINGLE):
            h += w[pos + k] * self._keys[k]  # wraps mod 2^64 on purpose
        return (h >> np.uint64(32)).astype(np.uint32), starts

    def signatures(self, texts: list[str]) -> np.ndarray:
        """MinHash signatures (n_docs, num_perm) uint32 of a batch of documents."""
        shingles, starts = self.shingle_hashes(texts)
        hv = _fmix32(shingles)
        sig = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        for j in range(self.num_perm):  # one permutation at a time keeps temporaries at (S,)
            sig[:, j] = np.minimum.reduceat(hv * self._a[j] + self._b[j], starts)
        return sig

    def band_hashes(self, signatures: np.ndarray) -> np.ndarray:
        """One 64-bit hash per LSH band: (n_docs, num_perm) uint32 -> (n_docs, bands) uint64."""
        n = len(signatures)
        rows = signatures[:, :self.bands * self.rows].astype(np.uint64).reshape(n, self.bands, self.rows)
        return (rows * self._band_keys).sum(axis=2, dtype=np.uint64)  # wraps mod 2^64 on purpose

    def duplicates(self, texts: list[str]) -> list[bool]:
        """Which documents of a batch are near-duplicates of an earlier kept one (in order: a document
        can match one earlier in the same batch); the others are added to the index."""
        if not texts:
            return []
        out = []
        for row in self.band_hashes(self.signatures(texts)).tolist():
            dup = any(h in bucket for h, bucket in zip(row, self._buckets))
            if not dup:
                if self._indexed >= self.window:
                    self._buckets = [set() for _ in range(self.bands)]
                    self._indexed = 0
                for h, bucket in zip(row, self._buckets):
                    bucket.add(h)
                self._indexed += 1
            out.append(dup)
        return out


# ----- prepare: documents -> token shards --------------------------------------------------------------

@dataclass
class PrepareConfig:
    """What `tinylm data prepare` does.

    Args:
        inputs: files, dirs, `tinytales:<n>`, a `datasets.save_to_disk` dir or hub names.
        tokenizer: a dir with tokenizer.json, or any model source (.gguf, checkpoint dir, alias).
        out: the data dir to write (atomically).
        text_field: JSON field / column holding the text.
        val_fraction: share of documents that go to the val split (by a hash of text and seed).
        seed: split seed (and seed of generated corpora).
        min_chars, max_chars: drop documents shorter / longer than this (characters, after cleaning).
        dedup: drop exact duplicates and (near_dedup_threshold > 0) MinHash near-duplicates.
        near_dedup_threshold: Jaccard similarity of word 5-grams above which a document is dropped.
        near_dedup_window: documents the near-dedup index holds (bounds its ~400 bytes per document).
        workers: threads of the Rust tokenizer (RAYON_NUM_THREADS); None: all cores.
        shard_tokens: a shard is closed after the document that takes it to this many tokens.
        dtype: "auto" (uint16 when the vocabulary fits, else uint32), "uint16" or "uint32".
        overwrite: replace an existing `out`.
        batch_docs: documents per tokenizer batch.
        progress: show a tqdm bar of documents read on stderr.
    """

    inputs: list[str]
    tokenizer: str
    out: str
    text_field: str = "text"
    val_fraction: float = 0.01
    seed: int = 0
    min_chars: int = 1
    max_chars: int | None = None
    dedup: bool = True
    near_dedup_threshold: float = 0.8
    near_dedup_window: int = 250_000
    workers: int | None = None
    shard_tokens: int = 100_000_000
    dtype: str = "auto"
    overwrite: bool = False
    batch_docs: int = 1000
    progress: bool = False


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
        from tinylm.checkpoint import load_tokenizer
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
        self._file: Any = None

    def write(self, tokens: np.ndarray, doc_lengths: np.ndarray, n_bytes: int) -> None:
        """Append documents: `tokens` is their concatenation, `doc_lengths` (n_docs,) their token counts."""
        self.documents += len(doc_lengths)
        self.tokens += len(tokens)
        self.bytes += n_bytes
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
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "shards": self.shards}


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
            while self._pending:
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
    if not 0 <= cfg.val_fraction < 1:
        raise TinylmError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.shard_tokens < 1 or cfg.batch_docs < 1:
        raise TinylmError("--shard-tokens must be positive")
    if not 0 <= cfg.near_dedup_threshold <= 1:
        raise TinylmError(f"--near-dedup-threshold must be in [0, 1], got {cfg.near_dedup_threshold}")
    if cfg.workers is not None:
        if cfg.workers < 1:
            raise TinylmError(f"--workers must be positive, got {cfg.workers}")
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
            for raw in tqdm(docs, unit=" docs", mininterval=2, disable=not cfg.progress, desc="prepare"):
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


# ----- tokenizer commands on files (the document reader lives here, so these do too) ----------------------

def train_tokenizer_on(inputs: list[str], vocab_size: int, out: str | os.PathLike, min_frequency: int = 2,
                       text_field: str = "text", overwrite: bool = False) -> Tokenizer:
    """Train a byte-level BPE on the cleaned documents of `inputs` and save it atomically to `out`.

    Args:
        inputs: as for `prepare`.
        vocab_size: final vocabulary size.
        out: tokenizer dir to write (AutoTokenizer.from_pretrained loads it).
        min_frequency: minimum pair count for a merge.
        text_field: JSON field / column holding the text.
        overwrite: replace an existing `out`.
    """

    if Path(out).exists() and not overwrite:
        raise TinylmError(f"{out} already exists (pass --overwrite to replace it)")
    tok = train_tokenizer(iter_texts(inputs, text_field), vocab_size, min_frequency)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        tok.save(tmp)
    return tok


def tokenizer_stats_on(source: str, corpus: list[str], text_field: str = "text") -> dict[str, Any]:
    """`tokenizer_stats` of the tokenizer at `source` on the documents of `corpus`.

    Args:
        source: tokenizer dir or model source.
        corpus: inputs as for `prepare`.
        text_field: JSON field / column holding the text.
    """
    return tokenizer_stats(load_tokenizer_source(source), iter_texts(corpus, text_field))


def trim_tokenizer_on(source: str, corpus: list[str], keep: int, out: str | os.PathLike,
                      text_field: str = "text", overwrite: bool = False) -> tuple[Tokenizer, list[int]]:
    """Trim the tokenizer at `source` to its `keep` most used tokens on `corpus`; write it and
    token_map.json ({"old_vocab_size", "kept": old ids in new-id order}) atomically to `out`.

    Args:
        source: tokenizer dir or model source.
        corpus: inputs as for `prepare`.
        keep: tokens in the new vocabulary (bytes and special tokens included).
        out: tokenizer dir to write.
        text_field: JSON field / column holding the text.
        overwrite: replace an existing `out`.
    """

    if Path(out).exists() and not overwrite:
        raise TinylmError(f"{out} already exists (pass --overwrite to replace it)")
    tok = load_tokenizer_source(source)
    trimmed, kept = trim_tokenizer(tok, iter_texts(corpus, text_field), keep)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        trimmed.save(tmp)
        (tmp / "token_map.json").write_text(json.dumps({"old_vocab_size": tok.vocab_size, "kept": kept}) + "\n")
    return trimmed, kept
