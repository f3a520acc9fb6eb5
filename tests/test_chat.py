"""Chat data: readers, exact loss masks (against transformers' assistant masks), ChatML for a tokenizer
without a template (resized embeddings), and packing into rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import hf_model, needs_smollm2, plain_tokenizer, tiny_model

from tinylm.core.errors import TinylmError
from tinylm.data.chat import (
    Example,
    Rendered,
    add_chatml,
    format_tool_call,
    pack,
    read_examples,
    render,
    to_example,
)
from tinylm.data.tokenizer import CHATML_TEMPLATE, Tokenizer
from tinylm.formats import checkpoint
from tinylm.model.surgery import resize_vocab, trim_vocab

# SmolLM2's / the default ChatML template with transformers' {% generation %} markers around what an
# assistant writes (its content and <|im_end|>): the reference for transformers' assistant masks.
GEN_SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEN_CHATML = GEN_SMOLLM2.replace(
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}", "")

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVERSATION = [  # multi-turn: a system message, a tool call, a tool turn, and two assistant answers
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21 degrees, sunny."},
    {"role": "user", "content": "Thanks!\n\n  Bye."},
    {"role": "assistant", "content": "Bye \u00e9t\u00e9 \U0001f600!"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def hf_tokenizer(tok: Tokenizer, template: str, directory: Path):
    """transformers' tokenizer over the same files, with a {% generation %} template (the reference)."""
    from transformers import AutoTokenizer

    tok.save(directory)
    hf = AutoTokenizer.from_pretrained(directory)
    hf.chat_template = template
    return hf


def hf_masks(hf, messages: list[dict]) -> tuple[list[int], list[bool]]:
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


