"""`tinylm scaling`: the fit recovers a known law from noisy losses (Chinchilla's approach 3); the frontier
is the brute-force optimum; a WSD branch starts from the stable checkpoint and ends where a straight run of
its length does; a tiny real ladder runs end to end, resumes without redoing work, and refuses bad configs
with one line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import torch
from helpers import assert_bitwise, make_data, weights
from scipy.optimize import approx_fprime
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from tinylm import cli
from tinylm.core.errors import TinylmError
from tinylm.core.recipe import load_config
from tinylm.evals.scaling import (
    CHINCHILLA_GRID,
    ScalingLaw,
    _objective,
    fit_law,
    frontier,
)
from tinylm.formats import checkpoint
from tinylm.stages import scaling as stage
from tinylm.train.loop import fit, setup
from tinylm.train.schedule import lr_factor

CHINCHILLA = ScalingLaw(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28)  # Hoffmann et al. 2022, eq. 10
SMALL_LM = ScalingLaw(E=0.5, A=60.0, alpha=0.3, B=300.0, beta=0.35)  # a law with a lower floor, other exponents


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train several times faster on one thread of a busy 2-core machine (and the same bits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ladder_points(law: ScalingLaw, sigma: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ladder like a real one: 6 sizes (0.1M-3M) x 5 budgets (5-80 tokens per parameter), losses from
    `law` times log-normal noise of `sigma`."""
    rng = np.random.default_rng(seed)
    n = np.repeat(np.geomspace(1e5, 3e6, 6), 5)
    d = n * np.tile([5.0, 10.0, 20.0, 40.0, 80.0], 6)
    return n, d, law.loss(n, d) * np.exp(rng.normal(0.0, sigma, n.size))


def assert_recovered(found: dict[str, float], law: ScalingLaw, tol: float = 0.05) -> None:
    errors = {k: found[k] / v - 1 for k, v in law.to_dict().items()}
    assert all(abs(e) < tol for e in errors.values()), f"relative errors {errors}"


# ----- the fit -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("law, seed", [(CHINCHILLA, 0), (CHINCHILLA, 1), (SMALL_LM, 2)])
def test_fit_recovers_a_known_law_from_noisy_losses(law: ScalingLaw, seed: int) -> None:
    n, d, loss = ladder_points(law, sigma=1e-3, seed=seed)  # 0.1% noise, seeded
    found = fit_law(n, d, loss, grid=stage.COARSE_GRID)
    print(f"seed {seed}: {found.law} (objective {found.objective:.3g}, {found.converged}/{found.starts} converged)")
    assert_recovered(found.law.to_dict(), law)
    assert found.starts == 2 ** 5 and found.points == 30


@pytest.mark.slow
def test_fit_dir_refits_results_and_predicts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    n, d, loss = ladder_points(SMALL_LM, sigma=1e-3, seed=3)
    (tmp_path / "results.jsonl").write_text("".join(
        json.dumps({"params": int(a), "tokens": int(b), "loss": float(c)}) + "\n" for a, b, c in zip(n, d, loss)))
    assert cli.main(["scaling", "--fit", str(tmp_path), "--fit.grid", "coarse", "--predict", "1e15"]) == 0
    fitted = json.loads((tmp_path / "fit.json").read_text())
    assert_recovered(fitted["law"], SMALL_LM)
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    law = ScalingLaw(**fitted["law"])
    n_opt, d_opt = law.optimal(1e15)
    out = capsys.readouterr().out
    assert f"N_opt {n_opt:,.0f} non-embedding parameters, D_opt {d_opt:,.0f} tokens" in out
    assert f"predicted loss {float(law.loss(n_opt, d_opt)):.4f}" in out
    c_max = max(6 * int(a) * int(b) for a, b in zip(n, d))
    assert fitted["tokens_per_param_at_ladder_max_flops"] == pytest.approx(float(law.tokens_per_param(c_max)))


