"""`tinylm dpo`: preference losses against their formulas and TRL's, the cached reference, and runs through the
shared loop on a tiny model with a tokenizer trained here."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    REPO,
    assert_bitwise,
    kill_note,
    run_and_kill,
    run_bad_data,
    sums_checkpoint,
    tune_args,
    weights,
    write_jsonl,
)
from safetensors import safe_open

from tinylm.core.recipe import load_config
from tinylm.data.chat import is_held_out, render
from tinylm.formats import checkpoint
from tinylm.formats.peft import load_adapter
from tinylm.stages import dpo as dpo_stage
from tinylm.stages.dpo import (
    CACHE,
    DpoConfig,
    cached_reference,
    dpo,
    read_pairs,
    reference_logps,
    render_pairs,
)
from tinylm.train.finetune import load_model
from tinylm.train.metrics import read_metrics
from tinylm.train.preference import (
    PairLogps,
    pair_logps,
    preference_losses,
    reward_metrics,
)

SEQ = 32


def _rows(n: int = 32, plain: bool = False) -> list[dict]:
    """Sums: the chosen answer is right, the rejected one off by one to five."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        a, b, off = (int(x) for x in rng.integers(0, 10, 3))
        good, bad = f"it is {a + b}", f"it is {a + b + 1 + off % 5}"
        if plain:
            rows.append({"prompt": f"{a} plus {b}: ", "chosen": good, "rejected": bad})
        else:
            rows.append({"prompt": [{"role": "user", "content": f"{a} plus {b}"}],
                         "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}], "reason": "sum", "spec": {}})
    return rows


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sums_checkpoint(tmp_path_factory.mktemp("base") / "ck")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", _rows())


def _args(base: Path, data: Path, out: Path, steps: int = 8, **extra: object) -> dict[str, object]:
    return tune_args(base, data, out, SEQ, rows=8, micro=4, steps=steps, warmup=1, lr=1e-2,
                     **{"dpo.beta": 0.5, **extra})


def _train(args: dict[str, object]) -> Path:
    return dpo(load_config(DpoConfig, None, args))


# ----- the losses against their formulas ------------------------------------------------------------------

def _fixed() -> PairLogps:
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 4, generator=g, dtype=torch.float64) * 30  # (4 kinds of logps, 4 pairs)
    return PairLogps(*lp, torch.tensor([3.0, 5, 7, 2], dtype=torch.float64), torch.tensor([4.0, 5, 1, 9],
                                                                                         dtype=torch.float64))


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("kind, beta, eps, gamma", [("sigmoid", 0.1, 0.0, 0.0), ("sigmoid", 0.5, 0.2, 0.0),
                                                    ("ipo", 0.1, 0.0, 0.0), ("ipo", 2.0, 0.0, 0.0),
                                                    ("simpo", 2.0, 0.0, 1.0), ("simpo", 2.5, 0.1, 0.3)])
def test_losses_and_rewards_equal_the_papers_formulas(kind: str, beta: float, eps: float, gamma: float) -> None:
    p = _fixed()
    losses, chosen, rejected = preference_losses(kind, p, beta, eps, gamma)
    for i in range(4):
        pc, pr, rc, rr = (float(t[i]) for t in (p.chosen, p.rejected, p.ref_chosen, p.ref_rejected))
        lc, lr = float(p.len_chosen[i]), float(p.len_rejected[i])
        if kind == "sigmoid":  # Rafailov et al. 2023 eq. 7, cDPO's smoothing
            rw_c, rw_r = beta * (pc - rc), beta * (pr - rr)
            h = rw_c - rw_r
            want = -(1 - eps) * math.log(_sig(h)) - eps * math.log(_sig(-h))
        elif kind == "ipo":  # Azar et al. 2023 eq. 17, on per-token averages as TRL 1.16 DPOTrainer._compute_loss
            h = (pc / lc - rc / lc) - (pr / lr - rr / lr)
            want = (h - 1 / (2 * beta)) ** 2
            rw_c, rw_r = beta * (pc - rc), beta * (pr - rr)  # the rewards TRL logs
        else:  # Meng et al. 2024 eq. 6
            rw_c, rw_r = beta * pc / lc, beta * pr / lr
            h = rw_c - rw_r - gamma
            want = -(1 - eps) * math.log(_sig(h)) - eps * math.log(_sig(-h))
        assert float(losses[i]) == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert float(chosen[i]) == pytest.approx(rw_c, rel=1e-9)
        assert float(rejected[i]) == pytest.approx(rw_r, rel=1e-9)
    m = reward_metrics(chosen, rejected)
    margins = (chosen - rejected).tolist()
    assert float(m["reward_margin"]) == pytest.approx(sum(margins) / 4, rel=1e-9)
    assert float(m["reward_accuracy"]) == sum(x > 0 for x in margins) / 4
    assert float(m["reward_chosen"]) == pytest.approx(float(chosen.sum()) / 4, rel=1e-9)


def _trl_loss(kind: str, p: PairLogps, beta: float) -> tuple[float, dict[str, float]]:
    """TRL 1.16's own DPO loss step (`DPOTrainer._compute_loss`, which has no public form over fixed
    log-probabilities) on p: a stand-in trainer with precomputed reference log-probs, and a model whose
    fused LM head gives per-token log-probs that sum to p's over completions of p's lengths.

    Returns:
        (the loss, TRL's logged rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies).
    """
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.dpo_trainer import DPOTrainer

    lens = torch.cat([p.len_chosen, p.len_rejected]).long()  # (2B,), TRL's batch is [chosen, rejected]
    pos = torch.arange(int(lens.max()) + 1)
    completion = ((pos >= 1) & (pos <= lens[:, None])).long()  # (2B, T + 1): the prompt is token 0
    per_token = completion[:, 1:] * (torch.cat([p.chosen, p.rejected]) / lens)[:, None]  # (2B, T)
    zeros = torch.zeros_like(per_token)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[kind], loss_weights=[1.0], beta=beta, use_weighting=False,
        label_smoothing=0.0, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t))
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "ref_chosen_logps": p.ref_chosen, "ref_rejected_logps": p.ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    logged = trainer._metrics["train"]
    return float(loss), {k: logged[f"rewards/{k}"][-1] for k in ("chosen", "rejected", "margins", "accuracies")}


