"""The run record and its checkpoints: save, find the latest, restore for a resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tinylm.core.devices import Dist
from tinylm.core.errors import TinylmError
from tinylm.data.tokenizer import Tokenizer
from tinylm.data.tokens import Batch, BatchSource, TokenData
from tinylm.formats import checkpoint
from tinylm.formats.peft import is_adapter, load_adapter, write_adapter
from tinylm.model.llama import Llama
from tinylm.model.lora import base_model, lora_layers
from tinylm.model.qlinear import quantization_of
from tinylm.model.surgery import build
from tinylm.train.budget import Budget, read_budget_state
from tinylm.train.optim import Optimizers
from tinylm.train.schedule import Anchor, BatchRamp

# ----- the run: everything setup() builds and fit() advances ----------------------------------------

@dataclass
class Run:
    """The state of one training run. A plain record: setup() fills it, fit() advances it."""

    cfg: Any  # TrainConfig (or a stage's config with the same model/data/optim/schedule/run sections)
    model: Llama  # the unwrapped model (its parameters are the ones being trained)
    train_model: nn.Module  # what the loss step calls: the model, compiled and/or DDP/FSDP-wrapped
    optimizer: Optimizers  # AdamW, or Muon beside AdamW (train.optim)
    batches: BatchSource  # (step, first row, rows) -> Batch: the training data, a pure function of its arguments
    val: TokenData | list[Batch] | None  # a val split's windows, or held-out Batches (sft's chat examples, dpo's pairs)
    tokenizer: Tokenizer | None
    dist: Dist
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for plain fp32
    total_steps: int
    rows: int  # rows (windows) per global batch
    micro: int  # rows per micro-step on one rank
    accum: int  # micro-steps per optimizer step on one rank (of a full batch)
    out: Path
    ramp: BatchRamp  # the global batch of each step (smaller ones first under batch-size warmup)
    step: int = 0  # optimizer steps done
    best_val: float | None = None
    last_val: float | None = None
    peak_flops: float = 0.0
    stop_signal: int | None = None  # set by SIGINT/SIGTERM: checkpoint and stop after this step
    meta: dict[str, Any] = field(default_factory=dict)  # extra facts for the checkpoints' tinylm block
    # Trainable modules beside the model that a loss uses (distillation's hidden-state projections): stepped
    # with the model at its learning rate, saved in train_state/ only, never in the model checkpoint.
    extra_modules: nn.ModuleDict | None = None
    extra_optimizer: torch.optim.Optimizer | None = None
    budget: Budget | None = None  # run.minutes: the wall-clock planner that sets total_steps while training
    decay_anchor: Anchor | None = None  # a WSD decay re-planned mid-way by the budget (schedule.decay_progress)

    def tokens(self) -> int:
        """Tokens trained on so far (all ranks)."""
        return self.ramp.tokens_at(self.step)


def read_train_info(ckpt: Path) -> dict[str, Any]:
    """train_state/state.json of a resumable checkpoint, with the fields a resume reads checked.

    Args:
        ckpt: the checkpoint dir.
    """
    path = ckpt / "train_state" / "state.json"
    if not checkpoint.is_complete(ckpt) or not path.is_file():
        raise TinylmError(f"{ckpt} is not a complete resumable checkpoint (no train_state/state.json)")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinylmError(f"{path}: not valid JSON ({e})") from None
    problem = _info_problem(info)
    if problem:
        raise TinylmError(f"{path}: {problem}")
    return info


def _info_problem(info: Any) -> str | None:
    def count(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(info, dict):
        return "expected a JSON object"
    for key in ("step", "total_steps"):
        if key not in info:
            return f"lacks the key {key!r}"
        if not count(info[key]):
            return f"{key} must be an integer >= 0, got {info[key]!r}"
    if info["step"] > info["total_steps"]:
        return f"step {info['step']} is past total_steps {info['total_steps']}"
    try:
        read_budget_state(info)
    except TinylmError as e:
        return str(e)
    best = info.get("best_val")
    if best is not None and (not isinstance(best, (int, float)) or isinstance(best, bool) or not math.isfinite(best)):
        return f"best_val must be a finite number or null, got {best!r}"
    return None


# ----- checkpoints -----------------------------------------------------------------------------------

def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:07d}"


def _step_dirs(out: str | os.PathLike) -> list[Path]:
    """OUT/checkpoints/step_* dirs, oldest first (temporary dirs of interrupted writes are dot-named)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete resumable checkpoint under OUT/checkpoints/, or None.

    Temporary dirs of an interrupted write (".step_*.tmp-*") and dirs missing any file are skipped.

    Args:
        out: the run's output dir.
    """
    for p in reversed(_step_dirs(out)):
        if checkpoint.is_complete(p) and (p / "train_state" / "state.json").is_file():
            return p
    return None


def resume_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest checkpoint under OUT/checkpoints/ that verifies, for `--resume auto`; None when there
    is none at all (a fresh start).

    A checkpoint that does not verify (a file missing or truncated, a state.json that does not read) is
    skipped, and one line on stderr says which and why. When none verifies, that is a one-line error:
    starting afresh would silently throw the run away.

    Args:
        out: the run's output dir.
    """
    skipped = []
    for p in reversed(_step_dirs(out)):
        problem = checkpoint.verify(p)
        if problem is None and not (p / "train_state").is_dir():
            problem = "not resumable (no train_state/)"
        if problem is None:
            try:
                read_train_info(p)
            except TinylmError as e:
                problem = str(e).replace(str(p) + "/", "")
        if problem is None:
            if skipped and int(os.environ.get("RANK", "0")) == 0:
                print(f"tinylm: resuming from {p.name}; skipped {'; '.join(skipped)}", file=sys.stderr)
            return p
        skipped.append(f"{p.name} ({problem})")
    if skipped:
        raise TinylmError(f"no checkpoint under {Path(out) / 'checkpoints'} verifies: {'; '.join(skipped)}")
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
        model, meta, beside = run.model, _meta(run), None
        if run.cfg.run.fsdp:  # a plain CPU copy of the gathered weights to save
            model = build(run.model.config, msd)
        if lora_layers(model):  # the base (quantised for QLoRA) under HF names, the adapter beside it (PEFT)
            model, adapted = base_model(model), model
            meta["quantization"] = quantization_of(model)
            beside = lambda d: write_adapter(adapted, d, meta.get("base"))  # noqa: E731
        info = dict(step=run.step, tokens=run.tokens(), total_steps=run.total_steps, best_val=run.best_val,
                    world=run.dist.world, config=run.cfg.to_dict()) if resumable else None
        if info is not None and run.budget is not None:
            info["budget"] = run.budget.state(run.decay_anchor)
        checkpoint.save(model, path, run.tokenizer, meta=meta, train_info=info, beside=beside,
                        train_state={**_flatten_optimizer(osd), **_extra_state(run)} if resumable else None)
    _barrier()
    return path


