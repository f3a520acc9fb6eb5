"""Speculative decoding: greedy output equal to plain greedy decoding token for token (single stream and in the
engine, with a draft model and with prompt lookup), sampled output with the target's distribution (chi-square
against the exact two-token distribution, and the same test failing for broken acceptance rules), both caches
rolled back past rejected drafts, the drafters, the adaptive draft length and `tinylm generate --draft`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import chi_square_p_value, needs_smollm2, rng_for, tiny_model

from tinylm.cli import main
from tinylm.data.tokenizer import train_tokenizer
from tinylm.formats import checkpoint
from tinylm.infer import speculative
from tinylm.infer.engine import Engine, EngineConfig, Request
from tinylm.infer.generate import generate_ids
from tinylm.infer.sampling import SamplingConfig, filter_logits, penalize_repetition
from tinylm.infer.speculative import (
    Draft,
    DraftLength,
    ModelDrafter,
    NgramDrafter,
    SpecStats,
    speculative_generate_ids,
)
from tinylm.model.kvcache import KVCache
from tinylm.model.llama import Llama

GREEDY = SamplingConfig(temperature=0.0)
NEW = 20  # new tokens per prompt in the greedy comparisons


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run thousands of forwards of tiny models, where a second thread's synchronisation costs
    more than it saves (5x the CPU time on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def truncated(model: Llama, n_layers: int) -> Llama:
    """A smaller model over the same vocabulary: the first n_layers blocks of `model`, its embeddings and head."""
    small = Llama(dataclasses.replace(model.config, n_layers=n_layers)).eval()
    small.load_state_dict(model.state_dict(), strict=False)  # the dropped blocks are unexpected keys
    return small


@pytest.fixture(scope="module")
def target() -> Llama:
    # untied and a little wider than the default init, so that the output depends on the context and a
    # one-layer draft agrees with it only part of the time (both verification paths run)
    return tiny_model(seed=0, n_layers=2, tie=False, init_std=0.05, max_seq_len=128)


@pytest.fixture(scope="module")
def draft(target) -> Llama:
    return truncated(target, 1)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """50 prompts: a few random ids, then a random motif repeated 1-3 times (so that n-grams hit)."""
    rng = rng_for("test_speculative prompts")
    out = []
    for _ in range(50):
        noise = rng.integers(3, 97, int(rng.integers(0, 4))).tolist()
        motif = rng.integers(3, 97, int(rng.integers(2, 6))).tolist()
        out.append(noise + motif * int(rng.integers(1, 4)))
    return out


@pytest.fixture(scope="module")
def plain(target, prompts) -> list[list[int]]:
    return [generate_ids(target, p, NEW, temperature=0.0) for p in prompts]


def _drafter(kind: str, draft: Llama):
    return NgramDrafter() if kind == "ngram" else ModelDrafter(draft)


def _limits(i: int, want: list[int]) -> tuple[int, list[int], list[int]]:
    """Prompt i's token limit and stop ids, and the plain greedy ids they leave: every third prompt stops at a
    stop id from the middle of its own output, every prompt has a limit of 17-20 tokens."""
    limit = NEW - i % 4
    stop = [want[NEW // 2]] if i % 3 == 0 else []
    out = want[:limit]
    if stop and stop[0] in out:
        out = out[:out.index(stop[0]) + 1]
    return limit, stop, out


# ----- greedy: the same tokens as plain decoding ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ngram", "model"])
def test_greedy_equals_plain_greedy_on_50_prompts(kind, target, draft, prompts, plain):
    total = SpecStats()
    for i, (p, want) in enumerate(zip(prompts, plain)):
        limit, stop, expected = _limits(i, want)
        got, stats = speculative_generate_ids(target, p, _drafter(kind, draft), limit, temperature=0.0,
                                              stop_ids=stop, k_max=4)
        assert got == expected, f"prompt {i}: {p}"
        total.add(stats)
    assert 0 < total.accepted < total.drafted, total  # drafts were accepted and rejected
    assert total.steps < sum(len(_limits(i, w)[2]) for i, w in enumerate(plain))  # fewer target forwards


@pytest.mark.parametrize("kind, max_batch", [("ngram", 1), ("ngram", 8), ("model", 8)])
def test_engine_greedy_equals_plain_greedy_on_50_prompts(kind, max_batch, target, draft, prompts, plain):
    """Every row of the engine's batched speculative steps (drafts of different lengths, rows at different
    positions) decodes its plain greedy ids; batch 1 is the engine's single-stream case."""
    engine = Engine(target, cfg=EngineConfig(max_batch=max_batch, block_size=4, kv_tokens=4096, draft_k=4),
                    drafter=_drafter(kind, draft))
    cases = [_limits(i, want) for i, want in enumerate(plain)]
    done = engine.run([Request(p, limit, stop_ids=stop) for p, (limit, stop, _) in zip(prompts, cases)])
    for i, (c, (_, _, expected)) in enumerate(zip(done, cases)):
        assert c.token_ids == expected, f"prompt {i}"
    stats = engine.spec_stats
    assert 0 < stats.accepted < stats.drafted, stats
    assert sum(engine.pool.refs) == 0  # every block released