def folded(messages: list[dict]) -> list[dict]:
    """The conversation as a template without tool support sees it (calls written into the content)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["content"] = "\n".join([m["content"]] * bool(m["content"]) + [format_tool_call(c) for c in m.pop("tool_calls")])
        out.append(m)
    return out


def shown(tok: Tokenizer, r: Rendered) -> str:
    """The rendered example with its loss tokens in brackets (for failure messages)."""
    return "".join(f"[{tok.decode([i])}]" if m else tok.decode([i]) for i, m in zip(r.ids, r.mask))


# ----- readers ----------------------------------------------------------------------------------------

def test_readers_normalise_every_format(tmp_path: Path) -> None:
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        "",  # blank lines are skipped
        {"messages": [{"role": "user", "content": "Weather?"},
                      {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                          "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
                      {"role": "tool", "content": {"temp": 21}}, {"role": "assistant", "content": "21."}],
         "tools": TOOLS},
    ])
    pc = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "2 + 2 =", "completion": " 4"},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}]},
    ])
    (tmp_path / "alpaca.json").write_text(json.dumps([
        {"instruction": "Add.", "input": "2 and 2", "output": "4"}, {"instruction": "Say hi.", "input": "", "output": "hi"}]))
    got, skipped = read_examples([str(chat), str(pc), str(tmp_path / "alpaca.json")])
    assert skipped == []
    assert [e.where for e in got] == [f"{chat}:1", f"{chat}:3", f"{pc}:1", f"{pc}:2",
                                      f"{tmp_path / 'alpaca.json'} item 1", f"{tmp_path / 'alpaca.json'} item 2"]
    assert got[0].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert got[1].messages[1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}  # arguments parsed
    assert got[1].messages[2]["content"] == '{"temp": 21}' and got[1].tools == TOOLS
    assert (got[2].prompt, got[2].completion, got[2].messages) == ("2 + 2 =", " 4", None)
    assert got[3].messages[1]["content"] == "Yo" and got[3].train_from == 1
    assert got[4].messages == [{"role": "user", "content": "Add.\n\n2 and 2"}, {"role": "assistant", "content": "4"}]
    assert got[5].messages[0] == {"role": "user", "content": "Say hi."}


def test_parquet_and_datasets_dirs_read_as_jsonl(tmp_path: Path) -> None:
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "user", "content": "Weather?"},
                          {"role": "assistant", "content": "", "tool_calls": [CALL]},
                          {"role": "tool", "content": "21"}, {"role": "assistant", "content": "21."}]}]
    reference, _ = read_examples([str(write_jsonl(tmp_path / "a.jsonl", rows))])
    # columnar storage gives every message every key (None where absent); the reader drops them
    table = pa.Table.from_pylist([{"messages": [{**m, "tool_calls": [{"type": c["type"], "function": {
        "name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}} for c in m.get("tool_calls", [])]
        or None} for m in r["messages"]]} for r in rows])
    pq.write_table(table, tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for source in (tmp_path / "a.parquet", tmp_path / "ds"):
        got, _ = read_examples([str(source)])
        assert [e.messages for e in got] == [e.messages for e in reference], source


BAD_ROWS = [
    ({"text": "hello"}, "no 'messages', 'prompt' / 'completion' or 'instruction' / 'output' fields"),
    ({"prompt": "a"}, "no 'messages'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}, "empty assistant turn"),
    ({"messages": [{"content": "a"}]}, "message 0 has no 'role'"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{city: Paris}"}}]}]}, "tool call 'f': arguments do not parse as JSON"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}, "no string 'content'"),
    ({"prompt": "a", "completion": ""}, "empty completion"),
    ({"instruction": "a", "output": 4}, "must be strings"),
    ("[1, 2", "not valid JSON"),
]


@pytest.mark.parametrize("row, problem", BAD_ROWS, ids=[p for _, p in BAD_ROWS])
def test_a_bad_row_is_one_line_naming_file_and_line(tmp_path: Path, row, problem: str) -> None:
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, row, good])
    with pytest.raises(TinylmError) as e:
        read_examples([str(path)])
    message = str(e.value)
    assert message.startswith(f"{path}:3: ") and problem in message and "\n" not in message, message
    if row != "[1, 2":  # skipping: the good rows kept, the bad one reported
        got, skipped = read_examples([str(path)], skip_bad=True)
        assert len(got) == 3 and skipped == [message]


def test_other_files_in_a_data_dir_are_left_out(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "completion": "b"}])
    (tmp_path / "README.md").write_text("about the data\n")
    assert len(read_examples([str(tmp_path)])[0]) == 1
    with pytest.raises(TinylmError, match="README.md: chat data must be"):
        read_examples([str(tmp_path / "README.md")])


# ----- masks on SmolLM2's template -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_tok() -> Tokenizer:
    return checkpoint.load_tokenizer("smollm2-135m")


@needs_smollm2
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:]], ids=["system", "default-system"])
def test_smollm2_masks_equal_transformers_assistant_masks(smollm2_tok: Tokenizer, tmp_path: Path, messages) -> None:
    hf = hf_tokenizer(smollm2_tok, GEN_SMOLLM2, tmp_path)
    r = render(Example([dict(m) for m in messages], TOOLS), smollm2_tok)
    # a tools list goes into the system message of a template that ignores tools; render it the same way
    expected_messages = folded(messages)
    ids, mask = hf_masks(hf, _with_tools_preamble(r, smollm2_tok, expected_messages))
    assert r.ids == ids, shown(smollm2_tok, r)
    assert r.mask == mask, shown(smollm2_tok, r)
    # by hand: the loss tokens are exactly each assistant turn's content followed by <|im_end|>
    said = [m["content"] + "<|im_end|>" for m in expected_messages if m["role"] == "assistant"]
    assert smollm2_tok.decode([i for i, m in zip(r.ids, r.mask) if m]) == "".join(said)
    assert sum(i == smollm2_tok.token_to_id("<|im_end|>") for i, m in zip(r.ids, r.mask) if m) == len(said)


def _with_tools_preamble(r: Rendered, tok: Tokenizer, messages: list[dict]) -> list[dict]:
    """The messages with the system message our render wrote (it carries the tools list)."""
    text = tok.decode(r.ids)
    system = text.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]
    assert "<tools>" in system and "get_weather" in system
    rest = messages[1:] if messages[0]["role"] == "system" else messages
    return [{"role": "system", "content": system}] + rest


@needs_smollm2
def test_smollm2_loss_on_all_tokens_and_plain_completions(smollm2_tok: Tokenizer) -> None:
    r = render(Example([dict(m) for m in CONVERSATION]), smollm2_tok, assistant_only=False)
    assert r.ids == render(Example([dict(m) for m in CONVERSATION]), smollm2_tok).ids
    assert r.mask == [False] + [True] * (len(r.ids) - 1)
    r = render(to_example({"prompt": "The capital of France is", "completion": " Paris."}), smollm2_tok)
    n = len(smollm2_tok.encode("The capital of France is"))
    assert r.ids == smollm2_tok.encode("The capital of France is") + smollm2_tok.encode(" Paris.", add_eos=True)
    assert r.mask == [False] * n + [True] * (len(r.ids) - n)


@needs_smollm2
def test_conversational_prompt_carries_no_loss(smollm2_tok: Tokenizer) -> None:
    ex = to_example({"prompt": CONVERSATION[:5], "completion": "Anything else?"})
    r = render(ex, smollm2_tok)
    assert smollm2_tok.decode([i for i, m in zip(r.ids, r.mask) if m]) == "Anything else?<|im_end|>"


def test_a_template_whose_prefixes_differ_is_refused() -> None:
    tok = _base_tokenizer()
    tok, _ = add_chatml(tok, tiny_model(vocab_size=tok.vocab_size))
    # renders the last message differently: a prefix is not the start of the whole conversation
    tok.chat_template = CHATML_TEMPLATE.replace("message['content']", "(message['content'] if loop.last else 'x')")
    with pytest.raises(TinylmError, match=r"^t.jsonl:7: the chat template renders the first \d+ messages"):
        render(Example([dict(m) for m in CONVERSATION], where="t.jsonl:7"), tok)


# ----- the default ChatML template --------------------------------------------------------------------------

def _base_tokenizer() -> Tokenizer:
    """A byte-level BPE trained here on a few sentences, with bos/eos/pad and no chat template."""
    return plain_tokenizer(["the weather in Paris is sunny", "you are terse", "thanks and bye"] * 5)


@pytest.mark.parametrize("tie", [True, False])
def test_default_chatml_adds_tokens_and_resizes_keeping_old_logits(tie: bool) -> None:
    tok = _base_tokenizer()
    model = tiny_model(vocab_size=tok.vocab_size, tie=tie)
    chat, resized = add_chatml(tok, model)
    n = tok.vocab_size
    assert chat.vocab_size == n + 2 and resized.config.vocab_size == n + 2 and model.config.vocab_size == n
    assert [chat.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>")] == [n, n + 1]
    assert chat.encode("<|im_start|>user\nhi<|im_end|>")[0] == n  # one special token, not split
    assert chat.chat_template == CHATML_TEMPLATE and chat.eos_id == n + 1 == resized.config.eos_token_id
    assert (resized.lm_head.weight is resized.model.embed_tokens.weight) == tie
    for w_old, w_new in ((model.model.embed_tokens.weight, resized.model.embed_tokens.weight),
                         (model.lm_head.weight, resized.lm_head.weight)):
        torch.testing.assert_close(w_new[n:], w_old.mean(0).expand(2, -1), rtol=0, atol=1e-7)
    ids = torch.tensor([tok.encode("the weather in Paris is sunny")])
    with torch.no_grad():
        torch.testing.assert_close(resized(ids)[..., :n], model(ids), rtol=0, atol=0)


def test_resize_vocab_matches_transformers_and_shrinks_as_trim() -> None:
    model = tiny_model(tie=False)
    grown = resize_vocab(model, 101)
    ref = hf_model(model)
    ref.resize_token_embeddings(101, mean_resizing=False)  # transformers' resize, new rows set to our mean below
    with torch.no_grad():
        ref.model.embed_tokens.weight[97:] = model.model.embed_tokens.weight.mean(0)
        ref.lm_head.weight[97:] = model.lm_head.weight.mean(0)
        ids = torch.tensor([[1, 5, 99, 100, 7]])
        torch.testing.assert_close(grown(ids), ref(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(resize_vocab(model, 50)(ids[:, :2]), trim_vocab(model, list(range(50)))(ids[:, :2]))


def test_default_template_masks_and_checkpoint_round_trip(tmp_path: Path) -> None:
    tok = _base_tokenizer()
    chat, model = add_chatml(tok, tiny_model(vocab_size=tok.vocab_size))
    messages = folded(CONVERSATION)
    r = render(Example([dict(m) for m in CONVERSATION]), chat)
    ids, mask = hf_masks(hf_tokenizer(chat, GEN_CHATML, tmp_path / "hf"), messages)
    assert (r.ids, r.mask) == (ids, mask), shown(chat, r)
    said = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    assert chat.decode([i for i, m in zip(r.ids, r.mask) if m]) == said
    checkpoint.save(model, tmp_path / "ckpt", tokenizer=chat)
    config = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML_TEMPLATE
    loaded = checkpoint.load(tmp_path / "ckpt")
    assert render(Example([dict(m) for m in CONVERSATION]), loaded.tokenizer) == r
    x = torch.tensor([r.ids[:40]])
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    from transformers import AutoTokenizer

    # transformers reads the added tokens and the template as saved
    hf = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == r.ids


def test_a_template_with_generation_markers_renders_and_masks_as_the_plain_one() -> None:
    """transformers' {% generation %} blocks are accepted by our renderer and change nothing."""
    tok = _base_tokenizer()
    tok, _ = add_chatml(tok, tiny_model(vocab_size=tok.vocab_size))
    plain = render(Example([dict(m) for m in CONVERSATION]), tok)
    tok.chat_template = GEN_CHATML
    assert render(Example([dict(m) for m in CONVERSATION]), tok) == plain


