"""`tinylm sft MODEL --data FILE_or_DIR`: supervised fine-tuning on chat / instruction data.

Pretraining's loop (`train.loop.begin` -> `start` -> `fit`) with another batch source: the examples
rendered through the tokenizer's chat template with exact assistant-only loss masks (`data.chat`),
packed into rows whose attention and positions restart per example, and `lm_loss`, which honours the
mask and the segments. Resume, checkpoints, validation, metrics, plots and DDP are the loop's.

Full fine-tuning, or `peft.method lora` (Hu et al. 2021) / `qlora` (Dettmers et al. 2023: LoRA over
tinylm's int8 / int4 base, LoftQ initialisation with `peft.loftq_iters`): then OUT/final/ holds the base
(quantised for QLoRA) under HF names plus the adapter in PEFT's format beside it (`state.save_checkpoint`),
which `peft.PeftModel.from_pretrained` loads and `tinylm merge` folds.

Held-out examples (`chat.val_fraction`) are chosen by a hash of their content, so the split does not
depend on the order of the data or on the seed; their masked loss is the run's val_loss.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from tinylm.core.errors import TinylmError
from tinylm.core.recipe import Fraction, Positive
from tinylm.data.chat import (
    ChatSection,
    Example,
    Packed,
    is_held_out,
    pack,
    read_examples,
    render,
)
from tinylm.data.tokenizer import Tokenizer
from tinylm.data.tokens import Batch
from tinylm.train.config import TrainConfig
from tinylm.train.finetune import PeftSection, load_model
from tinylm.train.loop import batch_layout, begin, fit, start
from tinylm.train.losses import lm_loss_fn


@dataclass
class SftChatSection(ChatSection):
    """The chat or instruction data and how it becomes training rows."""

    data: str | None = None  # chat JSONL (messages, prompt/completion, Alpaca), .json, parquet, or a dir of them
    val_fraction: Fraction = 0.0  # share of the examples held out for val_loss (chosen by a hash of each)
    epochs: Positive = 1.0  # passes over the packed rows when neither schedule.steps nor schedule.tokens is set


@dataclass
class SftConfig(TrainConfig):
    """Everything `tinylm sft` needs: the pretraining sections (model.init is the model to fine-tune)
    plus `chat` (the data) and `peft` (full fine-tuning or adapters)."""

    chat: SftChatSection = field(default_factory=SftChatSection)
    peft: PeftSection = field(default_factory=PeftSection)


# ----- data -------------------------------------------------------------------------------------------------

def pack_examples(examples: list[Example], tokenizer: Tokenizer, c: ChatSection, seq_len: int) -> Packed:
    """Render the examples with their loss masks and pack them into rows of seq_len + 1 tokens.

    Args:
        examples: the examples.
        tokenizer: the model's tokenizer, with a chat template.
        c: the chat section (assistant_only, packing, too_long, end_of_turn).
        seq_len: tokens per input row.
    """
    rendered = [render(e, tokenizer, c.assistant_only, c.end_of_turn) for e in examples]
    pad = next((t for t in (tokenizer.pad_id, tokenizer.eos_id) if t is not None), 0)
    return pack(rendered, seq_len, c.packing, c.too_long, pad_id=pad)


def val_batches(packed: Packed, rows: int) -> list[Batch]:
    """The held-out rows as Batches of `rows` rows each, in order."""
    return [packed.rows(list(range(i, min(i + rows, packed.n_rows))), index=i) for i in range(0, packed.n_rows, rows)]


# ----- the stage ----------------------------------------------------------------------------------------------

def sft(cfg: SftConfig) -> Path:
    """Fine-tune a model on chat / instruction data; returns OUT/final.

    Every user error (config, data rows, template, context, adapters) is raised before anything is
    written. Raises KeyboardInterrupt after a signal checkpoint, as pretraining does.

    Args:
        cfg: the sft config.
    """
    c = cfg.chat
    if not c.data:
        raise TinylmError("no chat data: tinylm sft MODEL --data FILE_or_DIR")
    if cfg.data.document_rows:
        raise TinylmError("data.document_rows starts pretraining rows at documents of a token stream; sft packs "
                          "whole examples, each from its start")
    d, device = begin(cfg)
    try:
        examples, skipped = read_examples([c.data], c.skip_bad_rows)
        model, tokenizer = load_model(cfg)
        held = [is_held_out(e, c.val_fraction) for e in examples]
        train = [e for e, h in zip(examples, held) if not h]
        if not train:
            raise TinylmError(f"chat.val_fraction {c.val_fraction} holds out all {len(examples)} examples")
        packed = pack_examples(train, tokenizer, c, cfg.data.seq_len)
        rows, micro, _ = batch_layout(cfg.data, d.world)
        val = [e for e, h in zip(examples, held) if h]
        val_rows = val_batches(pack_examples(val, tokenizer, c, cfg.data.seq_len), micro) if val else None
        if cfg.schedule.steps is None and cfg.schedule.tokens is None:
            cfg.schedule.steps = max(1, math.ceil(c.epochs * packed.n_rows / rows))
        if d.main:
            print(f"sft: {len(train)} examples in {packed.n_rows} rows of {cfg.data.seq_len + 1} tokens, "
                  f"{len(val)} held out; {len(skipped)} bad rows skipped, {packed.truncated} truncated")
        run = start(cfg, model, packed.batches(cfg.data.seed, rows), d, device, val_rows, tokenizer)
        run.meta.update(stage="sft", base=str(cfg.model.init), peft=dataclasses.asdict(cfg.peft),
                        examples=len(train), held_out=len(val))
        return fit(run, lm_loss_fn(cfg.optim.z_loss))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(cfg: SftConfig) -> None:
    """`tinylm sft`."""
    print(f"wrote {sft(cfg)}")
