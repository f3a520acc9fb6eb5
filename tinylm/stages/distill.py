"""Knowledge distillation: KD losses, an online teacher, and an offline one read from cached top-K logits.

`distill(cfg)` is `train.loop`'s `fit(setup(cfg), loss)` with another loss step (STYLE.md rule 5, after
torchtune's knowledge_distillation_single_device recipe): batches, schedules, checkpoint/resume, DDP,
logging and plots are the pretraining ones. The loss step closes over a teacher signal, which is either

- online: the teacher model, in eval mode without gradients (fp32 or bf16, on its own device if asked),
  run on each micro-batch; or
- offline: a cache written once by `build_cache` (`tinylm distill cache`) holding, for every window of
  the planned run, the teacher's top-K ids and log-probabilities and the log of the remaining mass.
  The cache holds exactly the windows the run will read (same data, seed, global batch, seq_len and
  steps), addressed by the batch's index (its global row number, step * rows + row), so training from it
  sees the same batches as online distillation and needs no teacher in memory. A K-of-V top-K stores
  K * (id + log-prob) + 4 bytes per token; K >= V stores the full log-prob rows (no ids).

Losses (a weighted list, `distill.losses`): `ce` (next-token cross-entropy), `fkl` KL(p_T || q_T), `rkl`
KL(q_T || p_T), `jsd` the generalised Jensen-Shannon divergence JSD(beta) of GKD (Agarwal et al. 2024,
eq. 1), each on distributions softened by a temperature and scaled by T^2 (Hinton et al. 2015, sec. 2);
with `top_k` the teacher's K most likely tokens plus one bucket for the rest (KL of the coarse-grained
distributions: equal to the full loss when K = V, and never larger); and `hidden_mse` / `hidden_cos` on
(student layer, teacher layer) pairs of the residual stream, through a learned linear projection where
the widths differ (the loop's extra trainable modules: trained with the student, saved in train_state/
only, not in the student checkpoint).

Vocabularies: the student's tokenizer must be the teacher's, or a trim of it (`tinylm tokenizer trim`):
then the teacher reads the tokens mapped back to its ids, and its distributions are restricted to the
kept ids and renormalised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinylm.core.devices import resolve_device
from tinylm.core.errors import TinylmError
from tinylm.core.fs import atomic_dir, check_out
from tinylm.core.recipe import Count, Positive, check_context, one_of
from tinylm.data.tokenizer import Tokenizer, read_token_map
from tinylm.data.tokens import Batch, TokenData
from tinylm.formats import checkpoint
from tinylm.model.config import ModelConfig
from tinylm.model.llama import Llama
from tinylm.model.qlinear import quantization_of, swap_in, target_modules
from tinylm.train.config import TrainConfig
from tinylm.train.loop import batch_ramp, data_tokenizer, fit, setup
from tinylm.train.losses import LossFn, coarse_grain, divergence, truncate
from tinylm.train.schedule import planned_steps

KD_KINDS = ("fkl", "rkl", "jsd")


HIDDEN_KINDS = ("hidden_mse", "hidden_cos")


LOSS_KINDS = ("ce", *KD_KINDS, *HIDDEN_KINDS)


CACHE_FORMAT = "tinylm-teacher-cache-v1"




# ----- configuration -------------------------------------------------------------------------------------

@dataclass
class DistillSection:
    """Where the teacher signal comes from and which losses the student minimises."""

    teacher: str | None = None  # teacher model source (checkpoint dir, HF dir, .gguf, alias); online mode
    cache: str | None = None  # or a cache dir written by `tinylm distill cache`; offline mode
    # Weighted loss terms; keys: kind (ce|fkl|rkl|jsd|hidden_mse|hidden_cos), weight, temperature, top_k,
    # beta (jsd), pairs (hidden: [[student_layer, teacher_layer], ...], 0 = embeddings, i = after block i).
    # Default: forward KL alone, the logit loss Minitron found best (Sreenivas et al. 2024, sec. 4).
    losses: list[dict[str, Any]] = field(default_factory=lambda: [{"kind": "fkl", "weight": 1.0}])
    teacher_dtype: one_of("float32", "bfloat16", "int8") = "float32"  # float32 | bfloat16 | int8 (weight-only, quantised on load)
    teacher_device: str = "auto"  # auto (the student's) | cpu | cuda | cuda:N
    token_map: str | None = None  # a `tinylm tokenizer trim` dir; None: found from the tokenizers

    def __post_init__(self) -> None:
        parse_losses(self.losses)  # each term checked when the config is read, before any model loads


@dataclass
class DistillConfig(TrainConfig):
    """Everything `tinylm distill` needs: the pretraining sections (model, data, optim, schedule, run) plus
    `distill`; YAML sections and `--section.key` overrides map onto them as for pretraining."""

    distill: DistillSection = field(default_factory=DistillSection)


@dataclass
class CacheSection:
    """The teacher cache `tinylm distill cache` writes (see `build_cache`)."""

    out: str | None = None  # cache dir to write
    top_k: Count | None = None  # tokens per position (>= vocabulary: full log-prob rows)
    dtype: one_of("float16", "float32") = "float16"  # log-prob storage: float16 or float32
    temperature: Positive = 1.0  # teacher temperature of a top-K cache (a full cache can be re-tempered: keep 1)
    batch_size: Count = 8  # windows per teacher forward pass
    overwrite: bool = False  # replace an existing cache


@dataclass
class CacheConfig(DistillConfig):
    """Everything `tinylm distill cache` needs: the recipe of the planned distillation run (its data, seq_len,
    batch_tokens, seed and steps fix the windows) plus the `cache` section."""

    cache: CacheSection = field(default_factory=CacheSection)


@dataclass
class LossTerm:
    """One weighted term of the distillation loss (see the module docstring)."""

    kind: str
    weight: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None
    beta: float = 0.5
    pairs: list[tuple[int, int]] = field(default_factory=list)


def parse_losses(spec: list[dict[str, Any]]) -> list[LossTerm]:
    """Check `distill.losses` and turn it into LossTerms; a bad entry is a one-line error naming it.

    Args:
        spec: the YAML list of {kind, weight, ...} mappings.
    """
    if not isinstance(spec, list) or not spec:
        raise TinylmError("distill.losses must be a non-empty list of {kind: ..., weight: ...}")
    known = {f.name for f in dataclasses.fields(LossTerm)}
    terms = []
    for i, entry in enumerate(spec):
        where = f"distill.losses[{i}]"
        if not isinstance(entry, dict) or entry.get("kind") not in LOSS_KINDS:
            raise TinylmError(f"{where}: kind must be one of {', '.join(LOSS_KINDS)}, got {entry!r}")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise TinylmError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        try:
            term = LossTerm(kind=entry["kind"], weight=float(entry.get("weight", 1.0)),
                            temperature=float(entry.get("temperature", 1.0)),
                            top_k=None if entry.get("top_k") is None else int(entry["top_k"]),
                            beta=float(entry.get("beta", 0.5)),
                            pairs=[(int(a), int(b)) for a, b in entry.get("pairs", [])])
        except (TypeError, ValueError):
            raise TinylmError(f"{where}: weight/temperature/beta must be numbers, top_k an integer, "
                              f"pairs a list of [student_layer, teacher_layer]") from None
        _check_term(term, where)
        terms.append(term)
    return terms


def _check_term(t: LossTerm, where: str) -> None:
    for name in ("weight", "temperature", "beta"):
        if not math.isfinite(getattr(t, name)):
            raise TinylmError(f"{where}: {name} must be a finite number, got {getattr(t, name)}")
    if t.weight < 0:
        raise TinylmError(f"{where}: weight must be >= 0, got {t.weight}")
    if t.temperature <= 0:
        raise TinylmError(f"{where}: temperature must be positive, got {t.temperature}")
    if t.top_k is not None and t.top_k < 1:
        raise TinylmError(f"{where}: top_k must be at least 1, got {t.top_k}")
    if t.kind == "jsd" and not 0 < t.beta < 1:
        raise TinylmError(f"{where}: jsd beta must be in (0, 1), got {t.beta} (0 and 1 are fkl and rkl)")
    if t.kind in HIDDEN_KINDS and not t.pairs:
        raise TinylmError(f"{where}: {t.kind} needs pairs: [[student_layer, teacher_layer], ...]")


# ----- teacher signals ---------------------------------------------------------------------------------

@dataclass
class TeacherSignal:
    """The teacher's view of one micro-batch of N = B * T positions.

    Either `logits` (N, V) (online, or a full-vocabulary cache of log-probs: the same softmax), or a
    cached top-K: `ids` (N, K) most probable first, `logprobs` (N, K) at `temperature`, `log_rest` (N,)
    the log of the remaining mass. `hidden` maps a teacher layer to its (B, T, dim) residual stream.
    """

    logits: Tensor | None = None
    ids: Tensor | None = None
    logprobs: Tensor | None = None
    log_rest: Tensor | None = None
    temperature: float = 1.0
    hidden: dict[int, Tensor] = field(default_factory=dict)

    def distribution(self, temperature: float, top_k: int | None) -> tuple[Tensor | None, Tensor]:
        """(ids or None, teacher log-probs) at `temperature`: (N, V) in id order, or (N, k + 1) for ids (N, k).

        Args:
            temperature: softening temperature.
            top_k: keep the k most likely tokens plus a rest bucket; None: all the signal has.
        """
        if self.logits is not None:
            lp = F.log_softmax(self.logits.float() / temperature, dim=-1)  # (N, V)
            if top_k is None or top_k >= lp.shape[-1]:
                return None, lp
            return truncate(lp, top_k)
        if temperature != self.temperature:  # setup checks this; guard against direct use
            raise TinylmError(f"the cache holds the teacher at temperature {self.temperature}, not {temperature}")
        k = self.ids.shape[-1] if top_k is None else min(top_k, self.ids.shape[-1])
        lp = self.logprobs.float()  # (N, K)
        rest = torch.logaddexp(self.log_rest.float(), lp[:, k:].logsumexp(-1)) if k < lp.shape[-1] \
            else self.log_rest.float()  # (N,): fold tokens k..K-1 into the rest
        # renormalise: fp16 storage leaves the K + 1 probabilities a little off a sum of 1
        return self.ids[:, :k].long(), F.log_softmax(torch.cat([lp[:, :k], rest[:, None]], -1), dim=-1)


TeacherFn = Callable[[Batch], TeacherSignal]  # the teacher's signal for a micro-batch


class OnlineTeacher:
    """Runs the teacher on each micro-batch: eval mode, no gradients, its own dtype and device.

    Args:
        model: the teacher.
        kept: (V_student,) teacher ids of the student's tokens (a trimmed vocabulary), or None.
        layers: teacher layers whose hidden states the hidden-state losses need.
    """

    def __init__(self, model: Llama, kept: Tensor | None = None, layers: tuple[int, ...] = ()) -> None:
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        self.kept = None if kept is None else kept.to(self.device)
        self.layers = layers

    @torch.no_grad()
    def __call__(self, batch: Batch) -> TeacherSignal:
        inputs = batch.inputs.to(self.device)  # (B, T) student ids
        if self.kept is not None:
            inputs = self.kept[inputs]  # teacher ids: the trimmed tokenizer's tokens renumbered
        # restricted to the student's tokens (log_softmax renormalises): (B, T, V_student), or V_teacher
        out = self.model(inputs, output_hidden_states=bool(self.layers), logits_for=self.kept)
        logits, hidden = out if self.layers else (out, [])
        logits = logits.float()
        device = batch.tokens.device
        return TeacherSignal(logits=logits.flatten(0, 1).to(device),
                             hidden={j: hidden[j].float().to(device) for j in self.layers})


# ----- the loss step --------------------------------------------------------------------------------------

def kd_term(term: LossTerm, student_logits: Tensor, signal: TeacherSignal) -> Tensor:
    """A logit-distillation term: mean over positions of T^2 * divergence(teacher, student).

    Args:
        term: fkl, rkl or jsd with its temperature, top_k and beta.
        student_logits: (N, V) student logits.
        signal: the teacher's signal for the same N positions.
    """
    t = term.temperature
    ids, p_log = signal.distribution(t, term.top_k)  # (N, V) or (N, K + 1)
    q_log = F.log_softmax(student_logits.float() / t, dim=-1)  # (N, V)
    if ids is not None:
        q_log = coarse_grain(q_log, ids.to(q_log.device))  # (N, K + 1)
    # T^2 keeps the gradient scale independent of T (Hinton et al. 2015, sec. 2).
    return t * t * divergence(term.kind, p_log, q_log, term.beta).mean()


def hidden_term(term: LossTerm, student_hidden: list[Tensor], signal: TeacherSignal,
                projections: nn.ModuleDict) -> Tensor:
    """Mean over pairs of MSE or (1 - cosine similarity) between projected student and teacher states."""
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for s, t in term.pairs:
        h = student_hidden[s].float()  # (B, T, d_student)
        key = _proj_key(s, t)
        if key in projections:
            h = projections[key](h)  # (B, T, d_teacher)
        target = signal.hidden[t]  # (B, T, d_teacher)
        if term.kind == "hidden_mse":
            total = total + F.mse_loss(h, target)
        else:
            total = total + (1 - F.cosine_similarity(h, target, dim=-1)).mean()
    return total / len(term.pairs)


def make_loss_fn(terms: list[LossTerm], teacher: TeacherFn, projections: nn.ModuleDict | None = None) -> LossFn:
    """The distillation loss step for train.fit: (model, batch) -> (weighted sum of the terms, each term).

    Args:
        terms: the weighted loss terms.
        teacher: batch -> TeacherSignal (an OnlineTeacher or a CachedTeacher).
        projections: the learned student -> teacher width projections of the hidden-state terms.
    """
    projections = projections if projections is not None else nn.ModuleDict()
    need_hidden = any(t.kind in HIDDEN_KINDS for t in terms)
    need_teacher = any(t.kind != "ce" for t in terms)
    names = _metric_names(terms)

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        signal = teacher(batch) if need_teacher else TeacherSignal()
        out = model(batch.inputs, output_hidden_states=need_hidden)
        logits, hidden = out if need_hidden else (out, [])
        logits = logits.float().flatten(0, 1)  # (N, V)
        total, metrics = logits.new_zeros(()), {}
        for name, term in zip(names, terms):
            if term.kind == "ce":
                value = F.cross_entropy(logits, batch.targets.flatten())
            elif term.kind in HIDDEN_KINDS:
                value = hidden_term(term, hidden, signal, projections)
            else:
                value = kd_term(term, logits, signal)
            total = total + term.weight * value
            metrics[name] = value.detach()
        return total, metrics

    return loss_fn


def _metric_names(terms: list[LossTerm]) -> list[str]:
    """metrics.jsonl keys of the terms' unweighted values: the kind, numbered where a kind repeats."""
    kinds = [t.kind for t in terms]
    return [k if kinds.count(k) == 1 else f"{k}_{i}" for i, k in enumerate(kinds)]


