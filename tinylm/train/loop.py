"""The one training loop: `setup -> fit`, for every stage that trains.

`setup(cfg)` builds everything (model, optimizer, data, devices) and checks the config before any
output is written; `fit(run, loss_fn)` is one plain loop. A stage that trains differs from pretraining
only in its batch source (`run.batches`, (step, first row, rows) -> `Batch`) and its loss function
(`LossFn`, (model, batch) -> (loss, metrics)); schedules, evaluation, checkpoints, resume, DDP/FSDP2,
signals, metrics and plots live here once (STYLE.md rules 4 and 5). A stage that trains a model held in
memory for a few steps (prune's recovery steps) builds its run with `setup_model`; a stage that builds
its own model and batch source and trains it as pretraining does (sft: resume, validation, DDP) calls
`begin`, checks its inputs, then `start`, the two halves of `setup`.

Determinism: a step's batches depend only on (data seed, step) (`TokenData.batches`), the model has no
dropout, and checkpoints hold the exact fp32 weights and AdamW moments, so a run killed and resumed
with `--resume auto` ends with the same bits as one that never stopped, compiled or not (a compiled CPU
run needs deterministic algorithms for that, see `_wrap`).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tinylm.core.devices import (
    Dist,
    _autocast,
    _sync,
    cpu_bf16_units,
    init_distributed,
    keep_freed_cpu_memory,
    measure_peak_flops,
    resolve_device,
)
from tinylm.core.errors import Terminated, TinylmError, optional_import
from tinylm.core.fs import check_out
from tinylm.core.recipe import check_context
from tinylm.core.recipe import validate as validate_config
from tinylm.data.tokenizer import Tokenizer
from tinylm.data.tokens import Batch, BatchSource, TokenData
from tinylm.formats import checkpoint
from tinylm.model.config import PRESETS, ModelConfig, preset
from tinylm.model.llama import Llama
from tinylm.model.surgery import check_memory
from tinylm.train.budget import UNBOUNDED, Budget, Plan, check_budget
from tinylm.train.config import DataSection, ModelSection, RunSection
from tinylm.train.losses import LossFn, eval_batches, eval_nats, is_lm_loss, lm_loss
from tinylm.train.metrics import MetricsLog, plot_metrics
from tinylm.train.optim import make_optimizer, set_lr
from tinylm.train.schedule import (
    BatchRamp,
    _check_schedule,
    branch_total,
    decay_steps,
    lr_factor,
    planned_steps,
)
from tinylm.train.state import (
    Run,
    _prune_checkpoints,
    checkpoint_dir,
    latest_checkpoint,
    read_train_info,
    restore,
    resume_checkpoint,
    save_checkpoint,
)

__all__ = ["Batch", "BatchSource", "LossFn", "Run", "begin", "fit", "setup", "setup_model", "start", "train_step"]

ExtraModules = Callable[[Llama], nn.ModuleDict]  # model -> named trainable modules beside it (see Run)


def setup(cfg: Any, extra_modules: ExtraModules | None = None) -> Run:
    """Check the config, build model, optimizer and data, and restore a checkpoint if asked.

    Every user error is raised here, before anything is written. The batch source is the data dir's
    train split (`TokenData.batches`).

    Args:
        cfg: a TrainConfig (or any config with model, data, optim, schedule and run sections).
        extra_modules: builds named trainable modules from the model (run.extra_modules, e.g.
            distillation's projections); they get their own AdamW at the model's lr and are saved in
            train_state/ only.
    """
    d, device = begin(cfg)
    if not cfg.data.dir:
        raise TinylmError("no training data: set data.dir (a dir made by `tinylm data prepare`)")
    train = TokenData.open(cfg.data.dir, "train")
    val = TokenData.open(cfg.data.dir, "val") if "val" in train.meta["splits"] else None
    tokenizer = data_tokenizer(cfg.data.dir)
    rows = batch_layout(cfg.data, d.world)[0]
    torch.manual_seed(cfg.run.seed)
    model, tokenizer = build_model(cfg.model, cfg.data.seq_len, train, tokenizer)
    for split in (train, val) if val is not None else (train,):  # ids beyond the embedding rows
        split.check_vocab(model.config.vocab_size, str(cfg.model.init or "the model"))
    if cfg.data.document_rows:
        train.document_starts(cfg.data.seq_len)  # a data dir without documents fails here, before the run dir
    batches = train.batches(cfg.data.seed, rows, cfg.data.seq_len, document_share(cfg.data, d.world))
    return start(cfg, model, batches, d, device, val, tokenizer, extra_modules)


def begin(cfg: Any) -> tuple[Dist, torch.device]:
    """The first part of every setup: check the config and the output path, join the process group.

    Nothing is written. A stage that builds its own model and batches (sft) calls this, checks its
    inputs, then calls `start`.

    Args:
        cfg: a config with model, data, optim, schedule and run sections.

    Returns:
        (the process layout, this process's device).
    """
    validate_config(cfg)  # the declared ranges, also for a config built in Python
    _check_schedule(cfg.schedule)
    check_budget(cfg)
    if cfg.optim.name == "muon" and cfg.run.fsdp:
        raise TinylmError("optim.name muon needs whole matrices: not with run.fsdp (use DDP)")
    check_out(cfg.run.out, overwrite=True)  # a run dir is resumed or added to, never replaced: check the path
    d, device = init_distributed(cfg.run.device)
    if getattr(cfg.run, "tensorboard", False):
        optional_import("tensorboard", "tensorboard", "run.tensorboard")
    return d, device


def start(cfg: Any, model: Llama, batches: BatchSource, d: Dist, device: torch.device,
          val: TokenData | list[Batch] | None = None, tokenizer: Tokenizer | None = None,
          extra_modules: ExtraModules | None = None) -> Run:
    """The shared part of every setup: plan the steps, build the run, restore a checkpoint if asked.

    Resume (`run.resume`), checkpoints, validation, metrics and DDP then work as in pretraining, whatever
    the model and batch source are (a model with LoRA adapters too: see `state.save_checkpoint`).

    Args:
        cfg: a config with model, data, optim, schedule and run sections (checked by `begin`).
        model: the model to train, on the CPU in fp32 (its trainable parameters are the ones optimised).
        batches: the batch source, a pure function of (step, first row, rows).
        d, device: from `begin`.
        val: validation data: a TokenData split (its windows), or a list of Batches that `fit`'s loss step
            scores (`validate`); None: none.
        tokenizer: saved beside the weights in every checkpoint.
        extra_modules: see `setup`.
    """
    out = Path(cfg.run.out)
    resume_from, total = _plan_start(cfg, out, batch_ramp(cfg.data, d.world))
    has_val = val is not None and (not isinstance(val, list) or len(val) > 0)
    if cfg.run.keep_best and not has_val:
        raise TinylmError("run.keep_best needs validation data: the data dir has no val split")
    run = _assemble(cfg, model, batches, d, device, total, out)
    run.val, run.tokenizer = val, tokenizer
    if cfg.run.minutes is not None:
        run.budget = Budget(cfg.run.minutes * 60, run.ramp, cfg.schedule, None if total == UNBOUNDED else total,
                            end_tokens=cfg.run.eval_tokens / 3 if has_val else 0.0)  # a forward: ~1/3 of a step
    if extra_modules is not None:
        _attach_extra(run, extra_modules(model))
    if resume_from is not None:
        restore(run, resume_from)
        if cfg.run.keep_best and not (out / "best").is_dir():
            run.best_val = None  # a branch from another run's checkpoint: its best is that run's
    amp = run.amp_dtype
    run.peak_flops = cfg.run.peak_flops or measure_peak_flops(device, torch.float32 if amp is None else amp)
    return run


def setup_model(cfg: Any, model: Llama, batches: BatchSource) -> Run:
    """A run over a model already in memory, in this process: no data dir, no resume, no validation.

    For a few steps of `train_step` inside another stage (prune's recovery steps); `fit` works too and
    writes to cfg.run.out.

    Args:
        cfg: a config with data (seq_len and batch layout), optim, schedule and run sections.
        model: the model to train in place.
        batches: the batch source.
    """
    validate_config(cfg)
    _check_schedule(cfg.schedule)
    ramp = batch_ramp(cfg.data, 1)
    total = planned_steps(cfg.schedule, ramp.rows * cfg.data.seq_len, ramp)
    model.train()
    return _assemble(cfg, model, batches, Dist(), resolve_device(cfg.run.device), total, Path(cfg.run.out))


def _assemble(cfg: Any, model: Llama, batches: BatchSource, d: Dist, device: torch.device, total: int,
              out: Path) -> Run:
    """The Run record: the model on its device and wrapped, its optimizer, the batch layout."""
    rows, micro, accum = batch_layout(cfg.data, d.world)
    ramp = batch_ramp(cfg.data, d.world)
    if device.type == "cpu":
        keep_freed_cpu_memory()  # no page faults refilling freed activations: fixed-batch steps 8-13% faster
    model.to(device)
    train_model = _wrap(model, cfg.run, d, device, dynamic_batch=bool(ramp.ramp))
    optimizer = make_optimizer(model, cfg.optim, device)
    amp = _amp_dtype(cfg.run.dtype, device, model.num_params())
    return Run(cfg, model, train_model, optimizer, batches, None, None, d, device, amp, total, rows, micro, accum,
               out, ramp)


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
    micro = min(data.micro_batch, per_rank)  # documented: a micro_batch above per_rank means per_rank
    if per_rank % micro:
        raise TinylmError(f"{per_rank} rows per process is not a multiple of data.micro_batch {micro}")
    return rows, micro, per_rank // micro


def document_share(data: DataSection, world: int) -> float | Callable[[int], float]:
    """data.document_rows, or while the first data.document_rows_tokens tokens are read, 0 after them."""
    if not data.document_rows or not data.document_rows_tokens:
        return data.document_rows
    steps = batch_ramp(data, world).steps_for(data.document_rows_tokens)  # the steps that read those tokens
    return lambda step: data.document_rows if step < steps else 0.0


def batch_ramp(data: DataSection, world: int) -> BatchRamp:
    """The global batch of every step: data.batch_tokens, or growing to it (data.batch_warmup_tokens)."""
    rows = batch_layout(data, world)[0]
    return BatchRamp.make(rows, data.seq_len, world, data.batch_warmup_tokens, data.batch_warmup_start)


def build_model(m: ModelSection, seq_len: int, data: TokenData,
                tokenizer: Tokenizer | None) -> tuple[Llama, Tokenizer | None]:
    """The model to train, on the CPU in fp32, and the tokenizer to save beside it.

    Args:
        m: the model section: a preset with shape overrides, or `init` (a model source to continue).
        seq_len: training context; the model's max_seq_len is raised to it if shorter.
        data: the training data (a new model gets its vocabulary size).
        tokenizer: the data's tokenizer (None if the data dir has none).
    """
    vocab_size = data.vocab_size
    if m.init:
        loaded = checkpoint.load(m.init)
        data.check_vocab(loaded.config.vocab_size, str(m.init))
        if not m.extend_context:
            check_context("data.seq_len", seq_len, loaded.config.max_seq_len, f"model.init {m.init}",
                          extend="model.extend_context true")
        elif seq_len > loaded.config.max_seq_len:  # the saved config.json says the context it was trained on
            loaded.model.config.max_seq_len = seq_len
            loaded.model.reserve(seq_len)
        loaded.model.train()
        return loaded.model, tokenizer or loaded.tokenizer
    cfg = new_model_config(m, seq_len, vocab_size, tokenizer)
    check_memory(cfg, f"model.preset {m.preset} with its overrides")  # fp32 master weights, built on the CPU
    return Llama(cfg), tokenizer


def new_model_config(m: ModelSection, seq_len: int, vocab_size: int, tokenizer: Tokenizer | None) -> ModelConfig:
    """The shape of a new model: the preset with the model section's overrides.

    Args:
        m: the model section (its preset and shape fields).
        seq_len: training context; max_seq_len is at least this.
        vocab_size: the data's vocabulary.
        tokenizer: the data's tokenizer, whose special ids go into the config (None: none).
    """
    if m.preset not in PRESETS:
        raise TinylmError(f"model.preset {m.preset!r} is unknown (known: {', '.join(PRESETS)}), or set model.init")
    shape = {k: getattr(m, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len",
                                         "tie_embeddings", "qk_norm", "logit_softcap") if getattr(m, k) is not None}
    if "max_seq_len" not in shape:
        shape["max_seq_len"] = max(PRESETS[m.preset].get("max_seq_len", 512), seq_len)
    if seq_len > shape["max_seq_len"]:
        raise TinylmError(f"data.seq_len {seq_len} is longer than model.max_seq_len {shape['max_seq_len']}")
    if ("dim" in shape or "n_heads" in shape) and "n_kv_heads" not in shape:
        shape["n_kv_heads"] = None  # derived from n_heads again
    if tokenizer is not None:
        shape.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return preset(m.preset, vocab_size=vocab_size, **shape)


def _plan_start(cfg: Any, out: Path, ramp: BatchRamp) -> tuple[Path | None, int]:
    """(checkpoint to restore or None, total steps) from run.resume / run.decay_from and the schedule;
    with run.minutes, the total is the schedule's cap (if it has steps or tokens) or UNBOUNDED until the
    budget plans it."""
    s, r = cfg.schedule, cfg.run
    if r.decay_from:
        if s.kind != "wsd":
            raise TinylmError("run.decay_from needs schedule.kind wsd")
        src = Path(r.decay_from)
        info = read_train_info(src)
        start, src_total = int(info["step"]), int(info["total_steps"])
        if start < s.warmup_steps or start > src_total - decay_steps(src_total, s.decay_fraction):
            raise TinylmError(f"{src} (step {start}) is not in the stable phase of its WSD schedule")
        latest = resume_checkpoint(out) if r.resume == "auto" else None  # a killed branch continues
        return latest or src, branch_total(start, s.decay_fraction)
    if r.minutes is not None and s.steps is None and s.tokens is None:
        total = UNBOUNDED
    else:
        total = planned_steps(s, ramp.rows * cfg.data.seq_len, ramp)
    if r.resume == "never":
        if latest_checkpoint(out) is not None:
            raise TinylmError(f"{out} already holds checkpoints: pass --resume auto to continue, or another run.out")
        return None, total
    if r.resume == "auto":
        return resume_checkpoint(out), total
    src = Path(r.resume)
    read_train_info(src)
    return src, total


def _amp_dtype(name: str, device: torch.device, params: int) -> torch.dtype | None:
    """The autocast dtype of run.dtype; None for plain fp32.

    auto is bf16 on CUDA, and on a CPU with bf16 matrix units (core.devices.cpu_bf16_units) for models
    from BF16_CPU_MIN_PARAMS parameters: with AMX a 1M-parameter step takes 1.33x (eager) to 1.75x (compiled)
    less time than in fp32, a 5M one 1.6x to 2x less, and a 0.4M one (dim 64, eager) none (BENCHMARKS.md, "bf16 on a
    CPU with AMX"); with AVX512-BF16 alone 1.55x to 1.99x, 2.1x to 2.43x, and 1.06x to 1.23x ("bf16 on an
    AVX512-BF16 CPU without AMX"). The weights, gradients and optimizer state stay fp32.
    """
    if name not in ("auto", "float32", "bfloat16"):
        raise TinylmError(f"run.dtype must be auto, float32 or bfloat16, got {name!r}")
    cpu_bf16 = device.type == "cpu" and params >= BF16_CPU_MIN_PARAMS and cpu_bf16_units()
    if name == "bfloat16" or (name == "auto" and (device.type == "cuda" or cpu_bf16)):
        return torch.bfloat16
    return None


BF16_CPU_MIN_PARAMS = 1_000_000


def use_compile(flag: bool | None, model: Llama, device: torch.device) -> bool:
    """run.compile, or its default: on for CUDA; on a CPU, on from 1M parameters, where compiling is
    faster (bench/bench_train.py), and off below, where the compile time outweighs the gain."""
    if flag is not None:
        return flag
    return device.type == "cuda" or model.num_params() >= COMPILE_MIN_PARAMS


COMPILE_MIN_PARAMS = 1_000_000


def _wrap(model: Llama, r: RunSection, d: Dist, device: torch.device, dynamic_batch: bool = False) -> nn.Module:
    """The module the loss step calls: FSDP2-sharded or DDP-wrapped under torchrun, then compiled.

    dynamic_batch (batch-size warmup: the rows of a micro-batch change over the ramp): the loss step marks
    the batch dimension dynamic (train.losses.lm_loss), so the first compile serves every batch size.
    Compiled for the first shape only, the step of the second shape recompiled the model and the loss, a
    30-40 s stall mid-run on a 2-core CPU at 1M parameters; compiled with every dimension dynamic
    (torch.compile(dynamic=True)), its full steps took 180 ms against 167 without a ramp (BENCHMARKS.md,
    "Batch-size warmup at the quickstart's budget"); with only the rows dynamic, a full step takes as long as
    one compiled for the full batch alone (bench/bench_dynamic_batch.py). A micro-batch of one row still
    compiles once more: dynamo specialises 0 and 1.
    """
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
        wrapped.dynamic_batch = dynamic_batch  # read by train.losses.lm_loss, which marks the rows dynamic
    return wrapped


def validate(run: Run, loss_fn: LossFn = lm_loss) -> dict[str, float] | None:
    """The validation record, or None without validation data: val_loss, the mean LM loss over
    run.eval_tokens tokens of a val split's windows, or the mean of the run's own loss step over a list
    of val Batches (sft: the masked LM loss; dpo: the preference loss), with the loss's metrics as
    val_<name> and val_ppl where the loss is an LM loss. Ranks share the windows or batches.

    Args:
        run: the run (run.val is its validation data).
        loss_fn: the run's loss step, which scores val Batches.
    """
    if run.val is None:
        return None
    windows = isinstance(run.val, TokenData)
    if windows:
        n = max(1, run.cfg.run.eval_tokens // run.cfg.data.seq_len)
        items: Any = run.val.eval_windows(run.cfg.data.seq_len, max_windows=n)
    else:
        items = run.val
    split = dist.is_initialized() and not run.cfg.run.fsdp  # FSDP ranks must run the same forwards
    mine = (w for i, w in enumerate(items) if not split or i % run.dist.world == run.dist.rank)
    run.model.eval()
    if windows:
        (nats, count), sums = eval_nats(run.model, mine, run.micro, run.device, run.amp_dtype), {}
    else:
        nats, count, sums = eval_batches(run.model, mine, run.device, run.amp_dtype, loss_fn)
    run.model.train()
    names = _names_over_ranks(sorted(sums)) if split else sorted(sums)  # a rank may have had no batch
    totals = torch.tensor([nats, float(count)] + [sums.get(k, 0.0) for k in names], dtype=torch.float64,
                          device=run.device)
    if split:
        dist.all_reduce(totals)
    if totals[1] <= 0:
        return None
    means = (totals / totals[1]).tolist()
    record = {"val_loss": means[0], **{f"val_{k}": v for k, v in zip(names, means[2:])}}
    if windows or is_lm_loss(loss_fn):  # a mean negative log-likelihood: its perplexity means something
        record["val_ppl"] = math.exp(min(means[0], 50))
    return record


def _names_over_ranks(names: list[str]) -> list[str]:
    """The sorted union of every rank's metric names (the same list on every rank)."""
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, names)
    return sorted({k for g in gathered for k in g or []})


# ----- extra modules: trainable, but not part of the model (distillation's hidden-state projections) -----

def _attach_extra(run: Run, modules: nn.ModuleDict) -> None:
    if not any(True for _ in modules.parameters()):
        return
    o = run.cfg.optim
    run.extra_modules = modules.to(run.device)
    run.extra_optimizer = torch.optim.AdamW([dict(params=list(modules.parameters()), lr_scale=1.0)], lr=o.lr,
                                            betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=0.0)


def _step_extra(run: Run, factor: float) -> None:
    """Step run.extra_modules at the model's lr; their gradients are averaged over ranks here (DDP does
    not see them)."""
    if run.extra_optimizer is None:
        return
    for p in run.extra_modules.parameters():
        if p.grad is not None and dist.is_initialized():
            dist.all_reduce(p.grad)
            p.grad /= run.dist.world
    set_lr(run.extra_optimizer, run.cfg.optim.lr, factor)
    run.extra_optimizer.step()
    run.extra_optimizer.zero_grad(set_to_none=True)


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


def _micro_batches(run: Run) -> tuple[list[Batch], float]:
    """This rank's micro-batches of the global batch of run.step, and the weight of the whole global batch."""
    d = run.dist
    per_rank = run.ramp.rows_at(run.step) // d.world  # all of run.rows // world but under batch-size warmup
    sizes = [min(run.micro, per_rank - start) for start in range(0, per_rank, run.micro)]
    # micro-step m of rank r reads rows [(m * world + r) * micro, ... + its size) of the global batch
    batches = [run.batches(run.step, (m * d.world + d.rank) * run.micro, size) for m, size in enumerate(sizes)]
    total = torch.tensor([sum(b.weight for b in batches)], dtype=torch.float64)
    if dist.is_initialized():
        total = total.to(run.device)
        dist.all_reduce(total)
    total = float(total)
    if total <= 0:
        raise TinylmError(f"the batch of step {run.step + 1} has nothing to learn from (every target is masked)")
    return batches, total


def train_step(run: Run, loss_fn: LossFn) -> dict[str, float]:
    """One optimizer step over the global batch of run.step.

    Each micro-batch's loss is weighted by its share of the global batch's weight (batch.weight, its
    counted targets by default), so the step minimises the mean over the whole global batch, as one
    large batch on one process would. A non-finite loss or gradient raises TinylmError before the
    weights change.

    Args:
        run: the run (its step selects the batches).
        loss_fn: (model, batch) -> (mean loss of the micro-batch, metrics).

    Returns:
        {"loss": mean loss, "grad_norm": gradient norm before clipping, and the loss's metrics, averaged}.
    """
    cfg, d = run.cfg, run.dist
    batches, total = _micro_batches(run)
    sums: dict[str, Tensor] = {"loss": torch.zeros((), device=run.device)}
    for m, batch in enumerate(batches):
        share = batch.weight * d.world / total  # DDP/FSDP average gradients over ranks: undo the 1 / world
        with _grad_sync(run.train_model, m == len(batches) - 1):
            with _autocast(run.device, run.amp_dtype):
                loss, metrics = loss_fn(run.train_model, batch.to(run.device))
                loss = loss * share
            loss.backward()
        sums["loss"] += loss.detach()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, device=run.device).detach().float() * share
    stats = _mean_over_ranks(sums, d)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip))
    for what, key in (("loss", "loss"), ("gradient norm", "grad_norm")):
        if not math.isfinite(stats[key]):
            _stop_non_finite(run, what, stats[key])
    factor = lr_factor(run.step, run.total_steps, cfg.schedule, run.decay_anchor)
    stats["lr"] = set_lr(run.optimizer, cfg.optim.lr, factor)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    _step_extra(run, factor)
    run.step += 1
    return stats