def test_objective_is_summed_huber_of_log_residuals_and_its_gradient_is_right(rng: np.random.Generator) -> None:
    n, d, loss = ladder_points(SMALL_LM, sigma=0.01, seed=4)
    args = (np.log(n), np.log(d), np.log(loss), 1e-3)
    for _ in range(5):
        theta = rng.uniform([0, 0.1, 0, 0.1, -1], [10, 1, 10, 1, 1])  # a, alpha, b, beta, e
        a, alpha, b, beta, e = theta
        predicted = np.logaddexp.reduce([a - alpha * np.log(n), b - beta * np.log(d), np.full(n.size, e)], axis=0)
        want = scipy.special.huber(1e-3, predicted - np.log(loss)).sum()
        value, grad = _objective(theta, *args)
        assert value == pytest.approx(want, rel=1e-12)
        numeric = approx_fprime(theta, lambda t: _objective(t, *args)[0], 1e-7)
        np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-9)


def test_frontier_is_the_brute_force_optimum() -> None:
    for law in (CHINCHILLA, SMALL_LM):
        for c in (1e12, 1e15, 1e18, 1e21):
            n = np.geomspace(1e2, 1e14, 400001)
            best = n[np.argmin(law.loss(n, c / (6 * n)))]  # the loss along C = 6ND, searched on a fine grid
            p = frontier(law, [c])[0]
            assert p["params"] == pytest.approx(best, rel=1e-3)
            assert p["tokens"] == pytest.approx(c / (6 * p["params"]), rel=1e-9)
            assert p["tokens_per_param"] == pytest.approx(p["tokens"] / p["params"])
            assert p["loss"] == pytest.approx(float(law.loss(p["params"], p["tokens"])))


def test_chinchilla_frontier_figures() -> None:
    # Hoffmann et al. 2022, eq. 4 with their fit: N_opt grows as C^0.45 (a = beta / (alpha + beta) = 0.452)
    n1, _ = CHINCHILLA.optimal(1e21)
    n2, _ = CHINCHILLA.optimal(1e23)
    assert math.log(n2 / n1) / math.log(100) == pytest.approx(0.28 / 0.62)
    assert math.prod(len(v) for v in CHINCHILLA_GRID.values()) == 4500  # app. D.2: 5 x 5 x 5 x 6 x 6 starts


def test_a_fit_needs_as_many_runs_as_parameters() -> None:
    n, d, loss = ladder_points(SMALL_LM, 0.0, 0)
    with pytest.raises(TinylmError, match="4 runs are too few .* at least 5 runs"):
        fit_law(n[:4], d[:4], loss[:4])
    with pytest.raises(TinylmError, match="positive, finite"):
        fit_law(n[:6], d[:6], np.r_[loss[:5], 0.0])


def test_a_missing_scipy_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import scipy.optimize now raises ImportError
    n, d, loss = ladder_points(SMALL_LM, 0.0, 0)
    with pytest.raises(TinylmError, match=r"needs scipy, which is not installed: pip install 'tinylm\[scaling\]'"):
        fit_law(n, d, loss)


def test_a_law_without_an_optimum_says_so() -> None:
    with pytest.raises(TinylmError, match="no compute-optimal size"):
        ScalingLaw(E=1.0, A=10.0, alpha=-0.1, B=10.0, beta=0.3).optimal(1e15)


# ----- the plan ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data") / "d")


LADDER = {"ladder.widths": "[16,32]", "ladder.depths": "[1]", "ladder.head_dim": "8", "ladder.tokens": "[1024,2048]",
          "data.seq_len": "16", "data.batch_tokens": "64", "data.micro_batch": "4", "schedule.warmup_steps": "2",
          "schedule.decay_fraction": "0.25", "run.eval_tokens": "256", "run.progress": "false", "run.plot": "false",
          "run.compile": "false", "run.device": "cpu", "run.peak_flops": "1e11", "run.log_every": "1"}


def words(data: Path, out: Path, **extra: str) -> list[str]:
    args = {**LADDER, "data.dir": str(data), "run.out": str(out), **extra}
    return ["scaling", *[w for k, v in args.items() for w in (f"--{k}", v)]]