def _proj_key(student_layer: int, teacher_layer: int) -> str:
    return f"s{student_layer}_t{teacher_layer}"


def make_projections(terms: list[LossTerm], student: ModelConfig, teacher: ModelConfig) -> nn.ModuleDict:
    """Linear maps student dim -> teacher dim for each hidden-state pair, where the widths differ.

    Initialised as nn.Linear does (Kaiming-uniform), as TinyBERT's W_h (Jiao et al. 2020, eq. 7) is learned
    from scratch. Layer indices are checked against both models.
    """
    projections = nn.ModuleDict()
    for term in terms:
        for s, t in term.pairs:
            if not (0 <= s <= student.n_layers and 0 <= t <= teacher.n_layers):
                raise TinylmError(f"{term.kind} pair [{s}, {t}]: layers must be in [0, {student.n_layers}] "
                                  f"(student) and [0, {teacher.n_layers}] (teacher)")
            if student.dim != teacher.dim:
                projections[_proj_key(s, t)] = nn.Linear(student.dim, teacher.dim, bias=False)
    return projections


# ----- vocabularies -----------------------------------------------------------------------------------------

def vocab_map(student: Tokenizer | None, teacher: Tokenizer | None, student_vocab: int, teacher_vocab: int,
              names: tuple[str, str], token_map: str | None = None) -> Tensor | None:
    """Teacher ids of the student's tokens (student id i -> kept[i]), or None when the ids are the same.

    With different tokenizers the map is read from a `tinylm tokenizer trim` dir (token_map.json) when
    given, else found by token string; either way every student token must be the teacher token it maps
    to. With the same tokenizer a teacher with extra (padding) embedding rows maps i -> i.

    Args:
        student, teacher: the two tokenizers (None: unknown, then the vocabulary sizes must agree).
        student_vocab, teacher_vocab: the two models' vocabulary sizes.
        names: what to call (student, teacher) in an error.
        token_map: a trimmed tokenizer dir holding token_map.json.
    """
    s_vocab = student.backend.get_vocab() if student is not None else None
    t_vocab = teacher.backend.get_vocab() if teacher is not None else None
    what = (f"incompatible tokenizers: the student's ({names[0]}, {student_vocab} tokens) is not the teacher's "
            f"({names[1]}, {teacher_vocab} tokens) or a trim of it")
    if s_vocab is None or t_vocab is None or s_vocab == t_vocab:
        if student_vocab > teacher_vocab or (s_vocab is None or t_vocab is None) and student_vocab != teacher_vocab:
            raise TinylmError(what)
        return None if student_vocab == teacher_vocab else torch.arange(student_vocab)
    t_token = {i: tok for tok, i in t_vocab.items()}
    if token_map is not None:
        kept = read_token_map(token_map, teacher_vocab)[0]
    else:
        kept = [t_vocab.get(tok, -1) for tok, _ in sorted(s_vocab.items(), key=lambda kv: kv[1])]
    bad = [tok for tok, i in s_vocab.items() if i >= len(kept) or t_token.get(kept[i]) != tok]
    if bad or len(kept) != student_vocab or max(kept) >= teacher_vocab:
        raise TinylmError(f"{what} ({len(bad)} tokens differ, e.g. {bad[:1]})")
    return torch.tensor(kept, dtype=torch.long)


