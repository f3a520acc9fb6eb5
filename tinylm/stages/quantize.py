"""Weight-only int8 / int4 quantisation by module swap, with the size and perplexity it costs.

`tinylm quantize SOURCE --scheme int8|int4 --out DIR` replaces every nn.Linear (the lm_head too, tied
or not: a tied head gets codes of its own and the embedding table stays float) by `qlinear.QLinear`,
symmetric per-group codes plus fp16 scales, and writes an ordinary checkpoint dir whose config.json
"tinylm" block says how (`checkpoint.load` rebuilds it). Per-channel int8 runs on PyTorch's int8
weight-only CPU kernel; other schemes are dequantised on the fly in forward (torchao is not a
dependency; its formats are not safetensors-plain).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinylm.core.errors import TinylmError
from tinylm.core.fs import check_out, disk_size
from tinylm.core.recipe import Count, Interval, one_of, validate
from tinylm.data.tokenizer import Tokenizer
from tinylm.data.tokens import TokenData
from tinylm.formats import checkpoint
from tinylm.model.llama import Llama
from tinylm.model.qlinear import QMAX, quantization_of, swap_in, target_modules
from tinylm.model.surgery import export_state_dict
from tinylm.train.losses import eval_nats

# Default group sizes: 32 for int4 (GGML Q4_0's block; Frantar et al. 2023 GPTQ and Lin et al. 2024 AWQ
# use 128, 32 is the safer choice for tiny layers); 0 = per output channel for int8 (LLM.int8() style
# absmax rows, Dettmers et al. 2022, loses little at 8 bits).
DEFAULT_GROUP = {"int8": 0, "int4": 32}


@dataclass
class QuantizeConfig:
    """What `tinylm quantize` does: weight-only int8 / int4 quantisation, with the size and perplexity it costs."""

    source: str  # checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)
    scheme: one_of(*QMAX)  # int8 or int4
    out: str  # checkpoint dir to write
    group_size: Interval | None = None  # inputs per scale (none: 32 for int4, per channel for int8; 0 = per channel)
    skip_lm_head: bool = False  # keep the lm_head in float (by default it is quantised too, tied or not)
    eval_text: str | None = None  # UTF-8 text for the perplexity report (none: 200 held-out TinyTales stories)
    eval_tokens: Count = 16384  # at most this many tokens are scored for the report
    overwrite: bool = False  # replace an existing out

    def __post_init__(self) -> None:
        validate(self)  # the declared ranges, also for a config built in Python
        if self.group_size is None:
            self.group_size = DEFAULT_GROUP[self.scheme]
        check_out(self.out, self.overwrite)


def quantize_model(model: Llama, scheme: str, group_size: int, skip_lm_head: bool = False) -> Llama:
    """Swap the model's linear layers for QLinear in place (weight-only, symmetric, per group).

    Args:
        model: a float Llama.
        scheme: "int8" or "int4".
        group_size: inputs per scale; 0 = per output channel.
        skip_lm_head: keep the lm_head in float.
    """
    if quantization_of(model) is not None:
        raise TinylmError("the model is already quantised")
    spec = {"scheme": scheme, "group_size": group_size, "modules": target_modules(model, skip_lm_head)}
    return swap_in(model, spec)


@torch.no_grad()
def perplexity(model: Llama, ids: list[int], seq_len: int = 256, batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of `ids` (train.eval_nats).

    Args:
        model: the model (eval mode).
        ids: the token stream (more than seq_len tokens).
        seq_len: window length (capped at the model's max_seq_len).
        batch_size: windows per forward pass.
    """
    seq_len = min(seq_len, model.config.max_seq_len)
    if len(ids) <= seq_len:
        raise TinylmError(f"perplexity needs more than {seq_len} tokens of text, got {len(ids)}")
    windows = TokenData.from_ids(ids, model.config.vocab_size).eval_windows(seq_len)  # each (seq_len + 1,)
    nats, count = eval_nats(model, windows, batch_size)
    return math.exp(nats / count)


def held_out_ids(tokenizer: Tokenizer, eval_text: str | None, max_tokens: int) -> list[int]:
    """Token ids of the report's held-out text: a file, or TinyTales stories of a seed training never uses,
    each followed by eos (as token shards separate documents)."""
    if eval_text is not None:
        try:
            text = Path(eval_text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TinylmError(f"cannot read --eval-text {eval_text}: {e}") from None
        return tokenizer.encode(text)[: max_tokens + 1]
    from tinylm.data import tinytales

    stories = tokenizer.encode_batch(list(tinytales.generate(200, seed=987_654_321)))
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return [i for ids in stories for i in ids + eos][: max_tokens + 1]


def weight_bytes(model: Llama) -> int:
    """Bytes of the stored tensors (parameters and persistent buffers, a tied matrix once)."""
    return sum(t.numel() * t.element_size() for t in export_state_dict(model).values())


def quantize(cfg: QuantizeConfig) -> dict[str, Any]:
    """Quantise `cfg.source`, write the checkpoint, and return (and print) the size and perplexity change."""
    loaded = checkpoint.load(cfg.source)
    model = loaded.model
    report: dict[str, Any] = {"scheme": cfg.scheme, "group_size": cfg.group_size, "bytes_before": weight_bytes(model)}
    ids = held_out_ids(loaded.tokenizer, cfg.eval_text, cfg.eval_tokens) if loaded.tokenizer else None
    if ids is not None:
        report["perplexity_before"] = perplexity(model, ids)
    quantize_model(model, cfg.scheme, cfg.group_size, cfg.skip_lm_head)
    report["bytes_after"] = weight_bytes(model)
    if ids is not None:
        report["perplexity_after"] = perplexity(model, ids)
        report["perplexity_change"] = report["perplexity_after"] / report["perplexity_before"] - 1
    meta = {**{k: v for k, v in loaded.meta.items() if k != "format_version"},
            "quantization": quantization_of(model), "quantized_from": str(loaded.source)}
    checkpoint.save(model, cfg.out, loaded.tokenizer, meta=meta)
    report["size_on_disk"] = disk_size(Path(cfg.out))
    return report


def main(cfg: QuantizeConfig) -> None:
    """`tinylm quantize`: quantise, write, print the report."""
    print(format_report(quantize(cfg)))
    print(f"wrote {cfg.out}")


def format_report(report: dict[str, Any]) -> str:
    """One line for the CLI: sizes and the perplexity change."""
    line = (f"{report['scheme']} (group {report['group_size'] or 'per-channel'}): weights "
            f"{report['bytes_before'] / 1e6:.2f} MB -> {report['bytes_after'] / 1e6:.2f} MB")
    if "perplexity_before" in report:
        line += (f"; held-out perplexity {report['perplexity_before']:.3f} -> {report['perplexity_after']:.3f} "
                 f"({100 * report['perplexity_change']:+.2f}%)")
    return line