def _mean_over_ranks(sums: dict[str, Tensor], d: Dist) -> dict[str, float]:
    """Each rank's weighted sums, averaged over ranks in one all-reduce (every rank has the same keys)."""
    values = torch.stack([sums[k] for k in sums])
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= d.world
    return dict(zip(sums, values.tolist()))


def _stop_non_finite(run: Run, what: str, value: float) -> None:
    run.optimizer.zero_grad(set_to_none=True)
    if run.extra_optimizer is not None:
        run.extra_optimizer.zero_grad(set_to_none=True)
    last = latest_checkpoint(run.out)
    raise TinylmError(f"non-finite {what} ({value}) at step {run.step + 1}; stopped before updating the "
                      f"weights; last good checkpoint: {last or 'none'}")


@contextlib.contextmanager
def _no_empty_run_dir(run: Run) -> Iterator[None]:
    """A run that fails before its first step (its inputs were at fault) leaves no run dir it created."""
    created, start = not run.out.exists(), run.step
    try:
        yield
    except BaseException:
        if created and run.step == start and run.dist.main:
            shutil.rmtree(run.out, ignore_errors=True)
        raise


def fit(run: Run, loss_fn: LossFn = lm_loss, stop_at: int | None = None) -> Path:
    """Train from run.step to run.total_steps; write checkpoints, metrics, OUT/final and the plot.

    Args:
        run: the run built by setup().
        loss_fn: the loss step, (model, batch) -> (loss, metrics); distillation passes its own.
        stop_at: stop after this step, before run.total_steps, and write a resumable checkpoint
            OUT/checkpoints/step_N there in place of OUT/final: the first part of a run that is
            continued later (`fit` again, or `--resume auto`), such as a WSD stable phase that decay
            branches start from (`tinylm scaling`). The learning rate follows the whole run's schedule.

    Returns:
        OUT/final (the checkpoint at stop_at with stop_at); after a signal checkpoint it raises
        KeyboardInterrupt (Terminated on SIGTERM).
    """
    if stop_at is not None and not run.step <= stop_at < run.total_steps:
        raise ValueError(f"stop_at {stop_at} is not in [step {run.step}, total_steps {run.total_steps})")
    with _no_empty_run_dir(run):
        return _fit(run, loss_fn, stop_at)


