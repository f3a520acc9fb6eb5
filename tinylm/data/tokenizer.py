"""Tokenizers: a thin wrapper over HF `tokenizers` with special tokens and a chat template.

The files it reads and writes (tokenizer.json, tokenizer_config.json, special_tokens_map.json) are the
ones `transformers.AutoTokenizer.from_pretrained(dir)` loads.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import tokenizers

from tinylm.core.errors import TinylmError

# ChatML, the template SmolLM2 uses; the default for tokenizers tinylm trains.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template that HF keeps beside it.

    Args:
        backend: the HF `tokenizers.Tokenizer` (byte-level BPE for every tokenizer tinylm makes).
        bos_token, eos_token, pad_token, unk_token: special token strings, or None.
        chat_template: a Jinja2 chat template (HF semantics), or None.
        model_max_length: written to tokenizer_config.json.
    """

    def __init__(self, backend: tokenizers.Tokenizer, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 unk_token: str | None = None, chat_template: str | None = None,
                 model_max_length: int = 2048) -> None:
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        for tok in (bos_token, eos_token, pad_token, unk_token):
            if tok is not None and backend.token_to_id(tok) is None:
                raise TinylmError(f"tokenizer: special token {tok!r} is not in the vocabulary")

    # ----- ids ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token)

    # ----- encode / decode ---------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text` (special-token strings inside it are recognised, as in HF)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust backend."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render a conversation with the chat template, as transformers does.

        Args:
            messages: [{"role": "user", "content": "..."}, ...].
            add_generation_prompt: end with the assistant turn's opening.
            tools: JSON-schema'd functions the conversation may call (the template's `tools`).
        """
        if not self.chat_template:
            raise TinylmError("this tokenizer has no chat template; drop --chat")

        def raise_exception(message: str) -> None:
            raise TinylmError(f"chat template: {message}")

        return _compiled(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", raise_exception=raise_exception)

    # ----- files -------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / "tokenizer.json"))
        specials = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                      ("pad_token", self.pad_token), ("unk_token", self.unk_token)) if v}
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            **specials,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (d / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Read a tokenizer dir written by `save` or by transformers' `save_pretrained`."""
        d = Path(directory)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise TinylmError(f"no tokenizer.json in {d}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
            raise TinylmError(f"{path}: not a valid tokenizers file ({str(e).splitlines()[0]})") from None
        config = _read_json(d / "tokenizer_config.json")
        special_map = _read_json(d / "special_tokens_map.json")

        def special(name: str) -> str | None:
            value = config.get(name, special_map.get(name))
            return value.get("content") if isinstance(value, dict) else value

        template = config.get("chat_template")
        if template is None and (d / "chat_template.jinja").is_file():  # transformers >= 4.43 layout
            template = (d / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(backend, bos_token=special("bos_token"), eos_token=special("eos_token"),
                   pad_token=special("pad_token"), unk_token=special("unk_token"), chat_template=template,
                   model_max_length=int(min(config.get("model_max_length", 2048), 2**31 - 1)))


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    """A chat template compiled once, in the environment transformers uses: sandboxed, trim_blocks and
    lstrip_blocks on, and `{% generation %}` blocks (transformers' assistant-mask markers) rendered as
    their plain content."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> list[Any]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation])
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TinylmError(f"chat template: not a valid Jinja template ({e.message}, line {e.lineno})") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TinylmError(f"{path}: not valid JSON ({e})") from None


# ----- training ----------------------------------------------------------------------------------------

# Special tokens of tokenizers tinylm trains, in id order: pad 0, bos 1, eos 2 (the Llama / SmolLM2 ids
# for bos and eos), then the ChatML roles used by CHATML_TEMPLATE.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def _byte_level_bpe() -> tokenizers.Tokenizer:
    """An empty byte-level BPE: GPT-2 byte-to-unicode pre-tokenizer (no prefix space) and decoder."""
    from tokenizers import decoders, models, pre_tokenizers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    model_max_length: int = 2048) -> Tokenizer:
    """Train a byte-level BPE tokenizer (HF `tokenizers`) on an iterable of documents.

    The initial alphabet is all 256 byte symbols, so any Unicode string round-trips even when the
    corpus never showed its bytes. Special tokens: SPECIAL_TOKENS; chat template: CHATML_TEMPLATE.

    Args:
        texts: the training documents (any iterable; consumed once).
        vocab_size: final vocabulary size, the 256 bytes and 5 special tokens included.
        min_frequency: a pair must occur this often to be merged.
        model_max_length: written to tokenizer_config.json.
    """
    from tokenizers import pre_tokenizers, trainers

    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise TinylmError(f"--vocab-size {vocab_size} is below the {floor} byte and special tokens")
    backend = _byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                     chat_template=CHATML_TEMPLATE, model_max_length=model_max_length)


# ----- statistics ----------------------------------------------------------------------------------------

def _token_counts(tok: Tokenizer, texts: Iterable[str], batch: int = 1000) -> tuple[np.ndarray, dict[str, int]]:
    """Per-id usage counts (vocab_size,) over `texts`, and the corpus' byte / word / document totals."""
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    totals = {"documents": 0, "bytes": 0, "words": 0}
    chunk: list[str] = []

    def flush() -> None:
        for ids in tok.encode_batch(chunk):
            counts[:] += np.bincount(np.asarray(ids, dtype=np.int64), minlength=len(counts))
        chunk.clear()

    for text in texts:
        totals["documents"] += 1
        totals["bytes"] += len(text.encode("utf-8"))
        totals["words"] += len(text.split())
        chunk.append(text)
        if len(chunk) >= batch:
            flush()
    flush()
    return counts, totals


def _partial_byte_ids(tok: Tokenizer) -> list[int]:
    """Ids of tokens that stand for a lone non-ASCII byte: a byte-level symbol of a byte >= 0x80, or an
    SentencePiece-style "<0xNN>" byte-fallback token. Seeing them means a character was not covered."""
    high = set(bytes_to_unicode()[0x80:])
    fallback = re.compile(r"<0x[89A-Fa-f][0-9A-Fa-f]>")
    return [i for token, i in tok.backend.get_vocab(with_added_tokens=False).items()
            if token in high or fallback.fullmatch(token)]


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (index = byte), the alphabet of ByteLevel tokenizers
    (openai/gpt-2 src/encoder.py, bytes_to_unicode); `tokenizers` exposes it only as an unordered list."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def tokenizer_stats(tok: Tokenizer, texts: Iterable[str]) -> dict[str, Any]:
    """How well a tokenizer fits a corpus.

    Returns bytes_per_token (UTF-8 bytes / tokens; higher is better compression), tokens_per_word
    (whitespace-separated words), vocab_used (distinct ids seen) and coverage (vocab_used / vocab_size),
    unk_rate (tokens that are the unknown token) and byte_fallback_rate (tokens that are a lone
    non-ASCII byte, i.e. part of a character the vocabulary has no token for).

    Args:
        tok: the tokenizer.
        texts: the corpus documents.
    """
    counts, totals = _token_counts(tok, texts)
    n = int(counts.sum())
    unk = int(counts[tok.token_to_id(tok.unk_token)]) if tok.token_to_id(tok.unk_token) is not None else 0
    fallback = int(counts[_partial_byte_ids(tok)].sum())
    used = int((counts > 0).sum())
    return {"documents": totals["documents"], "bytes": totals["bytes"], "words": totals["words"], "tokens": n,
            "vocab_size": tok.vocab_size, "bytes_per_token": totals["bytes"] / max(n, 1),
            "tokens_per_word": n / max(totals["words"], 1), "vocab_used": used,
            "coverage": used / tok.vocab_size, "unk_rate": unk / max(n, 1),
            "byte_fallback_rate": fallback / max(n, 1)}


# ----- trimming ------------------------------------------------------------------------------------------

def _bpe_spec(tok: Tokenizer) -> tuple[dict[str, Any], dict[str, int], list[tuple[str, str]]]:
    """The tokenizer.json of a byte-level BPE, its model vocab and its merges as (left, right) pairs."""
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise TinylmError(f"tokenizer trim needs a BPE tokenizer, got {model.get('type')!r}")
    vocab: dict[str, int] = model["vocab"]
    if sum(ch in vocab for ch in bytes_to_unicode()) < 128:
        raise TinylmError("tokenizer trim needs a byte-level BPE (its vocabulary lacks the byte tokens)")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return spec, vocab, merges


def _ancestry(token: str, parents: dict[str, tuple[str, str]]) -> set[str]:
    """`token` and every token the merges build it from (the tokens BPE must pass through to reach it)."""
    seen, stack = set(), [token]
    while stack:
        t = stack.pop()
        if t not in seen:
            seen.add(t)
            stack.extend(parents.get(t, ()))
    return seen


def _choose_kept(vocab: dict[str, int], merges: list[tuple[str, str]], counts: np.ndarray,
                 required: set[int], keep: int) -> list[int]:
    """Greedy: the most used tokens first, each with its merge ancestry, while the total fits in `keep`."""
    parents: dict[str, tuple[str, str]] = {}
    for left, right in merges:
        parents.setdefault(left + right, (left, right))  # the first (highest-priority) merge that builds it
    token_of = {i: t for t, i in vocab.items()}
    kept = set(required)
    for i in required:
        if i in token_of:
            kept |= {vocab[t] for t in _ancestry(token_of[i], parents) if t in vocab}
    if len(kept) > keep:
        raise TinylmError(f"--keep {keep} is below the {len(kept)} byte and special tokens every trim keeps")
    for i in sorted(token_of, key=lambda i: (-counts[i] if i < len(counts) else 0, i)):
        if len(kept) >= keep:
            break
        if i not in kept:
            need = {vocab[t] for t in _ancestry(token_of[i], parents) if t in vocab} - kept
            if len(kept) + len(need) <= keep:
                kept |= need
    return sorted(kept)


def _renumber_post_processor(node: Any, new_of: dict[int, int]) -> Any:
    """Rewrite the special-token ids a post-processor holds (TemplateProcessing "ids", Bert/Roberta pairs)."""
    if isinstance(node, dict):
        return {k: ([new_of[i] for i in v] if k == "ids" else
                    [v[0], new_of[v[1]]] if k in ("sep", "cls") and isinstance(v, list) else
                    _renumber_post_processor(v, new_of)) for k, v in node.items()}
    if isinstance(node, list):
        return [_renumber_post_processor(v, new_of) for v in node]
    return node


def trim_tokenizer(tok: Tokenizer, texts: Iterable[str], keep: int) -> tuple[Tokenizer, list[int]]:
    """Keep the `keep` most used tokens of a byte-level BPE on a corpus (vocabulary compression, as in
    the PanGu-pi Pro study, Tang et al. 2024, "Rethinking Optimization and Architecture for Tiny
    Language Models", sec. 3.1).

    All byte tokens (all 256 in tokenizers tinylm trains) and all added/special tokens are always kept,
    and the kept set is closed under merge ancestry, so every kept token stays reachable; `keep` counts the total. New id i is old id
    kept[i] (old order preserved). A text whose old tokenisation uses only kept tokens is tokenised
    identically up to renumbering (BPE applies the lowest-ranked applicable merge; the kept merges keep
    their ranks), and every string still round-trips through the bytes.

    Args:
        tok: a byte-level BPE tokenizer.
        texts: the corpus that decides which tokens are used.
        keep: number of tokens in the trimmed vocabulary.

    Returns:
        (the trimmed tokenizer, kept old ids in new-id order).
    """
    spec, vocab, merges = _bpe_spec(tok)
    counts, _ = _token_counts(tok, texts)
    # every byte token the vocabulary has (SmolLM2's lacks some control and invalid-UTF-8 bytes)
    required = {vocab[ch] for ch in bytes_to_unicode() if ch in vocab}
    required |= {a["id"] for a in spec.get("added_tokens", [])}
    kept = _choose_kept(vocab, merges, counts, required, keep)
    new_of = {old: new for new, old in enumerate(kept)}
    kept_tokens = {t for t, i in vocab.items() if i in new_of}
    spec["model"]["vocab"] = {t: new_of[i] for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i in new_of}
    spec["model"]["merges"] = [m for m, (left, right) in zip(spec["model"]["merges"], merges)
                               if left in kept_tokens and right in kept_tokens and left + right in kept_tokens]
    for added in spec.get("added_tokens", []):
        added["id"] = new_of[added["id"]]
    if spec.get("post_processor"):
        spec["post_processor"] = _renumber_post_processor(spec["post_processor"], new_of)
    backend = tokenizers.Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    trimmed = Tokenizer(backend, bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token,
                        unk_token=tok.unk_token, chat_template=tok.chat_template,
                        model_max_length=tok.model_max_length)
    return trimmed, kept


def read_token_map(directory: str | os.PathLike, vocab_size: int) -> tuple[list[int], Tokenizer]:
    """The kept ids of a `tinylm tokenizer trim` dir (token_map.json) and its trimmed tokenizer.

    Args:
        directory: the trimmed tokenizer dir.
        vocab_size: the model's vocabulary, which the map must come from.
    """
    path = Path(directory) / "token_map.json"
    if not path.is_file():
        raise TinylmError(f"{directory} has no token_map.json (make it with `tinylm tokenizer trim`)")
    try:
        spec = json.loads(path.read_text())
        old, kept = int(spec["old_vocab_size"]), [int(i) for i in spec["kept"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise TinylmError(f"{path}: not a token map ({type(e).__name__})") from None
    if old > vocab_size:
        raise TinylmError(f"{path} maps a vocabulary of {old}, the model has {vocab_size}")
    return kept, Tokenizer.load(directory)
