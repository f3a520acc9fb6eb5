"""`tinylm grpo`: advantages and the loss against their formulas and TRL's, the sampled rounds (masks, seeds,
cached reference log-probs), the rewards, and runs through the shared loop on a tiny model with a tokenizer
trained here."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_bitwise,
    chat_checkpoint,
    sums_checkpoint,
    tune_args,
    weights,
    write_jsonl,
)

from tinylm import cli
from tinylm.core.errors import TinylmError
from tinylm.core.recipe import load_config
from tinylm.data import tasks, tinytales
from tinylm.evals.rewards import checker_reward, load_reward, score
from tinylm.formats import checkpoint
from tinylm.stages.grpo import (
    GrpoConfig,
    Sampler,
    grpo,
    prompt_ids,
    read_prompts,
    reference_of,
)
from tinylm.train.finetune import load_model
from tinylm.train.grpo import (
    STD_EPS,
    group_advantages,
    grpo_loss,
    grpo_token_losses,
    reduce_losses,
    token_logps,
)
from tinylm.train.metrics import read_metrics
from tinylm.train.state import checkpoint_dir

SEQ = 48


def ones_share(prompts: list, completions: list[str]) -> list[float]:
    """A checkable synthetic reward a tiny model can learn in a few steps: the share of '1's in the text."""
    return [c.count("1") / max(len(c), 1) for c in completions]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sums_checkpoint(tmp_path_factory.mktemp("base") / "ck")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [{"prompt": [{"role": "user", "content": f"{a} plus {b}"}], "id": 4 * a + b} for a in range(4)
            for b in range(4)]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reward") / "reward.py"
    path.write_text("def ones_share(prompts, completions):\n"
                    "    return [c.count('1') / max(len(c), 1) for c in completions]\n")
    return path


def _args(base: Path, data: Path, out: Path, reward: str, steps: int = 10, **extra: object) -> dict[str, object]:
    """16 completions a step: 4 prompts x 4, in micro-batches of 8."""
    return tune_args(base, data, out, SEQ, rows=16, micro=8, steps=steps, warmup=1, lr=1e-2,
                     **{"grpo.reward": reward, "grpo.group_size": 4, "grpo.max_tokens": 16, **extra})


# ----- advantages and the loss against their formulas ----------------------------------------------------------

def test_advantages_equal_the_group_normalised_formula() -> None:
    rewards = [0.0, 1.0, 1.0, 0.5, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, 0.25, 0.0]  # 3 groups of 4, one flat
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), 4)
    centred = group_advantages(torch.tensor(rewards), 4, scale=False)
    for g in range(3):
        r = rewards[4 * g:4 * g + 4]
        mean, std = statistics.fmean(r), statistics.stdev(r)  # the sample std, as TRL's nanstd
        for i, x in enumerate(r):
            assert float(got[4 * g + i]) == pytest.approx((x - mean) / (std + STD_EPS), rel=1e-6, abs=1e-7)
            assert float(centred[4 * g + i]) == pytest.approx(x - mean, abs=1e-6)
    assert torch.all(got[4:8] == 0)  # a flat group teaches nothing


def test_advantages_equal_trls() -> None:
    pytest.importorskip("trl", minversion="1.16")
    from trl.trainer.utils import nanstd

    rewards = torch.rand(6 * 5, generator=torch.Generator().manual_seed(0))
    grouped = rewards.view(-1, 5)
    want = (rewards - grouped.mean(1).repeat_interleave(5)) / (nanstd(grouped, dim=1).repeat_interleave(5) + 1e-4)
    assert torch.allclose(group_advantages(rewards, 5), want, atol=1e-6)


def _fixed(b: int = 4, t: int = 6) -> dict[str, torch.Tensor]:
    """Log-probs where the ratio leaves the clip range on both sides, advantages of both signs, ragged masks."""
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logps = old + (torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5) * 0.8  # ratios in ~[0.67, 1.5]
    ref = old + (torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 4:], mask[2, 1:] = False, False
    adv = torch.tensor([1.3, -0.7, 0.0, -2.0], dtype=torch.float64)
    return {"logps": logps, "old": old, "ref": ref, "mask": mask, "adv": adv}


def _reference_loss(x: dict[str, torch.Tensor], beta: float, lo: float, hi: float, kind: str) -> float:
    """DeepSeekMath eq. 3 with the k3 KL (eq. 4), written out token by token."""
    per_seq, tokens_sum, tokens = [], 0.0, 0
    for i in range(len(x["adv"])):
        a, row = float(x["adv"][i]), []
        for j in range(x["logps"].shape[1]):
            if not x["mask"][i, j]:
                continue
            lp, old, ref = float(x["logps"][i, j]), float(x["old"][i, j]), float(x["ref"][i, j])
            rho = math.exp(lp - old)
            surrogate = min(rho * a, min(max(rho, 1 - lo), 1 + hi) * a)
            kl = math.exp(ref - lp) - (ref - lp) - 1
            row.append(-(surrogate - beta * kl))
        per_seq.append(sum(row) / len(row))
        tokens_sum, tokens = tokens_sum + sum(row), tokens + len(row)
    return sum(per_seq) / len(per_seq) if kind == "sequence" else tokens_sum / tokens


@pytest.mark.parametrize("kind, beta, lo, hi", [("sequence", 0.04, 0.2, 0.2), ("sequence", 0.0, 0.2, 0.28),
                                                ("token", 0.1, 0.1, 0.3), ("token", 0.0, 0.2, 0.2)])
def test_loss_equals_deepseekmaths_formula(kind: str, beta: float, lo: float, hi: float) -> None:
    x = _fixed()
    per_token, kl, clipped = grpo_token_losses(x["logps"], x["old"], x["ref"], x["adv"], beta, lo, hi)
    weight = len(x["adv"]) if kind == "sequence" else int(x["mask"].sum())
    got = float(reduce_losses(per_token, x["mask"], kind)) / weight
    assert got == pytest.approx(_reference_loss(x, beta, lo, hi, kind), rel=1e-12)
    assert bool(clipped[x["mask"]].any()), "the fixed ratios should leave the clip range"


def _trl_loss(x: dict[str, torch.Tensor], beta: float, lo: float, hi: float, loss_type: str) -> float:
    """TRL 1.16's own GRPO loss step (`GRPOTrainer._compute_loss`, which has no public form over fixed
    log-probabilities) on x: a stand-in trainer whose log-prob function returns x's policy log-probs."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer

    mask = x["mask"].long()
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (x["logps"], torch.zeros_like(x["logps"]), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=lo, epsilon_high=hi,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False), use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t, reduce=lambda t, **k: t))
    inputs = {"prompt_ids": torch.zeros(len(mask), 1, dtype=torch.long), "prompt_mask": torch.ones(len(mask), 1),
              "completion_ids": torch.zeros_like(mask), "completion_mask": mask, "advantages": x["adv"],
              "old_per_token_logps": x["old"], "ref_per_token_logps": x["ref"]}
    return float(GRPOTrainer._compute_loss(trainer, None, inputs))


