"""Property-based fuzzing (hypothesis) of the three places raw user input enters tinylm: the recipe parser
(YAML files and command-line words), the data readers (text, JSONL files of any bytes), and the tokenizer's
input path (any Unicode text). Whatever the input, the outcome is a value or a one-line TinylmError; never
another exception. Example counts are kept small so the file runs in seconds; the seed is fixed by
hypothesis's derandomize setting so a failure reproduces.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinylm.core.errors import TinylmError
from tinylm.core.recipe import load_config, parse_overrides
from tinylm.data import tinytales
from tinylm.data.sources import iter_texts
from tinylm.data.tokenizer import Tokenizer, train_tokenizer
from tinylm.stages.generate import GenerateConfig
from tinylm.train.config import TrainConfig

FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def one_line(e: TinylmError) -> bool:
    return "\n" not in str(e) and str(e).strip() != ""


# ----- the recipe parser ------------------------------------------------------------------------------------

SECTIONS = ["model", "data", "optim", "schedule", "run", "nonesuch"]
KEYS = ["lr", "beta1", "seq_len", "micro_batch", "kind", "steps", "out", "dim", "compile", "bogus", "eps"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(), max_size=3))


@FUZZ
@given(st.dictionaries(st.sampled_from(SECTIONS),
                       st.one_of(scalars, st.dictionaries(st.sampled_from(KEYS), scalars, max_size=4)),
                       max_size=4))
def test_any_recipe_mapping_is_a_config_or_one_line(body: dict) -> None:
    import yaml

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.yaml"
        path.write_text(yaml.safe_dump(body))
        try:
            load_config(TrainConfig, path)
        except TinylmError as e:
            assert one_line(e), str(e)


@FUZZ
@given(st.binary(max_size=300))
def test_any_recipe_bytes_are_a_config_or_one_line(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.yaml"
        path.write_bytes(raw)
        try:
            load_config(TrainConfig, path)
        except TinylmError as e:
            assert one_line(e), str(e)


words = st.lists(st.one_of(st.sampled_from([f"--{s}.{k}" for s in SECTIONS for k in KEYS]),
                           st.text(max_size=10)), max_size=8)


@FUZZ
@given(words)
def test_any_command_line_words_are_a_config_or_one_line(argv: list[str]) -> None:
    try:
        load_config(TrainConfig, None, parse_overrides(argv))
    except TinylmError as e:
        assert one_line(e), str(e)


@FUZZ
@given(st.dictionaries(st.sampled_from(["max_tokens", "temperature", "top_k", "top_p", "n", "seed",
                                        "repetition_penalty", "stop", "chat"]), st.text(max_size=8), max_size=5))
def test_any_flat_option_text_is_a_config_or_one_line(options: dict) -> None:
    try:
        load_config(GenerateConfig, None, {"source": "m", "prompt": "hi", **options})
    except TinylmError as e:
        assert one_line(e), str(e)


# ----- the data readers ---------------------------------------------------------------------------------------

def read_or_one_line(path: Path) -> None:
    """Reading `path` as a corpus input gives strings, or a one-line TinylmError."""
    try:
        docs = list(iter_texts([str(path)]))
    except TinylmError as e:
        assert one_line(e), str(e)
    else:
        assert all(isinstance(doc, str) for doc in docs)


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["a.txt", "a.jsonl", "a.json", "a", "a.md"]))
def test_any_file_reads_as_documents_or_one_line(raw: bytes, name: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(raw)
        read_or_one_line(path)


jsonl_lines = st.lists(st.one_of(
    st.fixed_dictionaries({"text": st.one_of(st.text(max_size=30), st.integers(), st.none())}),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
    st.text(max_size=20)), max_size=6)


@FUZZ
@given(jsonl_lines)
def test_any_jsonl_reads_as_its_text_fields_or_one_line(lines: list) -> None:
    import json

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "a.jsonl"
        path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines))
        read_or_one_line(path)


# ----- the tokenizer's input path ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(list(tinytales.generate(100, seed=0)), vocab_size=300)


@FUZZ
@given(st.text(max_size=200))
def test_any_text_round_trips_through_the_tokenizer(tok: Tokenizer, text: str) -> None:
    """Byte-level BPE: every Unicode string (any script, controls, emoji) encodes and decodes to itself."""
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@FUZZ
@given(st.text(alphabet=st.characters(), max_size=50))
def test_any_text_in_a_chat_message_renders_or_is_one_line(tok: Tokenizer, text: str) -> None:
    try:
        rendered = tok.apply_chat_template([{"role": "user", "content": text}])
    except TinylmError as e:
        assert one_line(e), str(e)
    else:
        assert text in rendered


@FUZZ
@given(st.binary(max_size=200))
def test_any_tokenizer_file_loads_or_is_one_line(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "tokenizer.json").write_bytes(raw)
        try:
            Tokenizer.load(d)
        except TinylmError as e:
            assert one_line(e), str(e)
