"""The sections every training stage shares: model, data, optim, schedule, run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any

from tinylm.core.recipe import (
    Beta,
    Check,
    Count,
    Fraction,
    Interval,
    NonNegative,
    Positive,
    Seed,
    one_of,
)
from tinylm.model.config import PRESETS

# ----- configuration -------------------------------------------------------------------------------
# Each section is a flat dataclass; YAML sections and `--section.key value` map onto their fields.


@dataclass
class ModelSection:
    """The model to train: a preset (vocab_size becomes the data tokenizer's) or a source to continue."""

    preset: one_of(*PRESETS) | None = "1m"  # a key of tinylm.model.config.PRESETS
    init: str | None = None  # continue from this model source (checkpoint dir, HF dir, .gguf, alias)
    dim: Count | None = None  # width; this and the shape fields below override the preset's when set
    n_layers: Count | None = None  # blocks (none: the preset's)
    n_heads: Count | None = None  # query heads (none: the preset's)
    n_kv_heads: Count | None = None  # key/value heads, GQA (none: the preset's)
    ffn_dim: Count | None = None  # SwiGLU hidden width (none: the preset's)
    max_seq_len: Count | None = None  # None: the preset's, raised to data.seq_len if shorter; if set, at least data.seq_len
    tie_embeddings: bool | None = None  # share the embedding and LM-head matrix (none: the preset's)
    # RMSNorm on each head's queries and keys before RoPE (OLMo 2, Qwen3); saved and exported as HF Qwen3
    qk_norm: bool = False
    # C: logits = C * tanh(logits / C) (Gemma 2; modded-nanogpt uses 30); none: off. Not Llama-exportable
    logit_softcap: Positive | None = None
    # with init: train on a data.seq_len longer than the model's max_seq_len (which is then raised to it);
    # without it such a data.seq_len is refused, since the positions past max_seq_len were never trained
    extend_context: bool = False


@dataclass
class DataSection:
    """Where the tokens come from and how they are batched."""

    dir: str | None = None  # a data dir written by `tinylm data prepare`
    seq_len: Count = 256  # tokens per training row (the model predicts seq_len targets per row)
    batch_tokens: Count = 32768  # GLOBAL batch in tokens per optimizer step (all ranks, all micro-steps)
    # rows per forward/backward on one device, the rest is gradient accumulation; at most the rows per
    # process and step (batch_tokens / seq_len / processes): a larger value means all of them at once
    micro_batch: Count = 16
    seed: Seed = 0  # data order seed: the batch of step s depends only on (seed, s)
    # batch-size warmup: the global batch grows linearly with the tokens seen, from batch_warmup_start of
    # batch_tokens to all of it, over the first batch_warmup_tokens tokens (0: off, the full batch from step 1)
    batch_warmup_tokens: Interval = 0
    batch_warmup_start: Annotated[float, Check(gt=0, le=1)] = 0.125  # the first step's share of batch_tokens
    # the share of training rows that start at a document's first token (its BOS) instead of anywhere in the
    # stream: such a row holds its document from the start, every name or word it repeats there to be copied
    document_rows: Annotated[float, Check(ge=0, le=1)] = 0.0
    document_rows_tokens: Interval = 0  # document_rows only over the first this many tokens (0: the whole run)


@dataclass
class OptimSection:
    """AdamW (Loshchilov & Hutter 2019) with width-aware learning rates, or Muon for hidden matrices."""

    # adamw: AdamW for every parameter; muon: torch.optim.Muon (Jordan et al. 2024) for the hidden matrices
    # (attention and MLP weights) at muon_lr, AdamW for embeddings, norms and an untied head at lr
    name: one_of("adamw", "muon") = "adamw"
    lr: Positive = 3e-3  # peak lr at width base_width (hidden matrices are scaled by base_width / dim)
    width_scaling: bool = True  # muP-style: hidden-matrix lr * base_width / dim (see param_groups)
    base_width: Count = 256  # MiniCPM's dim_model_base (Hu et al. 2024, sec. 3.1)
    weight_decay: NonNegative = 0.1  # on hidden matrices only
    beta1: Beta = 0.9  # AdamW first-moment decay
    beta2: Beta = 0.95  # LLaMA / MiniCPM value (Touvron et al. 2023, sec. 2.2)
    eps: Positive = 1e-8  # AdamW denominator epsilon
    grad_clip: NonNegative = 1.0  # max global gradient L2 norm; 0 disables clipping (the norm is still checked)
    muon_lr: Positive = 0.02  # muon: peak lr of the hidden matrices (Keller Jordan's default; scaled by sqrt(max(1, rows/cols)))
    muon_momentum: Beta = 0.95  # muon: Nesterov momentum (Keller Jordan's default)
    # z-loss coefficient: adds COEF * log(Z)^2 per token, Z the softmax normaliser (PaLM, Chowdhery et al.
    # 2022, sec. 5, used 1e-4), on the LM loss of pretrain and sft; 0: off
    z_loss: NonNegative = 0.0


@dataclass
class ScheduleSection:
    """Learning-rate schedule: wsd (warmup-stable-decay), cosine or constant."""

    kind: one_of("wsd", "cosine", "constant") = "wsd"  # wsd | cosine | constant
    steps: Count | None = None  # optimizer steps; or give tokens
    tokens: Count | None = None  # token budget; steps = ceil(tokens / data.batch_tokens)
    warmup_steps: Count = 100  # linear warmup from lr/warmup_steps to lr (1: none)
    decay_fraction: Annotated[float, Check(gt=0, le=1)] = 0.1  # wsd: the last round(decay_fraction * steps) steps decay (MiniCPM ~10%)
    decay_shape: one_of("exponential", "linear", "1-sqrt") = "1-sqrt"  # wsd: exponential | linear | 1-sqrt (Hagele et al. 2024 find 1-sqrt best)
    min_lr_ratio: Fraction = 0.0  # lr at the end of the decay / peak lr (exponential needs > 0)


@dataclass
class RunSection:
    """Outputs, devices, evaluation and checkpointing."""

    out: str = "runs/pretrain"  # OUT/checkpoints/step_XXXXXXX/, OUT/final/, OUT/metrics.jsonl, OUT/loss.png
    # a wall-clock budget: the steps are planned from measured speed and re-planned while training, so
    # the run (WSD decay included) ends after about this many minutes in total, counted over every resume;
    # schedule.steps / schedule.tokens, if set, become a cap (whichever comes first). none: off
    minutes: Positive | None = None
    resume: str = "never"  # never | auto (latest complete checkpoint in OUT, or a fresh start) | a checkpoint dir
    decay_from: str | None = None  # wsd: a stable-phase checkpoint; run only the decay from it
    seed: Seed = 0  # model initialisation seed
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda
    dtype: one_of("auto", "float32", "bfloat16") = "auto"  # autocast dtype: auto (bfloat16 on cuda, and on a cpu with bf16 units (AVX512-BF16, AMX) from 1M parameters; else float32) | float32 | bfloat16
    compile: bool | None = None  # torch.compile; None: on for cuda, and on cpu from 1M parameters (use_compile)
    fsdp: bool = False  # shard parameters with FSDP2 fully_shard (models that do not fit one device)
    eval_every: Interval = 200  # steps between validation passes (0: only at the end)
    eval_tokens: Count = 65536  # validation tokens per pass, in whole windows of data.seq_len (at least one)
    ckpt_every: Interval = 500  # steps between resumable checkpoints (0: only on a signal)
    keep_last: Count = 2  # resumable checkpoints kept
    # OUT/best: the weights (not resumable) of the lowest validation loss so far, rewritten at each val pass
    # that lowers it; for a run that may overfit (little data for its budget). Needs a val split
    keep_best: bool = False
    log_every: Count = 10  # steps between metrics.jsonl lines
    peak_flops: Positive | None = None  # device peak FLOP/s for MFU; None: measured (measure_peak_flops)
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = False  # also write OUT/tensorboard/ (needs the tensorboard package)
    plot: bool = True  # OUT/loss.png at the end


@dataclass
class TrainConfig:
    """Everything `tinylm pretrain` needs; YAML sections (model, data, optim, schedule, run) set defaults."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