@pytest.mark.parametrize("kind, beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 2.0)])
def test_sigmoid_and_ipo_losses_and_rewards_equal_trls(kind: str, beta: float) -> None:
    pytest.importorskip("trl", minversion="1.16")
    p = _fixed()
    losses, chosen, rejected = preference_losses(kind, p, beta)
    want, trl_rewards = _trl_loss(kind, p, beta)
    assert float(losses.mean()) == pytest.approx(want, rel=1e-9)
    ours = reward_metrics(chosen, rejected)
    names = {"chosen": "reward_chosen", "rejected": "reward_rejected", "margins": "reward_margin",
             "accuracies": "reward_accuracy"}
    for theirs, mine in names.items():
        assert float(ours[mine]) == pytest.approx(trl_rewards[theirs], rel=1e-9, abs=1e-12), theirs


# ----- data and log-probabilities ------------------------------------------------------------------------

@pytest.mark.parametrize("plain", [False, True])
def test_masks_cover_exactly_the_responses(plain: bool, base: Path, tmp_path: Path) -> None:
    tok = checkpoint.load(base).tokenizer
    raw, _ = read_pairs([str(write_jsonl(tmp_path / "p.jsonl", _rows(4, plain)))])
    pairs = render_pairs(raw, tok, load_config(DpoConfig, None, {}).chat, SEQ)
    end = "<|im_end|>" if not plain else tok.decode([tok.eos_id])
    for i, row in enumerate(_rows(4, plain)):
        for j, key in enumerate(("chosen", "rejected")):
            said = tok.decode(pairs.tokens[i, j][pairs.loss[i, j]].tolist())
            text = row[key] if plain else row[key][0]["content"]
            assert said == text + end


def test_too_long_pairs_are_truncated_or_dropped_and_counted(base: Path, tmp_path: Path) -> None:
    tok = checkpoint.load(base).tokenizer
    long_answer = {"prompt": "1 plus 2: ", "chosen": "it is 3 " * 30, "rejected": "it is 4"}
    long_prompt = {"prompt": "1 plus 2 " * 40, "chosen": "it is 3", "rejected": "it is 4"}
    raw, _ = read_pairs([str(write_jsonl(tmp_path / "p.jsonl", _rows(3, plain=True) + [long_answer, long_prompt]))])
    c = load_config(DpoConfig, None, {"chat.too_long": "truncate"}).chat
    pairs = render_pairs(raw, tok, c, SEQ)
    assert (pairs.n, pairs.truncated, pairs.dropped) == (4, 2, 1)
    assert pairs.tokens.shape == (4, 2, SEQ + 1) and bool(pairs.loss[3, 0, -1]) and int(pairs.loss[3, 1].sum()) > 0


def test_summed_response_logps_equal_a_per_sequence_computation(base: Path, pairs_file: Path) -> None:
    loaded = checkpoint.load(base)
    model, tok = loaded.model.eval(), loaded.tokenizer
    raw, _ = read_pairs([str(pairs_file)])
    pairs = render_pairs(raw, tok, load_config(DpoConfig, None, {}).chat, SEQ)
    pairs.ref = torch.zeros(pairs.n, 2)
    with torch.no_grad():
        got = pair_logps(model, pairs.rows([3, 0, 5]))
    for k, i in enumerate([3, 0, 5]):
        for j, (logp, count) in enumerate([(got.chosen, got.len_chosen), (got.rejected, got.len_rejected)]):
            r = render(raw[i][j], tok)  # unpadded, alone
            ids = torch.tensor([r.ids])
            with torch.no_grad():
                lp = F.log_softmax(model(ids[:, :-1]).double(), -1)[0]  # (T, V)
            keep = torch.tensor(r.mask[1:])
            want = lp[torch.arange(len(r.ids) - 1), ids[0, 1:]][keep].sum()
            assert float(logp[k]) == pytest.approx(float(want), abs=1e-4)
            assert int(count[k]) == int(keep.sum())


# ----- runs -----------------------------------------------------------------------------------------------

def _accuracy_and_margin(ckpt: Path, base: Path, data: Path, adapter: bool = False) -> tuple[float, float]:
    model = checkpoint.load(ckpt).model
    if adapter:
        model = load_adapter(model, ckpt)
    tok = checkpoint.load(base).tokenizer
    raw, _ = read_pairs([str(data)])
    pairs = render_pairs(raw, tok, load_config(DpoConfig, None, {}).chat, SEQ)
    ref = reference_logps(checkpoint.load(base).model, pairs, 8)
    pol = reference_logps(model, pairs, 8)
    margins = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    return float((margins > 0).float().mean()), float(margins.mean())


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo"])
def test_a_short_run_raises_reward_accuracy_and_margin(loss: str, base: Path, pairs_file: Path,
                                                       tmp_path: Path) -> None:
    extra = {"dpo.loss": loss, **({"dpo.beta": 2.0} if loss == "simpo" else {})}
    final = _train(_args(base, pairs_file, tmp_path / "run", steps=10, **extra))
    acc, margin = _accuracy_and_margin(final, base, pairs_file)
    assert acc >= 0.7 and margin > 0.5, (acc, margin)  # at the start: 0 and 0 (the policy is the reference)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 10 and rows[-1]["reward_margin"] > rows[0]["reward_margin"]
    if loss == "sigmoid":  # the policy starts as the reference: every reward 0, the loss log 2
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[0]["reward_accuracy"] == 0
    assert (tmp_path / "run" / CACHE).is_file() == (loss != "simpo")


def test_cached_reference_equals_recomputed_and_is_reused_or_refreshed(base: Path, pairs_file: Path,
                                                                      tmp_path: Path, capsys) -> None:
    _train(_args(base, pairs_file, tmp_path / "run", steps=2))
    cache = tmp_path / "run" / CACHE
    with safe_open(str(cache), "pt") as f:
        cached, meta = f.get_tensor("ref"), f.metadata()
    loaded = checkpoint.load(base)
    raw, _ = read_pairs([str(pairs_file)])
    pairs = render_pairs(raw, loaded.tokenizer, load_config(DpoConfig, None, {}).chat, SEQ)
    torch.testing.assert_close(cached, reference_logps(loaded.model, pairs, 1), rtol=0, atol=1e-6)
    assert meta["data_sha256"] == pairs.digest() and meta["seq_len"] == str(SEQ)
    assert cached_reference(cache, meta) is not None
    capsys.readouterr()
    assert cached_reference(cache, {**meta, "data_sha256": "other"}) is None
    assert "another data_sha256" in capsys.readouterr().out
    # a second run into the same dir on other data recomputes, and says so
    other = write_jsonl(tmp_path / "other.jsonl", _rows(12))
    _train(_args(base, other, tmp_path / "run", steps=4, **{"run.resume": "auto"}))
    out = capsys.readouterr().out
    assert "recomputing" in out
    with safe_open(str(cache), "pt") as f:
        assert f.get_tensor("ref").shape == (12, 2)


@pytest.mark.slow
def test_lora_dpo_trains_only_the_adapter_against_the_base(base: Path, pairs_file: Path, tmp_path: Path) -> None:
    final = _train(_args(base, pairs_file, tmp_path / "run", steps=10, **{"peft.method": "lora", "peft.r": 4,
                                                                          "optim.lr": 2e-2}))
    assert_bitwise(weights(base), weights(final), "(the base in final/ is the original)")
    with safe_open(str(tmp_path / "run" / CACHE), "pt") as f:  # the reference is the base
        cached = f.get_tensor("ref")
    loaded = checkpoint.load(base)
    raw, _ = read_pairs([str(pairs_file)])
    pairs = render_pairs(raw, loaded.tokenizer, load_config(DpoConfig, None, {}).chat, SEQ)
    torch.testing.assert_close(cached, reference_logps(loaded.model, pairs, 3), rtol=0, atol=1e-6)
    acc, margin = _accuracy_and_margin(final, base, pairs_file, adapter=True)
    assert acc > 0.5 and margin > 0.1, (acc, margin)  # at the start: 0 and 0 (B = 0: the policy is the base)


def _alone_logps(model: torch.nn.Module, example: object, tok: object) -> float:
    """The summed response log-probability of one rendered sequence, unpadded, in float64."""
    r = render(example, tok)
    ids = torch.tensor([r.ids])
    with torch.no_grad():
        lp = F.log_softmax(model(ids[:, :-1]).double(), -1)[0]  # (T, V)
    return float(lp[torch.arange(len(r.ids) - 1), ids[0, 1:]][torch.tensor(r.mask[1:])].sum())


def test_val_metrics_equal_a_hand_computation_on_the_held_out_pairs(base: Path, pairs_file: Path,
                                                                    tmp_path: Path) -> None:
    beta = 0.5
    final = _train(_args(base, pairs_file, tmp_path / "run", steps=6, **{"chat.val_fraction": 0.4,
                                                                          "run.eval_every": 4}))
    vals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in vals] == [4, 6] and "val_ppl" not in vals[-1]
    loaded, policy = checkpoint.load(base), checkpoint.load(final).model.eval()
    raw, _ = read_pairs([str(pairs_file)])
    held = [pair for pair in raw if is_held_out(pair, 0.4)]
    assert 0 < len(held) < len(raw) // 2
    margins, losses = [], []
    for pair in held:  # by hand: each sequence alone, the policy at the last step against the base
        c, r = (beta * (_alone_logps(policy, e, loaded.tokenizer) - _alone_logps(loaded.model.eval(), e,
                                                                                 loaded.tokenizer)) for e in pair)
        margins.append(c - r)
        losses.append(-math.log(_sig(c - r)))
    assert vals[-1]["val_loss"] == pytest.approx(sum(losses) / len(held), abs=1e-4)
    assert vals[-1]["val_reward_margin"] == pytest.approx(sum(margins) / len(held), abs=1e-4)
    assert vals[-1]["val_reward_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(held), abs=1e-6)
    with safe_open(str(tmp_path / "run" / CACHE), "pt") as f:  # the held-out pairs' references are cached too
        assert f.get_tensor("ref").shape == (len(raw), 2)


def test_held_out_pairs_never_reach_training_whatever_the_order(base: Path, pairs_file: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                rng: np.random.Generator) -> None:
    runs = []
    monkeypatch.setattr(dpo_stage, "fit", lambda run, loss_fn: runs.append(run) or run.out / "final")
    shuffled = _rows()
    rng.shuffle(shuffled)
    for i, data in enumerate([pairs_file, write_jsonl(tmp_path / "shuffled.jsonl", shuffled)]):
        _train(_args(base, data, tmp_path / f"run{i}", steps=6, **{"chat.val_fraction": 0.4, "data.seed": i}))
    loaded = checkpoint.load(base)
    raw, _ = read_pairs([str(pairs_file)])
    every = {tuple(t.flatten().tolist()) for t in render_pairs(raw, loaded.tokenizer, runs[0].cfg.chat, SEQ).tokens}
    seen = []
    for run in runs:  # a pair is its chosen and rejected rows together (two pairs may share a chosen answer)
        train = {tuple(torch.stack([b.tokens, b.extras["rejected"]], 1)[i].flatten().tolist())
                 for b in (run.batches(step, 0, run.rows) for step in range(run.total_steps)) for i in range(len(b.tokens))}
        val = {tuple(torch.stack([b.tokens, b.extras["rejected"]], 1)[i].flatten().tolist())
               for b in run.val for i in range(len(b.tokens))}
        assert val and not train & val
        assert train | val == every  # 6 steps of 8 pairs: every training pair was read
        seen.append(val)
    assert seen[0] == seen[1]  # the split follows the content, not the order of the rows or the seed


@pytest.mark.slow
def test_qlora_dpo_against_the_quantised_base_with_adapters_off(base: Path, pairs_file: Path, tmp_path: Path) -> None:
    # LoftQ's adapters start non-zero: the policy starts away from the reference, which is the base alone
    args = _args(base, pairs_file, tmp_path / "run", steps=10, **{"peft.method": "qlora", "peft.quantize": "int8",
                                                                  "peft.r": 4, "peft.loftq_iters": 1, "optim.lr": 2e-2})
    start, _ = load_model(load_config(DpoConfig, None, args), "dpo")
    final = _train(args)
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    quantised = checkpoint.load(final).model  # final/ holds the int8 base, untrained
    raw, _ = read_pairs([str(pairs_file)])
    pairs = render_pairs(raw, checkpoint.load(base).tokenizer, load_config(DpoConfig, None, {}).chat, SEQ)
    ref = reference_logps(quantised, pairs, 8)
    with safe_open(str(tmp_path / "run" / CACHE), "pt") as f:
        torch.testing.assert_close(f.get_tensor("ref"), ref, rtol=0, atol=1e-5)
    assert not torch.allclose(ref, reference_logps(checkpoint.load(base).model, pairs, 8), atol=1e-4)

    def accuracy(policy: torch.nn.Module) -> float:
        pol = reference_logps(policy, pairs, 8)
        return float((((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])) > 0).float().mean())

    before, after = accuracy(start), accuracy(load_adapter(checkpoint.load(final).model, final))
    # 32 pairs: 0.4375 -> 0.6875 with one thread, -> 0.71875 with two (BLAS rounding moves the trajectory)
    assert after >= before + 0.2, (before, after)


