"""Distillation: KD losses against torch `kl_div` and direct formulas, zero losses for a student equal to
its teacher, cached (K = V and top-K) against online step losses, trimmed vocabularies, bitwise resume
after kill -9 (with a learned hidden-state projection), and one-line errors."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, assert_bitwise, kill_note, make_data, run_and_kill, tiny_model, weights

from tinylm.cli import main
from tinylm.core.errors import TinylmError
from tinylm.core.recipe import load_config
from tinylm.data.tokenizer import train_tokenizer, trim_tokenizer
from tinylm.data.tokens import Batch
from tinylm.formats import checkpoint
from tinylm.stages.distill import (
    DistillConfig,
    LossTerm,
    OnlineTeacher,
    TeacherSignal,
    build_cache,
    distill,
    kd_term,
    make_loss_fn,
    parse_losses,
    vocab_map,
)
from tinylm.train.metrics import read_metrics
from tinylm.train.state import latest_checkpoint

# ----- losses against references ------------------------------------------------------------------------


def _logits(n: int = 12, v: int = 17, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, v, generator=g, dtype=torch.float64), 3 * torch.randn(n, v, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("t", [1.0, 2.5])
def test_kl_losses_equal_torch_kl_div(t: float) -> None:
    s, te = _logits()
    q, p = F.log_softmax(s / t, -1), F.log_softmax(te / t, -1)
    sig = TeacherSignal(logits=te)
    fkl = kd_term(LossTerm("fkl", temperature=t), s, sig)
    rkl = kd_term(LossTerm("rkl", temperature=t), s, sig)
    # F.kl_div(input, target) = KL(target || input); batchmean = sum / N positions
    assert float(fkl) == pytest.approx(t * t * float(F.kl_div(q, p, reduction="batchmean", log_target=True)), rel=1e-5)
    assert float(rkl) == pytest.approx(t * t * float(F.kl_div(p, q, reduction="batchmean", log_target=True)), rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_equals_direct_formula(beta: float) -> None:
    s, te = _logits(seed=1)
    t = 1.7
    p, q = F.softmax(te / t, -1).numpy(), F.softmax(s / t, -1).numpy()
    m = beta * p + (1 - beta) * q
    want = (beta * (p * np.log(p / m)).sum(-1) + (1 - beta) * (q * np.log(q / m)).sum(-1)).mean() * t * t
    got = kd_term(LossTerm("jsd", temperature=t, beta=beta), s, TeacherSignal(logits=te))
    assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_top_k_losses_equal_coarse_grained_formula(kind: str) -> None:
    s, te = _logits(seed=2)
    t, k, v = 2.0, 5, s.shape[-1]
    p, q = F.softmax(te / t, -1).numpy(), F.softmax(s / t, -1).numpy()
    ids = np.argsort(-p, axis=-1)[:, :k]
    pk, qk = np.take_along_axis(p, ids, -1), np.take_along_axis(q, ids, -1)
    pc = np.concatenate([pk, 1 - pk.sum(-1, keepdims=True)], -1)  # k tokens + the rest
    qc = np.concatenate([qk, 1 - qk.sum(-1, keepdims=True)], -1)
    kl = lambda a, b: (a * np.log(a / b)).sum(-1)  # noqa: E731
    mix = 0.5 * pc + 0.5 * qc
    want = {"fkl": kl(pc, qc), "rkl": kl(qc, pc), "jsd": 0.5 * kl(pc, mix) + 0.5 * kl(qc, mix)}[kind].mean() * t * t
    sig = TeacherSignal(logits=te)
    got = kd_term(LossTerm(kind, temperature=t, top_k=k), s, sig)
    assert float(got) == pytest.approx(want, rel=1e-5)
    full = kd_term(LossTerm(kind, temperature=t), s, sig)
    assert float(got) <= float(full) + 1e-9  # coarse-graining never increases a divergence
    assert float(kd_term(LossTerm(kind, temperature=t, top_k=v), s, sig)) == pytest.approx(float(full), rel=1e-9)


def test_every_kd_loss_is_zero_for_the_same_model() -> None:
    student = tiny_model(seed=3)
    teacher = OnlineTeacher(copy.deepcopy(student), layers=(0, 1, 2))
    tokens = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    specs = [{"kind": "fkl", "temperature": 2.0}, {"kind": "rkl"}, {"kind": "jsd", "beta": 0.3},
             {"kind": "fkl", "top_k": 4}, {"kind": "jsd", "top_k": 7, "temperature": 3.0},
             {"kind": "hidden_mse", "pairs": [[0, 0], [1, 1], [2, 2]]}, {"kind": "hidden_cos", "pairs": [[2, 2]]}]
    for spec in specs:
        loss, metrics = make_loss_fn(parse_losses([spec]), teacher)(student, Batch(tokens))
        assert abs(float(loss.detach())) < 1e-5, spec
        assert list(metrics) == [spec["kind"]]
    ce, metrics = make_loss_fn(parse_losses([{"kind": "ce"}]), teacher)(student, Batch(tokens))
    assert float(ce.detach()) > 1.0 and float(metrics["ce"]) == float(ce.detach())  # the harness computes something


# ----- vocabularies ------------------------------------------------------------------------------------------

def test_trimmed_student_reads_restricted_renormalised_teacher() -> None:
    teacher = tiny_model(seed=4)
    kept = torch.tensor(sorted(np.random.default_rng(0).choice(97, 40, replace=False).tolist()))
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))  # student ids
    sig = OnlineTeacher(teacher, kept)(Batch(tokens))
    _, lp = sig.distribution(1.0, None)
    with torch.no_grad():
        ref = F.log_softmax(teacher(kept[tokens[:, :-1]])[..., kept].float(), -1).flatten(0, 1)
    torch.testing.assert_close(lp, ref)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(lp.shape[0]), atol=1e-5)


def _corpus(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "sun", "rose", "slowly"]
    return [" ".join(rng.choice(words, 12)) for _ in range(n)]


def test_vocab_map_of_a_trim_and_incompatible_tokenizers(tmp_path: Path) -> None:
    tok = train_tokenizer(_corpus(300, 0), vocab_size=300)
    trimmed, kept = trim_tokenizer(tok, _corpus(50, 1), keep=280)
    assert vocab_map(trimmed, tok, 280, 300, ("s", "t")).tolist() == kept
    trimmed.save(tmp_path / "trim")
    (tmp_path / "trim" / "token_map.json").write_text(json.dumps({"old_vocab_size": 300, "kept": kept}))
    assert vocab_map(trimmed, tok, 280, 300, ("s", "t"), str(tmp_path / "trim")).tolist() == kept
    assert vocab_map(tok, tok, 300, 300, ("s", "t")) is None
    other = train_tokenizer([c.upper() for c in _corpus(300, 2)], vocab_size=300)
    with pytest.raises(TinylmError, match="incompatible tokenizers.*studentdir.*teacherdir") as err:
        vocab_map(other, tok, 300, 300, ("studentdir", "teacherdir"))
    assert "\n" not in str(err.value)


# ----- training: online, cached, resumed -------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"), n_train=6000, n_val=600)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher on the data's 64-token vocabulary, wider (48) than the students (32)."""
    model = tiny_model(seed=5, vocab_size=64)
    return checkpoint.save(model, tmp_path_factory.mktemp("teacher") / "t")