# ----- the teacher -----------------------------------------------------------------------------------------

def load_teacher(d: DistillSection, student_device: str) -> checkpoint.Loaded:
    """The teacher model, in eval mode, frozen, in distill.teacher_dtype on distill.teacher_device.

    int8: float32 weights quantised on load to per-channel int8 codes (`qlinear`, a quarter of the memory);
    the lm_head stays float, since a teacher restricted to a trimmed vocabulary reads only its kept rows.
    """
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32}
    if d.teacher_dtype not in dtypes:
        raise TinylmError(f"distill.teacher_dtype must be float32, bfloat16 or int8, got {d.teacher_dtype!r}")
    device = resolve_device(student_device if d.teacher_device == "auto" else d.teacher_device)
    loaded = checkpoint.load(d.teacher, device=device, dtype=dtypes[d.teacher_dtype])
    if d.teacher_dtype == "int8" and quantization_of(loaded.model) is None:
        swap_in(loaded.model, {"scheme": "int8", "group_size": 0,
                               "modules": target_modules(loaded.model, skip_lm_head=True)})
    loaded.model.eval().requires_grad_(False)
    return loaded


def _teacher_layers(terms: list[LossTerm]) -> tuple[int, ...]:
    return tuple(sorted({t for term in terms if term.kind in HIDDEN_KINDS for _, t in term.pairs}))


