"""`tinylm chat`: scripted sessions through the CLI (stdin replaced) on a tiny ChatML model, checking the
prompts the model is given (history, /reset, truncation) and the replies against `tinylm generate --chat`,
a full recompute without the reused KV cache, and transformers' generate on SmolLM2."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from helpers import hf_model, needs_smollm2, tiny_config

from tinylm import cli
from tinylm.data import tinytales
from tinylm.data.chat import add_chatml
from tinylm.data.tokenizer import Tokenizer, train_tokenizer
from tinylm.formats.checkpoint import load, save
from tinylm.infer import generate as infer_generate
from tinylm.model.llama import Llama
from tinylm.stages import chat as chat_stage

SYSTEM = "Tell short stories."


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    """A tiny random model whose tokenizer got its ChatML template (and <|im_end|> as eos) from add_chatml."""
    stories = list(tinytales.generate(200, seed=0))
    trained = train_tokenizer(stories, vocab_size=300)
    bare = Tokenizer(trained.backend, trained.bos_token, trained.eos_token, trained.pad_token, trained.unk_token)
    torch.manual_seed(0)
    model = Llama(tiny_config(vocab_size=bare.vocab_size, max_seq_len=96)).eval()
    with torch.no_grad():  # larger random weights than the init's, so greedy replies vary (not one token)
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    tok, model = add_chatml(bare, model)
    out = tmp_path_factory.mktemp("chat") / "ck"
    save(model, out, tokenizer=tok)
    return out


def _session(monkeypatch, capsys, args: list[str], lines: str) -> tuple[int, str, str, list[tuple[list[int], list[int]]]]:
    """Run `tinylm chat` with `lines` as stdin; returns (exit code, stdout, stderr, [(prompt ids, new ids)])."""
    calls: list[tuple[list[int], list[int]]] = []

    def recording(model, ids, *a, **kw):
        new = infer_generate.generate_ids(model, ids, *a, **kw)
        calls.append((list(ids), list(new)))
        return new

    monkeypatch.setattr(chat_stage, "generate_ids", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code = cli.main(["chat", *args])
    out, err = capsys.readouterr()
    return code, out, err, calls


def _reply(tok: Tokenizer, new: list[int]) -> str:
    """The text a reply adds to the history: its ids without the end-of-turn token."""
    return tok.decode(new[:-1] if new and new[-1] == tok.eos_id else new)


def _prompt(tok: Tokenizer, messages: list[tuple[str, str]]) -> list[int]:
    rendered = tok.apply_chat_template([{"role": r, "content": c} for r, c in messages], add_generation_prompt=True)
    return tok.encode(rendered)


def test_history_reset_and_eof(ck: Path, monkeypatch, capsys) -> None:
    code, out, err, calls = _session(monkeypatch, capsys, [str(ck), "--system", SYSTEM, "--temperature", "0",
                                                           "--max-tokens", "6"], "hello\nmore please\n/reset\nagain\n")
    assert code == 0, err
    tok = load(ck).tokenizer
    a1, a2, a3 = (_reply(tok, new) for _, new in calls)
    assert [ids for ids, _ in calls] == [
        _prompt(tok, [("system", SYSTEM), ("user", "hello")]),
        _prompt(tok, [("system", SYSTEM), ("user", "hello"), ("assistant", a1), ("user", "more please")]),
        _prompt(tok, [("system", SYSTEM), ("user", "again")]),  # /reset forgot the turns, kept the system
    ]
    assert out == f"{a1}\n{a2}\n{a3}\n"  # replies streamed to stdout, nothing else


def test_exit_and_empty_input(ck: Path, monkeypatch, capsys) -> None:
    for lines in ("", "/exit\nhello\n", "\n\n"):
        code, out, err, calls = _session(monkeypatch, capsys, [str(ck), "--temperature", "0", "--max-tokens", "6"], lines)
        assert (code, out, calls) == (0, "", []), err


def test_greedy_replies_equal_generate_chat_and_a_full_recompute(ck: Path, monkeypatch, capsys) -> None:
    code, out, err, calls = _session(monkeypatch, capsys, [str(ck), "--system", SYSTEM, "--temperature", "0",
                                                           "--max-tokens", "12"], "hello\nand then?\nwhy\n")
    assert code == 0, err
    tok = load(ck).tokenizer
    first = _reply(tok, calls[0][1]) + "\n"
    assert out.startswith(first) and len(set(calls[0][1])) > 3  # a reply of several different tokens
    assert cli.main(["generate", str(ck), "--chat", "--system", SYSTEM, "--prompt", "hello", "--greedy",
                     "--max-tokens", "12"]) == 0
    assert capsys.readouterr().out == first
    # turns 2 and 3 continued the previous turn's KV cache: the same tokens as computing the prompt anew
    model = load(ck).model
    for ids, new in calls:
        assert new == infer_generate.generate_ids(model, ids, 12, temperature=0.0, stop_ids=[model.config.eos_token_id])


def test_truncation_drops_oldest_turns_keeps_the_system_message(ck: Path, monkeypatch, capsys) -> None:
    max_tokens = 40  # the history gets 96 - 40 = 56 tokens: a turn with a 40-token reply crowds out the rest
    code, out, err, calls = _session(monkeypatch, capsys, [str(ck), "--system", SYSTEM, "--temperature", "0",
                                                           "--max-tokens", str(max_tokens)], "one\ntwo\nthree\n")
    assert code == 0, err
    assert err.count("dropping the oldest turns") == 1, err  # said once
    tok = load(ck).tokenizer
    turns: list[tuple[str, str]] = []
    truncated = 0
    for (ids, new), user in zip(calls, ("one", "two", "three")):
        turns.append(("user", user))
        kept = next(k for k in range(0, len(turns), 2)
                    if ids == _prompt(tok, [("system", SYSTEM), *turns[k:]]))  # a suffix of whole turns
        assert len(ids) <= 96 - max_tokens
        truncated += kept > 0
        turns.append(("assistant", _reply(tok, new)))
    assert truncated >= 1


def test_a_model_without_a_template_is_refused(ck: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    loaded = load(ck)
    bare = loaded.tokenizer
    save(loaded.model, tmp_path / "plain", tokenizer=Tokenizer(bare.backend, bare.bos_token, bare.eos_token))
    code, out, err, calls = _session(monkeypatch, capsys, [str(tmp_path / "plain")], "hello\n")
    assert code == 2 and out == "" and err.count("\n") == 1 and "tinylm sft" in err, err


@pytest.mark.slow
@needs_smollm2
def test_smollm2_two_greedy_turns_equal_transformers(monkeypatch, capsys) -> None:
    n = 8
    code, out, err, calls = _session(monkeypatch, capsys, ["smollm2-135m", "--temperature", "0", "--max-tokens",
                                                           str(n)], "What is the capital of France?\nAnd of Spain?\n")
    assert code == 0 and len(calls) == 2, err
    loaded = load("smollm2-135m")
    tok, ref = loaded.tokenizer, hf_model(loaded.model)
    history: list[tuple[str, str]] = []
    for (ids, new), user in zip(calls, ("What is the capital of France?", "And of Spain?")):
        history.append(("user", user))
        prompt = _prompt(tok, history)
        assert ids == prompt
        with torch.no_grad():
            want = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)[0, len(prompt):].tolist()
        assert new == want
        history.append(("assistant", _reply(tok, new)))


def test_ctrl_c_during_a_reply_stops_it_and_the_chat_goes_on(ck: Path, monkeypatch, capsys) -> None:
    calls: list[list[int]] = []

    def interrupted_once(model, ids, *a, **kw):
        calls.append(list(ids))
        if len(calls) == 1:
            kw["cache"].pos += 1  # half-written, as a Ctrl-C in the middle of a forward pass leaves it
            raise KeyboardInterrupt
        return infer_generate.generate_ids(model, ids, *a, **kw)

    monkeypatch.setattr(chat_stage, "generate_ids", interrupted_once)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n"))
    assert cli.main(["chat", str(ck), "--temperature", "0", "--max-tokens", "6"]) == 0
    tok = load(ck).tokenizer
    assert calls[1] == _prompt(tok, [("user", "again")])  # the stopped turn left the history
    assert "reply stopped" in capsys.readouterr().err