def _meta(run: Run) -> dict[str, Any]:
    return {"stage": "pretrain", "step": run.step, "tokens": run.tokens(),
            "val_loss": run.last_val, "config": run.cfg.to_dict(), **run.meta}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def restore(run: Run, ckpt: Path) -> None:
    """Load weights, optimizer moments and the step from a resumable checkpoint into the run."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    info = read_train_info(ckpt)
    flat, _ = checkpoint.load_train_state(ckpt)
    _load_extra(run, flat)  # pops the extra modules' entries
    saved = checkpoint.load(ckpt).model
    if is_adapter(ckpt):  # a LoRA run: its base with the adapter put back, named as run.model's tensors
        load_adapter(saved, ckpt)
    weights = saved.state_dict()
    opts = StateDictOptions(full_state_dict=True)
    _, osd = get_state_dict(run.model, run.optimizer, options=opts)  # the param_groups layout to fill
    osd["state"] = _unflatten_optimizer(flat)
    try:
        set_state_dict(run.model, run.optimizer, model_state_dict=weights, optim_state_dict=osd, options=opts)
    except (KeyError, RuntimeError, ValueError) as e:
        raise TinylmError(f"{ckpt} does not match this model/optimizer ({str(e).splitlines()[0]})") from None
    run.step, run.best_val = int(info["step"]), info.get("best_val")
    budget = read_budget_state(info)
    if run.budget is not None and budget is not None:  # the plan goes on: the same lr, the time left
        run.budget.spent, run.decay_anchor = budget
        run.total_steps = int(info["total_steps"])


def _prune_checkpoints(out: Path, keep: int) -> None:
    done = _step_dirs(out)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


# train_state/ keys of the extra modules: "_aux.weights.<name>" and "_aux.optim.<name>.<key>" (the prefix
# of the first distillation checkpoints, kept so that they resume)
EXTRA_PREFIX = "_aux."


def _extra_state(run: Run) -> dict[str, Tensor]:
    """run.extra_modules' weights and AdamW state as flat train_state/ entries under EXTRA_PREFIX."""
    if run.extra_modules is None:
        return {}
    names = [n for n, _ in run.extra_modules.named_parameters()]
    flat = {f"{EXTRA_PREFIX}weights.{n}": p.detach() for n, p in run.extra_modules.named_parameters()}
    for i, st in run.extra_optimizer.state_dict()["state"].items():
        flat.update({f"{EXTRA_PREFIX}optim.{names[i]}.{k}": v.reshape(1) if v.ndim == 0 else v for k, v in st.items()})
    return flat


def _load_extra(run: Run, flat: dict[str, Tensor]) -> None:
    """Pop the EXTRA_PREFIX entries of a train_state into run.extra_modules (missing ones start fresh)."""
    saved = {k: flat.pop(k) for k in [k for k in flat if k.startswith(EXTRA_PREFIX)]}
    if run.extra_modules is None:
        return
    osd = run.extra_optimizer.state_dict()
    with torch.no_grad():
        for i, (n, p) in enumerate(run.extra_modules.named_parameters()):
            if f"{EXTRA_PREFIX}weights.{n}" in saved:
                p.copy_(saved[f"{EXTRA_PREFIX}weights.{n}"])
            st = {k.rpartition(".")[2]: v for k, v in saved.items()
                  if k.rpartition(".")[0] == f"{EXTRA_PREFIX}optim.{n}"}
            if st:
                osd["state"][i] = {k: v.reshape(()) if k == "step" else v for k, v in st.items()}
    run.extra_optimizer.load_state_dict(osd)