# ----- the cache -------------------------------------------------------------------------------------------

def _data_fingerprint(data_dir: str) -> str:
    """sha256 of the data dir's meta.json: shards, token counts and tokenizer, so a cache of other data is refused."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise TinylmError(f"{data_dir} is not a data dir (no meta.json; make one with `tinylm data prepare`)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plan(cfg: DistillConfig) -> tuple[int, int]:
    """(rows per global batch, total steps) of the run `cfg` describes; the cache covers exactly these."""
    ramp = batch_ramp(cfg.data, 1)
    return ramp.rows, planned_steps(cfg.schedule, ramp.rows * cfg.data.seq_len, ramp)


@dataclass
class TeacherCache:
    """A cache dir opened for reading: memory-mapped arrays indexed by global window number step * rows + row.

    Files: meta.json; logprobs.npy (windows, T, K) float16|float32; for K < V also ids.npy (windows, T, K)
    uint16|int32 and log_rest.npy (windows, T) float32. Loaded with numpy, never unpickled.
    """

    path: Path
    meta: dict[str, Any]
    logprobs: np.ndarray
    ids: np.ndarray | None
    log_rest: np.ndarray | None

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "TeacherCache":
        d = Path(directory)
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            raise TinylmError(f"{d} is not a teacher cache (make one with `tinylm distill cache`)")
        arrays = {}
        for name in ("logprobs", "ids", "log_rest"):
            f = d / f"{name}.npy"
            arrays[name] = np.load(f, mmap_mode="r", allow_pickle=False) if f.is_file() else None
        if arrays["logprobs"] is None or (meta["full"] is False and arrays["ids"] is None):
            raise TinylmError(f"{d}: the cache is incomplete; write it again")
        return cls(d, meta, **arrays)

    def signal(self, first: int, count: int, device: torch.device) -> TeacherSignal:
        """The teacher signal of windows [first, first + count), flattened to N = count * T positions."""
        lp = torch.from_numpy(np.array(self.logprobs[first:first + count])).to(device)  # a copy: memmaps are read-only
        lp = lp.float().flatten(0, 1)  # (N, K)
        if self.meta["full"]:
            return TeacherSignal(logits=lp, temperature=self.meta["temperature"])
        ids = torch.from_numpy(self.ids[first:first + count].astype(np.int64)).to(device).flatten(0, 1)
        rest = torch.from_numpy(np.array(self.log_rest[first:first + count])).to(device).flatten(0, 1)
        return TeacherSignal(ids=ids, logprobs=lp, log_rest=rest, temperature=self.meta["temperature"])


class CachedTeacher:
    """Reads the cached signal of a micro-batch: the cache's windows [batch.index, batch.index + B)."""

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache

    def __call__(self, batch: Batch) -> TeacherSignal:
        return self.cache.signal(batch.index, batch.tokens.shape[0], batch.tokens.device)