@pytest.mark.parametrize("kind, loss_type", [("sequence", "grpo"), ("token", "bnpo")])
@pytest.mark.parametrize("beta, lo, hi", [(0.04, 0.2, 0.2), (0.0, 0.2, 0.28), (0.3, 0.1, 0.1)])
def test_loss_equals_trls(kind: str, loss_type: str, beta: float, lo: float, hi: float) -> None:
    pytest.importorskip("trl", minversion="1.16")
    x = _fixed()
    per_token, _, _ = grpo_token_losses(x["logps"], x["old"], x["ref"] if beta else None, x["adv"], beta, lo, hi)
    weight = len(x["adv"]) if kind == "sequence" else int(x["mask"].sum())
    got = float(reduce_losses(per_token, x["mask"], kind)) / weight
    assert got == pytest.approx(_trl_loss(x, beta, lo, hi, loss_type), rel=1e-12)


def test_token_logps_are_the_tempered_policys(base: Path) -> None:
    model = checkpoint.load(base).model.eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = token_logps(model, tokens, 0.7)
        lp = F.log_softmax(model(tokens[:, :-1]).double() / 0.7, -1)  # (2, 8, V)
    assert torch.allclose(got.double(), lp.gather(-1, tokens[:, 1:, None]).squeeze(-1), atol=1e-5)


# ----- sampled rounds -------------------------------------------------------------------------------------------

def _sampler(base: Path, data: Path, tmp_path: Path, **extra: object) -> Sampler:
    cfg = load_config(GrpoConfig, None, _args(base, data, tmp_path / "run", "x.py:f", **extra))
    model, tok = load_model(cfg, "grpo")
    raw, _ = read_prompts([str(data)])
    return Sampler(cfg, model, reference_of(model, cfg.grpo.beta), tok, [(p, prompt_ids(p, tok)) for p in raw],
                   (ones_share, "ones_share"), rows=16)


