"""JSON-schema-constrained decoding: samples of a random model parse and validate; bad schemas are one-line errors."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("outlines_core")
jsonschema = pytest.importorskip("jsonschema")

from helpers import needs_smollm2, padded_model, tiny_model  # noqa: E402

from tinylm.cli import main  # noqa: E402
from tinylm.core.errors import TinylmError
from tinylm.data.tokenizer import train_tokenizer
from tinylm.formats import checkpoint
from tinylm.infer.constrained import JsonConstraint, JsonIndex, check_schema, constraint_factory
from tinylm.infer.generate import generate_ids

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "pos": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "null"}},
                "required": ["x", "y"]},
    },
    "required": ["name", "age", "kind", "pos"],
}
CORPUS = ['{"name": "Tom", "age": 3, "kind": "cat", "pos": {"x": 1.5, "y": null}, "ok": true}',
          '{"tags": ["a", "b"], "score": -2e3, "ok": false}', "the cat sat on the mat"] * 30


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=350, min_frequency=1)


@pytest.fixture(scope="module")
def model(tok):
    # a few more logits than tokens: padding ids must never be sampled
    return padded_model(tok, max_seq_len=160)


def test_100_random_samples_parse_and_validate(tok, model):
    make = constraint_factory(SCHEMA, tok, model.config.vocab_size)
    prompt = tok.encode("the cat")
    texts = []
    for batch in range(5):  # 5 batches of 20 rows, sampled at temperature 1 from a random model
        rows = generate_ids(model, [prompt] * 20, 96, temperature=1.0, seed=batch, stop_ids=[tok.eos_id],
                            constraints=[make() for _ in range(20)])
        texts += [tok.decode([t for t in ids if t != tok.eos_id]) for ids in rows]
    assert len(texts) == 100
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 50  # sampling still chooses: not one forced string


@pytest.mark.parametrize("slack", [0, 6])
def test_a_short_budget_still_closes_the_json(tok, model, slack):
    # The budget is the fewest tokens that can spell a valid value (+ slack): every sample must still close.
    index = JsonIndex(SCHEMA, tok, model.config.vocab_size)
    budget = int(index.distance[index.start]) + slack
    rows = generate_ids(model, [tok.encode("the")] * 10, budget, temperature=1.0, seed=7,
                        stop_ids=[tok.eos_id], constraints=[JsonConstraint(index) for _ in range(10)])
    for ids in rows:
        assert len(ids) <= budget
        jsonschema.validate(json.loads(tok.decode([t for t in ids if t != tok.eos_id])), SCHEMA)


def test_allowed_tokens_are_exactly_the_valid_next_bytes(tok, model):
    # After '{"name": "Tom", "age": 3' the DFA must allow digits, ',' and ' ', and never '}' (kind, pos required).
    index = JsonIndex(SCHEMA, tok, model.config.vocab_size)
    c = JsonConstraint(index)
    for t in tok.encode('{"name": "Tom", "age": 3'):
        c.advance(t)
    allowed = {tok.decode([i]) for i in c.allowed(1000).nonzero().flatten().tolist()}
    assert allowed and "}" not in allowed and tok.eos_id not in c.allowed(1000).nonzero().flatten().tolist()
    assert {"0", ","} <= allowed and all(s[0] in "0123456789, " for s in allowed)


def test_greedy_constrained_is_deterministic(tok, model):
    make = constraint_factory({"type": "array", "items": {"type": "integer"}, "maxItems": 4}, tok,
                              model.config.vocab_size)
    eager = generate_ids(model, tok.encode("x"), 30, temperature=0.0, constraints=[make()])
    again = generate_ids(model, tok.encode("x"), 30, temperature=0.0, constraints=[make()])
    assert eager == again
    value = json.loads(tok.decode([t for t in eager if t != tok.eos_id]))
    assert isinstance(value, list) and len(value) <= 4


@pytest.mark.parametrize("schema, words", [
    ({"type": "strin"}, "not a valid JSON schema"),
    ({"type": "object", "required": "name"}, "not a valid JSON schema"),
    ({"type": "string", "format": "no-such-format"}, "not supported"),
    ([1, 2], "a JSON schema is an object"),
])
def test_bad_schemas_are_one_line_errors(tmp_path, capsys, tok, schema, words):
    checkpoint.save(tiny_model(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id), tmp_path / "m", tok)
    (tmp_path / "s.json").write_text(json.dumps(schema))
    code = main(["generate", str(tmp_path / "m"), "--prompt", "hi", "--json-schema", str(tmp_path / "s.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tinylm: error:") and words in err[0], err


def test_schema_file_that_is_not_json(tmp_path, capsys):
    (tmp_path / "s.json").write_text("{not json")
    code = main(["generate", "nowhere", "--prompt", "hi", "--json-schema", str(tmp_path / "s.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not JSON" in err[0]


def test_cli_prints_valid_json_only(tmp_path, capsys, tok):
    checkpoint.save(tiny_model(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id), tmp_path / "m", tok)
    (tmp_path / "s.json").write_text(json.dumps(SCHEMA))
    code = main(["generate", str(tmp_path / "m"), "--prompt", "the cat", "--json-schema", str(tmp_path / "s.json"),
                 "--max-tokens", "60", "--seed", "1"])
    out = capsys.readouterr().out
    assert code == 0
    jsonschema.validate(json.loads(out), SCHEMA)


def test_check_schema_accepts_valid_drafts():
    check_schema(SCHEMA)
    check_schema({"$schema": "http://json-schema.org/draft-07/schema#", "type": "integer"})
    with pytest.raises(TinylmError):
        check_schema({"$schema": "http://json-schema.org/draft-07/schema#", "minimum": "zero"})


@needs_smollm2  # outlines-core is first needed after the model loads
@pytest.mark.parametrize("missing", ["jsonschema", "outlines_core"])
def test_a_missing_json_extra_is_a_one_line_error(tmp_path, capsys, monkeypatch, missing):
    (tmp_path / "s.json").write_text(json.dumps({"type": "object"}))
    monkeypatch.setitem(sys.modules, missing, None)  # importing it raises ImportError
    monkeypatch.setitem(sys.modules, f"{missing}.json_schema", None)
    assert main(["generate", "smollm2-135m", "--prompt", "hi", "--json-schema", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--json-schema needs {missing}" in err and "tinylm[json]" in err, err


@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize("schema", [{"type": "object"}, SCHEMA])
def test_common_schemas_stay_within_the_limits_on_smollm2(tmp_path, capsys, schema):
    """The compile limits refuse what would hang, not the schemas people use with a 49k-token vocabulary."""
    (tmp_path / "s.json").write_text(json.dumps(schema))
    assert main(["generate", "smollm2-135m", "--chat", "--prompt", "A user record", "--json-schema",
                 str(tmp_path / "s.json"), "--max-tokens", "60", "--greedy"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), schema)
