"""Pretraining: TrainConfig, learning-rate schedules, the loop, checkpoint/resume, DDP/FSDP2.

`pretrain(cfg)` is `fit(setup(cfg))`: `setup` builds everything (model, optimizer, data, devices) and
checks the config before any output is written; `fit` is one plain loop whose loss step is a function
argument, so `distill.py` reuses this loop, the schedules, the evaluation step, checkpointing and
logging, and writes only its loss (STYLE.md rules 4 and 5).

Determinism: a step's batch depends only on (data seed, step) (`TokenData.windows`), the model has no
dropout, and checkpoints hold the exact fp32 weights and AdamW moments, so a run killed and resumed
with `--resume auto` ends with the same bits as one that never stopped, compiled or not (a compiled CPU
run needs deterministic algorithms for that, see `_wrap`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tinylm import checkpoint
from tinylm.config import PRESETS, TinylmError, preset
from tinylm.data import TokenData
from tinylm.model import Llama
from tinylm.tokenizer import Tokenizer

# ----- configuration -------------------------------------------------------------------------------
# Each section is a flat dataclass; YAML sections and `--section.key value` map onto their fields.


@dataclass
class ModelSection:
    """The model to train: a preset (vocab_size becomes the data tokenizer's) or a source to continue."""

    preset: str | None = "1m"  # a key of tinylm.config.PRESETS
    init: str | None = None  # continue from this model source (checkpoint dir, HF dir, .gguf, alias)
    dim: int | None = None  # the shape fields below override the preset's when set
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    ffn_dim: int | None = None
    max_seq_len: int | None = None  # None: the preset's, raised to data.seq_len if shorter
    tie_embeddings: bool | None = None


@dataclass
class DataSection:
    """Where the tokens come from and how they are batched."""

    dir: str | None = None  # a data dir written by `tinylm data prepare`
    seq_len: int = 256  # tokens per training row (the model predicts seq_len targets per row)
    batch_tokens: int = 32768  # GLOBAL batch in tokens per optimizer step (all ranks, all micro-steps)
    micro_batch: int = 16  # rows per forward/backward on one device; the rest is gradient accumulation
    seed: int = 0  # data order seed: the batch of step s depends only on (seed, s)


@dataclass
class OptimSection:
    """AdamW (Loshchilov & Hutter 2019) with width-aware learning rates."""

    lr: float = 3e-3  # peak lr at width base_width (hidden matrices are scaled by base_width / dim)
    width_scaling: bool = True  # muP-style: hidden-matrix lr * base_width / dim (see param_groups)
    base_width: int = 256  # MiniCPM's dim_model_base (Hu et al. 2024, sec. 3.1)
    weight_decay: float = 0.1  # on hidden matrices only
    beta1: float = 0.9
    beta2: float = 0.95  # LLaMA / MiniCPM value (Touvron et al. 2023, sec. 2.2)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 disables clipping (the norm is still checked)


@dataclass
class ScheduleSection:
    """Learning-rate schedule: wsd (warmup-stable-decay), cosine or constant."""

    kind: str = "wsd"  # wsd | cosine | constant
    steps: int | None = None  # optimizer steps; or give tokens
    tokens: int | None = None  # token budget; steps = ceil(tokens / data.batch_tokens)
    warmup_steps: int = 100  # linear warmup from lr/warmup_steps to lr
    decay_fraction: float = 0.1  # wsd: the last round(decay_fraction * steps) steps decay (MiniCPM ~10%)
    decay_shape: str = "1-sqrt"  # wsd: exponential | linear | 1-sqrt (Hagele et al. 2024 find 1-sqrt best)
    min_lr_ratio: float = 0.0  # lr at the end of the decay / peak lr (exponential needs > 0)


@dataclass
class RunSection:
    """Outputs, devices, evaluation and checkpointing."""

    out: str = "runs/pretrain"  # OUT/checkpoints/step_XXXXXXX/, OUT/final/, OUT/metrics.jsonl, OUT/loss.png
    resume: str = "never"  # never | auto (latest complete checkpoint in OUT, or a fresh start) | a checkpoint dir
    decay_from: str | None = None  # wsd: a stable-phase checkpoint; run only the decay from it
    seed: int = 0  # model initialisation seed
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16
    compile: bool | None = None  # torch.compile; None: on for cuda, and on cpu from 1M parameters (use_compile)
    fsdp: bool = False  # shard parameters with FSDP2 fully_shard (models that do not fit one device)
    eval_every: int = 200  # steps between validation passes (0: only at the end)
    eval_tokens: int = 65536  # validation tokens per pass
    ckpt_every: int = 500  # steps between resumable checkpoints (0: only on a signal)
    keep_last: int = 2  # resumable checkpoints kept
    log_every: int = 10  # steps between metrics.jsonl lines
    peak_flops: float | None = None  # device peak FLOP/s for MFU; None: measured (measure_peak_flops)
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = False  # also write OUT/tensorboard/ (needs the tensorboard package)
    plot: bool = True  # OUT/loss.png at the end


@dataclass
class TrainConfig:
    """Everything `tinylm pretrain` needs; YAML sections (model, data, optim, schedule, run) set defaults."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(cls: type, path: str | os.PathLike | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> Any:
    """Build a sectioned config dataclass from a YAML recipe plus overrides; the command line wins.

    Args:
        cls: the config class (TrainConfig, or a stage's own with more sections); its fields are
            section dataclasses.
        path: a YAML recipe whose top-level keys are section names.
        overrides: `["--section.key", "value", ...]` (as typed on the command line; `--a.b=v` works
            too) or a dict {"section.key": value}.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    pairs = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    sections = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for name, body in raw.items():
        if name not in sections:
            raise TinylmError(f"{path}: unknown section {name!r} (known: {', '.join(sections)})")
        if not isinstance(body, dict):
            raise TinylmError(f"{path}: section {name!r} must be a mapping of keys to values")
        values[name].update({k: (v, False) for k, v in body.items()})
    for dotted, value in pairs.items():
        name, _, key = dotted.partition(".")
        if name not in sections or not key:
            raise TinylmError(f"unknown option --{dotted} (use --section.key with a section of: {', '.join(sections)})")
        values[name][key] = (value, isinstance(value, str))
    kwargs = {name: _build_section(sections[name].default_factory, name, values[name]) for name in sections}
    return cls(**kwargs)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise TinylmError(f"no recipe at {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TinylmError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise TinylmError(f"{path}: a recipe is a mapping of sections (model, data, optim, ...)")
    return data


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`["--a.b", "v", "--c.d=w", "--flag"]` -> {"a.b": "v", "c.d": "w", "flag": "true"}.

    Args:
        args: command-line words after the known options.
    """
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--") or len(word) == 2:
            raise TinylmError(f"unexpected argument {word!r} (options look like --section.key VALUE)")
        key, eq, value = word[2:].partition("=")
        if not eq:
            has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            value = args[i + 1] if has_value else "true"
            i += has_value
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _build_section(cls: type, section: str, values: dict[str, tuple[Any, bool]]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, (value, from_text) in values.items():
        if key not in hints:
            raise TinylmError(f"unknown key {section}.{key} (known: {', '.join(hints)})")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", from_text)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str, from_text: bool) -> Any:
    """Check (YAML) or convert (command-line text) one value to its field's type."""
    if typing.get_origin(hint) is list:  # e.g. distill.losses: a YAML list, or YAML flow text on the command line
        return _coerce_list(value, name, from_text)
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (from_text and optional and str(value).lower() in ("none", "null")):
        if optional:
            return None
        raise TinylmError(f"{name} must be {base.__name__}, got none")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if from_text and str(value).lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return str(value).lower() in ("true", "yes", "1", "on")
        elif base is int and not isinstance(value, bool):
            if isinstance(value, int):
                return value
            if isinstance(value, str) and from_text:  # "1e6" is a fine step count on a command line
                return int(float(value)) if float(value).is_integer() else int(value)
        elif base is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads "3e-3" as a string
                return float(value)
        elif base is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    except ValueError:
        pass
    raise TinylmError(f"{name} must be {base.__name__}{' or none' if optional else ''}, got {value!r}")


def _coerce_list(value: Any, name: str, from_text: bool) -> list[Any]:
    import yaml

    if from_text and isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise TinylmError(f"{name} must be a YAML list, e.g. '[{{kind: fkl, weight: 1}}]', got {value!r}") from None
    if not isinstance(value, list):
        raise TinylmError(f"{name} must be a list, got {value!r}")
    return value


# ----- learning-rate schedules ---------------------------------------------------------------------

def decay_steps(total: int, fraction: float) -> int:
    """Length of the WSD decay phase: round(fraction * total), at least 1."""
    return max(1, round(fraction * total))


def lr_factor(step: int, total: int, sched: ScheduleSection) -> float:
    """Learning rate of optimizer step `step` (0-based) as a fraction of the peak.

    warmup (all kinds): (step + 1) / warmup_steps while step < warmup_steps.
    constant: 1.
    cosine: m + (1 - m) * (1 + cos(pi * p)) / 2, p = (step - W) / (total - W) (Loshchilov & Hutter 2017).
    wsd (MiniCPM, Hu et al. 2024, sec. 4): 1 until the decay starts at D0 = total - round(f * total),
        then with p = (step - D0) / round(f * total): exponential m ** p, linear 1 - (1 - m) p,
        1-sqrt m + (1 - m)(1 - sqrt(p)) (Hagele et al. 2024, sec. 3).

    Args:
        step: optimizer step, 0-based.
        total: number of steps of the run.
        sched: the schedule section (kind, warmup_steps, decay_fraction, decay_shape, min_lr_ratio).
    """
    w, m = sched.warmup_steps, sched.min_lr_ratio
    if step < w:
        return (step + 1) / w
    if sched.kind == "constant":
        return 1.0
    if sched.kind == "cosine":
        p = (step - w) / max(1, total - w)
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
    d = decay_steps(total, sched.decay_fraction)
    p = (step - (total - d)) / d
    if p < 0:
        return 1.0
    p = min(p, 1.0)
    if sched.decay_shape == "exponential":
        return m ** p
    if sched.decay_shape == "linear":
        return 1 - (1 - m) * p
    return m + (1 - m) * (1 - math.sqrt(p))


def branch_total(start: int, fraction: float) -> int:
    """Total steps of the WSD run whose decay starts at step `start`: the smallest S with
    S - round(fraction * S) == start, so a decay branch from a stable checkpoint at `start` follows
    exactly the schedule of a straight run of S steps.

    Args:
        start: the step of the stable-phase checkpoint.
        fraction: schedule.decay_fraction.
    """
    total = start + 1
    while total - decay_steps(total, fraction) < start:
        total += 1
    if total - decay_steps(total, fraction) != start:
        raise TinylmError(f"no WSD run with decay_fraction {fraction} starts its decay at step {start}")
    return total


def _check_schedule(s: ScheduleSection) -> None:
    if s.kind not in ("wsd", "cosine", "constant"):
        raise TinylmError(f"schedule.kind must be wsd, cosine or constant, got {s.kind!r}")
    if s.decay_shape not in ("exponential", "linear", "1-sqrt"):
        raise TinylmError(f"schedule.decay_shape must be exponential, linear or 1-sqrt, got {s.decay_shape!r}")
    if s.warmup_steps < 1:
        raise TinylmError("schedule.warmup_steps must be at least 1")
    if not 0 < s.decay_fraction <= 1:
        raise TinylmError(f"schedule.decay_fraction must be in (0, 1], got {s.decay_fraction}")
    if not 0 <= s.min_lr_ratio <= 1 or (s.kind == "wsd" and s.decay_shape == "exponential" and s.min_lr_ratio <= 0):
        raise TinylmError(f"schedule.min_lr_ratio must be in [0, 1] (> 0 for exponential), got {s.min_lr_ratio}")


# ----- optimizer -------------------------------------------------------------------------------------

def param_groups(model: Llama, cfg: OptimSection) -> list[dict[str, Any]]:
    """AdamW parameter groups with width-aware learning rates and weight decay on hidden matrices.

    Learning rate: MiniCPM's "wind tunnel" rule (Hu et al. 2024, sec. 3; muP for Adam, Yang et al. 2022,
    Table 3): the lr tuned at width base_width (MiniCPM's dim_model_base = 256) carries over to width
    dim if hidden matrices (q, k, v, o, gate, up, down) use lr * base_width / dim, while vector-like
    parameters (token embeddings, an untied lm_head treated as the embedding's mirror, RMSNorm gains)
    keep lr. tinylm does not add muP's forward multipliers (scale_emb, logit scaling), so exported
    models stay plain HF Llama; the default peak 3e-3 at width 256 is for this standard parametrisation.

    Weight decay applies to hidden matrices only: not to norms (scale-free gains), and not to
    embeddings, whose rare-token rows get few gradients and would only shrink (OLMo 2, Team OLMo 2024,
    sec. 3.1 removes it too).

    Args:
        model: the (unwrapped) model.
        cfg: the optim section.
    """
    scale = cfg.base_width / model.config.dim if cfg.width_scaling else 1.0
    hidden, other = [], []
    for name, p in model.named_parameters():  # a tied lm_head is the embedding, listed once
        is_hidden = p.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name
        (hidden if is_hidden else other).append(p)
    return [dict(params=hidden, lr_scale=scale, weight_decay=cfg.weight_decay),
            dict(params=other, lr_scale=1.0, weight_decay=0.0)]


def make_optimizer(model: Llama, cfg: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where this PyTorch build has it for the device (one kernel for all parameters)."""
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, peak: float, factor: float) -> float:
    """Set every group's lr to peak * factor * its lr_scale; return peak * factor."""
    for g in optimizer.param_groups:
        g["lr"] = peak * factor * g["lr_scale"]
    return peak * factor


# ----- devices, distribution, FLOPs ------------------------------------------------------------------

@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs) and pick this rank's device.

    Args:
        device: run.device: auto | cpu | cuda.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise TinylmError(f"run.device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise TinylmError("run.device is cuda but no CUDA device is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    dev = torch.device("cuda", d.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return d, dev


_PEAK_CACHE: dict[tuple[str, torch.dtype], float] = {}


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """An achievable peak: the best of 5 timed n x n matmuls (2 n^3 FLOPs each) in `dtype`.

    On a CPU this is the fp32 matmul rate of the current thread count (torch.get_num_threads()), the
    ceiling a training step's matmuls can reach, which makes MFU comparable between machines where a
    datasheet figure (clock x FMA units) is unknown. On GPUs prefer run.peak_flops (datasheet dense
    bf16, e.g. 989e12 for an H100 SXM).

    Args:
        device: where to measure.
        dtype: matmul dtype (float32 on CPU; bfloat16 on GPUs).
        n: matrix size.
    """
    key = (str(device), dtype)
    if key not in _PEAK_CACHE:
        _PEAK_CACHE[key] = matmul_flops(device, dtype, n)
    return _PEAK_CACHE[key]


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 6) -> float:
    """FLOP/s of the fastest of `repeats` timed n x n matmuls (uncached; see measure_peak_flops)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- the run: everything setup() builds and fit() advances ----------------------------------------

LossFn = Callable[[nn.Module, Tensor], Tensor]


@dataclass
class Run:
    """The state of one training run. A plain record: setup() fills it, fit() advances it."""

    cfg: Any  # TrainConfig (or a stage's config with the same model/data/optim/schedule/run sections)
    model: Llama  # the unwrapped model (its parameters are the ones being trained)
    train_model: nn.Module  # what the loss step calls: the model, compiled and/or DDP/FSDP-wrapped
    optimizer: torch.optim.Optimizer
    train: TokenData
    val: TokenData | None
    tokenizer: Tokenizer | None
    dist: Dist
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for plain fp32
    total_steps: int
    rows: int  # rows (windows) per global batch
    micro: int  # rows per micro-step on one rank
    accum: int  # micro-steps per optimizer step on one rank
    out: Path
    step: int = 0  # optimizer steps done
    best_val: float | None = None
    last_val: float | None = None
    peak_flops: float = 0.0
    stop_signal: int | None = None  # set by SIGINT/SIGTERM: checkpoint and stop after this step
    meta: dict[str, Any] = field(default_factory=dict)  # extra facts for the checkpoints' tinylm block
    batch_start: int = 0  # first row (of the global batch) of the micro-batch being computed, for loss steps
    # that read per-window data by (step, row), e.g. distillation from cached teacher logits
    aux: nn.Module | None = None  # trainable modules beside the model (distillation's hidden-state projections):
    aux_optimizer: torch.optim.Optimizer | None = None  # stepped with the model, saved in train_state/ only


def pretrain(cfg: TrainConfig) -> Path:
    """Train a model from a config; returns OUT/final. Raises KeyboardInterrupt after a signal checkpoint.

    Args:
        cfg: the training config.
    """
    run = setup(cfg)
    try:
        return fit(run, lm_loss)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def setup(cfg: Any, aux: Callable[[Llama], nn.Module] | None = None) -> Run:
    """Check the config, build model, optimizer and data, and restore a checkpoint if asked.

    Every user error is raised here, before anything is written.

    Args:
        cfg: a TrainConfig (or any config with model, data, optim, schedule and run sections).
        aux: builds extra trainable modules from the model (run.aux, e.g. distillation's projections);
            they get their own AdamW at the model's lr and are saved in train_state/ only.
    """
    _check_schedule(cfg.schedule)
    d, device = init_distributed(cfg.run.device)
    if not cfg.data.dir:
        raise TinylmError("no training data: set data.dir (a dir made by `tinylm data prepare`)")
    train = TokenData.open(cfg.data.dir, "train")
    val = TokenData.open(cfg.data.dir, "val") if "val" in train.meta["splits"] else None
    tokenizer = data_tokenizer(cfg.data.dir)
    rows, micro, accum = batch_layout(cfg.data, d.world)
    torch.manual_seed(cfg.run.seed)
    model, tokenizer = build_model(cfg.model, cfg.data.seq_len, train.vocab_size, tokenizer)
    out = Path(cfg.run.out)
    resume_from, total = _plan_start(cfg, out, rows)
    model.to(device)
    train_model = _wrap(model, cfg.run, d, device)
    optimizer = make_optimizer(model, cfg.optim, device)
    amp = _amp_dtype(cfg.run.dtype, device)
    run = Run(cfg, model, train_model, optimizer, train, val, tokenizer, d, device, amp, total,
              rows, micro, accum, out)
    if aux is not None:
        _attach_aux(run, aux(model))
    if resume_from is not None:
        restore(run, resume_from)
    run.peak_flops = cfg.run.peak_flops or measure_peak_flops(device, torch.float32 if amp is None else amp)
    return run


def data_tokenizer(data_dir: str) -> Tokenizer | None:
    path = Path(data_dir) / "tokenizer"
    return Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None


def batch_layout(data: DataSection, world: int) -> tuple[int, int, int]:
    """(rows per global batch, rows per micro-step, micro-steps per step) from the data section."""
    if data.seq_len < 1 or data.batch_tokens < data.seq_len or data.batch_tokens % data.seq_len:
        raise TinylmError(f"data.batch_tokens {data.batch_tokens} must be a positive multiple of "
                          f"data.seq_len {data.seq_len}")
    rows = data.batch_tokens // data.seq_len
    if rows % world:
        raise TinylmError(f"the global batch of {rows} rows does not split over {world} processes")
    per_rank = rows // world
    micro = min(max(1, data.micro_batch), per_rank)
    if per_rank % micro:
        raise TinylmError(f"{per_rank} rows per process is not a multiple of data.micro_batch {micro}")
    return rows, micro, per_rank // micro


def build_model(m: ModelSection, seq_len: int, vocab_size: int,
                tokenizer: Tokenizer | None) -> tuple[Llama, Tokenizer | None]:
    """The model to train, on the CPU in fp32, and the tokenizer to save beside it.

    Args:
        m: the model section: a preset with shape overrides, or `init` (a model source to continue).
        seq_len: training context; the model's max_seq_len is raised to it if shorter.
        vocab_size: the data's vocabulary size.
        tokenizer: the data's tokenizer (None if the data dir has none).
    """
    if m.init:
        loaded = checkpoint.load(m.init)
        if vocab_size > loaded.config.vocab_size:
            raise TinylmError(f"the data's vocabulary ({vocab_size}) is larger than {m.init}'s "
                              f"({loaded.config.vocab_size}); prepare the data with the model's tokenizer")
        loaded.model.train()
        return loaded.model, tokenizer or loaded.tokenizer
    if m.preset not in PRESETS:
        raise TinylmError(f"model.preset {m.preset!r} is unknown (known: {', '.join(PRESETS)}), or set model.init")
    shape = {k: getattr(m, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len",
                                         "tie_embeddings") if getattr(m, k) is not None}
    if "max_seq_len" not in shape:
        shape["max_seq_len"] = max(PRESETS[m.preset].get("max_seq_len", 512), seq_len)
    if ("dim" in shape or "n_heads" in shape) and "n_kv_heads" not in shape:
        shape["n_kv_heads"] = None  # derived from n_heads again
    if tokenizer is not None:
        shape.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    cfg = preset(m.preset, vocab_size=vocab_size, **shape)
    return Llama(cfg), tokenizer


def _plan_start(cfg: Any, out: Path, rows: int) -> tuple[Path | None, int]:
    """(checkpoint to restore or None, total steps) from run.resume / run.decay_from and the schedule."""
    s, r = cfg.schedule, cfg.run
    if r.decay_from:
        if s.kind != "wsd":
            raise TinylmError("run.decay_from needs schedule.kind wsd")
        src = Path(r.decay_from)
        info = _train_info(src)
        start, src_total = int(info["step"]), int(info["total_steps"])
        if start < s.warmup_steps or start > src_total - decay_steps(src_total, s.decay_fraction):
            raise TinylmError(f"{src} (step {start}) is not in the stable phase of its WSD schedule")
        latest = latest_checkpoint(out) if r.resume == "auto" else None  # a killed branch continues
        return latest or src, branch_total(start, s.decay_fraction)
    if (s.steps is None) == (s.tokens is None):
        raise TinylmError("set exactly one of schedule.steps and schedule.tokens")
    total = s.steps if s.steps is not None else math.ceil(s.tokens / (rows * cfg.data.seq_len))
    if total < 1:
        raise TinylmError("the schedule has no steps; raise schedule.steps or schedule.tokens")
    if r.resume == "never":
        if latest_checkpoint(out) is not None:
            raise TinylmError(f"{out} already holds checkpoints: pass --resume auto to continue, or another run.out")
        return None, total
    if r.resume == "auto":
        return latest_checkpoint(out), total
    src = Path(r.resume)
    _train_info(src)
    return src, total


def _train_info(ckpt: Path) -> dict[str, Any]:
    path = ckpt / "train_state" / "state.json"
    if not checkpoint.is_complete(ckpt) or not path.is_file():
        raise TinylmError(f"{ckpt} is not a complete resumable checkpoint (no train_state/state.json)")
    return json.loads(path.read_text())


def _amp_dtype(name: str, device: torch.device) -> torch.dtype | None:
    if name not in ("auto", "float32", "bfloat16"):
        raise TinylmError(f"run.dtype must be auto, float32 or bfloat16, got {name!r}")
    if name == "bfloat16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def use_compile(flag: bool | None, model: Llama, device: torch.device) -> bool:
    """run.compile, or its default: on for CUDA; on a CPU, on from 1M parameters, where compiling is
    faster (bench/bench_train.py), and off below, where the compile time outweighs the gain."""
    if flag is not None:
        return flag
    return device.type == "cuda" or model.num_params() >= COMPILE_MIN_PARAMS


COMPILE_MIN_PARAMS = 1_000_000


def _wrap(model: Llama, r: RunSection, d: Dist, device: torch.device) -> nn.Module:
    """The module the loss step calls: FSDP2-sharded or DDP-wrapped under torchrun, then compiled."""
    wrapped: nn.Module = model
    if r.fsdp:
        from torch.distributed.fsdp import fully_shard

        if d.world == 1 and not dist.is_initialized():
            raise TinylmError("run.fsdp needs torchrun with several processes")
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    elif d.world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if use_compile(r.compile, model, device):
        if device.type == "cpu":
            # Inductor's CPU code for the embedding's backward (an index_put with accumulate) adds from
            # parallel threads in no fixed order: two identical compiled runs ended 4e-7 apart after 12
            # steps. With deterministic algorithms it lowers that op to the ordered ATen kernel, and a
            # compiled run killed and resumed ends bit for bit where the straight run does (test_train).
            # This is process-wide PyTorch state; warn_only keeps ops without a deterministic kernel usable.
            torch.use_deterministic_algorithms(True, warn_only=True)
        wrapped = torch.compile(wrapped)
    return wrapped


# ----- the loss step and evaluation ------------------------------------------------------------------

def lm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy of one micro-batch, in fp32.

    Args:
        model: the (wrapped) language model.
        tokens: (B, T + 1) token ids; inputs tokens[:, :-1], targets tokens[:, 1:].
    """
    logits = model(tokens[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


@torch.no_grad()
def eval_nats(model: nn.Module, windows: Iterable[Tensor], batch_size: int = 8,
              device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) and the number of predicted tokens.

    Args:
        model: the language model (called in no-grad mode; switch it to eval() yourself if it matters).
        windows: (T + 1,) token tensors; each predicts its T last tokens. Lengths may differ.
        batch_size: windows per forward pass (equal-length windows are batched together).
        device: where to run.
        amp_dtype: autocast dtype, or None for the model's own.
    """
    total, count = 0.0, 0
    for batch in _batches(windows, batch_size):
        batch = batch.to(device)
        with _autocast(torch.device(device), amp_dtype):
            logits = model(batch[:, :-1])  # (B, T, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return total, count


def _batches(windows: Iterable[Tensor], size: int) -> Iterator[Tensor]:
    pending: list[Tensor] = []
    for w in windows:
        if pending and (len(pending) == size or len(w) != len(pending[0])):
            yield torch.stack(pending)
            pending = []
        pending.append(w)
    if pending:
        yield torch.stack(pending)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def validate(run: Run) -> float | None:
    """Mean validation loss over run.eval_tokens tokens of the val split (ranks share the windows)."""
    if run.val is None:
        return None
    n = max(1, run.cfg.run.eval_tokens // run.cfg.data.seq_len)
    windows = run.val.eval_windows(run.cfg.data.seq_len, max_windows=n)
    split = dist.is_initialized() and not run.cfg.run.fsdp  # FSDP ranks must run the same forwards
    mine = (w for i, w in enumerate(windows) if not split or i % run.dist.world == run.dist.rank)
    run.model.eval()
    nats, count = eval_nats(run.model, mine, run.micro, run.device, run.amp_dtype)
    run.model.train()
    totals = torch.tensor([nats, float(count)], dtype=torch.float64, device=run.device)
    if split:
        dist.all_reduce(totals)
    return float(totals[0] / totals[1])


# ----- checkpoints -----------------------------------------------------------------------------------

def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:07d}"


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete resumable checkpoint under OUT/checkpoints/, or None.

    Temporary dirs of an interrupted write (".step_*.tmp-*") and dirs missing any file are skipped.

    Args:
        out: the run's output dir.
    """
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return None
    found = sorted((p for p in root.glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    for p in reversed(found):
        if checkpoint.is_complete(p) and (p / "train_state" / "state.json").is_file():
            return p
    return None


def _full_state(run: Run) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Full (unsharded) model and optimizer state dicts, on every rank (collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=run.cfg.run.fsdp)
    return get_state_dict(run.model, run.optimizer, options=opts)


def _flatten_optimizer(osd: dict[str, Any]) -> dict[str, Tensor]:
    # {"state": {param: {"step", "exp_avg", "exp_avg_sq"}}} -> {"param.exp_avg": tensor, ...}; the
    # 0-d "step" becomes shape (1,) for safetensors.
    flat = {}
    for name, st in osd["state"].items():
        for key, value in st.items():
            flat[f"{name}.{key}"] = value.reshape(1) if value.ndim == 0 else value
    return flat


def _unflatten_optimizer(flat: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    state: dict[str, dict[str, Tensor]] = {}
    for key, value in flat.items():
        name, _, part = key.rpartition(".")
        state.setdefault(name, {})[part] = value.reshape(()) if part == "step" else value
    return state


def save_checkpoint(run: Run, path: Path, resumable: bool = True) -> Path:
    """Write a checkpoint of the run (rank 0 writes; every rank takes part under FSDP).

    Args:
        run: the run.
        path: the checkpoint dir (written atomically).
        resumable: include the optimizer state and the training position (train_state/).
    """
    msd, osd = _full_state(run) if (resumable or run.cfg.run.fsdp) else (None, None)
    if run.dist.main:
        model = run.model
        if run.cfg.run.fsdp:  # a plain CPU copy of the gathered weights to save
            model = checkpoint.build(run.model.config, msd)
        info = dict(step=run.step, tokens=run.step * run.rows * run.cfg.data.seq_len, total_steps=run.total_steps,
                    best_val=run.best_val, world=run.dist.world, config=run.cfg.to_dict()) if resumable else None
        checkpoint.save(model, path, run.tokenizer, meta=_meta(run), train_info=info,
                        train_state={**_flatten_optimizer(osd), **_aux_state(run)} if resumable else None)
    _barrier()
    return path


def _meta(run: Run) -> dict[str, Any]:
    return {"stage": "pretrain", "step": run.step, "tokens": run.step * run.rows * run.cfg.data.seq_len,
            "val_loss": run.last_val, "config": run.cfg.to_dict(), **run.meta}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def restore(run: Run, ckpt: Path) -> None:
    """Load weights, optimizer moments and the step from a resumable checkpoint into the run."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    flat, info = checkpoint.load_train_state(ckpt)
    _load_aux(run, flat)  # pops the aux entries
    weights = checkpoint.load(ckpt).model.state_dict()
    opts = StateDictOptions(full_state_dict=True)
    _, osd = get_state_dict(run.model, run.optimizer, options=opts)  # the param_groups layout to fill
    osd["state"] = _unflatten_optimizer(flat)
    try:
        set_state_dict(run.model, run.optimizer, model_state_dict=weights, optim_state_dict=osd, options=opts)
    except (KeyError, RuntimeError, ValueError) as e:
        raise TinylmError(f"{ckpt} does not match this model/optimizer ({str(e).splitlines()[0]})") from None
    run.step, run.best_val = int(info["step"]), info.get("best_val")


def _prune_checkpoints(out: Path, keep: int) -> None:
    root = out / "checkpoints"
    done = sorted((p for p in root.glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


# ----- aux modules: trainable, but not part of the model (distillation's hidden-state projections) -----

def _attach_aux(run: Run, module: nn.Module) -> None:
    if not any(True for _ in module.parameters()):
        return
    o = run.cfg.optim
    run.aux = module.to(run.device)
    run.aux_optimizer = torch.optim.AdamW([dict(params=list(module.parameters()), lr_scale=1.0)], lr=o.lr,
                                          betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=0.0)


def _step_aux(run: Run, factor: float) -> None:
    """Step run.aux at the model's lr; their gradients are averaged over ranks here (DDP does not see them)."""
    if run.aux_optimizer is None:
        return
    for p in run.aux.parameters():
        if p.grad is not None and dist.is_initialized():
            dist.all_reduce(p.grad)
            p.grad /= run.dist.world
    set_lr(run.aux_optimizer, run.cfg.optim.lr, factor)
    run.aux_optimizer.step()
    run.aux_optimizer.zero_grad(set_to_none=True)


def _aux_state(run: Run) -> dict[str, Tensor]:
    """run.aux's weights and AdamW state as flat train_state/ entries "_aux.weights.<name>", "_aux.optim.<name>.<key>"."""
    if run.aux is None:
        return {}
    names = [n for n, _ in run.aux.named_parameters()]
    flat = {f"_aux.weights.{n}": p.detach() for n, p in run.aux.named_parameters()}
    for i, st in run.aux_optimizer.state_dict()["state"].items():
        flat.update({f"_aux.optim.{names[i]}.{k}": v.reshape(1) if v.ndim == 0 else v for k, v in st.items()})
    return flat


def _load_aux(run: Run, flat: dict[str, Tensor]) -> None:
    """Pop the "_aux." entries of a train_state into run.aux (missing ones: the modules start fresh)."""
    saved = {k: flat.pop(k) for k in [k for k in flat if k.startswith("_aux.")]}
    if run.aux is None:
        return
    osd = run.aux_optimizer.state_dict()
    with torch.no_grad():
        for i, (n, p) in enumerate(run.aux.named_parameters()):
            if f"_aux.weights.{n}" in saved:
                p.copy_(saved[f"_aux.weights.{n}"])
            st = {k.rpartition(".")[2]: v for k, v in saved.items() if k.rpartition(".")[0] == f"_aux.optim.{n}"}
            if st:
                osd["state"][i] = {k: v.reshape(()) if k == "step" else v for k, v in st.items()}
    run.aux_optimizer.load_state_dict(osd)


# ----- logging -----------------------------------------------------------------------------------------

class MetricsLog:
    """OUT/metrics.jsonl (one JSON object per line), plus TensorBoard scalars if asked and installed."""

    def __init__(self, out: Path, start_step: int, enabled: bool, tensorboard: bool) -> None:
        self.path, self.enabled, self.tb = out / "metrics.jsonl", enabled, None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                print("tinylm: tensorboard is not installed; writing metrics.jsonl only")

    def _truncate(self, start_step: int) -> None:
        # A resumed run drops lines written after its checkpoint, so the log has each step once.
        if self.path.is_file():
            keep = [json.dumps(r) for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a last line cut off by a kill is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(metrics: Path, png: Path) -> None:
    """Train and validation loss (left axis, log-scaled steps not needed) and learning rate (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics)
    train = [(r["step"], r["loss"], r["lr"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot([t[0] for t in train], [t[1] for t in train], label="train loss", lw=1)
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(loc="upper right")
    if train:
        ax2 = ax.twinx()
        ax2.plot([t[0] for t in train], [t[2] for t in train], color="gray", ls="--", lw=1)
        ax2.set_ylabel("learning rate (dashed)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ----- the loop ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _catch_signals(run: Run) -> Iterator[None]:
    """SIGINT/SIGTERM set run.stop_signal; the loop checkpoints after the current step and stops."""
    def handler(signum: int, frame: types.FrameType | None) -> None:
        run.stop_signal = signum

    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        old = {}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _grad_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-step (DDP no_sync / FSDP2 flag)."""
    inner = getattr(model, "_orig_mod", model)
    if hasattr(inner, "set_requires_gradient_sync"):  # FSDP2
        inner.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if isinstance(inner, nn.parallel.DistributedDataParallel) and not last:
        return inner.no_sync()
    return contextlib.nullcontext()


def train_step(run: Run, loss_fn: LossFn) -> tuple[float, float]:
    """One optimizer step over the global batch of run.step: (mean loss, gradient norm before clipping).

    A non-finite loss or gradient raises TinylmError before the weights change.

    Args:
        run: the run (its step selects the batch).
        loss_fn: (model, tokens (B, T + 1)) -> scalar loss of the micro-batch.
    """
    cfg, d = run.cfg, run.dist
    loss_sum = torch.zeros((), device=run.device)
    for m in range(run.accum):
        start = (m * d.world + d.rank) * run.micro  # this rank's slice of the global batch
        run.batch_start = start
        tokens = run.train.windows(run.step, cfg.data.seed, run.rows, cfg.data.seq_len, start, run.micro)
        tokens = tokens.to(run.device, non_blocking=True)
        with _grad_sync(run.train_model, m == run.accum - 1):
            with _autocast(run.device, run.amp_dtype):
                loss = loss_fn(run.train_model, tokens) / run.accum
            loss.backward()
        loss_sum += loss.detach()
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
        loss_sum /= d.world
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip))
    loss_value = float(loss_sum)
    for what, value in (("loss", loss_value), ("gradient norm", norm)):
        if not math.isfinite(value):
            run.optimizer.zero_grad(set_to_none=True)
            if run.aux_optimizer is not None:
                run.aux_optimizer.zero_grad(set_to_none=True)
            last = latest_checkpoint(run.out)
            raise TinylmError(f"non-finite {what} ({value}) at step {run.step + 1}; stopped before updating the "
                              f"weights; last good checkpoint: {last or 'none'}")
    set_lr(run.optimizer, cfg.optim.lr, lr_factor(run.step, run.total_steps, cfg.schedule))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    _step_aux(run, lr_factor(run.step, run.total_steps, cfg.schedule))
    run.step += 1
    return loss_value, norm


def fit(run: Run, loss_fn: LossFn = lm_loss) -> Path:
    """Train from run.step to run.total_steps; write checkpoints, metrics, OUT/final and the plot.

    Args:
        run: the run built by setup().
        loss_fn: the loss step, (model, tokens (B, T + 1)) -> scalar; distillation passes its own.

    Returns:
        OUT/final, or the signal checkpoint (after which KeyboardInterrupt is raised).
    """
    from tqdm import tqdm

    cfg, out = run.cfg.run, run.out
    log = MetricsLog(out, run.step, run.dist.main, cfg.tensorboard)
    tokens_per_step = run.rows * run.cfg.data.seq_len
    flops_per_token = run.model.config.flops_per_token(run.cfg.data.seq_len, training=True)
    bar = tqdm(total=run.total_steps, initial=run.step, disable=not (cfg.progress and run.dist.main),
               unit="step", dynamic_ncols=True)
    window_s, window_steps = 0.0, 0  # time spent in training steps since the last log line
    with _catch_signals(run):
        while run.step < run.total_steps:
            t0 = time.perf_counter()
            loss, norm = train_step(run, loss_fn)
            _sync(run.device)
            window_s, window_steps = window_s + time.perf_counter() - t0, window_steps + 1
            tps = tokens_per_step * window_steps / max(window_s, 1e-9)
            mfu = tps * flops_per_token / run.peak_flops
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.0%}", refresh=False)
            record: dict[str, Any] = {}
            if run.step % max(1, cfg.log_every) == 0 or run.step == run.total_steps:
                lr = run.cfg.optim.lr * lr_factor(run.step - 1, run.total_steps, run.cfg.schedule)
                record = dict(step=run.step, tokens=run.step * tokens_per_step, loss=loss, lr=lr,
                              grad_norm=norm, tokens_per_s=tps, mfu=mfu)
                window_s, window_steps = 0.0, 0
            if (cfg.eval_every and run.step % cfg.eval_every == 0) or run.step == run.total_steps:
                run.last_val = validate(run)
                if run.last_val is not None:
                    run.best_val = min(run.best_val or run.last_val, run.last_val)
                    record.update(step=run.step, val_loss=run.last_val, val_ppl=math.exp(min(run.last_val, 50)))
                    bar.write(f"step {run.step}: val loss {run.last_val:.4f}")
            if record:
                log.write(record)
            if run.stop_signal is not None or (cfg.ckpt_every and run.step % cfg.ckpt_every == 0):
                path = save_checkpoint(run, checkpoint_dir(out, run.step))
                if run.dist.main:
                    _prune_checkpoints(out, cfg.keep_last)
                if run.stop_signal is not None:
                    bar.close()
                    log.close()
                    print(f"tinylm: stopped at step {run.step}; checkpoint {path}; continue with --resume auto")
                    raise KeyboardInterrupt
    bar.close()
    log.close()
    final = save_checkpoint(run, out / "final", resumable=False)
    if run.dist.main and cfg.plot and log.path.is_file():
        plot_metrics(log.path, out / "loss.png")
    return final


__all__ = [
    "DataSection", "Dist", "LossFn", "MetricsLog", "ModelSection", "OptimSection", "Run", "RunSection",
    "ScheduleSection", "TrainConfig", "branch_total", "build_model", "checkpoint_dir", "decay_steps",
    "eval_nats", "fit", "latest_checkpoint", "lm_loss", "load_config", "lr_factor", "make_optimizer",
    "matmul_flops", "measure_peak_flops", "param_groups", "parse_overrides", "plot_metrics", "pretrain", "read_metrics",
    "restore", "save_checkpoint", "set_lr", "setup", "train_step", "validate",
]
