"""Stories sampled from a model and scored by the TinyTales validator."""

from __future__ import annotations

from typing import Any

from tinylm.data.tokenizer import Tokenizer
from tinylm.model.llama import Llama


def sample_tinytales(model: Llama, tokenizer: Tokenizer, n: int, seed: int = 0, max_new_tokens: int = 256,
                     temperature: float = 0.8) -> dict[str, Any]:
    """Sample n stories and score them with the TinyTales validator (tinytales.check).

    A story starts from the bos token when the tokenizer has one (data dirs store every document as
    BOS + text + EOS), else from "Once upon a time"; it ends at eos or a blank line.

    Args:
        model, tokenizer: the model and its tokenizer.
        n: number of stories.
        seed: sampling seed.
        max_new_tokens: longest story.
        temperature: sampling temperature.

    Returns:
        {"stories", "sentences", "valid_fraction", "consistent_fraction", "consistent_valid_fraction",
        "samples" (the first 3)}: consistent_valid_fraction counts only consistent stories at least half
        of whose sentences the validator parses (a story it cannot parse is vacuously consistent).
    """
    from tinylm.data import tinytales
    from tinylm.infer.generate import generate

    with_bos = tokenizer.bos_id is not None
    prompt = "" if with_bos else "Once upon a time"
    texts = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                     seed=seed, stop=[tinytales.SEPARATOR], n=n, add_bos=with_bos)
    texts = [prompt + t for t in ([texts] if isinstance(texts, str) else texts)]
    results = [tinytales.check(t) for t in texts]
    sentences = sum(r.n_sentences for r in results)
    return {"stories": n, "sentences": sentences,
            "valid_fraction": sum(r.n_valid for r in results) / sentences if sentences else 0.0,
            "consistent_fraction": sum(r.consistent for r in results) / n,
            "consistent_valid_fraction": sum(r.consistent and 2 * r.n_valid >= r.n_sentences > 0 for r in results) / n,
            "samples": texts[:3]}
