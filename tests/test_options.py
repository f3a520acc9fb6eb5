"""The modern-recipe options, each default-off: Muon (against Newton-Schulz by hand), QK-norm (against HF
Qwen3), logit soft-capping (against its formula; export refused), untied heads, z-loss (against its
formula) and batch-size warmup; each through save/load or resume, and through HF export where exportable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bitwise, make_data, tiny_model, tiny_train_args, weights

from tinylm.cli import main
from tinylm.core.errors import TinylmError
from tinylm.core.recipe import load_config
from tinylm.data.tokenizer import train_tokenizer
from tinylm.data.tokens import Batch, TokenData
from tinylm.formats import checkpoint
from tinylm.train.config import OptimSection, ScheduleSection, TrainConfig
from tinylm.train.loop import fit, setup
from tinylm.train.losses import lm_loss, lm_loss_fn
from tinylm.train.metrics import read_metrics
from tinylm.train.optim import make_optimizer, set_lr
from tinylm.train.schedule import BatchRamp, planned_steps


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


def tiny_args(data: Path, out: Path, steps: int = 12, **extra: object) -> dict[str, object]:
    return tiny_train_args(data, out, **{"schedule.steps": steps, "run.resume": "auto", **extra})


def train(args: dict[str, object], stop_at: int | None = None) -> Path | None:
    """A run in this process; stop_at: a SIGINT arrives during that step (checkpoint, then stop)."""
    run = setup(load_config(TrainConfig, None, args))
    loss_fn = lm_loss_fn(run.cfg.optim.z_loss)

    def loss(model, batch):
        if stop_at is not None and run.step + 1 == stop_at:
            run.stop_signal = 2
        return loss_fn(model, batch)

    try:
        return fit(run, loss)
    except KeyboardInterrupt:
        return None


def resumed_equals_straight(data: Path, tmp_path: Path, **extra: object) -> Path:
    """Stop a run at step 5 and resume it: the final weights equal a straight run's, bit for bit."""
    straight = train(tiny_args(data, tmp_path / "straight", **extra))
    assert train(tiny_args(data, tmp_path / "resumed", **extra), stop_at=5) is None
    resumed = train(tiny_args(data, tmp_path / "resumed", **extra))
    assert_bitwise(weights(straight), weights(resumed), "(stopped at step 5)")
    return straight


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def cli_error(capsys, argv: list[str]) -> str:
    """The one line a refused command prints (exit 2)."""
    capsys.readouterr()  # what came before
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tinylm: error:"), err
    return err[0]


# ----- Muon ----------------------------------------------------------------------------------------------

def newton_schulz_by_svd(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int) -> torch.Tensor:
    """Muon's orthogonalisation computed on the singular values: each step of the quintic iteration
    X <- a X + b (X X^T) X + c (X X^T)^2 X maps X = U S V^T to U p(S) V^T with p(s) = a s + b s^3 + c s^5,
    starting from G / ||G||_F (Jordan et al. 2024), here in float64."""
    a, b, c = coefficients
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    s = s / g.double().norm()
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return u @ torch.diag(s) @ vh