def config(data: Path, out: Path, **extra: str) -> stage.ScalingConfig:
    return load_config(stage.ScalingConfig, None, {**LADDER, "data.dir": str(data), "run.out": str(out), **extra})


def test_budgets_are_wsd_runs_whose_decays_start_at_the_branch_points(data: Path, tmp_path: Path) -> None:
    cfg = config(data, tmp_path / "o", **{"ladder.tokens": "[1000,2000,5000]", "schedule.decay_fraction": "0.1"})
    plan = stage.make_plan(cfg)
    assert [s.name for s, _ in plan] == ["d16-l1", "d32-l1"]
    for size, budgets in plan:
        for b, asked in zip(budgets, (1000, 2000, 5000)):
            steps = math.ceil(asked / 64)
            assert b.decay_start == steps - round(0.1 * steps)  # MiniCPM's decay: the last ~10% of the run
            assert b.steps - round(0.1 * b.steps) == b.decay_start and b.steps <= steps
            assert b.tokens == b.steps * 64
        assert size.params == stage._model_config(size.dim, 1, cfg, 64).param_count(include_embeddings=False)


def test_tokens_per_param_budgets_scale_with_each_size(data: Path, tmp_path: Path) -> None:
    cfg = config(data, tmp_path / "o", **{"ladder.tokens": "[]", "ladder.tokens_per_param": "[2,4]"})
    for size, budgets in stage.make_plan(cfg):
        for b, tpp in zip(budgets, (2, 4)):
            assert abs(b.tokens - tpp * size.params) <= 64 * 2, (size, b)  # within the rounding to whole steps


def test_target_params_find_shapes_near_the_target(data: Path, tmp_path: Path) -> None:
    targets = [1e5, 3e5, 1e6, 3e6]
    cfg = config(data, tmp_path / "o", **{"ladder.widths": "[]", "ladder.depths": "[]", "ladder.head_dim": "32",
                                          "ladder.params": str(targets), "ladder.tokens": "[1e6]",
                                          "data.batch_tokens": "4096", "data.seq_len": "128", "data.micro_batch": "32"})
    sizes = [s for s, _ in stage.make_plan(cfg)]
    for size, target in zip(sizes, targets):
        assert abs(math.log(size.params / target)) < math.log(1.15), size
        assert 16 <= size.dim / size.n_layers <= 64 and size.dim % 32 == 0, size


def test_the_recipe_is_a_5_by_4_ladder_of_0_1m_to_3m_within_the_time_budget(data: Path) -> None:
    recipe = Path(stage.__file__).parents[1] / "recipes" / "scaling-tinytales.yaml"
    meta = json.loads((data / "meta.json").read_text())
    fake = data.parent / "vocab2048"
    fake.mkdir(exist_ok=True)
    (fake / "meta.json").write_text(json.dumps({**meta, "vocab_size": 2048}))  # the bench's TinyTales tokenizer
    cfg = load_config(stage.ScalingConfig, recipe, {"data.dir": str(fake)})
    plan = stage.make_plan(cfg)
    assert len(plan) >= 5 and all(len(b) >= 4 for _, b in plan)
    assert all(1e5 <= s.params <= 3e6 for s, _ in plan)
    # the recipe's sizing: at 10 GFLOP/s (the 1M model's 1-2K tokens/s under load) its steps take < 75 minutes
    assert stage.plan_cost(cfg, plan)["flops"] / 10e9 < 75 * 60