def _row_logps(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1,) log-probs of one unpadded sequence's targets, in float64."""
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([ids[:-1]])).double(), -1)[0]
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def test_a_round_holds_its_completions_rewards_and_reference_logps(base: Path, prompts_file: Path,
                                                                   tmp_path: Path) -> None:
    s = _sampler(base, prompts_file, tmp_path, **{"grpo.iterations": 2})
    rnd = s.sample(0)
    chosen = [i for i in s.round_prompts(0) for _ in range(4)]
    texts = []
    for row, i in enumerate(chosen):
        ids = s.prompts[i][1]
        n = len(ids) + int(rnd.mask[row].sum())
        assert rnd.tokens[row, :len(ids)].tolist() == ids  # the prompt, then the completion right after it
        assert rnd.mask[row].nonzero().flatten().tolist() == list(range(len(ids) - 1, n - 1))
        completion = rnd.tokens[row, len(ids):n].tolist()
        texts.append(s.tokenizer.decode([t for t in completion if t not in s.stops]))
        want = _row_logps(s.reference, rnd.tokens[row, :n].tolist())[len(ids) - 1:]
        assert torch.allclose(rnd.extras["ref_logps"][row][rnd.mask[row]].double(), want, atol=1e-5)
        assert torch.allclose(rnd.extras["old_logps"][row][rnd.mask[row]].double(), want, atol=1e-5)  # no step yet
    rewards = torch.tensor(ones_share([], texts))
    assert torch.allclose(rnd.advantages, group_advantages(rewards, 4))
    assert float(rnd.extras["reward"][0]) == pytest.approx(float(rewards.mean()))
    again = s.sample(0)  # seeded: the same weights sample the same round
    assert torch.equal(again.tokens, rnd.tokens) and not torch.equal(s.sample(1).tokens, rnd.tokens)


def test_the_loss_step_on_a_round_equals_the_formula_on_each_sequence(base: Path, prompts_file: Path,
                                                                      tmp_path: Path) -> None:
    s = _sampler(base, prompts_file, tmp_path)
    rnd = s.sample(0)
    with torch.no_grad():  # a changed policy, so the ratios and the KL are not trivial
        for p in s.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch = s.slice(rnd, 4, 8, index=4)
    loss, metrics = grpo_loss("sequence", 0.04, 0.2, 0.2)(s.model.eval(), batch)
    total, kls = 0.0, []
    for row in range(4, 12):
        n = int(rnd.mask[row].nonzero().max()) + 2
        ids = rnd.tokens[row, :n].tolist()
        keep = rnd.mask[row, :n - 1]
        lp = _row_logps(s.model, ids)[keep]
        ref = rnd.extras["ref_logps"][row, :n - 1][keep].double()
        a = float(rnd.advantages[row])
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        total += float((-a + 0.04 * kl).mean())  # the ratio is 1 (iterations 1: old = the policy's own)
        kls.append(kl)
    assert float(loss.detach()) == pytest.approx(total / 8, rel=1e-4, abs=1e-6)
    assert float(metrics["kl"]) == pytest.approx(float(torch.cat(kls).mean()), rel=1e-4)


# ----- rewards --------------------------------------------------------------------------------------------------

def test_checker_reward_scores_the_built_in_tasks() -> None:
    fc = tasks.examples("function-calling", 3, seed=1)
    tt = tasks.examples("tinytales-instruct", 2, seed=1)
    gold = [r["messages"][-1]["content"] for r in fc + tt]
    assert checker_reward(fc + tt, gold) == [1.0] * 5
    wrong = [json.dumps({"name": "set_alarm", "arguments": {"time": "99:99"}}), "not json", "{}",
             "A story.", gold[3]]  # the last one: another story than the spec asks for
    assert checker_reward(fc + tt, wrong) == [0.0] * 5
    with pytest.raises(TinylmError, match="neither"):
        checker_reward([{"prompt": "hi"}], ["x"])


def test_a_users_function_is_loaded_and_its_output_checked(reward_file: Path) -> None:
    fn = load_reward(f"{reward_file}:ones_share")
    assert score(fn, [{}, {}], ["111", "a1"]) == [1.0, 0.5]
    assert not (reward_file.parent / "__pycache__").exists()  # nothing written beside the user's file
    with pytest.raises(TinylmError, match="returned 1 rewards for 2"):
        score(lambda p, c: [1.0], [{}, {}], ["a", "b"])
    with pytest.raises(TinylmError, match="must return a list of numbers"):
        score(lambda p, c: None, [{}], ["a"])
    with pytest.raises(TinylmError, match="raised ZeroDivisionError"):
        score(lambda p, c: [1 / 0], [{}], ["a"])
    with pytest.raises(TinylmError, match="needs a judge: --judge"):
        load_reward("judge")