def test_muon_update_equals_newton_schulz_by_hand() -> None:
    model = tiny_model(seed=3)
    cfg = OptimSection(name="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.0)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    muon, adamw = opt.parts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    hidden = {id(p) for g in muon.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in hidden}
    assert names == {n for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and "lm_head" not in n}
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    w = model.model.layers[0].mlp.gate_proj.weight  # (80, 48): taller than wide
    emb = model.model.embed_tokens.weight
    before, emb_before = w.detach().clone(), emb.detach().clone()
    opt.step()
    ns = muon.param_groups[0]["ns_coefficients"], muon.param_groups[0]["ns_steps"]
    assert ns == ((3.4445, -4.775, 2.0315), 5)  # torch's defaults, Keller Jordan's
    # first step from a zero momentum buffer: the Nesterov update is a multiple of the gradient, and the
    # orthogonalisation does not see its scale; Keller Jordan's lr factor sqrt(max(1, rows / cols))
    want = -0.02 * (80 / 48) ** 0.5 * newton_schulz_by_svd(w.grad, *ns)
    got = (w.detach() - before).double()
    err = (got - want).abs().max().item()
    exact = -0.02 * (80 / 48) ** 0.5 * newton_schulz_by_svd(w.grad, (1.5, -0.5, 0.0), 40)  # true U V^T
    print(f"max error {err:.2e} (float32 on CPU); against the exact U V^T: {(got - exact).abs().max():.2e}")
    assert err < 1e-5 * want.abs().max().item()  # torch's own Muon, in bfloat16, is ~2% off here
    assert (got - exact).abs().max().item() > 2 * err  # the quintic's S' (0.7-1.2) is not U V^T: it can fail
    # AdamW's first step for the embedding: lr * g / (|g| + eps) (bias-corrected moments)
    torch.testing.assert_close(emb.detach() - emb_before, -1e-3 * emb.grad / (emb.grad.abs() + 1e-8))
    assert set_lr(opt, 1e-3, 0.5) == 5e-4
    assert muon.param_groups[0]["lr"] == pytest.approx(0.01) and adamw.param_groups[0]["lr"] == 5e-4


@pytest.mark.slow
def test_muon_run_resumes_bitwise(data: Path, tmp_path: Path) -> None:
    straight = resumed_equals_straight(data, tmp_path, **{"optim.name": "muon"})
    meta = json.loads((straight / "config.json").read_text())["tinylm"]
    assert meta["config"]["optim"]["name"] == "muon"
    from safetensors import safe_open

    ckpt = next((tmp_path / "resumed" / "checkpoints").iterdir())
    with safe_open(str(ckpt / "train_state" / "optimizer.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight.momentum_buffer" in keys
    assert "model.embed_tokens.weight.exp_avg" in keys


# ----- QK-norm -------------------------------------------------------------------------------------------

def qk_model(**kwargs):
    model = tiny_model(seed=4, qk_norm=True, **kwargs)
    with torch.no_grad():  # gains away from 1 so that a missing or misplaced norm shows
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


def test_qk_norm_equals_hf_qwen3() -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = qk_model()
    hf = {k: v for k, v in model.config.to_hf().items() if k != "architectures"}
    ref = Qwen3ForCausalLM(Qwen3Config(**hf)).eval()
    result = ref.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randint(0, 97, (2, 20))
    assert (logits(ref, x) - logits(model, x)).abs().max().item() < 1e-5
    plain = tiny_model(seed=4)  # the same weights without the norms: other logits
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "q_norm" not in k and "k_norm" not in k})
    assert (logits(plain, x) - logits(model, x)).abs().max().item() > 1e-3


def test_qk_norm_saves_loads_and_exports_to_hf_not_gguf(tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    tok = train_tokenizer(["Once upon a time there was a cat. The cat sat."] * 20, vocab_size=300, min_frequency=1)
    model = qk_model(vocab_size=tok.vocab_size, tie=False)
    checkpoint.save(model, tmp_path / "ck", tok)
    x = torch.randint(0, tok.vocab_size, (2, 20))
    loaded = checkpoint.load(tmp_path / "ck")
    assert loaded.config.qk_norm and torch.equal(logits(loaded.model, x), logits(model, x))
    assert main(["export", str(tmp_path / "ck"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(ref).__name__ == "Qwen3ForCausalLM"
    assert (logits(ref, x) - logits(model, x)).abs().max().item() < 1e-5
    err = cli_error(capsys, ["export", str(tmp_path / "ck"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    assert "qk_norm" in err and not (tmp_path / "m.gguf").exists()


# ----- logit soft-capping ------------------------------------------------------------------------------

def test_logit_softcap_is_tanh_capping_saved_and_refused_by_export(tmp_path: Path, capsys) -> None:
    capped = tiny_model(seed=5, logit_softcap=2.0)
    plain = tiny_model(seed=5)
    x = torch.randint(0, 97, (2, 20))
    want = 2.0 * torch.tanh(logits(plain, x) / 2.0)
    torch.testing.assert_close(logits(capped, x), want)
    assert logits(capped, x).abs().max() < 2.0 < logits(plain, x).abs().max() * 2  # capped, and not a no-op
    assert (logits(capped, x) - logits(plain, x)).abs().max() > 1e-3
    checkpoint.save(capped, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["final_logit_softcapping"] == 2.0
    assert torch.equal(logits(checkpoint.load(tmp_path / "ck").model, x), logits(capped, x))
    for fmt, out in (("hf", tmp_path / "hf"), ("gguf", tmp_path / "m.gguf")):
        err = cli_error(capsys, ["export", str(tmp_path / "ck"), "--format", fmt, "--out", str(out)])
        assert "logit_softcap" in err and not out.exists()


# ----- options through pretraining: qk_norm, softcap, untied head, z-loss -----------------------------------

def test_model_options_train_save_and_export(data: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    final = train(tiny_args(data, tmp_path / "run", steps=4, **{"model.qk_norm": True, "model.tie_embeddings": False,
                                                                 "model.logit_softcap": 30.0}))
    loaded = checkpoint.load(final)
    c = loaded.config
    assert c.qk_norm and not c.tie_embeddings and c.logit_softcap == 30.0
    assert loaded.model.lm_head.weight.data_ptr() != loaded.model.model.embed_tokens.weight.data_ptr()
    final = train(tiny_args(data, tmp_path / "untied", steps=4, **{"model.tie_embeddings": False}))
    assert main(["export", str(final), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert not ref.config.tie_word_embeddings
    x = torch.randint(0, 64, (2, 16))
    assert (logits(ref, x) - logits(checkpoint.load(final).model, x)).abs().max().item() < 1e-5


def test_z_loss_is_palm_formula_in_training_only() -> None:
    model = tiny_model(seed=6, vocab_size=64).train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (3, 13), generator=g)
    mask = torch.rand(3, 12, generator=g) < 0.6
    for batch, counted in ((Batch(tokens), torch.ones(3, 12, dtype=torch.bool)), (Batch(tokens, mask=mask), mask)):
        out = model(tokens[:, :-1]).float()  # (B, T, V)
        nll = -F.log_softmax(out, -1).gather(-1, tokens[:, 1:, None])[..., 0]  # (B, T)
        z2 = out.logsumexp(-1).pow(2)  # (B, T)
        want = (nll[counted].sum() + 1e-2 * z2[counted].sum()) / counted.sum()
        loss, metrics = lm_loss(model, batch, z_loss=1e-2)
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(metrics["z_loss"], z2[counted].mean())
        assert float(z2[counted].mean().detach()) * 1e-2 > 1e-3  # the term is not negligible here: the test can fail
        with torch.no_grad():  # evaluation: the plain cross-entropy
            torch.testing.assert_close(lm_loss(model, batch, z_loss=1e-2)[0], lm_loss(model, batch)[0])
    assert lm_loss_fn(0.0) is lm_loss


def test_z_loss_run_logs_it(data: Path, tmp_path: Path) -> None:
    final = train(tiny_args(data, tmp_path / "z", steps=3, **{"optim.z_loss": 1e-4}))
    records = [r for r in read_metrics(tmp_path / "z" / "metrics.jsonl") if "loss" in r]
    assert len(records) == 3 and all(r["z_loss"] > 0 for r in records)
    assert json.loads((final / "config.json").read_text())["tinylm"]["config"]["optim"]["z_loss"] == 1e-4


# ----- batch-size warmup --------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2])
def test_batch_ramp_grows_by_tokens_to_the_full_batch(world: int) -> None:
    ramp = BatchRamp.make(rows=32, seq_len=16, world=world, tokens=10_000, start=0.125)
    rows = list(ramp.ramp)
    assert rows[0] == 4 and all(r % world == 0 and 4 <= r < 32 for r in rows)
    assert rows == sorted(rows)
    assert ramp.tokens_at(len(rows)) >= 10_000 - 32 * 16  # it reaches the full batch after ~10k tokens
    assert ramp.rows_at(len(rows)) == 32 and ramp.tokens_at(len(rows) + 3) == ramp.tokens_at(len(rows)) + 3 * 512
    for tokens in (1, 100, 5000, 10_000, 50_000):
        n = ramp.steps_for(tokens)
        assert ramp.tokens_at(n) >= tokens > ramp.tokens_at(n - 1)
    sched = ScheduleSection(tokens=50_000)
    assert planned_steps(sched, 512, ramp) > planned_steps(sched, 512) == 98  # small batches: more steps


def test_batch_warmup_reads_the_small_batches(data: Path, tmp_path: Path) -> None:
    extra = {"data.batch_warmup_tokens": 300, "data.batch_warmup_start": 0.25, "data.micro_batch": 2}
    args = tiny_args(data, tmp_path / "spy", steps=8, **extra)
    run = setup(load_config(TrainConfig, None, args))
    seen: dict[int, int] = {}
    source = run.batches

    def spy(step: int, start: int, count: int) -> Batch:
        seen[step] = seen.get(step, 0) + count
        return source(step, start, count)

    run.batches = spy
    first = spy(0, 0, 2)  # the first step's whole (2-row) batch, computed at once before training
    seen.clear()
    with torch.no_grad():
        want = float(lm_loss(run.model.train(), first)[0])
    fit(run)
    assert [seen[s] for s in range(8)] == [run.ramp.rows_at(s) for s in range(8)]
    assert run.ramp.ramp == (2, 2, 3, 4, 5, 7) and seen[7] == 8  # 2 rows (of 8) first, the full batch later
    records = [r for r in read_metrics(tmp_path / "spy" / "metrics.jsonl") if "loss" in r]
    assert records[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert records[-1]["tokens"] == run.ramp.tokens_at(8) < 8 * 128


@pytest.mark.slow
def test_batch_warmup_run_resumes_bitwise(data: Path, tmp_path: Path) -> None:
    resumed_equals_straight(data, tmp_path, **{"data.batch_warmup_tokens": 600, "data.micro_batch": 2})


def test_document_rows_for_their_tokens_then_anywhere(tmp_path: Path) -> None:
    data = make_data(tmp_path / "docs")
    stream = np.fromfile(data / "train_0000.bin", dtype=np.uint16)
    stream[::23] = 1  # documents of 23 tokens, each from a BOS
    stream.tofile(data / "train_0000.bin")
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "bos_id": 1}))
    extra = {"data.document_rows": 1.0, "data.document_rows_tokens": 300}
    run = setup(load_config(TrainConfig, None, tiny_args(data, tmp_path / "run", steps=8, **extra)))
    plain = TokenData.open(data)
    # 128 tokens a step: steps 0-2 read the first 384 >= 300 tokens, every row from a document's start
    for step in range(8):
        rows = run.batches(step, 0, 8).tokens
        if step < 3:
            assert (rows[:, 0] == 1).all()
        else:  # then the windows a run without the option reads
            assert torch.equal(rows, plain.windows(step, 0, 8, 16))
    assert fit(run, lm_loss_fn()) is not None and (tmp_path / "run" / "final").is_dir()


def test_document_rows_need_documents_before_anything_is_written(data: Path, tmp_path: Path) -> None:
    args = tiny_args(data, tmp_path / "run", steps=2, **{"data.document_rows": 0.5})  # make_data: no BOS id
    with pytest.raises(TinylmError, match="document_rows"):
        setup(load_config(TrainConfig, None, args))
    assert not (tmp_path / "run").exists()


def test_options_are_off_by_default() -> None:
    cfg = TrainConfig()
    assert (cfg.optim.name, cfg.optim.z_loss, cfg.model.qk_norm, cfg.model.logit_softcap,
            cfg.data.batch_warmup_tokens, cfg.data.document_rows, cfg.run.minutes) == ("adamw", 0.0, False, None, 0,
                                                                                      0.0, None)


@pytest.mark.slow
def test_batch_warmup_compiles_once(data: Path, tmp_path: Path) -> None:
    # the ramp's batches grow (2, 2, 3, 4, 5, 7 rows, then 8); compiled for the first shape only, the second
    # recompiled the model and the loss: a 35-40 s stall mid-run at 1M parameters
    extra = {"data.batch_warmup_tokens": 300, "data.batch_warmup_start": 0.25, "data.micro_batch": 8,
             "run.compile": True}
    run = setup(load_config(TrainConfig, None, tiny_args(data, tmp_path / "ramp", steps=8, **extra)))
    assert run.train_model.dynamic_batch and run.ramp.ramp == (2, 2, 3, 4, 5, 7) and run.micro == 8
    torch._dynamo.reset()  # no compiled code of earlier tests: every compile below is this run's
    with torch._dynamo.config.patch(error_on_recompile=True):
        fit(run)
    plain = setup(load_config(TrainConfig, None, tiny_args(data, tmp_path / "plain", steps=2, **{"run.compile": True})))
    assert not plain.train_model.dynamic_batch  # without a ramp: compiled for its one shape