def test_engine_speculation_keeps_penalty_and_logprobs(target, draft, prompts):
    """Under a repetition penalty (row j of a verification has seen the draft's first j tokens) the tokens,
    log-probabilities and top log-probabilities equal the plain engine's."""
    sampling = SamplingConfig(temperature=0.0, repetition_penalty=1.3)
    requests = [Request(p, 16, sampling, stop_ids=[], top_logprobs=3) for p in prompts[:8]]
    plain_done = Engine(target, cfg=EngineConfig(max_batch=4, block_size=4)).run(requests)
    spec = Engine(target, cfg=EngineConfig(max_batch=4, block_size=4, draft_k=3), drafter=ModelDrafter(draft))
    spec_done = spec.run([dataclasses.replace(r) for r in requests])
    for a, b in zip(plain_done, spec_done):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
        assert [[t for t, _ in row] for row in a.top_logprobs] == [[t for t, _ in row] for row in b.top_logprobs]
    assert spec.spec_stats.accepted > 0


# ----- the caches after rollback ----------------------------------------------------------------------------

def _assert_cache_holds(model: Llama, cache: KVCache, ids: list[int]) -> None:
    """The cache's first len(ids) positions hold what a fresh prefill of `ids` computes."""
    assert cache.pos == len(ids)
    ref = KVCache.new(model, 1, len(ids))
    with torch.no_grad():
        model(torch.tensor([ids]), cache=ref)
    n = len(ids)
    torch.testing.assert_close(cache.k[..., :n, :], ref.k[..., :n, :], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v[..., :n, :], ref.v[..., :n, :], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_target_cache_holds_exactly_the_kept_tokens(temperature, target, draft, prompts):
    p = prompts[3]
    cache = KVCache.new(target, 1, len(p) + NEW + 4)
    out, stats = speculative_generate_ids(target, p, ModelDrafter(draft), NEW, temperature=temperature, seed=1,
                                          k_max=4, cache=cache)
    assert len(out) == NEW and stats.accepted < stats.drafted  # some drafted positions were rolled back
    _assert_cache_holds(target, cache, (p + out)[:-1])  # every token but the last, which is never fed


def test_draft_cache_rolls_back_to_the_accepted_prefix(draft, prompts):
    ctx = prompts[1]
    drafter = ModelDrafter(draft)
    first = drafter.propose(ctx, 4, GREEDY, None)
    # the target keeps two draft tokens and replaces the third
    ctx2 = ctx + first.tokens[:2] + [(first.tokens[2] + 1) % 97]
    second = drafter.propose(ctx2, 4, GREEDY, None)
    assert second.tokens == ModelDrafter(draft).propose(ctx2, 4, GREEDY, None).tokens  # as if it started afresh
    assert drafter.fed == ctx2 + second.tokens[:3]  # the last draft token is never fed
    _assert_cache_holds(draft, drafter.cache, drafter.fed)


def test_engine_pool_holds_exactly_the_kept_tokens(target, draft, prompts):
    """After every speculative step, each running row's pool positions before its `pos` hold what a fresh
    prefill of its tokens computes, and `pos` is its token count less the unfed last one."""
    engine = Engine(target, cfg=EngineConfig(max_batch=4, block_size=4, draft_k=4), drafter=ModelDrafter(draft))
    for p in prompts[:4]:
        engine.submit(Request(p, NEW, stop_ids=[]))
    checked = 0
    while engine.busy:
        engine.step()
        for live in engine.running.values():
            assert live.pos == len(live.tokens) - 1
            slots = engine.pool.slots([live.blocks], live.pos)[0]  # (pos,)
            cache = KVCache.new(target, 1, live.pos)
            cache.k[:, 0], cache.v[:, 0] = (pool[:, slots].transpose(1, 2) for pool in (engine.pool.k, engine.pool.v))
            cache.pos = live.pos
            _assert_cache_holds(target, cache, live.tokens[:-1])
            checked += 1
    assert checked >= 8 and engine.spec_stats.accepted < engine.spec_stats.drafted


# ----- sampling: the target's distribution ------------------------------------------------------------------

class FixedDrafter:
    """Draws every draft token from one fixed distribution q, whatever the context: a poor drafter but a valid
    one (the rule corrects any q). It reports `reported` as its q: q itself, None (its drafts taken as fixed
    tokens: still exact, since accepting d with probability p(d) and otherwise drawing from p without d gives
    p for any choice of d), or a wrong q (a bug the statistical test must catch)."""

    def __init__(self, q: torch.Tensor, reported: torch.Tensor | None) -> None:
        self.q, self.reported = q, reported

    def fresh(self) -> "FixedDrafter":
        return self

    def propose(self, tokens, k, sampling, generator) -> Draft:
        drawn = torch.multinomial(self.q, k, replacement=True, generator=generator).tolist()
        return Draft(drawn, self.reported.expand(k, -1) if self.reported is not None else None)


PROMPT8 = [0, 6, 2, 0, 6]  # prompt lookup proposes "2 0", which the target accepts part of the time
SAMPLINGS = [SamplingConfig(1.0), SamplingConfig(0.7, top_k=5, top_p=0.9, repetition_penalty=1.3)]


@pytest.fixture(scope="module")
def small() -> Llama:
    return tiny_model(vocab_size=8, seed=4, tie=False, init_std=0.15, eos_token_id=None)


def exact_two_tokens(model: Llama, prompt: list[int], cfg: SamplingConfig) -> torch.Tensor:
    """(64,) the probability of each first two tokens under plain sampling: penalty, temperature, top-k, top-p
    (filter_logits and penalize_repetition are checked against transformers in test_generate.py)."""
    def dist(ids: list[int]) -> torch.Tensor:
        logits = model(torch.tensor([ids]))[:, -1]
        logits = penalize_repetition(logits, torch.tensor([ids]), cfg.repetition_penalty)
        return filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)[0].double()  # (8,)

    with torch.no_grad():
        first = dist(prompt)
        second = torch.stack([dist(prompt + [x]) for x in range(8)])  # (8, 8)
    return (first[:, None] * second).flatten()