# a cache holds the windows of rows that start anywhere (TokenData.batches without documents)
NO_DOCUMENT_ROWS = ("a teacher cache holds rows that start anywhere in the data; data.document_rows needs online "
                    "distillation (--teacher)")


def check_cache(cache: TeacherCache, cfg: DistillConfig, terms: list[LossTerm], rows: int, steps: int,
                vocab_size: int) -> None:
    """One-line errors when a cache was not made for this run (data, windows, vocabulary, temperature)."""
    m, want = cache.meta, dict(data=_data_fingerprint(cfg.data.dir), seed=cfg.data.seed, rows=rows,
                               seq_len=cfg.data.seq_len)
    for key, value in want.items():
        if m[key] != value:
            raise TinylmError(f"{cache.path} was made for another run: its {key} is {m[key]!r}, this run's is "
                              f"{value!r} (make the cache with this recipe)")
    if m["steps"] < steps:
        raise TinylmError(f"{cache.path} covers {m['steps']} steps, the run needs {steps}")
    if m["vocab_size"] != vocab_size:
        raise TinylmError(f"{cache.path} holds a vocabulary of {m['vocab_size']}, the student has {vocab_size}")
    for term in terms:
        if term.kind in HIDDEN_KINDS:
            raise TinylmError(f"{term.kind} needs the teacher's hidden states: distill online (--teacher), "
                              f"not from a cache")
        if term.kind in KD_KINDS and not m["full"] and term.temperature != m["temperature"]:
            raise TinylmError(f"{term.kind} at temperature {term.temperature}, but the top-{m['top_k']} cache "
                              f"was made at temperature {m['temperature']} (only a full cache re-tempers)")