def _follow_budget(run: Run, bar: Any) -> None:
    """Let the budget re-plan after a step; under torchrun every rank takes rank 0's plan (clocks differ)."""
    plan = run.budget.step_done(run.step, Plan(run.total_steps, run.decay_anchor))
    if dist.is_initialized():
        anchor = plan.anchor or (-1, 0.0)
        shared = torch.tensor([plan.total, anchor[0], anchor[1]], dtype=torch.float64, device=run.device)
        dist.broadcast(shared, src=0)
        total, step, p = shared.tolist()
        plan = Plan(int(total), (int(step), p) if step >= 0 else None)
    if plan.total != run.total_steps:
        bar.total = plan.total
    run.total_steps, run.decay_anchor = plan.total, plan.anchor


def _fit(run: Run, loss_fn: LossFn, stop_at: int | None) -> Path:
    from tqdm import tqdm

    cfg, out = run.cfg.run, run.out
    log = MetricsLog(out, run.step, run.dist.main, cfg.tensorboard)
    flops_per_token = run.model.config.flops_per_token(run.cfg.data.seq_len, training=True)
    budgeted = run.budget is not None
    bar = tqdm(total=None if budgeted and run.total_steps == UNBOUNDED else run.total_steps, initial=run.step,
               disable=not (cfg.progress and run.dist.main), unit="step", dynamic_ncols=True)
    window_s, window_tokens = 0.0, 0  # time spent in training steps since the last log line, and their tokens
    started = time.perf_counter()  # time_s: seconds into this session, evaluations and checkpoints included
    with _catch_signals(run):
        # a budget re-plans run.total_steps while running; stop_at (a part of the run) stays fixed
        while run.step < (run.total_steps if stop_at is None else stop_at):
            if budgeted:
                run.budget.step_started()
            t0, tokens = time.perf_counter(), run.tokens()
            stats = train_step(run, loss_fn)
            _sync(run.device)
            window_s, window_tokens = window_s + time.perf_counter() - t0, window_tokens + run.tokens() - tokens
            if budgeted:
                _follow_budget(run, bar)
            now = time.perf_counter() - started
            tps = window_tokens / max(window_s, 1e-9)
            mfu = tps * flops_per_token / run.peak_flops if run.peak_flops else 0.0
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.0%}", refresh=False)
            record: dict[str, Any] = {}
            if run.step % cfg.log_every == 0 or run.step == run.total_steps:
                record = dict(step=run.step, tokens=run.tokens(), **stats, tokens_per_s=tps, mfu=mfu, time_s=now)
                window_s, window_tokens = 0.0, 0
            if (cfg.eval_every and run.step % cfg.eval_every == 0) or run.step == run.total_steps:
                vals = validate(run, loss_fn)
                run.last_val = None if vals is None else vals["val_loss"]
                if vals is not None:
                    improved = run.best_val is None or run.last_val < run.best_val
                    run.best_val = run.last_val if improved else run.best_val
                    if improved and cfg.keep_best:
                        save_checkpoint(run, out / "best", resumable=False)
                    record.update(step=run.step, tokens=run.tokens(), time_s=now, **vals)
                    if run.dist.main:
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
                    raise Terminated if run.stop_signal == signal.SIGTERM else KeyboardInterrupt
    bar.close()
    log.close()
    if stop_at is not None and run.step < run.total_steps:
        # a part of the run: resumable, and not pruned by keep_last until a later save
        return save_checkpoint(run, checkpoint_dir(out, run.step))
    final = save_checkpoint(run, out / "final", resumable=False)
    if run.dist.main and cfg.plot and log.path.is_file():
        plot_metrics(log.path, out / "loss.png")
    return final