def engine_two_tokens(model: Llama, drafter, cfg: SamplingConfig, n: int) -> torch.Tensor:
    """(64,) counts of the first two tokens of n seeded speculative samples of PROMPT8 (3 tokens each, so the
    first step drafts two), decoded together by the engine."""
    engine = Engine(model, cfg=EngineConfig(max_batch=n, block_size=4, kv_tokens=16 * n, draft_k=2), drafter=drafter)
    done = engine.run([Request(PROMPT8, 3, dataclasses.replace(cfg, seed=i), stop_ids=[]) for i in range(n)])
    pairs = torch.tensor([c.token_ids[0] * 8 + c.token_ids[1] for c in done])
    assert engine.spec_stats.accepted > n // 10 and engine.spec_stats.accepted < engine.spec_stats.drafted
    return torch.bincount(pairs, minlength=64).double()


def _q8() -> torch.Tensor:
    return torch.softmax(torch.randn(8, generator=torch.Generator().manual_seed(3)) * 1.5, -1)


def _drafter8(kind: str) -> object:
    q = _q8()
    return {"fixed q": lambda: FixedDrafter(q, q), "fixed tokens": lambda: FixedDrafter(q, None),
            "q misreported": lambda: FixedDrafter(q, torch.softmax(q.log() / 2, -1)),  # drawn at T=1, told T=2
            "no residual": lambda: FixedDrafter(q, q), "ngram": NgramDrafter}[kind]()


@pytest.mark.parametrize("kind, cfg", [("fixed q", SAMPLINGS[0]), ("fixed q", SAMPLINGS[1]),
                                       ("fixed tokens", SAMPLINGS[0]), ("ngram", SAMPLINGS[1])],
                         ids=["fixed q", "fixed q-filtered", "fixed tokens", "ngram-filtered"])
def test_sampled_two_tokens_follow_the_target(kind, cfg, small):
    """2000 samples' first two tokens against their exact distribution under plain sampling (p > 1e-3 at the
    fixed seeds: a correct rule fails one time in a thousand over seeds, and not at these)."""
    counts = engine_two_tokens(small, _drafter8(kind), cfg, 2000)
    assert chi_square_p_value(counts, exact_two_tokens(small, PROMPT8, cfg), min_expected=5) > 1e-3