def build_cache(cfg: DistillConfig, top_k: int, out: str | os.PathLike, dtype: str = "float16",
                temperature: float = 1.0, batch_size: int = 8, overwrite: bool = False) -> dict[str, Any]:
    """Run the teacher once over every window the run `cfg` will read and store its top-K distributions.

    Windows are the run's own batches (TokenData.batches at the run's seed, global batch, seq_len, for
    all its steps), stored at each batch's index, so training from the cache reads by batch.index and sees
    exactly what online distillation sees.

    Args:
        cfg: the distillation config of the planned run (data, schedule and distill.teacher are used).
        top_k: tokens kept per position; K >= vocabulary stores full log-prob rows.
        out: cache dir to write (atomically).
        dtype: float16 (2 bytes) or float32 (exact) for the log-probabilities.
        temperature: the teacher's softening temperature (top-K losses must use the same; a full cache can
            be re-tempered, so keep 1 there).
        batch_size: windows per teacher forward pass.
        overwrite: replace an existing cache.

    Returns:
        The cache's meta.json (with bytes_per_token and the teacher's tokens/s).
    """
    if dtype not in ("float16", "float32"):
        raise TinylmError(f"--dtype must be float16 or float32, got {dtype!r}")
    if top_k < 1 or temperature <= 0 or batch_size < 1:
        raise TinylmError("--top-k, --temperature and --batch-size must be positive")
    if not cfg.distill.teacher or not cfg.data.dir:
        raise TinylmError("a cache needs a teacher (--teacher) and data (--data)")
    if cfg.data.document_rows:
        raise TinylmError(NO_DOCUMENT_ROWS)
    check_out(out, overwrite)
    data = TokenData.open(cfg.data.dir, "train")
    data.check_vocab(data.vocab_size, "its tokenizer")  # ids the teacher (through any token map) can read
    rows, steps = _plan(cfg)
    teacher = load_teacher(cfg.distill, cfg.run.device)
    check_context("data.seq_len", cfg.data.seq_len, teacher.config.max_seq_len, f"the teacher {cfg.distill.teacher}")
    kept = vocab_map(data_tokenizer(cfg.data.dir), teacher.tokenizer, data.vocab_size, teacher.config.vocab_size,
                     (f"{cfg.data.dir}/tokenizer", cfg.distill.teacher), cfg.distill.token_map)
    vocab = data.vocab_size
    online = OnlineTeacher(teacher.model, kept)
    full = top_k >= vocab
    meta = dict(format=CACHE_FORMAT, teacher=str(cfg.distill.teacher), data=_data_fingerprint(cfg.data.dir),
                data_dir=str(cfg.data.dir), seed=cfg.data.seed, rows=rows, seq_len=cfg.data.seq_len, steps=steps,
                vocab_size=vocab, top_k=vocab if full else top_k, full=full, temperature=temperature,
                dtype=dtype, token_map=kept is not None, teacher_dtype=cfg.distill.teacher_dtype)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        seconds = _fill_cache(tmp, meta, data, online, batch_size)
        meta.update(bytes_per_token=_bytes_per_token(meta),
                    teacher_tokens_per_s=steps * rows * cfg.data.seq_len / max(seconds, 1e-9))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _bytes_per_token(meta: dict[str, Any]) -> float:
    k, lp = meta["top_k"], 2 if meta["dtype"] == "float16" else 4
    if meta["full"]:
        return float(k * lp)
    return float(k * (lp + (2 if meta["vocab_size"] <= 65536 else 4)) + 4)