def test_a_template_turn_without_the_end_of_turn_token_is_refused() -> None:
    tok = _base_tokenizer()
    tok, _ = add_chatml(tok, tiny_model(vocab_size=tok.vocab_size))
    with pytest.raises(TinylmError, match="does not end with the end-of-turn token '<pad>'"):
        render(Example([dict(m) for m in CONVERSATION], where="x"), tok, end_of_turn="<pad>")


# ----- packing ------------------------------------------------------------------------------------------------

def random_examples(rng: np.random.Generator, n: int, longest: int) -> list[Rendered]:
    out = []
    for k in range(n):
        length = int(rng.integers(2, longest + 1))
        mask = (rng.random(length) < 0.5).tolist()
        mask[0], mask[-1] = False, True
        out.append(Rendered(rng.integers(3, 1000, length).tolist(), mask, f"e{k}"))
    return out


@pytest.mark.parametrize("packing", ["fit", "order", "none"])
def test_packing_keeps_every_example_whole(rng: np.random.Generator, packing: str) -> None:
    examples, seq_len = random_examples(rng, 60, 17), 16
    p = pack(examples, seq_len, packing, pad_id=0)
    assert p.tokens.shape == p.segments.shape == p.loss.shape == (p.n_rows, seq_len + 1)
    seen = torch.zeros_like(p.segments, dtype=torch.bool)
    for k, (ex, place) in enumerate(zip(examples, p.places)):
        row, start, n = place
        assert n == len(ex.ids)
        assert p.tokens[row, start:start + n].tolist() == ex.ids, k
        assert p.loss[row, start:start + n].tolist() == ex.mask, k
        seg = p.segments[row, start:start + n]
        assert (seg == seg[0]).all() and not seen[row, start:start + n].any(), k
        seen[row, start:start + n] = True
    # segments number the examples of a row 0, 1, ... left to right; the rest is padding (-1, no loss)
    for row in range(p.n_rows):
        s = p.segments[row][seen[row]]
        assert s.tolist() == sorted(s.tolist()) and set(s.tolist()) == set(range(int(s.max()) + 1))
        assert not seen[row, int(seen[row].sum()):].any()  # examples first, padding after
    assert (p.segments[~seen] == -1).all() and not p.loss[~seen].any() and (p.tokens[~seen] == 0).all()
    if packing == "none":
        assert p.n_rows == len(examples)
    if packing == "order":  # data order; a new row only when the next example does not fit the current one
        assert [pl[0] for pl in p.places] == sorted(pl[0] for pl in p.places)
        for k in range(1, len(examples)):
            (row0, start0, n0), (row1, _, n1) = p.places[k - 1], p.places[k]
            assert (row1 == row0 + 1) == (start0 + n0 + n1 > seq_len + 1), k