@pytest.mark.parametrize("broken", ["no residual", "q misreported"])
def test_the_statistical_test_catches_a_wrong_rule(broken, small, monkeypatch):
    """The same test fails (p < 1e-6) when a rejected token's replacement is drawn from p instead of
    norm(max(0, p - q)), or when the acceptance ratio and the residual use another q than the draft's."""
    cfg = SAMPLINGS[0]
    if broken == "no residual":
        monkeypatch.setattr(speculative, "residual", lambda p, q, token: p)
    counts = engine_two_tokens(small, _drafter8(broken), cfg, 2000)
    assert chi_square_p_value(counts, exact_two_tokens(small, PROMPT8, cfg), min_expected=5) < 1e-6


def test_sampled_two_tokens_follow_the_target_with_a_draft_model(small):
    """The engine with a real draft model (its own cache, rolled back; its sampled q)."""
    counts = engine_two_tokens(small, ModelDrafter(truncated(small, 1)), SAMPLINGS[0], 1200)
    assert chi_square_p_value(counts, exact_two_tokens(small, PROMPT8, SAMPLINGS[0]), min_expected=5) > 1e-3


@pytest.mark.slow
def test_single_stream_sampling_follows_the_target(small):
    """speculative_generate_ids, one seeded sample at a time."""
    drafter, cfg, pairs = _drafter8("fixed q"), SAMPLINGS[0], []
    for i in range(1000):
        out, _ = speculative_generate_ids(small, PROMPT8, drafter, 3, cfg.temperature, cfg.top_k, cfg.top_p,
                                          cfg.repetition_penalty, seed=i, k_max=2)
        pairs.append(out[0] * 8 + out[1])
    counts = torch.bincount(torch.tensor(pairs), minlength=64).double()
    assert chi_square_p_value(counts, exact_two_tokens(small, PROMPT8, cfg), min_expected=5) > 1e-3


def test_model_drafter_reports_the_distributions_it_drew_from(draft, prompts):
    ctx, cfg = prompts[2], SamplingConfig(0.8, top_k=20, repetition_penalty=1.2)
    got = ModelDrafter(draft).propose(ctx, 3, cfg, torch.Generator().manual_seed(0))
    assert len(got.tokens) == 3 and got.q.shape == (3, 97)
    with torch.no_grad():
        for j in range(3):
            seen = torch.tensor([ctx + got.tokens[:j]])
            logits = penalize_repetition(draft(seen)[:, -1], seen, 1.2)
            want = filter_logits(logits / 0.8, top_k=20).softmax(-1)[0]
            torch.testing.assert_close(got.q[j], want, atol=1e-5, rtol=1e-5)
            assert got.q[j, got.tokens[j]] > 0


@pytest.mark.parametrize("vocab", [90, 100])
def test_model_drafter_maps_its_logits_onto_the_target_vocabulary(vocab, draft, prompts):
    got = ModelDrafter(draft, vocab).propose(prompts[0], 4, SamplingConfig(1.5), torch.Generator().manual_seed(0))
    assert got.q.shape == (4, vocab) and max(got.tokens) < vocab
    if vocab > 97:  # ids the draft model has no row for are never proposed
        assert got.q[:, 97:].sum() == 0


# ----- the drafters and the draft length -------------------------------------------------------------------

