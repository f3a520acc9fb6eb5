"""The inference engine: continuous batching over a paged KV cache, checked against single-stream decoding.

Each request's greedy output must equal `generate_ids` / `generate` on its own prompt, whatever joins, leaves
or is cancelled around it; a seeded sampled request draws the same tokens alone or in a batch; the paged
cache's batched forward (rows at different positions) matches the plain forward's logits.
"""

from __future__ import annotations

import pytest
import torch
from helpers import needs_smollm2, padded_model, tiny_model

from tinylm.cli import main
from tinylm.core.errors import TinylmError
from tinylm.data.tokenizer import train_tokenizer
from tinylm.formats import checkpoint
from tinylm.infer.engine import Engine, EngineConfig, Request
from tinylm.infer.generate import TextStream, generate, generate_ids
from tinylm.infer.sampling import SamplingConfig
from tinylm.model.kvcache import PagedCache

CORPUS = ['{"name": "Tom", "age": 3, "ok": true}', '{"name": "Ann", "age": 41, "ok": false}',
          "the cat sat on the mat. ", "café naïve 日本語 🤖 hello world "] * 30
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=320, min_frequency=1)


@pytest.fixture(scope="module")
def model(tok):
    return padded_model(tok, max_seq_len=160)


def _prompts(rng, vocab: int, n: int, shared: int = 9) -> list[list[int]]:
    """n random prompts of 1..20 ids; every other one starts with the same `shared` ids (a system prompt)."""
    prefix = rng.integers(3, vocab, shared).tolist()
    prompts = []
    for i in range(n):
        body = rng.integers(3, vocab, int(rng.integers(1, 12))).tolist()
        prompts.append(prefix + body if i % 2 else body)
    return prompts


# ----- the paged cache in the model's own forward ------------------------------------------------------

def test_paged_cache_matches_plain_forward(rng):
    model = tiny_model()
    L, hd, H = model.config.n_layers, model.config.head_dim, model.config.n_kv_heads
    k, v = torch.zeros(L, 64, H, hd), torch.zeros(L, 64, H, hd)
    lengths = [3, 7, 5]
    seqs = [rng.integers(3, 97, n + 4).tolist() for n in lengths]  # 4 more ids each: decoded later
    where = torch.from_numpy(rng.permutation(64)).long()  # each row's positions scattered over the pool
    slots = [where[20 * i:20 * (i + 1)] for i in range(3)]
    with torch.no_grad():
        for i, n in enumerate(lengths):  # prefill each row alone, in two chunks (the second one is chunked prefill)
            model(torch.tensor([seqs[i][:2]]), cache=PagedCache(k, v, slots[i][None, :2], [0]))
            model(torch.tensor([seqs[i][2:n]]), cache=PagedCache(k, v, slots[i][None, :n], [2]))
        pos = list(lengths)
        for _ in range(2):  # two batched one-token steps, the rows at different positions
            ids = torch.tensor([[s[p] for s, p in zip(seqs, pos)]])  # (1, B) -> (B, 1) below
            S = max(pos) + 1
            got = model(ids.T, cache=PagedCache(k, v, torch.stack([s[:S] for s in slots]), pos))[:, -1]
            pos = [p + 1 for p in pos]
            for i in range(3):
                want = model(torch.tensor([seqs[i][:pos[i]]]))[0, -1]
                torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
        # a batched step of two tokens per row: per-row (B, 1, T, S) masks through scaled_dot_product_attention
        ids = torch.tensor([s[p:p + 2] for s, p in zip(seqs, pos)])  # (B, 2)
        got = model(ids, cache=PagedCache(k, v, torch.stack([s[:max(pos) + 2] for s in slots]), pos))
        for i in range(3):
            want = model(torch.tensor([seqs[i][:pos[i] + 2]]))[0, -2:]
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def _stop_reference(model, tok, prompt: list[int], stop: str) -> tuple[list[int], str]:
    """Single-stream greedy ids and text of `prompt` cut at `stop`, as `generate` decodes them."""
    stream = TextStream(tok, [stop])
    ids = generate_ids(model, prompt, 40, temperature=0.0, stop_ids=[tok.eos_id],
                       on_token=lambda row, t: t == tok.eos_id or stream.push(t))
    return ids, stream.finish()