def test_fit_packs_no_worse_than_order_and_is_deterministic(rng: np.random.Generator) -> None:
    examples = random_examples(rng, 200, 40)
    fit, order = pack(examples, 40, "fit"), pack(examples, 40, "order")
    assert fit.n_rows <= order.n_rows
    total = sum(len(e.ids) for e in examples)
    assert fit.n_rows >= -(-total // 41)
    again = pack(examples, 40, "fit")
    assert again.places == fit.places and torch.equal(again.tokens, fit.tokens)


def test_batch_masks_never_cross_examples_and_count_the_same_targets(rng: np.random.Generator) -> None:
    examples = random_examples(rng, 30, 12)
    for e in examples:  # loss on every token, even the first: which must still not be a target
        e.mask = [True] * len(e.ids)
    packed, unpacked = pack(examples, 12, "fit"), pack(examples, 12, "none")
    b = packed.rows(list(range(packed.n_rows)))
    seg = b.segments
    assert b.mask.shape == (packed.n_rows, 12) and torch.equal(seg, packed.segments)
    # a target counts iff it is a loss token whose input is the same example's previous token
    assert torch.equal(b.mask, packed.loss[:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] >= 0))
    assert int(b.mask.sum()) == sum(len(e.ids) - 1 for e in examples) == int(unpacked.rows(
        list(range(unpacked.n_rows))).mask.sum())
    for k, (row, start, n) in enumerate(packed.places):  # per example: its targets are its own mask[1:]
        assert b.mask[row, start:start + n - 1].tolist() == examples[k].mask[1:], k
        assert b.labels[row, start:start + n - 1].tolist() == examples[k].ids[1:], k