def _latest_match(tokens: list[int], k: int, max_n: int) -> list[int]:
    """Prompt lookup written out plainly: for n = max_n..1, the latest earlier occurrence of the last n tokens."""
    for n in range(min(max_n, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_ngram_drafter_proposes_what_followed_the_latest_match(rng):
    ctx = [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6, 7]
    assert NgramDrafter().propose(ctx, 2, GREEDY).tokens == [1, 2]  # "5 6 7" came twice: the latest wins
    assert NgramDrafter().propose(ctx + [1], 4, GREEDY).tokens == [2, 5, 6, 7]
    assert NgramDrafter().propose([1, 2, 3, 9, 3], 5, GREEDY).tokens == [9, 3]  # only "3" matches: n = 1
    assert NgramDrafter().propose([1, 2, 3], 5, GREEDY).tokens == []
    assert NgramDrafter(max_n=1).propose(ctx, 3, GREEDY).tokens == [1, 2, 5]  # "7" alone
    drafter, seq = NgramDrafter(), rng.integers(0, 6, 5).tolist()
    for _ in range(200):  # the growing index proposes what a scan of the whole context finds
        assert drafter.propose(seq, 3, GREEDY).tokens == _latest_match(seq, 3, 3), seq
        seq.append(int(rng.integers(0, 6)))


def test_draft_length_grows_on_full_acceptance_and_shrinks_on_rejection():
    length = DraftLength(4)
    assert length.k == 4
    length.update(4, 1)  # fewer than half accepted
    assert length.k == 3
    length.update(3, 2)  # most accepted: unchanged
    length.update(0, 0)  # nothing drafted: unchanged
    assert length.k == 3
    length.update(3, 3)
    length.update(4, 4)
    assert length.k == 4  # at most k_max
    for _ in range(6):
        length.update(length.k, 0)
    assert length.k == 1  # at least 1


def test_stats_report_acceptance():
    stats = SpecStats()
    stats.record(4, 4)
    stats.record(4, 0)
    stats.record(0, 0)
    assert (stats.steps, stats.drafted, stats.accepted) == (3, 8, 4)
    assert stats.acceptance_rate == 0.5 and stats.mean_accepted == 4 / 3
    assert "4/8 drafted tokens accepted (50%)" in stats.summary()


# ----- the generate command ---------------------------------------------------------------------------------

CORPUS = ["the cat sat on the mat. the cat sat on the hat. " * 2, "hello world, hello there " * 3] * 20


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    tok = train_tokenizer(CORPUS, vocab_size=300, min_frequency=1)
    model = tiny_model(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, n_layers=3, tie=False, init_std=0.05,
                       max_seq_len=128)
    checkpoint.save(model, root / "target", tokenizer=tok)
    checkpoint.save(truncated(model, 1), root / "draft", tokenizer=tok)
    checkpoint.save(truncated(model, 1), root / "bare")  # no tokenizer
    other = train_tokenizer(["a wholly different corpus of words " * 5] * 10, vocab_size=280, min_frequency=1)
    checkpoint.save(tiny_model(vocab_size=other.vocab_size), root / "other", tokenizer=other)
    return root


def _generate(capsys, *args: str) -> tuple[str, str]:
    assert main(["generate", *args]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


@pytest.mark.parametrize("draft", ["ngram", "draft"])
@pytest.mark.parametrize("extra", [["--prompt", "the cat sat"],
                                   ["--prompt", "the cat sat", "--prompt", "hello world", "--max-batch", "2"]])
def test_cli_draft_prints_what_plain_greedy_prints(ckpts, capsys, draft, extra):
    """One prompt (single stream) and several (the engine), with a stop string from the middle of the text."""
    base = [str(ckpts / "target"), *extra, "--greedy", "--max-tokens", "20"]
    want, _ = _generate(capsys, *base)
    stop = want.split("\n")[0][len("the cat sat") + 6:][:3]
    assert stop.strip()
    source = "ngram" if draft == "ngram" else str(ckpts / "draft")
    for args in ([], ["--stop", stop]):
        plain_out, _ = _generate(capsys, *base, *args)
        out, err = _generate(capsys, *base, *args, "--draft", source, "--draft-k", "3")
        assert out == plain_out
        assert err.startswith(f"speculative decoding ({source}): ") and "drafted tokens accepted" in err
        assert err.count("\n") == 1
    assert plain_out != want  # the stop string cut it


def test_cli_draft_samples_with_a_seed(ckpts, capsys):
    args = [str(ckpts / "target"), "--prompt", "hello", "--temperature", "1.0", "--seed", "3", "--max-tokens", "12",
            "--draft", str(ckpts / "draft")]
    first, _ = _generate(capsys, *args)
    assert first.startswith("hello") and _generate(capsys, *args)[0] == first


@pytest.mark.parametrize("extra, message", [
    (["--draft", "other"], "vocabulary"),
    (["--draft", "bare"], "no tokenizer"),
    (["--draft-k", "3"], "--draft-k needs --draft"),
    (["--draft", "ngram", "--fast"], "--fast"),
])
def test_cli_draft_errors_are_one_line_exit_2(ckpts, capsys, extra, message):
    extra = [str(ckpts / e) if e in ("other", "bare") else e for e in extra]
    assert main(["generate", str(ckpts / "target"), "--prompt", "hi", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err


# ----- the real model -----------------------------------------------------------------------------------------

@needs_smollm2
@pytest.mark.slow
def test_smollm2_greedy_with_prompt_lookup_equals_plain_greedy():
    loaded = checkpoint.load("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    texts = ['Text: "Ada Lovelace was born in London in 1815." Give JSON with name, city and year: {"name": "',
             "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the"]
    total = SpecStats()
    for text in texts:
        ids = tok.encode(text)
        want = generate_ids(model, ids, 16, temperature=0.0, stop_ids=[tok.eos_id])
        got, stats = speculative_generate_ids(model, ids, NgramDrafter(), 16, temperature=0.0,
                                              stop_ids=[tok.eos_id], k_max=4)
        assert got == want, text
        total.add(stats)
    assert total.accepted > 0