# ----- greedy requests equal their single-stream decodes ------------------------------------------------

@pytest.mark.parametrize("with_json", [False, True])
def test_greedy_requests_equal_single_stream(model, tok, rng, with_json):
    """12 requests of mixed lengths and limits join at steps 0-5 of a batch of at most 5 over 4-position
    blocks; some share a prefix, two are cancelled, two have stop strings, two (with_json) a JSON schema."""
    make = None
    if with_json:
        pytest.importorskip("outlines_core")
        from tinylm.infer.constrained import constraint_factory
        make = constraint_factory(SCHEMA, tok, model.config.vocab_size)
    prompts = _prompts(rng, tok.vocab_size, 12)
    limits = rng.integers(1, 25, 12).tolist()
    eos = [tok.eos_id]
    limits[1] = limits[11] = 30  # the cancelled ones: no eos, still running when cancelled
    stop_ids = [[] if i in (1, 11) else eos for i in range(12)]
    want = [generate_ids(model, p, n, temperature=0.0, stop_ids=s) for p, n, s in zip(prompts, limits, stop_ids)]
    stops = {}
    for i in (3, 8):  # a stop string from the middle of its own greedy text
        text = tok.decode(generate_ids(model, prompts[i], 40, temperature=0.0))
        limits[i], stops[i] = 40, text[len(text) // 2:len(text) // 2 + 2]
    json_rows = (5, 10) if with_json else ()
    engine = Engine(model, tok, EngineConfig(max_batch=5, block_size=4, kv_tokens=512))
    ids, busiest = {}, 0
    for step in range(200):
        for i in range(12):
            if i // 2 == step and i not in ids:  # two requests join at each step 0..5
                ids[i] = engine.submit(Request(prompts[i], limits[i], stop=[stops[i]] if i in stops else (),
                                               stop_ids=stop_ids[i], constraint=make() if i in json_rows else None))
        if step == 6:
            engine.cancel(ids[1])  # running
            engine.cancel(ids[11])  # still waiting (the batch is full)
        engine.step()
        busiest = max(busiest, len(engine.running))
        if not engine.busy:
            break
    done = {i: engine.pop(r) for i, r in ids.items()}
    for i, c in done.items():
        note = f"request {i} (prompt {len(prompts[i])} ids, limit {limits[i]})"
        if i in (1, 11):
            assert c.finish_reason == "cancelled" and c.token_ids == want[i][:len(c.token_ids)], note
            assert len(c.token_ids) == (6 if i == 1 else 0), note  # steps 0-5 gave request 1 six tokens
        elif i in stops:
            ref_ids, ref_text = _stop_reference(model, tok, prompts[i], stops[i])
            assert (c.token_ids, c.text, c.finish_reason) == (ref_ids, ref_text, "stop"), note
            assert stops[i] not in c.text, note
        elif i in json_rows:
            assert c.token_ids == generate_ids(model, prompts[i], limits[i], temperature=0.0, stop_ids=eos,
                                               constraints=[make()]), note
        else:
            assert c.token_ids == want[i], note
            assert c.finish_reason == ("stop" if want[i][-1] == tok.eos_id else "length"), note
    assert busiest == 5 and any(c.cached_tokens for c in done.values())  # a full batch; a reused prefix
    assert sum(engine.pool.refs) == 0 and not engine.running  # every block released


def test_a_small_pool_queues_requests_and_evicts_cached_blocks(model, tok, rng):
    """A pool of 12 blocks: requests wait for blocks, cached prefix blocks are evicted to make room, and the
    outputs still equal their single-stream decodes."""
    prompts = _prompts(rng, tok.vocab_size, 8)
    want = [generate_ids(model, p, 10, temperature=0.0) for p in prompts]
    engine = Engine(model, tok, EngineConfig(max_batch=8, block_size=4, kv_tokens=48))
    got = engine.run([Request(p, 10, stop_ids=[]) for p in prompts])
    assert [c.token_ids for c in got] == want
    assert engine.pool.n_blocks == 12 and engine.pool.evicted > 0 and sum(engine.pool.refs) == 0


def test_a_later_turn_reuses_the_blocks_of_the_earlier_one(model, tok, rng):
    """A chat's next prompt (prompt + reply + more) finds the blocks written while the reply was decoded."""
    first = rng.integers(3, tok.vocab_size, 10).tolist()
    engine = Engine(model, tok, EngineConfig(block_size=4))
    reply = engine.run([Request(first, 12, stop_ids=[])])[0].token_ids
    second = first + reply + rng.integers(3, tok.vocab_size, 2).tolist()  # 24 ids; 21 were in the pool
    done = engine.run([Request(second, 8, stop_ids=[])])[0]
    assert done.cached_tokens == 20  # the 5 full blocks; the 6th was not full
    assert done.token_ids == generate_ids(model, second, 8, temperature=0.0)


# ----- sampling, streaming, log-probabilities ------------------------------------------------------------

def test_seeded_requests_draw_the_same_tokens_in_any_batch(model, tok, rng):
    prompts = _prompts(rng, tok.vocab_size, 6)
    sampled = Request(prompts[0], 20, SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.2,
                                                     seed=7), stop_ids=[])
    alone = Engine(model, tok).run([sampled])[0].token_ids
    others = [Request(p, 15, SamplingConfig(temperature=0.8, seed=i), stop_ids=[]) for i, p in enumerate(prompts[1:])]
    crowded = Engine(model, tok, EngineConfig(max_batch=3)).run(others[:2] + [sampled] + others[2:])[2].token_ids
    assert alone == crowded == generate_ids(model, prompts[0], 20, temperature=1.0, top_k=50, top_p=0.95,
                                            repetition_penalty=1.2, seed=7)
    assert alone != generate_ids(model, prompts[0], 20, temperature=1.0, top_k=50, top_p=0.95,
                                 repetition_penalty=1.2, seed=8)