def _cli_words(args: dict[str, object]) -> list[str]:
    words = [sys.executable, "-m", "tinylm", "dpo"]
    for k, v in args.items():
        words += [f"--{k}", str(v)]
    return words


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "lora", "qlora"])
def test_kill9_then_resume_is_bitwise_identical(method: str, base: Path, pairs_file: Path, tmp_path: Path,
                                                rng: np.random.Generator) -> None:
    steps = 16
    peft = {"peft.method": method, **({"peft.loftq_iters": 1} if method == "qlora" else {})}
    reference = _train(_args(base, pairs_file, tmp_path / "straight", steps=steps, **peft))
    args = _args(base, pairs_file, tmp_path / "killed", steps=steps, **peft, **{"run.ckpt_every": 3})
    kill_at = int(rng.integers(4, 14))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    run_and_kill(_cli_words(args), tmp_path / "killed" / "metrics.jsonl", kill_at, env)
    resumed = subprocess.run(_cli_words({**args, "run.resume": "auto"}), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, f"{kill_note(kill_at)} {resumed.stderr}"
    if (tmp_path / "killed" / CACHE).is_file():  # killed after the cache was written: the resume reused it
        assert "from " in resumed.stdout, resumed.stdout
    assert_bitwise(weights(reference), weights(tmp_path / "killed" / "final"), kill_note(kill_at))
    if method != "none":
        from safetensors.torch import load_file

        assert_bitwise(load_file(str(reference / "adapter_model.safetensors")),
                       load_file(str(tmp_path / "killed" / "final" / "adapter_model.safetensors")), kill_note(kill_at))


GOOD = _rows(1)[0]


@pytest.mark.parametrize("row, says", [
    ({"prompt": "a", "chosen": "b"}, "'rejected' fields"),
    ({**GOOD, "rejected": [{"role": "assistant", "content": "  "}]}, "empty assistant turn"),
    ({"prompt": "1 plus 2", "chosen": "it is 3", "rejected": ""}, "empty 'rejected' response"),
    ({"prompt": "1 plus 2", "chosen": "it is 3", "rejected": 4}, "'rejected' must be a string"),
    ('{"prompt": ', "not valid JSON"),
    ({**GOOD, "chosen": [{"role": "assistant", "content": "it is " + "3 " * 60}]}, "longer than the context"),
])
def test_bad_data_is_one_line_exit_2_and_nothing_written(row: object, says: str, base: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", _rows(3) + [row])
    out = tmp_path / "out"
    code, err = run_bad_data("dpo", base, data, out, SEQ, capsys)
    assert code == 2 and err.startswith("tinylm: error: ") and err.count("\n") == 1, err
    assert says in err, err
    if "longer" not in says:
        assert f"{data}:4" in err, err
    assert not out.exists()
