"""Sampling against transformers' logits processors, decoding against HF `generate`, streaming and the CLI."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from helpers import chi_square_p_value, hf_model, tiny_model

from tinylm.cli import main
from tinylm.core.errors import TinylmError
from tinylm.data.tokenizer import bytes_to_unicode, train_tokenizer
from tinylm.formats import checkpoint
from tinylm.infer.generate import TextStream, generate, generate_ids
from tinylm.infer.sampling import SamplingConfig, filter_logits, penalize_repetition, sample_next

CORPUS = ["the cat sat on the mat. " * 3, "café naïve façade 日本語 🤖 <END> stop here", "hello world " * 4] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, max_seq_len=128)


def byte_ids(tok, text: str) -> list[int]:
    """One id per UTF-8 byte of `text` (the byte-level alphabet), so multibyte characters are split."""
    alphabet = bytes_to_unicode()
    return [tok.token_to_id(alphabet[b]) for b in text.encode("utf-8")]


def _survivors(filtered: torch.Tensor) -> list[list[float]]:
    # Per row, the kept logit values in order; equal lists = same kept set up to which of tied tokens.
    return [sorted(row[row > float("-inf")].tolist()) for row in filtered]


# ----- filters against transformers ---------------------------------------------------------------

def _random_logits(seed: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, 50, generator=g) * torch.linspace(0.1, 8, 64)[:, None]  # flat to peaked rows
    return logits.round(decimals=0) if ties else logits  # rounding makes many ties


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 2, 7, 49, 50, 80])
def test_top_k_matches_transformers(k, ties):
    from transformers import TopKLogitsWarper

    logits = _random_logits(k, ties)
    ours = filter_logits(logits, top_k=k)
    ref = TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(ours.isinf(), ref.isinf())  # ties with the k-th are kept by both


@pytest.mark.parametrize("p", [1e-9, 0.01, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_top_p_matches_transformers(p):
    from transformers import TopPLogitsWarper

    logits = _random_logits(int(p * 1000), ties=False)
    ours = filter_logits(logits, top_p=p)
    ref = TopPLogitsWarper(top_p=p)(None, logits.clone())
    assert torch.equal(ours.isinf(), ref.isinf())
    assert (~ours.isinf()).sum(-1).min() >= 1


@pytest.mark.parametrize("p", [0.1, 0.5, 0.75, 0.8, 0.95])
def test_top_p_with_ties_matches_transformers(p):
    from transformers import TopPLogitsWarper

    logits = _random_logits(7, ties=True)
    exact = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))  # cumulative masses land exactly on p = 0.75
    for x in (logits, exact):
        ours = filter_logits(x, top_p=p)
        ref = TopPLogitsWarper(top_p=p)(None, x.clone())
        assert _survivors(ours) == _survivors(ref)


def test_top_k_then_top_p_matches_transformers():
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    logits = _random_logits(3, ties=False) / 0.7
    ref = TopPLogitsWarper(top_p=0.8)(None, TopKLogitsWarper(top_k=10)(None, logits.clone()))
    assert torch.equal(filter_logits(logits, top_k=10, top_p=0.8).isinf(), ref.isinf())


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 30, generator=g)
    logits[:, :3] = 0.0  # zero logits are a branch of their own
    seen = torch.randint(0, 30, (4, 12), generator=g)  # repeats inside a row too
    seen[:, 0] = 1
    ref = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone())
    assert torch.equal(penalize_repetition(logits, seen, penalty), ref)


# ----- sampling --------------------------------------------------------------------------------------

def test_temperature_zero_is_argmax():
    logits = _random_logits(1, ties=False)
    cfg = SamplingConfig(temperature=0.0, top_k=3, top_p=0.5)
    assert torch.equal(sample_next(logits, cfg), logits.argmax(-1))


def test_seeded_sampling_is_deterministic_and_seed_dependent(model):
    prompt = [5, 6, 7]
    runs = {s: generate_ids(model, prompt, 24, temperature=1.0, seed=s) for s in (1, 2)}
    assert generate_ids(model, prompt, 24, temperature=1.0, seed=1) == runs[1]
    assert runs[1] != runs[2]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 5, None), (1.5, None, 0.8)])
def test_sampled_frequencies_match_softmax(temperature, top_k, top_p):
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    small = tiny_model(vocab_size=8, seed=4)
    prompt, draws = [3, 1, 4], 5_000
    with torch.no_grad():
        logits = small(torch.tensor([prompt]))[:, -1] / temperature  # (1, 8)
    if top_k:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p:
        logits = TopPLogitsWarper(top_p)(None, logits)
    probs = logits.softmax(-1)[0]
    rows = generate_ids(small, [prompt] * draws, 1, temperature, top_k, top_p, seed=0)  # first token of each row
    counts = torch.bincount(torch.tensor(rows)[:, 0], minlength=8).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0 and kept.sum() >= 3
    assert chi_square_p_value(counts[kept], probs[kept].double()) > 1e-3


def test_bad_sampling_settings_are_one_line_errors():
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2), dict(repetition_penalty=0)):
        with pytest.raises(TinylmError) as e:
            SamplingConfig(**bad)
        assert "\n" not in str(e.value)


# ----- decoding ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_equals_transformers_generate(penalty):
    small = tiny_model(eos_token_id=None, max_seq_len=128)  # no eos: HF runs the full length too
    ref = hf_model(small)
    prompt = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=30, do_sample=False, repetition_penalty=penalty,
                            pad_token_id=0)[0, 9:]
    got = generate_ids(small, prompt[0].tolist(), 30, temperature=0.0, repetition_penalty=penalty)
    assert got == want.tolist()


def test_batch_equals_rows_under_greedy(model):
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(10, model.config.vocab_size, (4, 7), generator=g).tolist()
    rows = [generate_ids(model, p, 20, temperature=0.0) for p in prompts]
    assert generate_ids(model, prompts, 20, temperature=0.0) == rows
    stop = rows[1][3]  # rows end at their own first stop id, the stop id kept
    batched = generate_ids(model, prompts, 20, temperature=0.0, stop_ids=[stop])
    assert batched == [r[:r.index(stop) + 1] if stop in r else r for r in rows]


def test_unequal_prompts_are_an_error(model):
    with pytest.raises(TinylmError):
        generate_ids(model, [[1, 2, 3], [1, 2]], 4)


def test_n_samples_are_a_seeded_batch(model, tok):
    texts = generate(model, tok, "the cat", 16, temperature=1.0, seed=3, n=3)
    assert isinstance(texts, list) and len(texts) == 3
    assert texts == generate(model, tok, "the cat", 16, temperature=1.0, seed=3, n=3)
    assert len(set(texts)) > 1
    ids = generate_ids(model, [tok.encode("the cat")] * 3, 16, temperature=1.0, seed=3, stop_ids=[tok.eos_id])
    assert texts == [tok.decode([i for i in row if i != tok.eos_id]) for row in ids]


def test_stop_string_cuts_text_and_stream(model, tok):
    full = generate(model, tok, "hello", 40, temperature=0.0)
    stop = full[10:13]
    assert len(full) > 20 and stop.strip()
    chunks: list[str] = []
    text = generate(model, tok, "hello", 40, temperature=0.0, stop=[stop], write=chunks.append)
    assert text == full[:full.find(stop)]
    assert "".join(chunks) == text and stop not in text


# ----- streaming --------------------------------------------------------------------------------------

def _stream(tok, ids: list[int], stops=()) -> tuple[TextStream, list[str], list[str]]:
    # Push ids one at a time; record the chunks and the text shown after each push.
    chunks: list[str] = []
    stream = TextStream(tok, stops, chunks.append)
    shown = []
    for i in ids:
        stopped = stream.push(i)
        shown.append("".join(chunks))
        if stopped:
            break
    return stream, chunks, shown


def test_stream_holds_back_incomplete_utf8(tok):
    text = "a🤖b é日本語c"
    ids = byte_ids(tok, text)
    stream, chunks, shown = _stream(tok, ids)
    assert stream.finish() == text == "".join(chunks)
    assert all("\ufffd" not in c for c in chunks)
    assert all(text.startswith(s) for s in shown)
    assert shown[0] == shown[3] == "a"  # the robot's 4 bytes: nothing until the last arrives
    assert shown[4] == "a🤖"


def test_stream_holds_back_stop_prefix(tok):
    stream, chunks, shown = _stream(tok, byte_ids(tok, "ab<EN"), stops=["<END>"])
    assert shown[-1] == "ab" and not stream.stopped  # "<EN" might become "<END>"
    stream, chunks, shown = _stream(tok, byte_ids(tok, "ab<ENX more<END>never"), stops=["<END>"])
    assert shown[5] == "ab<ENX" and stream.stopped
    assert stream.finish() == "".join(chunks) == "ab<ENX more"
    stream, chunks, shown = _stream(tok, byte_ids(tok, "xyz!q"), stops=["yz?", "z!"])  # two stops
    assert shown[1] == "x" and stream.finish() == "xy"


# ----- CLI --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, model, tok):
    root = tmp_path_factory.mktemp("gen")
    checkpoint.save(model, root / "with_tok", tokenizer=tok)
    checkpoint.save(model, root / "no_tok")
    return root


def test_cli_generate_streams_to_stdout(ckpts, model, tok, monkeypatch):
    writes: list[str] = []
    fake = type("Out", (), {"write": lambda self, s: writes.append(s), "flush": lambda self: None})()
    monkeypatch.setattr(sys, "stdout", fake)
    rc = main(["generate", str(ckpts / "with_tok"), "--prompt", "the cat", "--greedy", "--max-tokens", "12"])
    assert rc == 0
    assert "".join(writes) == "the cat" + generate(model, tok, "the cat", 12, temperature=0.0) + "\n"
    assert len(writes) > 3  # streamed piece by piece, not written once at the end


def test_cli_prompt_file_and_stdin(ckpts, model, tok, tmp_path, capsys, monkeypatch):
    (tmp_path / "prompts.txt").write_text("the cat\n\nhello world\n")
    args = ["generate", str(ckpts / "with_tok"), "--max-tokens", "6", "--temperature", "0.9", "--seed", "4"]
    assert main(args + ["--prompt-file", str(tmp_path / "prompts.txt")]) == 0
    out = capsys.readouterr().out
    want = [p + generate(model, tok, p, 6, temperature=0.9, seed=4) for p in ("the cat", "hello world")]
    assert out == "".join(w + "\n---\n" for w in want)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world\n"))
    assert main(args + ["--prompt-file", "-"]) == 0
    assert capsys.readouterr().out == want[1] + "\n"


@pytest.mark.parametrize("extra, which, message", [
    ([], "with_tok", "give a prompt"),
    (["--prompt", "hi", "--temperature", "-1"], "with_tok", "temperature"),
    (["--prompt", "hi", "--top-p", "0"], "with_tok", "--top-p"),
    (["--prompt", "hi"], "no_tok", "no tokenizer"),
    (["--prompt", "hi"], "missing", "no model"),
])
def test_cli_errors_are_one_line_exit_2(ckpts, capsys, extra, which, message):
    assert main(["generate", str(ckpts / which)] + extra) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("tinylm: error: ") and captured.err.count("\n") == 1 and message in captured.err