def test_events_stream_text_and_logprobs(model, tok):
    log: list = []
    prompt = tok.encode("café")
    request = Request(prompt, 30, SamplingConfig(temperature=1.0, seed=3), top_logprobs=3,
                      on_token=log.append, on_finish=log.append)
    done = Engine(model, tok).run([request])[0]
    events = log[:-1]
    assert log[-1] is done and [e.token for e in events] == done.token_ids  # on_finish after the last token
    assert "".join(e.text for e in events) == done.text == tok.decode(done.token_ids)
    # held back until complete: a character's bytes never show as U+FFFD in a delta that precedes its end
    # (TextStream's own tests cover the cases; a random model may also spell bytes that never complete)
    shown = [("".join(e.text for e in events[:i + 1])) for i in range(len(events))]
    assert all(not s.endswith("\ufffd") or s == done.text for s in shown)
    assert [e.finish_reason for e in events] == [None] * (len(events) - 1) + [done.finish_reason]
    with torch.no_grad():  # log-probabilities of the raw logits, recomputed without a cache
        logits = model(torch.tensor([prompt + done.token_ids]))[0, len(prompt) - 1:-1].log_softmax(-1)
    chosen = logits.gather(1, torch.tensor(done.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(done.logprobs), chosen, atol=1e-4, rtol=0)
    top = logits.topk(3)
    assert [[t for t, _ in row] for row in done.top_logprobs] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([[lp for _, lp in row] for row in done.top_logprobs]), top.values,
                               atol=1e-4, rtol=0)


# ----- the generate command ------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [["--n", "3", "--temperature", "1.0", "--seed", "5"],
                                   ["--greedy", "--stop", "at", "--max-batch", "1"]])
