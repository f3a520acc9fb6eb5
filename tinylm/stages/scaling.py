"""`tinylm scaling`: a ladder of model sizes x token budgets, trained cheaply with WSD branches, and a
fit of L(N, D) = E + A / N^alpha + B / D^beta with its compute-optimal frontier.

WSD branching (Hu et al. 2024, MiniCPM, sec. 4): under a warmup-stable-decay schedule the learning rate
of the stable phase does not depend on the run's length, so one stable run per size serves every budget.
For a budget of S steps the decay starts at K = S - round(f S) (f = schedule.decay_fraction, MiniCPM
~10%); the stable run stops at each K with a resumable checkpoint (`fit(..., stop_at=K)`), and a decay
branch (`run.decay_from`) continues from it with exactly the schedule of a straight S-step WSD run. A
size with budgets D_1 < ... < D_k costs one run to the last decay start plus k decays, ~(1 - f) D_k +
f (D_1 + ... + D_k) tokens instead of D_1 + ... + D_k. Each branch's final validation loss is a point.

N, the convention: non-embedding parameters (the token embedding and LM head left out; norms counted),
as Kaplan et al. 2020 (sec. 3.1, fig. 6) and MiniCPM count them. At these sizes the embedding is a large
share of all parameters (vocabulary x width) yet adds little per-token compute or capacity, and counting
it bends the loss-vs-N curve of small models away from a power law; `params_total` is recorded beside N.
C = 6 N D (Kaplan et al. 2020, sec. 2.1): training FLOPs of the non-embedding matmuls; `flops_model`
beside it adds the LM head and attention (the PaLM count of `ModelConfig.flops_per_token`).

Layout of --out DIR: ladder.json (the plan; a rerun with another plan is refused), runs/<size>/stable/
(the stable run; its branch-point checkpoints are removed once every branch of the size is done),
runs/<size>/<budget>/ (a branch: a pretrain run dir, and result.json once done), results.jsonl (one
line per finished branch), fit.json and scaling.png. A rerun skips finished branches and continues the
rest; runs are deterministic, so a resumed ladder ends with the numbers of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from tinylm.core.errors import TinylmError
from tinylm.core.fs import atomic_file, check_out
from tinylm.core.recipe import Check, Count, Positive, one_of, validate
from tinylm.data.sources import read_jsonl
from tinylm.data.tokens import read_meta
from tinylm.evals import scaling as law_fit
from tinylm.formats import checkpoint
from tinylm.model.config import ModelConfig, preset
from tinylm.train.config import (
    DataSection,
    ModelSection,
    OptimSection,
    RunSection,
    ScheduleSection,
    TrainConfig,
)
from tinylm.train.loop import fit, setup
from tinylm.train.losses import lm_loss
from tinylm.train.schedule import _check_schedule, branch_total, decay_steps
from tinylm.train.state import checkpoint_dir

FORMAT = "tinylm-scaling-v1"
PARAMS_CONVENTION = "non-embedding parameters (token embedding and LM head excluded), Kaplan et al. 2020"
# the run-section keys that change a ladder's numbers; the others (device, logging, progress) may differ on a rerun
RUN_KEYS = ("seed", "dtype", "eval_tokens")


Counts = Annotated[list[int], Check(ge=1)]  # a list of widths or depths
Amounts = Annotated[list[float], Check(gt=0)]  # a list of parameter or token counts (YAML reads 1e6 as text: floats)


@dataclass
class LadderSection:
    """The ladder: model sizes x token budgets; one WSD stable run per size, a decay branch per budget."""

    widths: Counts = field(default_factory=list)  # model widths (dim), one size each; or give ladder.params
    depths: Counts = field(default_factory=list)  # blocks (n_layers): one per width, or one for all
    params: Amounts = field(default_factory=list)  # or target non-embedding parameter counts, one size each
    aspect: Positive = 32.0  # with params: the width / depth ratio aimed at (dim 128 x 4 layers is 32)
    head_dim: Count = 32  # width of one attention head: n_heads = dim / head_dim
    tokens: Amounts = field(default_factory=list)  # token budgets, increasing, for every size; or tokens_per_param
    tokens_per_param: Amounts = field(default_factory=list)  # budgets per non-embedding parameter, increasing
    keep_checkpoints: bool = False  # keep the stable runs' branch-point checkpoints once their branches are done
    overwrite: bool = False  # start over in an --out that holds another ladder or other files


@dataclass
class FitSection:
    """The fit of L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3)."""

    dir: str | None = None  # refit the results.jsonl in this dir (writes fit.json, scaling.png); no training
    predict: Positive | None = None  # print N_opt, D_opt and the predicted loss at this compute C = 6ND (FLOPs)
    # L-BFGS starts: chinchilla (4500, Hoffmann et al. app. D.2) | coarse (32)
    grid: one_of("chinchilla", "coarse") = "chinchilla"
    huber_delta: Positive = 1e-3  # Huber delta on log-loss residuals (Hoffmann et al. 2022: 1e-3)


@dataclass
class LadderRunSection(RunSection):
    """Outputs, devices, evaluation and checkpointing of every run of the ladder."""

    out: str = "runs/scaling"  # the ladder dir (--out): ladder.json, runs/, results.jsonl, fit.json, scaling.png


@dataclass
class ScalingConfig:
    """`tinylm scaling`: the ladder and the fit, and the training sections every run of the ladder shares
    (the ladder sets each run's model shape, schedule length, run.out, run.resume and run.decay_from)."""

    ladder: LadderSection = field(default_factory=LadderSection)
    fit: FitSection = field(default_factory=FitSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    run: LadderRunSection = field(default_factory=LadderRunSection)


# fit.grid coarse: two starts per parameter inside Chinchilla's ranges, 32 in all (a quick refit; on the
# noisy synthetic ladders of tests/test_scaling.py it ends at the same optimum as the full grid)
COARSE_GRID = {"alpha": (0.5, 1.5), "beta": (0.5, 1.5), "e": (-1.0, 1.0), "a": (5.0, 15.0), "b": (5.0, 15.0)}


# ----- the plan: sizes, budgets, and the steps they become --------------------------------------------

@dataclass(frozen=True)
class Size:
    """One model size of the ladder."""

    name: str  # d128-l4
    dim: int
    n_layers: int
    n_heads: int
    params: int  # non-embedding (N)
    params_total: int  # with the embedding (and an untied LM head)
    flops_per_token: int  # training FLOPs per token, PaLM's count (ModelConfig.flops_per_token)


@dataclass(frozen=True)
class Budget:
    """One token budget of one size: a WSD run of `steps` steps whose decay starts at `decay_start`."""

    name: str  # tokens-000409600
    steps: int
    decay_start: int
    tokens: int  # steps x data.batch_tokens: the budget asked for, rounded to whole steps of a branch


def make_plan(cfg: ScalingConfig) -> list[tuple[Size, list[Budget]]]:
    """Every size with its budgets; every mistake in the config is a one-line TinylmError here.

    Args:
        cfg: the scaling config.
    """
    _check_sections(cfg)
    vocab = read_meta(cfg.data.dir)["vocab_size"]
    sizes = _sizes(cfg, vocab)
    plan = [(size, _budgets(cfg, size)) for size in sizes]
    runs = sum(len(b) for _, b in plan)
    if cfg.fit.predict is not None and runs < law_fit.N_PARAMS:
        raise TinylmError(f"--predict needs a fit, and a ladder of {runs} runs is too small for one "
                          f"(at least {law_fit.N_PARAMS})")
    return plan


def _check_sections(cfg: ScalingConfig) -> None:
    validate(cfg)
    _check_ladder(cfg.ladder)
    set_by_ladder = {"model.init": cfg.model.init, "model.dim": cfg.model.dim, "model.n_layers": cfg.model.n_layers,
                     "model.n_heads": cfg.model.n_heads, "model.n_kv_heads": cfg.model.n_kv_heads,
                     "model.ffn_dim": cfg.model.ffn_dim, "schedule.steps": cfg.schedule.steps,
                     "schedule.tokens": cfg.schedule.tokens, "run.decay_from": cfg.run.decay_from}
    for name, value in set_by_ladder.items():
        if value is not None:
            raise TinylmError(f"{name} is set by the ladder for each run; leave it out (sizes: ladder.widths or "
                              f"ladder.params; budgets: ladder.tokens or ladder.tokens_per_param)")
    if cfg.schedule.kind != "wsd":
        raise TinylmError(f"the ladder branches WSD decays from stable runs: schedule.kind must be wsd, "
                          f"got {cfg.schedule.kind}")
    _check_schedule(cfg.schedule)
    if not cfg.data.dir:
        raise TinylmError("no training data: set data.dir (a dir made by `tinylm data prepare`)")
    if "val" not in read_meta(cfg.data.dir)["splits"]:
        raise TinylmError(f"{cfg.data.dir} has no val split, and each run's result is its final validation loss: "
                          f"prepare the data with a val fraction")


def _check_ladder(lad: LadderSection) -> None:
    """Sizes and budgets: each given one way, the budgets increasing."""
    if not (lad.widths or lad.params) or not (lad.tokens or lad.tokens_per_param):
        raise TinylmError("the ladder is empty: give sizes (ladder.widths with ladder.depths, or ladder.params) "
                          "and budgets (ladder.tokens or ladder.tokens_per_param)")
    for a, b in (("widths", "params"), ("tokens", "tokens_per_param")):
        if getattr(lad, a) and getattr(lad, b):
            raise TinylmError(f"set ladder.{a} or ladder.{b}, not both")
    if lad.widths and len(lad.depths) not in (1, len(lad.widths)):
        raise TinylmError(f"ladder.depths needs one value, or one per width ({len(lad.widths)}), "
                          f"got {len(lad.depths)}")
    if lad.params and lad.depths:
        raise TinylmError("ladder.depths goes with ladder.widths; with ladder.params the shapes follow ladder.aspect")
    for name in ("tokens", "tokens_per_param"):
        values = getattr(lad, name)
        if any(b <= a for a, b in zip(values, values[1:])):
            raise TinylmError(f"ladder.{name} must be increasing, got {values}")


def _sizes(cfg: ScalingConfig, vocab: int) -> list[Size]:
    lad = cfg.ladder
    if lad.widths:
        depths = lad.depths * len(lad.widths) if len(lad.depths) == 1 else lad.depths
        shapes = list(zip(lad.widths, depths))
    else:
        shapes = [_shape_for(target, lad.aspect, lad.head_dim, cfg, vocab) for target in lad.params]
    sizes = [_size(dim, layers, cfg, vocab) for dim, layers in shapes]
    names = [s.name for s in sizes]
    for i, name in enumerate(names):
        if name in names[:i]:
            given = f"ladder.params {lad.params}" if lad.params else "ladder.widths and ladder.depths"
            raise TinylmError(f"two sizes of the ladder are both {name} ({given}): space them further apart")
    return sizes


def _model_config(dim: int, layers: int, cfg: ScalingConfig, vocab: int) -> ModelConfig:
    """The ModelConfig that pretraining builds for this shape (train.loop.build_model's rules)."""
    head_dim = cfg.ladder.head_dim
    if dim % head_dim:
        raise TinylmError(f"ladder width {dim} is not a multiple of ladder.head_dim {head_dim}")
    if cfg.model.preset is None:
        raise TinylmError("model.preset is needed: the ladder builds each size from it (its other fields)")
    extra = {"tie_embeddings": cfg.model.tie_embeddings} if cfg.model.tie_embeddings is not None else {}
    return preset(cfg.model.preset, vocab_size=vocab, dim=dim, n_layers=layers, n_heads=dim // head_dim,
                  n_kv_heads=None, ffn_dim=None, **extra)


def _size(dim: int, layers: int, cfg: ScalingConfig, vocab: int) -> Size:
    mc = _model_config(dim, layers, cfg, vocab)
    return Size(f"d{dim}-l{layers}", dim, layers, mc.n_heads, mc.param_count(include_embeddings=False),
                mc.param_count(), mc.flops_per_token(cfg.data.seq_len, training=True))


def _shape_for(target: float, aspect: float, head_dim: int, cfg: ScalingConfig, vocab: int) -> tuple[int, int]:
    """(dim, n_layers) for a target non-embedding count: over depths 1..64 and widths that are multiples
    of head_dim, the shape whose count is nearest the target (in log), a miss in width / depth vs
    `aspect` weighing a quarter as much (so 1% more of a miss in count buys 4% nearer the aspect)."""
    best, best_score = (head_dim, 1), math.inf
    for layers in range(1, 65):
        for dim in range(head_dim, 16385, head_dim):  # the count grows with the width: stop past the target
            n = _model_config(dim, layers, cfg, vocab).param_count(include_embeddings=False)
            score = abs(math.log(n / target)) + abs(math.log(dim / layers / aspect)) / 4
            if score < best_score:
                best, best_score = (dim, layers), score
            if n > target:
                break
    return best


def _budgets(cfg: ScalingConfig, size: Size) -> list[Budget]:
    lad, f, batch = cfg.ladder, cfg.schedule.decay_fraction, cfg.data.batch_tokens
    asked = lad.tokens or [t * size.params for t in lad.tokens_per_param]
    budgets = []
    for tokens in asked:
        steps = max(1, math.ceil(tokens / batch))
        start = steps - decay_steps(steps, f)
        if start < cfg.schedule.warmup_steps:
            raise TinylmError(f"size {size.name}: a budget of {tokens:,.0f} tokens is {steps} steps of "
                              f"{batch} tokens, whose decay starts at step {start}, inside the warmup "
                              f"(schedule.warmup_steps {cfg.schedule.warmup_steps}): raise the budget, or lower "
                              f"the warmup or data.batch_tokens")
        if budgets and start <= budgets[-1].decay_start:
            raise TinylmError(f"size {size.name}: budgets {budgets[-1].tokens:,} and {tokens:,.0f} tokens round to "
                              f"the same decay start (step {start}) at data.batch_tokens {batch}: space them "
                              f"further apart")
        total = branch_total(start, f)  # the shortest run decaying from `start`: the branch's length
        budgets.append(Budget(f"tokens-{total * batch:09d}", total, start, total * batch))
    return budgets


def plan_cost(cfg: ScalingConfig, plan: list[tuple[Size, list[Budget]]]) -> dict[str, float]:
    """What the ladder trains: tokens and training FLOPs (PaLM's count, LM head and attention included),
    and the tokens that separate runs of every budget would train instead.

    Args:
        cfg: the scaling config.
        plan: from make_plan.
    """
    batch, tokens, flops, separate = cfg.data.batch_tokens, 0, 0.0, 0
    for size, budgets in plan:
        trained = budgets[-1].decay_start + sum(b.steps - b.decay_start for b in budgets)  # steps
        tokens += trained * batch
        flops += trained * batch * size.flops_per_token
        separate += sum(b.tokens for b in budgets)
    return {"runs": sum(len(b) for _, b in plan), "tokens": tokens, "flops": flops, "separate_tokens": separate}


# ----- the output dir -------------------------------------------------------------------------------

def identity(cfg: ScalingConfig, plan: list[tuple[Size, list[Budget]]]) -> dict[str, Any]:
    """What ladder.json holds: everything that makes the ladder's numbers; a rerun must match it."""
    train = {s: dataclasses.asdict(getattr(cfg, s)) for s in ("model", "data", "optim", "schedule")}
    train["data"]["dir"] = str(Path(cfg.data.dir).resolve())
    train["run"] = {k: getattr(cfg.run, k) for k in RUN_KEYS}
    return {"format": FORMAT, "params_convention": PARAMS_CONVENTION,
            "sizes": [dict(dataclasses.asdict(s), budgets=[dataclasses.asdict(b) for b in budgets])
                      for s, budgets in plan],
            "train": train}


def _prepare_out(cfg: ScalingConfig, ident: dict[str, Any]) -> Path:
    """Check --out before anything is written: new, empty, or this very ladder (resumed); or replaced
    with ladder.overwrite."""
    out = Path(cfg.run.out)
    check_out(out, overwrite=True, kind="dir")
    if out.is_dir() and any(out.iterdir()):
        held = _read_json(out / "ladder.json") if (out / "ladder.json").is_file() else None
        if held != ident:
            if not cfg.ladder.overwrite:
                what = "holds no ladder" if held is None else f"holds another ladder ({_first_difference(held, ident)})"
                raise TinylmError(f"{out} {what}: pass --overwrite to start over there, or another --out")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "ladder.json") as tmp:
        tmp.write_text(json.dumps(ident, indent=1) + "\n")
    return out


def _first_difference(held: Any, new: Any, path: str = "") -> str:
    """The first key where two JSON values differ, as a dotted path: `train.optim.lr 0.003 -> 0.002`."""
    if isinstance(held, dict) and isinstance(new, dict):
        for key in list(new) + [k for k in held if k not in new]:
            if held.get(key) != new.get(key):
                return _first_difference(held.get(key), new.get(key), f"{path}.{key}" if path else key)
    if isinstance(held, list) and isinstance(new, list) and len(held) == len(new):
        for i, (a, b) in enumerate(zip(held, new)):
            if a != b:
                return _first_difference(a, b, f"{path}[{i}]")
    return f"{path or 'the file'}: {json.dumps(held)[:60]} -> {json.dumps(new)[:60]}"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinylmError(f"{path}: not readable JSON ({e})") from None


# ----- the ladder -----------------------------------------------------------------------------------

def run_config(cfg: ScalingConfig, size: Size, out: Path, steps: int | None = None,
               resume: str = "auto", decay_from: str | None = None) -> TrainConfig:
    """The pretraining config of one run of the ladder: the shared sections with this size's shape.

    Args:
        cfg: the scaling config.
        size: the model size.
        out: the run dir.
        steps: the schedule's length (the stable run's); None for a branch (decay_from sets it).
        resume: run.resume ("auto", or a checkpoint to start from).
        decay_from: a branch's stable checkpoint.
    """
    return TrainConfig(
        model=dataclasses.replace(cfg.model, dim=size.dim, n_layers=size.n_layers, n_heads=size.n_heads),
        data=dataclasses.replace(cfg.data),
        optim=dataclasses.replace(cfg.optim),
        schedule=dataclasses.replace(cfg.schedule, steps=steps),
        # the stable run checkpoints at the branch points only (stop_at): the loop's keep_last would prune them
        run=dataclasses.replace(cfg.run, out=str(out), resume=resume, decay_from=decay_from,
                                ckpt_every=cfg.run.ckpt_every if decay_from else 0))


def run_ladder(cfg: ScalingConfig, plan: list[tuple[Size, list[Budget]]], out: Path) -> list[dict[str, Any]]:
    """Train every size's stable run and its branches (skipping finished ones); the results, in plan order.

    Args:
        cfg: the scaling config.
        plan: from make_plan.
        out: the ladder dir.
    """
    for size, budgets in plan:
        _run_size(cfg, size, budgets, out / "runs" / size.name)
    return collect(plan, out)


def _run_size(cfg: ScalingConfig, size: Size, budgets: list[Budget], root: Path) -> None:
    stable_dir, stable = root / "stable", None
    pending = [b for b in budgets if not (root / b.name / "result.json").is_file()]
    _say(f"{size.name}: {size.params:,} non-embedding parameters; {len(budgets) - len(pending)} of "
         f"{len(budgets)} budgets done")
    for budget in pending:
        source = checkpoint_dir(stable_dir, budget.decay_start)
        if not _resumable(source):
            if stable is None:  # one stable run (one model build, one compile) per size and session
                stable = setup(run_config(cfg, size, stable_dir, steps=budgets[-1].steps,
                                          resume=_stable_start(stable_dir, budget.decay_start)))
            _say(f"{size.name}: stable phase to step {budget.decay_start}")
            fit(stable, lm_loss, stop_at=budget.decay_start)
        _say(f"{size.name}: decay branch to {budget.tokens:,} tokens (steps {budget.decay_start}-{budget.steps})")
        branch = setup(run_config(cfg, size, root / budget.name, decay_from=str(source)))
        fit(branch, lm_loss)
        _write_result(root / budget.name, size, budget, branch.last_val)
    if not cfg.ladder.keep_checkpoints:  # every branch is done: its start points are no longer needed
        shutil.rmtree(stable_dir / "checkpoints", ignore_errors=True)


def _resumable(ckpt: Path) -> bool:
    return checkpoint.is_complete(ckpt) and (ckpt / "train_state" / "state.json").is_file()


def _stable_start(stable_dir: Path, step: int) -> str:
    """run.resume for a stable run that must reach `step`: its newest checkpoint at or before it, else
    "auto" from scratch. Later checkpoints without the earlier ones (a branch redone after its start
    point was removed) are removed: the stable run is redone from step 0, with the same bits."""
    found = sorted((int(p.name[5:]), p) for p in (stable_dir / "checkpoints").glob("step_*")
                   if p.name[5:].isdigit() and _resumable(p))
    before = [p for s, p in found if s <= step]
    if before:
        return str(before[-1])
    shutil.rmtree(stable_dir / "checkpoints", ignore_errors=True)
    return "auto"


def _write_result(branch_dir: Path, size: Size, budget: Budget, loss: float | None) -> None:
    if loss is None or not math.isfinite(loss):
        raise TinylmError(f"{branch_dir}: the run ended without a finite validation loss ({loss})")
    record = {"size": size.name, "dim": size.dim, "n_layers": size.n_layers, "n_heads": size.n_heads,
              "params": size.params, "params_total": size.params_total, "tokens": budget.tokens,
              "steps": budget.steps, "decay_start": budget.decay_start, "loss": loss,
              "flops": 6 * size.params * budget.tokens, "flops_model": size.flops_per_token * budget.tokens,
              "run": f"runs/{size.name}/{budget.name}"}
    with atomic_file(branch_dir / "result.json") as tmp:
        tmp.write_text(json.dumps(record) + "\n")


def collect(plan: list[tuple[Size, list[Budget]]], out: Path) -> list[dict[str, Any]]:
    """OUT/results.jsonl from the finished branches' result.json, in plan order; returns the records.

    Args:
        plan: from make_plan.
        out: the ladder dir.
    """
    records = [_read_json(p) for size, budgets in plan for b in budgets
               if (p := out / "runs" / size.name / b.name / "result.json").is_file()]
    with atomic_file(out / "results.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


# ----- the fit --------------------------------------------------------------------------------------

def read_results(path: Path) -> list[dict[str, Any]]:
    """The records of a results.jsonl: each a JSON object with positive, finite params, tokens and loss.

    Args:
        path: the file.
    """
    if not path.is_file():
        raise TinylmError(f"no results at {path}: run `tinylm scaling --config LADDER --out DIR` first")
    records = read_jsonl(str(path), "the ladder's results")
    for i, r in enumerate(records, 1):
        for key in ("params", "tokens", "loss"):
            value = r.get(key) if isinstance(r, dict) else None
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise TinylmError(f"{path}: record {i}: {key} must be a positive finite number, got {value!r}")
        r.setdefault("flops", 6 * r["params"] * r["tokens"])
    return records


def fit_results(records: list[dict[str, Any]], cfg: FitSection) -> dict[str, Any]:
    """The fit of the runs, its frontier and tokens per parameter at the optimum, as fit.json holds them.

    Args:
        records: results.jsonl records.
        cfg: the fit section (grid, Huber delta).
    """
    found = law_fit.fit_law([r["params"] for r in records], [r["tokens"] for r in records],
                            [r["loss"] for r in records], delta=cfg.huber_delta,
                            grid=COARSE_GRID if cfg.grid == "coarse" else None)
    law, c_max = found.law, max(r["flops"] for r in records)
    budgets = [c_max * 10.0 ** k for k in (-2, -1, 0, 1, 2, 3)]
    return {"law": law.to_dict(), "log": found.log, "objective": found.objective, "runs": found.points,
            "starts": found.starts, "converged": found.converged, "huber_delta": found.delta, "grid": cfg.grid,
            "params_convention": PARAMS_CONVENTION, "flops_convention": "C = 6 N D", "ladder_max_flops": c_max,
            # None where the law has no optimum (an exponent <= 0: the runs do not show loss falling with both)
            "tokens_per_param_at_ladder_max_flops": float(law.tokens_per_param(c_max)) if law.has_optimum else None,
            "frontier": law_fit.frontier(law, budgets) if law.has_optimum else None}


def _write_fit(out: Path, records: list[dict[str, Any]], fitted: dict[str, Any] | None) -> None:
    law = law_fit.ScalingLaw(**fitted["law"]) if fitted else None
    if fitted is not None:
        with atomic_file(out / "fit.json") as tmp:
            tmp.write_text(json.dumps(fitted, indent=1) + "\n")
    with atomic_file(out / "scaling.png") as tmp:
        law_fit.plot_ladder(records, law, tmp)


def _print_fit(fitted: dict[str, Any]) -> None:
    law = fitted["law"]
    print(f"L(N, D) = {law['E']:.4f} + {law['A']:.4g} / N^{law['alpha']:.4f} + {law['B']:.4g} / D^{law['beta']:.4f}"
          f"   ({fitted['runs']} runs, Huber {fitted['objective']:.3g}, best of {fitted['starts']} L-BFGS starts)")
    if fitted["frontier"] is None:
        print(f"alpha {law['alpha']:.4f}  beta {law['beta']:.4f}: with an exponent <= 0 there is no compute-optimal "
              f"frontier (loss does not fall with both N and D over these runs)")
        return
    print(f"alpha {law['alpha']:.4f}  beta {law['beta']:.4f}  tokens per parameter at the optimum "
          f"{fitted['tokens_per_param_at_ladder_max_flops']:.1f} at {fitted['ladder_max_flops']:.3g} FLOPs "
          f"(Chinchilla ~20, MiniCPM ~192)")
    print("compute-optimal frontier (C = 6ND, N non-embedding):")
    print(f"  {'FLOPs':>10} {'N_opt':>12} {'D_opt':>14} {'D/N':>8} {'loss':>8}")
    for p in fitted["frontier"]:
        print(f"  {p['flops']:>10.3g} {p['params']:>12,.0f} {p['tokens']:>14,.0f} {p['tokens_per_param']:>8.1f} "
              f"{p['loss']:>8.4f}")


def predict(fitted: dict[str, Any], flops: float) -> dict[str, float]:
    """N_opt, D_opt, D_opt / N_opt and the predicted loss at C FLOPs, from a fit.json's law.

    Args:
        fitted: fit_results' record.
        flops: the compute budget C = 6ND.
    """
    return law_fit.frontier(law_fit.ScalingLaw(**fitted["law"]), [flops])[0]


def _print_prediction(p: dict[str, float]) -> None:
    print(f"at C = {p['flops']:.4g} FLOPs: N_opt {p['params']:,.0f} non-embedding parameters, D_opt "
          f"{p['tokens']:,.0f} tokens ({p['tokens_per_param']:.1f} per parameter), predicted loss {p['loss']:.4f}")


# ----- the command ----------------------------------------------------------------------------------

def scaling(cfg: ScalingConfig) -> dict[str, Any]:
    """Run (or resume) the ladder, then fit it; or, with fit.dir, refit existing results.

    Returns {"dir", "results", "fit" (None with fewer runs than the law has parameters), "prediction"}.

    Args:
        cfg: the scaling config.
    """
    if cfg.fit.dir:
        validate(cfg)
        out = Path(cfg.fit.dir)
        records = read_results(out / "results.jsonl")
        law_fit.check_enough(len(records))
        for name in ("fit.json", "scaling.png"):  # the outputs of an earlier fit are replaced
            check_out(out / name, overwrite=True, kind="file")
        _say(f"fitting {len(records)} runs")
        fitted = fit_results(records, cfg.fit)
    else:
        plan = make_plan(cfg)
        out = _prepare_out(cfg, identity(cfg, plan))
        cost = plan_cost(cfg, plan)
        _say(f"{len(plan)} sizes, {cost['runs']} runs: trains {cost['tokens']:,} tokens ({cost['flops']:.3g} FLOPs), "
             f"{cost['tokens'] / cost['separate_tokens']:.0%} of the {cost['separate_tokens']:,} of separate runs")
        records = run_ladder(cfg, plan, out)
        fitted = None
        if len(records) >= law_fit.N_PARAMS:
            _say(f"fitting {len(records)} runs")
            fitted = fit_results(records, cfg.fit)
    _write_fit(out, records, fitted)
    prediction = predict(fitted, cfg.fit.predict) if fitted and cfg.fit.predict else None
    return {"dir": str(out), "results": records, "fit": fitted, "prediction": prediction}


def main(cfg: ScalingConfig) -> None:
    """`tinylm scaling`."""
    done = scaling(cfg)
    out = Path(done["dir"])
    print(f"{'size':>10} {'N':>10} {'D':>12} {'C=6ND':>10} {'loss':>8}")
    for r in done["results"]:
        print(f"{r.get('size', ''):>10} {r['params']:>10,} {r['tokens']:>12,} {r['flops']:>10.3g} {r['loss']:>8.4f}")
    if done["fit"] is None:
        print(f"{len(done['results'])} runs: too few to fit the {law_fit.N_PARAMS} parameters of L(N, D); "
              f"add sizes or budgets")
    else:
        _print_fit(done["fit"])
        print(f"wrote {out / 'fit.json'}")
    if done["prediction"] is not None:
        _print_prediction(done["prediction"])
    print(f"wrote {out / 'results.jsonl'} and {out / 'scaling.png'}")


def _say(message: str) -> None:
    print(f"[scaling] {message}", flush=True)