@pytest.mark.parametrize("extra, message", [
    ({"ladder.widths": "[]"}, "the ladder is empty"),
    ({"ladder.tokens": "[]"}, "the ladder is empty"),
    ({"ladder.tokens": "[2048,1024]"}, "ladder.tokens must be increasing"),
    ({"ladder.tokens": "[1152,1216]"}, "round to the same decay start"),  # 18 and 19 steps both decay from 14
    ({"ladder.tokens": "[128,1024]"}, "inside the warmup"),
    ({"ladder.params": "[1e5]"}, "set ladder.widths or ladder.params, not both"),
    ({"ladder.widths": "[]", "ladder.params": "[1e3,1e4]"}, "ladder.depths goes with ladder.widths"),
    ({"ladder.depths": "[1,2,3]"}, "ladder.depths needs one value, or one per width (2)"),
    ({"ladder.widths": "[16,20]"}, "ladder width 20 is not a multiple of ladder.head_dim 8"),
    ({"ladder.widths": "[16,16]"}, "two sizes of the ladder are both d16-l1"),
    ({"model.dim": "64"}, "model.dim is set by the ladder"),
    ({"schedule.steps": "10"}, "schedule.steps is set by the ladder"),
    ({"schedule.kind": "cosine"}, "schedule.kind must be wsd"),
    ({"fit.predict": "1e15"}, "a ladder of 4 runs is too small"),
])
def test_bad_ladders_are_one_line_errors_and_write_nothing(data: Path, tmp_path: Path, extra: dict, message: str,
                                                           capsys: pytest.CaptureFixture) -> None:
    assert cli.main(words(data, tmp_path / "o", **extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinylm: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_data_without_a_val_split_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = make_data(tmp_path / "d")
    meta = json.loads((d / "meta.json").read_text())
    del meta["splits"]["val"]
    (d / "meta.json").write_text(json.dumps(meta))
    assert cli.main(words(d, tmp_path / "o")) == 2
    assert "has no val split" in capsys.readouterr().err


# ----- a real ladder -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ladder(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 sizes x 2 budgets, trained for real (a few steps each), branch-point checkpoints kept."""
    out = tmp_path_factory.mktemp("ladder") / "l"
    assert cli.main(words(data, out, **{"ladder.keep_checkpoints": "true"})) == 0
    return out


@pytest.mark.slow  # the ladder fixture trains 8 runs
def test_a_tiny_ladder_writes_results_and_a_plot(ladder: Path, data: Path) -> None:
    records = [json.loads(line) for line in (ladder / "results.jsonl").read_text().splitlines()]
    assert [(r["size"], r["tokens"]) for r in records] == [(s, t) for s in ("d16-l1", "d32-l1") for t in (1024, 2048)]
    for r in records:
        final = checkpoint.load(ladder / r["run"] / "final")
        assert r["params"] == final.config.param_count(include_embeddings=False)  # N: non-embedding
        assert r["params_total"] == final.model.num_params()
        assert r["flops"] == 6 * r["params"] * r["tokens"] and r["tokens"] == 64 * r["steps"]
        last = [json.loads(x) for x in (ladder / r["run"] / "metrics.jsonl").read_text().splitlines()][-1]
        assert last["step"] == r["steps"] and r["loss"] == last["val_loss"]  # the final validation loss
    losses = {(r["size"], r["tokens"]): r["loss"] for r in records}
    assert losses["d32-l1", 2048] < losses["d32-l1", 1024]  # a longer run of the same model learns more
    assert (ladder / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (ladder / "fit.json").exists()  # 4 runs: too few for the 5-parameter law
    assert json.loads((ladder / "ladder.json").read_text())["params_convention"].startswith("non-embedding")


@pytest.mark.slow  # the ladder fixture trains 8 runs
def test_each_branch_starts_from_the_stable_checkpoint(ladder: Path, data: Path) -> None:
    cfg = config(data, ladder)
    for size, budgets in stage.make_plan(cfg):
        for b in budgets:
            src = ladder / "runs" / size.name / "stable" / "checkpoints" / f"step_{b.decay_start:07d}"
            run = setup(stage.run_config(cfg, size, ladder / "probe", decay_from=str(src)))
            assert run.step == b.decay_start and run.total_steps == b.steps
            saved, now = weights(src), run.model.state_dict()
            for name, p in saved.items():  # (a tied LM head is saved once, as the embedding)
                assert torch.equal(now[name], p), f"{size.name} {b.name}: {name} is not the stable checkpoint's"
            moments = checkpoint.load_train_state(src)[0]
            state = get_state_dict(run.model, run.optimizer, options=StateDictOptions(full_state_dict=True))[1]
            assert len(state["state"]) == len(saved)  # every trained tensor has its moments
            for name, st in state["state"].items():  # the AdamW moments continue too
                for k in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(st[k], moments[f"{name}.{k}"]), f"{size.name} {b.name}: {name}.{k}"
            assert lr_factor(b.decay_start - 1, b.steps, cfg.schedule) == 1.0  # still stable before the branch


@pytest.mark.slow  # the ladder fixture trains 8 runs
def test_a_branch_ends_where_a_straight_wsd_run_of_its_length_does(ladder: Path, data: Path, tmp_path: Path) -> None:
    cfg = config(data, tmp_path)
    size, budgets = stage.make_plan(cfg)[1]
    for b in budgets:
        straight = fit(setup(stage.run_config(cfg, size, tmp_path / b.name, steps=b.steps)))
        assert_bitwise(weights(straight), weights(ladder / "runs" / size.name / b.name / "final"), b.name)


@pytest.mark.slow  # the ladder fixture trains 8 runs
def test_a_rerun_skips_finished_work(ladder: Path, data: Path, capsys: pytest.CaptureFixture) -> None:
    before = {p: p.stat().st_mtime_ns for p in ladder.rglob("*") if p.is_file() and p.suffix != ".png"}
    results = (ladder / "results.jsonl").read_text()
    assert cli.main(words(data, ladder, **{"ladder.keep_checkpoints": "true", "run.progress": "true"})) == 0
    assert "2 of 2 budgets done" in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for p in before}
    changed = {str(p.relative_to(ladder)) for p in before if after[p] != before[p]}
    assert changed <= {"ladder.json", "results.jsonl"}, changed  # rewritten with the same content
    assert (ladder / "results.jsonl").read_text() == results


@pytest.mark.slow  # the ladder fixture trains 8 runs
def test_an_interrupted_ladder_resumes_to_the_same_numbers(ladder: Path, data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fit_until_the_third_call(*args, **kwargs):
        calls.append(kwargs.get("stop_at"))
        if len(calls) == 3:  # the stable run's second segment: killed before it ran
            raise KeyboardInterrupt
        return fit(*args, **kwargs)

    monkeypatch.setattr(stage, "fit", fit_until_the_third_call)
    with pytest.raises(KeyboardInterrupt):
        stage.scaling(config(data, tmp_path / "l"))
    first = tmp_path / "l" / "runs" / "d16-l1" / "tokens-000001024" / "result.json"
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(stage, "fit", fit)
    done = stage.scaling(config(data, tmp_path / "l"))
    assert first.stat().st_mtime_ns == stamp  # the finished branch was not run again
    # the same bits as the uninterrupted ladder: every loss equal
    assert (tmp_path / "l" / "results.jsonl").read_text() == (ladder / "results.jsonl").read_text()
    assert len(done["results"]) == 4
    assert not (tmp_path / "l" / "runs" / "d16-l1" / "stable" / "checkpoints").exists()  # removed once done


@pytest.mark.slow  # the ladder fixture trains 8 runs
def test_another_ladder_in_the_same_dir_is_refused_unless_overwrite(ladder: Path, data: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    assert cli.main(words(data, ladder, **{"optim.lr": "1e-3"})) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds another ladder (train.optim.lr: 0.003 -> 0.001)" in err, err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert cli.main(words(data, mine)) == 2
    assert "holds no ladder: pass --overwrite" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep"


@pytest.mark.slow  # the ladder fixture trains 8 runs
def test_fit_of_a_ladder_with_too_few_runs_is_one_line(ladder: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["scaling", "--fit", str(ladder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "4 runs are too few to fit" in err, err
    assert not (ladder / "fit.json").exists()
