"""`tinylm generate`: prompts in, streamed samples out."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable

from tinylm.core.errors import TinylmError
from tinylm.core.recipe import Check, Count, NonNegative, Positive, Seed
from tinylm.data.tokenizer import Tokenizer
from tinylm.formats.checkpoint import load
from tinylm.infer.engine import Engine, EngineConfig, Request
from tinylm.infer.generate import generate
from tinylm.infer.sampling import SamplingConfig
from tinylm.infer.speculative import Drafter, ModelDrafter, NgramDrafter, SpecStats
from tinylm.model.llama import Llama


@dataclass
class GenerateConfig:
    """What `tinylm generate` does: prompts in, streamed samples out."""

    source: str  # checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)
    prompt: list[str] = field(default_factory=list)  # prompt text (repeat for several prompts)
    prompt_file: str | None = None  # or a file with one prompt per line, or - for stdin
    chat: bool = False  # wrap each prompt as a user message in the tokenizer's chat template
    system: str | None = None  # system message for --chat
    max_tokens: Count = 128  # new tokens per sample
    temperature: NonNegative = 0.8  # softmax temperature; 0 = greedy
    greedy: bool = False  # same as --temperature 0
    top_k: Count | None = None  # sample among the k most likely tokens only (none: all)
    top_p: Annotated[float, Check(gt=0, le=1)] | None = None  # nucleus sampling: the smallest set of tokens with this probability (none: all)
    repetition_penalty: Positive = 1.0  # CTRL-style penalty on tokens already present (1 = off)
    seed: Seed | None = None  # sampling seed (sample i of a prompt uses seed + i)
    n: Count = 1  # samples per prompt
    stop: list[str] = field(default_factory=list)  # stop string (repeatable)
    add_bos: bool = False  # start the prompt with the bos token
    json_schema: str | None = None  # constrain the output to JSON valid for the JSON Schema in this file
    fast: bool = False  # compiled fixed-shape decoding (torch.compile; same tokens), one sample at a time
    max_batch: Count = 16  # samples decoded together by the engine when there are several (continuous batching)
    draft: str | None = None  # speculative decoding: a draft model with the same tokenizer (any source), or ngram
    draft_k: Count | None = None  # with --draft: the most draft tokens per step, adapting between 1 and this (none: 5)

    def __post_init__(self) -> None:
        if self.greedy:
            self.temperature = 0.0
        if self.draft is not None and self.draft_k is None:
            self.draft_k = EngineConfig.draft_k


def main(cfg: GenerateConfig) -> None:
    """`tinylm generate`: read the prompts and the JSON schema (both fail before the model loads), load the
    model, stream the samples to stdout; constrained samples are checked against the schema, then printed.

    Args:
        cfg: the command's config.
    """
    prompts = read_prompts(cfg.prompt, cfg.prompt_file)
    _check_draft(cfg)
    if cfg.json_schema:
        return _main_json(cfg, prompts)
    loaded = _load(cfg)
    if cfg.draft is None:
        run(loaded.model, loaded.tokenizer, cfg, prompts)
        return
    stats = SpecStats()
    run(loaded.model, loaded.tokenizer, cfg, prompts, drafter=load_drafter(cfg.draft, loaded), stats=stats)
    print(f"speculative decoding ({cfg.draft}): {stats.summary()}", file=sys.stderr)


def _check_draft(cfg: GenerateConfig) -> None:
    """The options --draft cannot be combined with, refused before the model loads."""
    if cfg.draft is None:
        if cfg.draft_k is not None:
            raise TinylmError("--draft-k needs --draft (a draft model or ngram)")
        return
    if cfg.json_schema:
        raise TinylmError("--draft cannot be combined with --json-schema: the schema constrains every token, "
                          "so a draft cannot be verified ahead of it")
    if cfg.fast:
        raise TinylmError("--draft cannot be combined with --fast: the compiled path decodes one token a step")


def load_drafter(source: str, target: Any) -> Drafter:
    """--draft: prompt lookup ("ngram"), or a draft model whose tokenizer is the target's (same tokens, same ids).

    Args:
        source: "ngram" or a model source.
        target: the loaded target model (checkpoint.Loaded).
    """
    if source == "ngram":
        return NgramDrafter()
    draft = load(source)
    if draft.tokenizer is None:
        raise TinylmError(f"--draft {source} has no tokenizer; a draft model must share the target's tokenizer")
    if draft.tokenizer.backend.get_vocab() != target.tokenizer.backend.get_vocab():
        raise TinylmError(f"--draft {source}: its tokenizer's vocabulary is not the target's; a draft model must "
                          "share the target's tokenizer")
    return ModelDrafter(draft.model, target.config.vocab_size)


def _load(cfg: GenerateConfig) -> Any:
    """The model, refused before any generation when it has no tokenizer or --chat asks for a chat template it
    does not have."""
    loaded = load(cfg.source)
    if loaded.tokenizer is None:
        raise TinylmError("this model has no tokenizer; generation needs one")
    if cfg.chat and not loaded.tokenizer.chat_template:
        raise TinylmError(f"--chat: the tokenizer of {cfg.source} has no chat template (drop --chat)")
    return loaded


def _main_json(cfg: GenerateConfig, prompts: list[str]) -> None:
    """`generate --json-schema`: samples that are checked against the schema before any is printed, so the
    output is valid JSON or one error line."""
    from tinylm.infer.constrained import (
        JsonConstraint,
        JsonIndex,
        load_schema,
        validate,
    )

    schema = load_schema(cfg.json_schema)
    if cfg.stop:
        raise TinylmError("--stop cannot be combined with --json-schema: a stop string would cut the JSON short")
    loaded = _load(cfg)
    index = JsonIndex(schema, loaded.tokenizer, loaded.config.vocab_size)
    if cfg.max_tokens < index.min_tokens:
        raise TinylmError(f"--max-tokens {cfg.max_tokens} is too small for this JSON schema: its shortest valid "
                          f"value takes {index.min_tokens} tokens")
    texts = run(loaded.model, loaded.tokenizer, cfg, prompts, out=lambda _: None,
                constraint=lambda: JsonConstraint(index))
    for text in texts:
        validate(text, schema)
    sep = "\n" if len(texts) == 1 else "\n---\n"
    sys.stdout.write("".join(text + sep for text in texts))
    sys.stdout.flush()


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
    """Prompts from arguments, from a file (one per line), or from stdin ("-").

    Args:
        prompts: prompt texts (--prompt).
        prompt_file: a file with one prompt per line, or "-" for stdin (--prompt-file).
    """
    import sys
    from pathlib import Path

    if prompts and prompt_file is not None:
        raise TinylmError("give --prompt or --prompt-file, not both")
    if prompts:
        return prompts
    if prompt_file is None:
        raise TinylmError("give a prompt: --prompt TEXT or --prompt-file FILE (- for stdin)")
    if prompt_file == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TinylmError(f"cannot read prompts from {prompt_file}: {e}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise TinylmError(f"no prompts in {prompt_file}")
    return lines


def run(model: Llama, tokenizer: Tokenizer | None, cfg: GenerateConfig, prompts: list[str],
        out: Callable[[str], object] | None = None, constraint: Callable[[], Any] | None = None,
        drafter: Drafter | None = None, stats: SpecStats | None = None) -> list[str]:
    """Generate for every prompt, streaming to `out` (default stdout); return the texts. Several samples
    (prompts, or --n above 1) are decoded together by the engine, printed in order as they come.

    Args:
        model, tokenizer: the loaded model.
        cfg: sampling settings.
        prompts: the prompts, each continued `cfg.n` times.
        out: where the text streams.
        constraint: a per-sample constraint factory (JSON schema); the prompt is then not echoed.
        drafter: decode speculatively with (a fresh copy of) this drafter per sample; its acceptance counts
            are added to `stats`.
    """
    if tokenizer is None:
        raise TinylmError("this model has no tokenizer; generation needs one")
    write = out or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    texts = [_chat_text(tokenizer, cfg, p) for p in prompts]
    heads = ["" if cfg.chat or constraint is not None else p for p in prompts for _ in range(cfg.n)]
    sep = "\n" if len(heads) == 1 else "\n---\n"
    if len(heads) > 1 and not cfg.fast:
        return _run_engine(model, tokenizer, cfg, texts, _InOrder(write, heads, sep), constraint, drafter, stats)
    results: list[str] = []
    for j, text in enumerate(t for t in texts for _ in range(cfg.n)):
        write(heads[j])
        seed = None if cfg.seed is None else cfg.seed + j % cfg.n
        results.append(generate(model, tokenizer, text, cfg.max_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                cfg.repetition_penalty, seed, cfg.stop, 1, cfg.add_bos, write, constraint, cfg.fast,
                                drafter.fresh() if drafter is not None else None,
                                cfg.draft_k or EngineConfig.draft_k, stats))
        write(sep)
    return results


def _chat_text(tokenizer: Tokenizer, cfg: GenerateConfig, prompt: str) -> str:
    """The prompt, wrapped in the chat template (with --system) under --chat."""
    if not cfg.chat:
        return prompt
    messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
        {"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _run_engine(model: Llama, tokenizer: Tokenizer, cfg: GenerateConfig, texts: list[str], shown: "_InOrder",
                constraint: Callable[[], Any] | None, drafter: Drafter | None = None,
                stats: SpecStats | None = None) -> list[str]:
    """Every sample of every prompt as one engine request (sample i of a prompt seeded with seed + i)."""
    stop_ids = [i for i in (tokenizer.eos_id,) if i is not None]  # as `generate` stops
    requests = []
    for text in texts:
        ids = tokenizer.encode(text, add_bos=cfg.add_bos)
        if not ids:
            raise TinylmError("the prompt is empty; give some text or use --add-bos")
        for i in range(cfg.n):
            j = len(requests)
            sampling = SamplingConfig(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty,
                                      None if cfg.seed is None else cfg.seed + i)
            requests.append(Request(ids, cfg.max_tokens, sampling, cfg.stop, stop_ids,
                                    constraint() if constraint is not None else None,
                                    on_token=lambda e, j=j: shown.text(j, e.text),
                                    on_finish=lambda c, j=j: shown.finish(j)))
    engine = Engine(model, tokenizer, EngineConfig(max_batch=cfg.max_batch, kv_tokens=_kv_tokens(requests, cfg),
                                                   draft_k=cfg.draft_k or EngineConfig.draft_k), drafter)
    texts = [c.text for c in engine.run(requests)]
    if stats is not None:
        stats.add(engine.spec_stats)
    return texts


def _kv_tokens(requests: list[Request], cfg: GenerateConfig) -> int:
    """A KV pool for a full batch of the longest requests (blocks rounded up)."""
    reach = cfg.draft_k or 0  # how far past its last token a verification step writes
    longest = max(len(r.prompt_ids) for r in requests) + cfg.max_tokens + reach + EngineConfig.block_size
    return min(len(requests), cfg.max_batch) * longest


class _InOrder:
    """Writes the samples' text in order while they are decoded together: the first unfinished sample's text
    as it comes, the others' kept until their turn.

    Args:
        write: where the text goes.
        heads: what each sample's text starts with (its prompt, or nothing).
        sep: what follows each sample.
    """

    def __init__(self, write: Callable[[str], object], heads: list[str], sep: str) -> None:
        self.write, self.sep = write, sep
        self.parts: list[list[str]] = [[h] if h else [] for h in heads]
        self.done = [False] * len(heads)
        self.current = 0
        self._flush()

    def text(self, j: int, piece: str) -> None:
        if piece:
            self.parts[j].append(piece)
            self._flush()

    def finish(self, j: int) -> None:
        self.parts[j].append(self.sep)
        self.done[j] = True
        self._flush()

    def _flush(self) -> None:
        while self.current < len(self.parts):
            for piece in self.parts[self.current]:
                self.write(piece)
            self.parts[self.current] = []
            if not self.done[self.current]:
                return
            self.current += 1