def _fill_cache(tmp: Path, meta: dict[str, Any], data: TokenData, teacher: OnlineTeacher, batch_size: int) -> float:
    """Write logprobs.npy (and ids.npy, log_rest.npy) for every window; returns the seconds spent."""
    from numpy.lib.format import open_memmap
    from tqdm import tqdm

    n, t, k = meta["steps"] * meta["rows"], meta["seq_len"], meta["top_k"]
    lp_out = open_memmap(tmp / "logprobs.npy", mode="w+", dtype=np.dtype(meta["dtype"]), shape=(n, t, k))
    if not meta["full"]:
        id_dtype = np.uint16 if meta["vocab_size"] <= 65536 else np.int32
        ids_out = open_memmap(tmp / "ids.npy", mode="w+", dtype=id_dtype, shape=(n, t, k))
        rest_out = open_memmap(tmp / "log_rest.npy", mode="w+", dtype=np.float32, shape=(n, t))
    source = data.batches(meta["seed"], meta["rows"], t)  # the run's batch source
    start = time.perf_counter()
    for step in tqdm(range(meta["steps"]), unit="step", desc="teacher cache"):
        for b in range(0, meta["rows"], batch_size):
            count = min(batch_size, meta["rows"] - b)
            batch = source(step, b, count)
            sig = teacher(batch)
            ids, lp = sig.distribution(meta["temperature"], None if meta["full"] else k)
            first = batch.index
            if meta["full"]:
                lp_out[first:first + count] = lp.view(count, t, k).cpu().numpy()
                continue
            lp_out[first:first + count] = lp[:, :k].view(count, t, k).cpu().numpy()
            ids_out[first:first + count] = ids.view(count, t, k).cpu().numpy()
            rest_out[first:first + count] = lp[:, k].view(count, t).cpu().numpy()
    seconds = time.perf_counter() - start
    for arr in [lp_out] + ([] if meta["full"] else [ids_out, rest_out]):
        arr.flush()
    return seconds


