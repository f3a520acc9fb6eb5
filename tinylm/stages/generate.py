"""`tinylm generate`: prompts in, streamed samples out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tinylm.core.errors import TinylmError
from tinylm.data.tokenizer import Tokenizer
from tinylm.infer.generate import generate
from tinylm.infer.sampling import SamplingConfig
from tinylm.model.llama import Llama


@dataclass
class GenerateConfig:
    """What `tinylm generate` does.

    Args:
        prompts: the prompts, each continued `n` times.
        chat: wrap each prompt as a user message in the tokenizer's chat template.
        system: a system message for chat.
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, n, add_bos: see `generate`.
        constraint: a per-sample constraint factory (JSON schema); the prompt is then not echoed.
        fast: decode with StaticDecoder (compiled one-token step).
    """

    prompts: list[str]
    chat: bool = False
    system: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: Sequence[str] = ()
    add_bos: bool = False
    constraint: Callable[[], Any] | None = None
    fast: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.n < 1:
            raise TinylmError("--max-tokens and --n must be at least 1")
        SamplingConfig(self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed)


def read_prompts(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
    """Prompts from arguments, from a file (one per line), or from stdin ("-")."""
    import sys
    from pathlib import Path

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


def run(model: Llama, tokenizer: Tokenizer | None, cfg: GenerateConfig, out: Callable[[str], object] | None = None) -> list[str]:
    """Generate for every prompt, streaming to `out` (default stdout); return the texts."""
    import sys

    if tokenizer is None:
        raise TinylmError("this model has no tokenizer; generation needs one")
    write = out or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    results: list[str] = []
    for prompt in cfg.prompts:
        text = prompt
        if cfg.chat:
            messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
                {"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        for i in range(cfg.n):
            if not cfg.chat and cfg.constraint is None:
                write(prompt)
            seed = None if cfg.seed is None else cfg.seed + i
            sample = generate(model, tokenizer, text, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                              cfg.repetition_penalty, seed, cfg.stop, 1, cfg.add_bos, write, cfg.constraint, cfg.fast)
            write("\n" if cfg.n == 1 and len(cfg.prompts) == 1 else "\n---\n")
            results.append(sample)
    return results