def test_too_long_examples_are_refused_or_truncated() -> None:
    examples = [Rendered(list(range(3, 3 + n)), [False] + [True] * (n - 1)) for n in (5, 30, 9, 40)]
    with pytest.raises(TinylmError, match=r"^2 of 4 examples are longer than the context \(17 tokens with "
                                          r"seq_len 16; the longest has 40\)"):
        pack(examples, 16)
    p = pack(examples, 16, too_long="truncate")
    assert p.truncated == 2 and p.dropped == 0 and p.places[1][2] == 17
    assert p.tokens[p.places[1][0], p.places[1][1]:p.places[1][1] + 17].tolist() == examples[1].ids[:17]
    late = [Rendered(list(range(3, 33)), [False] * 25 + [True] * 5), examples[0]]  # loss only past the cut
    p = pack(late, 16, too_long="truncate")
    assert (p.truncated, p.dropped, p.places[0]) == (1, 1, None)


def test_batches_depend_only_on_seed_and_step(rng: np.random.Generator) -> None:
    examples = random_examples(rng, 50, 10)
    p = pack(examples, 10)
    source = p.batches(seed=3, global_batch=4)
    again = pack(examples, 10).batches(seed=3, global_batch=4)
    whole = source(5, 0, 4)
    assert whole.index == 20
    halves = [again(5, 0, 2), again(5, 2, 2)]  # micro-batches / ranks read slices of the same global batch
    assert torch.equal(torch.cat([h.tokens for h in halves]), whole.tokens)
    assert torch.equal(torch.cat([h.segments for h in halves]), whole.segments)
    assert halves[1].index == 22
    # one epoch reads every row exactly once
    rows = torch.cat([source(s, 0, 4).tokens for s in range(-(-p.n_rows // 4))])[:p.n_rows]
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, p.tokens.tolist()))
    assert not torch.equal(p.batches(seed=4, global_batch=4)(0, 0, 4).tokens, source(0, 0, 4).tokens)