def test_cli_generate_decodes_several_samples_with_the_engine(model, tok, tmp_path, capsys, monkeypatch, extra):
    """Several prompts or samples go through the engine and print, in order, what one-at-a-time `generate`
    prints for each (sample i of a prompt seeded with seed + i)."""
    checkpoint.save(model, tmp_path / "m", tokenizer=tok)
    steps = []
    monkeypatch.setattr(Engine, "step", lambda self, step=Engine.step: steps.append(1) or step(self))
    prompts = ["the cat", "hello"]
    assert main(["generate", str(tmp_path / "m"), "--max-tokens", "12", *sum((["--prompt", p] for p in prompts), []),
                 *extra]) == 0
    n = 3 if "--n" in extra else 1
    kwargs = dict(temperature=1.0) if n == 3 else dict(temperature=0.0, stop=["at"])
    want = [p + generate(model, tok, p, 12, seed=5 + i if n == 3 else None, **kwargs)
            for p in prompts for i in range(n)]
    assert capsys.readouterr().out == "".join(w + "\n---\n" for w in want) and steps


# ----- cancellation and bad requests ---------------------------------------------------------------------

def test_cancel_frees_the_slot_at_once(model, tok, rng):
    prompts = _prompts(rng, tok.vocab_size, 3)
    engine = Engine(model, tok, EngineConfig(max_batch=1, block_size=4))
    first, second = (engine.submit(Request(p, 50, stop_ids=[])) for p in prompts[:2])
    engine.step()
    engine.step()
    assert list(engine.running) == [first] and sum(engine.pool.refs) > 0
    engine.cancel(first)
    assert not engine.running and sum(engine.pool.refs) == 0
    engine.step()  # the waiting request takes the freed row
    assert list(engine.running) == [second]
    cancelled = engine.pop(first)
    assert cancelled.finish_reason == "cancelled" and len(cancelled.token_ids) == 2
    engine.cancel(second)
    assert not engine.busy and engine.pop(second).finish_reason == "cancelled"


def test_callbacks_may_cancel_requests(model, tok, rng):
    """A streaming callback that cancels its own request and another one (a client gone) frees each once."""
    prompts = _prompts(rng, tok.vocab_size, 3)
    engine = Engine(model, tok, EngineConfig(block_size=4))
    ids: list[int] = []

    def on_token(event) -> None:
        if len(engine.running[event.request].out) == 3:
            engine.cancel(ids[1])  # the next row of this step
            engine.cancel(event.request)

    ids += [engine.submit(Request(prompts[0], 20, stop_ids=[], on_token=on_token))]
    ids += [engine.submit(Request(p, 20, stop_ids=[])) for p in prompts[1:]]
    while engine.busy:
        engine.step()
    done = [engine.pop(i) for i in ids]
    assert [c.finish_reason for c in done] == ["cancelled", "cancelled", "length"]
    assert [len(c.token_ids) for c in done] == [3, 2, 20] and sum(engine.pool.refs) == 0
    assert done[2].token_ids == generate_ids(model, prompts[2], 20, temperature=0.0)


@pytest.mark.parametrize("request_, message", [
    (Request([]), "non-empty prompt"),
    (Request([5, 400]), "outside the model's vocabulary"),
    (Request([5], max_tokens=0), "max_tokens must be >= 1"),
    (Request([5] * 40, max_tokens=30), "exceeds the KV cache"),
])
def test_bad_requests_are_one_line_errors(model, tok, request_, message):
    engine = Engine(model, tok, EngineConfig(kv_tokens=64))
    with pytest.raises(TinylmError, match=message):
        engine.submit(request_)
    with pytest.raises(TinylmError, match="need a tokenizer"):
        Engine(model).submit(Request([5], stop=["x"]))
    assert not engine.busy


@needs_smollm2
def test_smollm2_requests_equal_single_stream():
    loaded = checkpoint.load("smollm2-135m")
    model, tok = loaded.model.eval(), loaded.tokenizer
    texts = ["The capital of France is", "def fib(n):", "Once upon a time, a little"]
    prompts = [tok.encode(t) for t in texts]
    want = [generate_ids(model, p, 6, temperature=0.0, stop_ids=[tok.eos_id]) for p in prompts]
    engine = Engine(model, tok)
    ids = [engine.submit(Request(p, 6)) for p in prompts[:2]]
    engine.step()  # the third joins after the first step
    ids += [engine.submit(Request(prompts[2], 6))]
    while engine.busy:
        engine.step()
    assert [engine.pop(i).token_ids for i in ids] == want