class FakeJudge:
    """Grades each response by its length (1-10) and records what it was shown."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[str], list[str]]] = []

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        self.seen.append((prompts, responses))
        return [float(min(10, 1 + len(r))) for r in responses]


def test_the_judge_reward_is_its_grade_rescaled_and_reads_the_prompt_text() -> None:
    judge = FakeJudge()
    rows = [{"prompt": "a story about a cat"},
            {"prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "two plus two"}]},
            {"messages": [{"role": "user", "content": "call it"}, {"role": "assistant", "content": "gold"}]}]
    got = score(load_reward("judge", judge), rows, ["", "abcd", "a" * 20])
    assert got == [0.0, pytest.approx(4 / 9), 1.0]  # (grade - 1) / 9
    assert judge.seen == [(["a story about a cat", "two plus two", "call it"], ["", "abcd", "a" * 20])]
    with pytest.raises(TinylmError, match="no text prompt or user message"):
        score(load_reward("judge", judge), [{"id": 1}], ["x"])


# ----- runs -----------------------------------------------------------------------------------------------------

def test_a_short_run_raises_the_mean_reward(base: Path, prompts_file: Path, reward_file: Path,
                                            tmp_path: Path) -> None:
    final = grpo(load_config(GrpoConfig, None, _args(base, prompts_file, tmp_path / "run",
                                                     f"{reward_file}:ones_share", steps=10)))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    rewards = [r["reward"] for r in rows]
    assert len(rows) == 10 and rows[0]["kl"] == 0  # the policy starts as the reference, computed alike
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > 2 * first and last > 0.04, rewards
    assert rows[-1]["kl"] > 0.01
    assert (final / "model.safetensors").is_file()


def test_lora_grpo_trains_only_the_adapter_against_the_base(base: Path, prompts_file: Path, reward_file: Path,
                                                            tmp_path: Path) -> None:
    args = _args(base, prompts_file, tmp_path / "run", f"{reward_file}:ones_share", steps=3,
                 **{"peft.method": "lora", "peft.r": 4, "grpo.iterations": 3, "grpo.loss": "token"})
    final = grpo(load_config(GrpoConfig, None, args))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["kl"] == 0 and rows[0]["clip_ratio"] == 0  # adapters start at zero: the base itself
    assert rows[2]["kl"] > 0 and len({r["reward"] for r in rows}) == 1  # three steps on one round
    assert (final / "adapter_model.safetensors").is_file()
    tuned, start = weights(final), weights(base)
    assert tuned.keys() == start.keys() and all(torch.equal(tuned[k], start[k]) for k in tuned)


def test_the_checker_runs_on_a_built_in_tasks_records_through_the_cli(tmp_path: Path, capsys) -> None:
    rows = tasks.examples("function-calling", 4, seed=2)
    texts = [m["content"] for r in tasks.examples("function-calling", 40, seed=3) for m in r["messages"]]
    ck = chat_checkpoint(texts, tmp_path / "ck", vocab_size=600, max_seq_len=512)
    data = write_jsonl(tmp_path / "fc.jsonl", rows)
    code = cli.main(["grpo", str(ck), "--data", str(data), "--out", str(tmp_path / "run"), "--data.seq_len", "400",
                     "--data.batch_tokens", "1600", "--data.micro_batch", "2", "--grpo.group_size", "2",
                     "--grpo.max_tokens", "8", "--schedule.steps", "1", "--run.progress", "false", "--run.plot",
                     "false", "--run.compile", "false", "--run.device", "cpu", "--run.peak_flops", "1e11"])
    assert code == 0, capsys.readouterr().err
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert row["reward"] == 0 and row["flat_groups"] == 1 and abs(row["loss"]) < 1e-6  # a random model calls nothing
    assert checkpoint.load(tmp_path / "run" / "final").tokenizer is not None


def test_a_local_judge_rewards_a_run(base: Path, prompts_file: Path, tmp_path: Path) -> None:
    judge = chat_checkpoint(list(tinytales.generate(100, 0)), tmp_path / "judge", max_seq_len=512)
    args = _args(base, prompts_file, tmp_path / "run", "judge", steps=1,
                 **{"grpo.judge": str(judge), "grpo.judge_rubric": "instruction", "grpo.beta": 0.0})
    grpo(load_config(GrpoConfig, None, args))
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert 0 <= row["reward"] <= 1 and math.isfinite(row["loss"])  # every grade parsed (a random judge, a schema)


def test_a_resumed_run_samples_and_ends_as_the_straight_one(base: Path, prompts_file: Path, reward_file: Path,
                                                            tmp_path: Path) -> None:
    reward = f"{reward_file}:ones_share"
    straight = grpo(load_config(GrpoConfig, None, _args(base, prompts_file, tmp_path / "a", reward, steps=4,
                                                        **{"run.ckpt_every": 2, "run.keep_last": 3})))
    shutil.copytree(  # a run killed after step 2's checkpoint
        checkpoint_dir(tmp_path / "a", 2), checkpoint_dir(tmp_path / "b", 2))
    resumed = grpo(load_config(GrpoConfig, None, _args(base, prompts_file, tmp_path / "b", reward, steps=4,
                                                       **{"run.ckpt_every": 2, "run.resume": "auto"})))
    assert_bitwise(weights(straight), weights(resumed))
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in "ab")
    assert [r["reward"] for r in a[2:]] == [r["reward"] for r in b]  # the same completions were sampled
