"""What the fine-tuning stages (sft, dpo) share: the `peft` section and loading the model to tune.

The model gets the default ChatML template when its tokenizer has none (`data.chat.add_chatml`), and LoRA
(Hu et al. 2021) or QLoRA (Dettmers et al. 2023) adapters over a frozen base when `peft.method` asks;
the rows of the tokens ChatML added then train too (`lora.train_token_rows`, PEFT's trainable tokens),
or the model could never learn to emit <|im_end|>.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tinylm.core.errors import TinylmError
from tinylm.core.recipe import (
    Count,
    Fraction,
    Interval,
    Positive,
    check_context,
    one_of,
)
from tinylm.data.chat import CHATML_TOKENS, add_chatml
from tinylm.data.tokenizer import Tokenizer
from tinylm.formats import checkpoint
from tinylm.model.llama import Llama
from tinylm.model.lora import ALL_LINEAR, EMBED, HEAD, apply_lora, train_token_rows


@dataclass
class PeftSection:
    """Full fine-tuning, or low-rank adapters (LoRA, QLoRA) over a frozen base."""

    method: one_of("none", "lora", "qlora") = "none"  # none (full fine-tuning) | lora | qlora
    r: Count = 8  # adapter rank
    alpha: Positive = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: Fraction = 0.0  # dropout on the adapters' input (above 0, a resumed run is no longer bitwise)
    targets: list[str] = field(default_factory=lambda: [ALL_LINEAR])  # all-linear, or layer names / suffixes
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)
    quantize: one_of("int8", "int4") = "int4"  # qlora: the base's weight-only scheme
    group_size: Interval = 0  # qlora: inputs per quantisation scale (0: per output row)
    loftq_iters: Interval = 0  # qlora: LoftQ initialisation alternations (0: PEFT's default init)



def load_model(cfg: Any, verb: str = "sft") -> tuple[Llama, Tokenizer]:
    """The model to fine-tune and its tokenizer, with ChatML added when it has no template, and adapters
    when `peft.method` asks for them.

    Args:
        cfg: a TrainConfig with a `peft` section (model.init is the model to fine-tune).
        verb: the command, named in errors.
    """
    if not cfg.model.init:
        raise TinylmError(f"give the model to fine-tune: tinylm {verb} MODEL (a checkpoint dir, HF dir, .gguf or alias)")
    loaded = checkpoint.load(cfg.model.init)
    if loaded.tokenizer is None:
        raise TinylmError(f"{cfg.model.init} has no tokenizer: {verb} renders its data through it")
    model = loaded.model
    if not cfg.model.extend_context:
        check_context("data.seq_len", cfg.data.seq_len, model.config.max_seq_len, f"the model {cfg.model.init}",
                      extend="model.extend_context true")
    elif cfg.data.seq_len > model.config.max_seq_len:
        model.config.max_seq_len = cfg.data.seq_len
        model.reserve(cfg.data.seq_len)
    tokenizer, model = add_chatml(loaded.tokenizer, model)
    added = [tokenizer.token_to_id(t) for t in CHATML_TOKENS if loaded.tokenizer.token_to_id(t) is None]
    p = cfg.peft
    if p.method != "none":
        if cfg.run.fsdp:
            raise TinylmError("peft.method lora / qlora does not run under run.fsdp (use DDP: torchrun without it)")
        targets = ALL_LINEAR if p.targets == [ALL_LINEAR] else list(p.targets)
        apply_lora(model, p.r, p.alpha, p.dropout, targets, seed=cfg.run.seed, use_rslora=p.use_rslora,
                   quantize=p.quantize if p.method == "qlora" else None, group_size=int(p.group_size),
                   loftq_iters=int(p.loftq_iters) if p.method == "qlora" else 0)
        if added:  # new rows (the mean of the old ones) that the adapters never reach
            train_token_rows(model, {EMBED: added, **({} if model.config.tie_embeddings else {HEAD: added})})
    elif p.loftq_iters:
        raise TinylmError("peft.loftq_iters needs peft.method qlora")
    model.train()
    return model, tokenizer