# ----- the stage ---------------------------------------------------------------------------------------------

def distill(cfg: DistillConfig) -> Path:
    """Train a student on a teacher's distributions (online or from a cache); returns OUT/final.

    Every user error (sources, vocabularies, losses, cache/run mismatch) is raised before anything is
    written. Raises KeyboardInterrupt after a signal checkpoint, as pretraining does.

    Args:
        cfg: the distillation config.
    """
    import torch.distributed as dist

    d = cfg.distill
    terms = parse_losses(d.losses)
    uses_teacher = any(t.kind != "ce" for t in terms)
    if cfg.optim.z_loss:
        raise TinylmError("optim.z_loss regularises the LM loss of pretrain and sft, not distill's loss terms")
    if uses_teacher and (d.teacher is None) == (d.cache is None):
        raise TinylmError("give exactly one teacher signal: distill.teacher (--teacher) or distill.cache (--cache)")
    if not cfg.data.dir:
        raise TinylmError("no training data: set data.dir (--data, a dir made by `tinylm data prepare`)")
    check_out(cfg.run.out, overwrite=True)  # before the teacher loads; a run dir is resumed, never replaced
    teacher_fn: TeacherFn | None = None
    cache = TeacherCache.open(d.cache) if uses_teacher and d.cache else None
    if cache is not None and cfg.data.document_rows:
        raise TinylmError(NO_DOCUMENT_ROWS)
    if cache is not None and cfg.run.minutes is not None and cfg.schedule.steps is cfg.schedule.tokens is None:
        cfg.schedule.steps = cache.meta["steps"]  # a budget cannot outrun the cache: its steps are the cap
    extra = None
    if uses_teacher and d.teacher:
        teacher = load_teacher(d, cfg.run.device)
        check_context("data.seq_len", cfg.data.seq_len, teacher.config.max_seq_len, f"the teacher {d.teacher}")
        data = TokenData.open(cfg.data.dir, "train")
        kept = vocab_map(data_tokenizer(cfg.data.dir), teacher.tokenizer, data.vocab_size, teacher.config.vocab_size,
                         (f"{cfg.data.dir}/tokenizer", d.teacher), d.token_map)
        teacher_fn = OnlineTeacher(teacher.model, kept, _teacher_layers(terms))
        t_cfg, t_vocab = teacher.config, teacher.config.vocab_size if kept is None else len(kept)
        extra = lambda model: make_projections(terms, model.config, t_cfg)  # noqa: E731
    run = setup(cfg, extra_modules=extra)
    try:
        if teacher_fn is not None and run.model.config.vocab_size != t_vocab:
            raise TinylmError(f"the student's vocabulary ({run.model.config.vocab_size}) is not the teacher's "
                              f"({t_vocab}, after any trim): give the student the data's tokenizer")
        if cache is not None:
            check_cache(cache, cfg, terms, run.rows, run.total_steps, run.model.config.vocab_size)
            teacher_fn = CachedTeacher(cache)
        run.meta.update(stage="distill", teacher=d.teacher or (cache.meta["teacher"] if cache else None),
                        losses=[dataclasses.asdict(t) for t in terms])
        return fit(run, make_loss_fn(terms, teacher_fn or (lambda batch: TeacherSignal()), run.extra_modules))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(cfg: DistillConfig) -> None:
    """`tinylm distill`."""
    print(f"wrote {distill(cfg)}")


def cache_main(cfg: CacheConfig) -> None:
    """`tinylm distill cache`: write the teacher cache of a planned run and say what it holds."""
    c = cfg.cache
    if not c.out or c.top_k is None:
        raise TinylmError("tinylm distill cache needs --out CACHE and --top-k K")
    meta = build_cache(cfg, c.top_k, c.out, c.dtype, c.temperature, c.batch_size, c.overwrite)
    print(f"wrote {c.out}: {meta['steps']} steps x {meta['rows']} windows x {meta['seq_len']} tokens, top-"
          f"{meta['top_k']} of {meta['vocab_size']}, {meta['bytes_per_token']:.0f} bytes/token, teacher "
          f"{meta['teacher_tokens_per_s']:,.0f} tokens/s")