def args_for(data: Path, out: Path, steps: int = 6, **extra: object) -> dict[str, object]:
    base = {"data.dir": str(data), "model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "data.seq_len": 16,
            "data.batch_tokens": 128, "data.micro_batch": 4, "schedule.steps": steps, "schedule.warmup_steps": 3,
            "run.out": str(out), "run.eval_every": 0, "run.eval_tokens": 128, "run.ckpt_every": 0,
            "run.log_every": 1, "run.compile": False, "run.progress": False, "run.plot": False,
            "run.device": "cpu", "run.peak_flops": 1e11}
    return {**base, **extra}


def losses_of(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("top_k,dtype,spec", [
    (64, "float32", [{"kind": "fkl", "weight": 0.7, "temperature": 2.0}, {"kind": "ce", "weight": 0.3}]),
    (8, "float32", [{"kind": "jsd", "top_k": 8, "beta": 0.4}, {"kind": "rkl", "top_k": 5}]),
])
def test_cache_gives_the_online_step_losses(data: Path, teacher: Path, tmp_path: Path, top_k: int, dtype: str,
                                            spec: list) -> None:
    online = args_for(data, tmp_path / "online", **{"distill.teacher": str(teacher), "distill.losses": spec})
    distill(load_config(DistillConfig, None, online))
    meta = build_cache(load_config(DistillConfig, None, online), top_k, tmp_path / "cache", dtype)
    n_tokens = meta["steps"] * meta["rows"] * meta["seq_len"]
    on_disk = sum(f.stat().st_size for f in (tmp_path / "cache").glob("*.npy"))
    assert on_disk == pytest.approx(meta["bytes_per_token"] * n_tokens, rel=0.01)  # npy headers aside
    cached = {**online, "distill.teacher": None, "distill.cache": str(tmp_path / "cache"),
              "run.out": str(tmp_path / "cached")}
    distill(load_config(DistillConfig, None, cached))
    a, b = losses_of(tmp_path / "online"), losses_of(tmp_path / "cached")
    assert len(a) == len(b) == 6
    for r in read_metrics(tmp_path / "cached" / "metrics.jsonl"):  # each term is logged beside the loss
        terms = sum(t.get("weight", 1.0) * r[t["kind"]] for t in spec)
        assert r["loss"] == pytest.approx(terms, rel=1e-5), r
    print('max |online - cached| step loss:', np.abs(np.subtract(a, b)).max())
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_fp16_cache_is_close_and_compact(data: Path, teacher: Path, tmp_path: Path) -> None:
    spec = [{"kind": "fkl", "top_k": 16}]
    online = args_for(data, tmp_path / "online", steps=4, **{"distill.teacher": str(teacher), "distill.losses": spec})
    distill(load_config(DistillConfig, None, online))
    meta = build_cache(load_config(DistillConfig, None, online), 16, tmp_path / "cache", "float16")
    assert meta["bytes_per_token"] == 16 * (2 + 2) + 4  # uint16 ids, float16 log-probs, float32 log-rest
    cached = {**online, "distill.teacher": None, "distill.cache": str(tmp_path / "cache"),
              "run.out": str(tmp_path / "cached")}
    distill(load_config(DistillConfig, None, cached))
    # fp16 log-probs carry a relative error of 2^-11; a KL of ~1 nat moves by about 1e-3 at most
    a, b = losses_of(tmp_path / "online"), losses_of(tmp_path / "cached")
    print('fp16: max |online - cached| step loss:', np.abs(np.subtract(a, b)).max())
    np.testing.assert_allclose(a, b, atol=5e-3)


def cli_words(args: dict[str, object]) -> list[str]:
    words = [sys.executable, "-m", "tinylm", "distill"]
    for k, v in args.items():
        words += [f"--{k}", json.dumps(v) if isinstance(v, list) else str(v)]
    return words


def test_kill9_then_resume_is_bitwise_identical(data: Path, teacher: Path, tmp_path: Path,
                                                rng: np.random.Generator) -> None:
    steps = 16
    spec = [{"kind": "fkl", "weight": 1.0, "temperature": 2.0}, {"kind": "hidden_mse", "weight": 0.5,
                                                                 "pairs": [[1, 1], [2, 2]]}]
    extra = {"distill.teacher": str(teacher), "distill.losses": spec, "run.ckpt_every": 4, "run.keep_last": 3}
    args = args_for(data, tmp_path / "killed", steps=steps, **extra)
    reference = distill(load_config(DistillConfig, None, args_for(data, tmp_path / "straight", steps=steps,
                                                                  **{**extra, "run.ckpt_every": 0})))
    kill_at = int(rng.integers(5, 13))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    metrics = tmp_path / "killed" / "metrics.jsonl"
    run_and_kill(cli_words(args), metrics, kill_at, env)
    last = latest_checkpoint(tmp_path / "killed")
    assert last is not None, kill_note(kill_at)
    flat, _ = checkpoint.load_train_state(last)
    assert any(k.startswith("_aux.weights.") for k in flat)  # the projections (32 -> 48) are saved ...
    assert not any("s1_t1" in k for k in weights(last))  # ... but not as part of the student
    resumed = subprocess.run(cli_words({**args, "run.resume": "auto"}), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, f"{kill_note(kill_at)} {resumed.stderr}"
    assert_bitwise(weights(reference), weights(tmp_path / "killed" / "final"), kill_note(kill_at))
    assert [r["step"] for r in read_metrics(metrics) if "loss" in r] == list(range(1, steps + 1)), kill_note(kill_at)


# ----- errors ------------------------------------------------------------------------------------------------

def test_losses_config_errors() -> None:
    for spec, match in [([{"kind": "kl"}], "kind must be one of"), ([{"kind": "jsd", "beta": 0}], "beta"),
                        ([{"kind": "fkl", "temperature": 0}], "temperature"), ([{"kind": "hidden_mse"}], "pairs"),
                        ([{"kind": "fkl", "wieght": 1}], "unknown key 'wieght'"), ([], "non-empty")]:
        with pytest.raises(TinylmError, match=match):
            parse_losses(spec)


def test_one_line_cli_errors(data: Path, teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = args_for(data, tmp_path / "o", steps=4, **{"distill.teacher": str(teacher)})
    cache = tmp_path / "cache"
    build_cache(load_config(DistillConfig, None, args), 8, cache)
    cases = [
        ({**args, "distill.cache": str(cache)}, "exactly one teacher signal"),
        ({**args, "distill.teacher": str(tmp_path / "nowhere")}, "nowhere"),
        ({**args, "distill.teacher": None, "distill.cache": str(cache), "data.seed": 1}, "made for another run"),
        ({**args, "distill.teacher": None, "distill.cache": str(cache), "schedule.steps": 9}, "covers 4 steps"),
        ({**args, "distill.teacher": None, "distill.cache": str(cache),
          "distill.losses": [{"kind": "fkl", "temperature": 2}]}, "temperature"),
        ({**args, "distill.teacher": None, "distill.cache": str(cache),
          "distill.losses": [{"kind": "hidden_cos", "pairs": [[1, 1]]}]}, "hidden states"),
        ({**args, "distill.losses": [{"kind": "hidden_cos", "pairs": [[1, 9]]}]}, "layers must be in"),
        ({**args, "distill.losses": "fkl"}, "must be a list"),
    ]
    for case, match in cases:
        capsys.readouterr()
        code = main(cli_words({k: v for k, v in case.items() if v is not None})[3:])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (match, lines)
        assert len(lines) == 1 and lines[0].startswith("tinylm: error:") and match in lines[0], (match, lines)
    assert not (tmp_path / "o").exists()  # nothing written


def test_recipes_parse() -> None:
    recipes = sorted((REPO / "recipes").glob("distill*.yaml"))
    assert recipes
    for path in recipes:
        cfg = load_config(DistillConfig, path)
        assert parse_losses(cfg.distill.losses)
        assert cfg.distill.teacher or cfg.distill.cache
        assert math.isfinite(cfg.optim.lr)


def test_int8_teacher_is_close_to_the_float_one(teacher: Path) -> None:
    from tinylm.model.qlinear import QLinear
    from tinylm.stages.distill import DistillSection, load_teacher

    tokens = torch.randint(0, 64, (3, 17))
    signals = {}
    for dtype in ("float32", "int8"):
        loaded = load_teacher(DistillSection(teacher=str(teacher), teacher_dtype=dtype), "cpu")
        signals[dtype] = OnlineTeacher(loaded.model)(Batch(tokens))
        n_q = sum(isinstance(m, QLinear) for m in loaded.model.modules())
        assert n_q == (0 if dtype == "float32" else 7 * loaded.model.config.n_layers)  # the head stays float
    p, q = (F.log_softmax(signals[k].logits, -1) for k in ("float32", "int8"))
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert 0 < kl < 1e-3
    with pytest.raises(TinylmError, match="teacher_dtype"):
        load_teacher(DistillSection(teacher=str(teacher), teacher_dtype="int4"), "cpu")
