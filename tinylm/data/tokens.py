"""Token shards written by `tinylm data prepare`, the deterministic batch loader over them, and `Batch`,
what every training stage's batch source yields to the one training loop (`train.loop`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from tinylm.core.errors import TinylmError
from tinylm.data.tokenizer import _read_json

FORMAT = "tinylm-tokens-v1"

IGNORE_INDEX = -100  # the label of a target left out of the loss (F.cross_entropy's default ignore_index)


# ----- batches: what a batch source yields to the training loop ----------------------------------------

@dataclass
class Batch:
    """A micro-batch of training rows, and where it sits in the run.

    The loop weights each micro-batch's loss by `weight`, so the loss of a step is the mean over the
    whole global batch (all micro-steps and ranks) of whatever the loss averages: with a mask, the
    unmasked targets, exactly as one large batch would average them.

    Args:
        tokens: (B, T + 1) token ids; inputs tokens[:, :-1], targets tokens[:, 1:].
        index: the global row number of its first row: step * rows per global batch + its first row in
            that batch, so per-row data prepared beforehand (a cached teacher) is addressed by the batch.
        mask: (B, T) bool, True where the target tokens[:, 1:] counts in the loss (None: every target).
        extras: per-row data a loss needs beside the tokens (a preference pair's rejected half, ...).
        weight: what the loss averages over in this micro-batch; default the number of counted targets.
        segments: (B, T + 1) integer example ids of packed rows, aligned with tokens (see
            `model.llama.packed_layout`; -1 marks padding). The mask then also leaves out every target
            whose input is padding or belongs to another example (an example's last token predicting
            the next one's first): set here, once, so every loss and the weight see it.
    """

    tokens: torch.Tensor
    index: int = 0
    mask: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    weight: float | None = None
    segments: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.segments is not None:
            if self.segments.shape != self.tokens.shape:
                raise ValueError(f"segments {tuple(self.segments.shape)} must have the shape of tokens "
                                 f"{tuple(self.tokens.shape)}")
            same = (self.segments[:, 1:] == self.segments[:, :-1]) & (self.segments[:, :-1] >= 0)  # (B, T)
            self.mask = same if self.mask is None else self.mask & same
        if self.weight is None:
            n = self.mask.sum() if self.mask is not None else self.tokens[:, 1:].numel()
            self.weight = float(n)

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]  # (B, T)

    @property
    def targets(self) -> torch.Tensor:
        return self.tokens[:, 1:]  # (B, T)

    @property
    def input_segments(self) -> torch.Tensor | None:
        """(B, T) example ids of the inputs, or None for unpacked rows."""
        return None if self.segments is None else self.segments[:, :-1]

    @property
    def labels(self) -> torch.Tensor:
        """(B, T) targets with IGNORE_INDEX where the mask leaves them out."""
        return self.targets if self.mask is None else self.targets.masked_fill(~self.mask, IGNORE_INDEX)

    def to(self, device: torch.device | str) -> "Batch":
        def move(v: Any) -> Any:
            return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v

        return Batch(move(self.tokens), self.index, move(self.mask), {k: move(v) for k, v in self.extras.items()},
                     self.weight, move(self.segments))


# (step, first row of the global batch, row count) -> the Batch of those rows. A pure function of its
# arguments (and the data and seed it closes over), so DDP ranks, micro-steps and a resumed run read the
# same global batches.
BatchSource = Callable[[int, int, int], Batch]


# ----- reading: the batch loader ---------------------------------------------------------------------

def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed meta.json of a data dir written by `prepare`, every field that readers use checked.

    Args:
        directory: the data dir.
    """
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise TinylmError(f"{directory} is not a tinylm data dir (no meta.json); make one with `tinylm data prepare`")
    meta = _read_json(path)
    if not isinstance(meta, dict):
        raise TinylmError(f"{path}: expected a JSON object")
    if meta.get("format") != FORMAT:
        raise TinylmError(f"{path}: unknown format {meta.get('format')!r} (expected {FORMAT!r})")
    problem = _meta_problem(meta)
    if problem:
        raise TinylmError(f"{path}: {problem}; prepare the data again")
    return meta


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a meta.json's fields (None: nothing)."""
    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"dtype must be uint16 or uint32, got {meta.get('dtype')!r}"
    if not _is_count(meta.get("vocab_size")) or meta["vocab_size"] < 1:
        return f"vocab_size must be a positive integer, got {meta.get('vocab_size')!r}"
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not splits:
        return "splits must be a non-empty object"
    for name, info in splits.items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            return f"splits.{name} must be an object with a list of shards"
        if not _is_count(info.get("bytes", 0)):
            return f"splits.{name}.bytes must be an integer >= 0, got {info.get('bytes')!r}"
        if info.get("max_token_id") is not None and not _is_count(info["max_token_id"]):
            return f"splits.{name}.max_token_id must be an integer >= 0 or null, got {info['max_token_id']!r}"
        for shard in info["shards"]:
            file = shard.get("file") if isinstance(shard, dict) else None
            if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
                return f"splits.{name}: a shard's file must be a file name in the data dir, got {file!r}"
            if not _is_count(shard.get("tokens")):
                return f"splits.{name}: shard {file}'s tokens must be an integer >= 0, got {shard.get('tokens')!r}"
    return None


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
        self.n_bytes = int(info.get("bytes", 0))
        self.vocab_size = int(meta["vocab_size"])
        self.where = "the data"  # named in errors: the data dir's split once opened
        self._max_id: int | None = info.get("max_token_id") if "max_token_id" in info else -1
        # starts[k] = position of shard k's first token in the concatenated stream; starts[-1] = n_tokens
        self._starts = np.cumsum([0] + [len(s) for s in shards])
        self._doc_starts: tuple[int, np.ndarray] | None = None  # (seq_len, document_starts(seq_len))

    def check_vocab(self, model_vocab: int, model: str = "the model") -> None:
        """A one-line error when the data holds ids the model has no embedding for.

        Args:
            model_vocab: the model's vocabulary size.
            model: what to call the model in the error.
        """
        if self.vocab_size > model_vocab:
            raise TinylmError(f"the data's vocabulary ({self.vocab_size}) is larger than {model}'s ({model_vocab}): "
                              f"prepare the data with the model's tokenizer")
        top = self.max_token_id
        if top is not None and top >= model_vocab:
            raise TinylmError(f"{self.where} holds token id {top}, beyond the vocabulary of {model} ({model_vocab} "
                              f"tokens); prepare the data with the model's tokenizer")

    @property
    def max_token_id(self) -> int | None:
        """The largest token id of the split (None: no tokens): meta.json's record (written by `prepare`),
        else computed once over the memory-mapped shards (a data dir from before the record)."""
        if self._max_id == -1:
            tops = [int(s.max()) for s in self.shards if len(s)]
            self._max_id = max(tops) if tops else None
        return self._max_id

    @classmethod
    def from_ids(cls, ids: np.ndarray | torch.Tensor | list[int], vocab_size: int, n_bytes: int = 0,
                 split: str = "train") -> "TokenData":
        """A token stream held in memory (text tokenised on the spot), read as a data dir's split is.

        Args:
            ids: the token ids, in order.
            vocab_size: the tokenizer's vocabulary size.
            n_bytes: UTF-8 bytes of the text the ids encode (for bits per byte).
            split: the split's name.
        """
        array = np.asarray(ids.numpy() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
        return cls({"vocab_size": vocab_size, "splits": {split: {"bytes": n_bytes}}}, [array], split)

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
        data = cls(meta, shards, split)
        data.where = f"{d} ({split} split)"
        return data

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

    def document_starts(self, seq_len: int) -> np.ndarray:
        """Stream positions of every document's first token (its BOS) that a whole window can start at."""
        bos = self.meta.get("bos_id")
        if bos is None:
            raise TinylmError(f"{self.where} marks no documents (its tokenizer has no BOS token): "
                              "data.document_rows needs them; set it to 0")
        span = self._check_len(seq_len)
        if self._doc_starts is None or self._doc_starts[0] != seq_len:  # found once, not at every step
            found = [np.flatnonzero(np.asarray(s) == bos) + int(at) for s, at in zip(self.shards, self._starts)]
            every = np.concatenate(found) if found else np.empty(0, dtype=np.int64)
            self._doc_starts = (seq_len, every[every < span])
        starts = self._doc_starts[1]
        if not len(starts):
            raise TinylmError(f"{self.where}: no document starts early enough for a window of seq_len {seq_len}")
        return starts

    def offsets(self, step: int, seed: int, global_batch: int, seq_len: int,
                sequential: bool = False, documents: float = 0.0) -> np.ndarray:
        """Start positions (global_batch,) of the windows of step `step`'s global batch; with `documents` > 0
        that share of them (each window drawn on its own) at a document's first token."""
        span = self._check_len(seq_len)
        if sequential:
            i = np.arange(global_batch, dtype=np.int64)
            return ((step * global_batch + i) * seq_len) % span
        rng = np.random.default_rng([seed, step])
        offs = rng.integers(0, span, global_batch)  # drawn first: documents 0 reads what it always read
        if documents > 0:
            starts = self.document_starts(seq_len)
            at_start = rng.random(global_batch) < documents
            offs = np.where(at_start, starts[rng.integers(0, len(starts), global_batch)], offs)
        return offs

    def windows(self, step: int, seed: int, global_batch: int, seq_len: int, start: int = 0,
                count: int | None = None, sequential: bool = False, documents: float = 0.0) -> torch.Tensor:
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
        offs = self.offsets(step, seed, global_batch, seq_len, sequential, documents)[start:start + count]
        out = np.stack([self._read(int(o), seq_len + 1) for o in offs]) if count else np.empty((0, seq_len + 1))
        return torch.from_numpy(out.astype(np.int64, copy=False))

    def batches(self, seed: int, global_batch: int, seq_len: int,
                documents: float | Callable[[int], float] = 0.0) -> BatchSource:
        """The batch source of pretraining: random windows of the stream (`windows`), nothing masked.

        Args:
            seed: data seed.
            global_batch: windows per step over all ranks and micro-steps.
            seq_len: tokens per input row.
            documents: the share of each step's windows that start at a document's first token, or a function
                of the step giving it (data.document_rows over the first data.document_rows_tokens).
        """
        def source(step: int, start: int, count: int) -> Batch:
            share = documents(step) if callable(documents) else documents
            tokens = self.windows(step, seed, global_batch, seq_len, start, count, documents=share)
            return Batch(tokens, index=step * global_batch + start)

        return source

    def eval_windows(self, seq_len: int, max_windows: int | None = None,
                     partial: bool = False) -> Iterator[torch.Tensor]:
        """Non-overlapping consecutive (seq_len + 1,) windows from the start of the stream (stride seq_len).

        Window j covers tokens [j * seq_len, j * seq_len + seq_len + 1), so every token after the first
        is predicted exactly once (the last few only with `partial`).

        Args:
            seq_len: tokens per input row.
            max_windows: stop after this many windows (None: the whole split).
            partial: end with a shorter window over the tokens a whole window leaves (a text file is
                scored to its end); without it the stream must hold one whole window.
        """
        if not partial:
            self._check_len(seq_len)
        n = (self.n_tokens - 1) // seq_len
        if partial and (self.n_tokens - 1) % seq_len:
            n += 1
        if max_windows is not None:
            n = min(n, max_windows)
        for j in range(n):
            start = j * seq_len
            yield torch.from_numpy(self._read(start, min(seq_len + 1, self.n_tokens - start)))
