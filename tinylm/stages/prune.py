"""Structured pruning from activations (Minitron), in one shot or in small steps (Adapt-Pruner), and
vocabulary trimming.

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation",
sec. 2.2) ranks every prunable unit by its activations on a few calibration batches:
  - SwiGLU neuron n of layer l: the input of down_proj, silu(gate(x)) * up(x), (B, T, ffn_dim);
  - attention head h of layer l: the L2 norm of its output (the input of o_proj), (B, T, n_heads);
  - residual channel c: the outputs of every RMSNorm (their weights included), (B, T, dim);
  - layer l: Block Influence 1 - cos(input, output) averaged over tokens (ShortGPT, Men et al. 2024),
    or the increase of the calibration loss when the block is skipped (Minitron's perplexity metric).
Activations are aggregated as Minitron's best (batch, sequence) pair (Table 11): the mean of |a| over
the sequence, then the L2 norm over the batch. Width goes first, then depth (Minitron's finding 4:
width pruning beats depth pruning); each stage re-scores the model the previous one produced.

GQA: query heads are pruned evenly per group and key/value groups whole (a group's score is the sum
of its query heads'), so n_heads stays a multiple of n_kv_heads and every kept query head keeps its
own key/value head. Pruned heads keep head_dim (HF LlamaConfig.head_dim expresses that).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from tinylm.core.errors import TinylmError
from tinylm.core.fs import check_out
from tinylm.core.recipe import Check, Count, Interval, Positive, check_context, one_of
from tinylm.data.sources import iter_texts
from tinylm.data.tokenizer import Tokenizer, read_token_map
from tinylm.data.tokens import Batch, TokenData
from tinylm.data.vocab import trimmed_tokenizer
from tinylm.formats import checkpoint
from tinylm.model.config import ModelConfig
from tinylm.model.llama import Llama
from tinylm.model.surgery import Keep, slice_model, target_shape, trim_vocab
from tinylm.train.config import (
    DataSection,
    OptimSection,
    RunSection,
    ScheduleSection,
    TrainConfig,
)
from tinylm.train.loop import setup_model, train_step
from tinylm.train.losses import lm_loss

# ----- calibration data ----------------------------------------------------------------------------


def open_tokens(spec: str, tokenizer: Tokenizer | None, max_tokens: int = 2_000_000, split: str = "train",
                text_field: str = "text") -> TokenData:
    """Tokens to calibrate (or briefly train) on: a prepared data dir, or text tokenised here.

    Args:
        spec: a data dir (`tinylm data prepare`), or anything `tinylm data prepare` reads as text
            (a .txt/.jsonl/.parquet file or dir, `tinytales:N`).
        tokenizer: the model's tokenizer (needed for text).
        max_tokens: stop tokenising text after this many tokens.
        split: the split of a data dir.
        text_field: JSON field / column holding the text.
    """
    if (Path(spec) / "meta.json").is_file():
        return TokenData.open(spec, split)
    if tokenizer is None:
        raise TinylmError(f"{spec}: text calibration data needs the model's tokenizer, and the model has none")
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    ids: list[int] = []
    n_bytes, chunk = 0, []
    for text in iter_texts([spec], text_field):
        chunk.append(text)
        n_bytes += len(text.encode("utf-8"))
        if len(chunk) == 256:  # the Rust backend encodes a batch in parallel
            _extend(ids, tokenizer.encode_batch(chunk), bos, eos)
            chunk = []
            if len(ids) >= max_tokens:
                break
    _extend(ids, tokenizer.encode_batch(chunk), bos, eos)
    return TokenData.from_ids(ids, tokenizer.vocab_size, n_bytes, split)


def _extend(ids: list[int], encoded: list[list[int]], bos: list[int], eos: list[int]) -> None:
    """Append BOS + document + EOS for each document, as `tinylm data prepare` writes them."""
    for doc in encoded:
        ids += bos + doc + eos


def calib_batches(data: TokenData, n_batches: int, batch_size: int, seq_len: int, seed: int = 0) -> list[Tensor]:
    """`n_batches` batches of (batch_size, seq_len + 1) windows, a pure function of the arguments.

    Args:
        data: the token stream.
        n_batches, batch_size, seq_len: how many windows of which length.
        seed: data seed (training between pruning steps uses another).
    """
    return [data.windows(i, seed, batch_size, seq_len) for i in range(n_batches)]


# ----- importance ----------------------------------------------------------------------------------


@dataclass
class Importance:
    """Scores of every prunable unit; higher is more important.

    Args:
        channels: (dim,) residual channels.
        heads: (n_layers, n_heads) query heads.
        neurons: (n_layers, ffn_dim) SwiGLU neurons.
        layers: (n_layers,) blocks.
    """

    channels: Tensor
    heads: Tensor
    neurons: Tensor
    layers: Tensor


def _aggregate(a: Tensor) -> Tensor:
    """(B, T, N) activations -> (N,) sum over the batch of the squared per-sequence mean of |a|."""
    return a.detach().float().abs().mean(1).pow(2).sum(0)


def _hooks(model: Llama, acc: dict[str, Tensor]) -> list[Any]:
    """Register the hooks that add each batch's activation statistics into `acc`; return the handles."""
    cfg, handles = model.config, []

    def add(key: str, index: int | None, value: Tensor) -> None:
        target = acc[key] if index is None else acc[key][index]
        target += value

    for i, block in enumerate(model.model.layers):
        handles.append(block.mlp.down_proj.register_forward_pre_hook(
            lambda m, args, i=i: add("neurons", i, _aggregate(args[0]))))
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(  # (B, T, H * hd) -> (B, T, H)
            lambda m, args, i=i: add("heads", i, _aggregate(args[0].unflatten(-1, (cfg.n_heads, -1)).norm(dim=-1)))))
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            handles.append(norm.register_forward_hook(lambda m, args, out: add("channels", None, _aggregate(out))))
    handles.append(model.model.norm.register_forward_hook(lambda m, args, out: add("channels", None, _aggregate(out))))
    return handles


def _block_influence(hidden: list[Tensor]) -> Tensor:
    """(n_layers,) summed over tokens of 1 - cos(block input, block output) (ShortGPT, Men et al. 2024)."""
    return torch.stack([(1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).sum()
                        for a, b in zip(hidden[:-1], hidden[1:])])


@torch.no_grad()
def _loss(model: Llama, batches: list[Tensor]) -> float:
    return sum(float(lm_loss(model, Batch(b))[0]) for b in batches) / len(batches)


@torch.no_grad()
def _skip_loss_increase(model: Llama, batches: list[Tensor]) -> Tensor:
    """(n_layers,) calibration loss with each block skipped (its output replaced by its input), minus
    the full model's loss (Minitron's layer metric)."""
    base, out = _loss(model, batches), []
    for block in model.model.layers:
        handle = block.register_forward_hook(lambda m, args, output: args[0])
        try:
            out.append(_loss(model, batches) - base)
        finally:
            handle.remove()
    return torch.tensor(out)


@torch.no_grad()
def importance(model: Llama, batches: list[Tensor], layer_metric: str = "bi") -> Importance:
    """Minitron activation importance of channels, heads, neurons and layers on calibration batches.

    Deterministic: a pure function of the weights and the batches.

    Args:
        model: the model to score (left unchanged).
        batches: (B, T + 1) token windows (the last token is only a target).
        layer_metric: "bi" (Block Influence, one pass) or "loss" (loss increase when a block is
            skipped, n_layers + 1 passes).
    """
    if layer_metric not in ("bi", "loss"):
        raise TinylmError(f"unknown layer metric {layer_metric!r} (known: bi, loss)")
    cfg = model.config
    acc = {"channels": torch.zeros(cfg.dim), "heads": torch.zeros(cfg.n_layers, cfg.n_heads),
           "neurons": torch.zeros(cfg.n_layers, cfg.ffn_dim), "layers": torch.zeros(cfg.n_layers)}
    was_training = model.training
    model.eval()
    handles = _hooks(model, acc)
    try:
        for batch in batches:
            _, hidden = model(batch[:, :-1], output_hidden_states=True)
            acc["layers"] += _block_influence(hidden)
    finally:
        for h in handles:
            h.remove()
    if layer_metric == "loss":
        acc["layers"] = _skip_loss_increase(model, batches)
    model.train(was_training)
    return Importance(acc["channels"].sqrt(), acc["heads"].sqrt(), acc["neurons"].sqrt(), acc["layers"])


# ----- choosing what to keep -----------------------------------------------------------------------


def top_k(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores, ties to the lower index, returned in increasing order."""
    order = torch.argsort(-scores, stable=True)
    return order[:k].sort().values


def keep_heads(scores: Tensor, n_kv_heads: int, n_heads: int, kv_keep: int, q_keep: int) -> tuple[Tensor, Tensor]:
    """Kept (query heads, key/value heads) of one layer: the best kv groups whole, then the best
    q_keep / kv_keep query heads inside each kept group.

    Args:
        scores: (n_heads,) query-head importance.
        n_kv_heads, n_heads: the layer's head counts.
        kv_keep, q_keep: how many to keep.
    """
    r, r_new = n_heads // n_kv_heads, q_keep // kv_keep
    groups = scores.view(n_kv_heads, r)  # query heads of kv head g are g * r ... g * r + r - 1
    kv = top_k(groups.sum(1), kv_keep)
    q = torch.cat([g * r + top_k(groups[g], r_new) for g in kv.tolist()])
    return q, kv


def width_keep(imp: Importance, cfg: ModelConfig, target: ModelConfig) -> Keep:
    """Keep the most important channels, heads (GQA-aware) and neurons, to the sizes of `target`."""
    heads = [keep_heads(imp.heads[i], cfg.n_kv_heads, cfg.n_heads, target.n_kv_heads, target.n_heads)
             for i in range(cfg.n_layers)]
    return Keep(channels=top_k(imp.channels, target.dim), q_heads=[q for q, _ in heads],
                kv_heads=[kv for _, kv in heads],
                neurons=[top_k(imp.neurons[i], target.ffn_dim) for i in range(cfg.n_layers)])


def depth_keep(imp: Importance, target: ModelConfig) -> Keep:
    """Keep the `target.n_layers` most important blocks, in their order."""
    return Keep(layers=top_k(imp.layers, target.n_layers).tolist())


# ----- pruning -------------------------------------------------------------------------------------

ORDERS = ("width", "depth")


def _width_differs(a: ModelConfig, b: ModelConfig) -> bool:
    return (a.dim, a.n_heads, a.n_kv_heads, a.ffn_dim) != (b.dim, b.n_heads, b.n_kv_heads, b.ffn_dim)


def prune_model(model: Llama, batches: list[Tensor], target: ModelConfig,
                order: Iterable[str] = ORDERS, layer_metric: str = "bi") -> Llama:
    """One-shot Minitron pruning of `model` to the shape of `target`; returns a new model.

    Pruning to the model's own shape returns an identical copy.

    Args:
        model: the source (unchanged).
        batches: calibration windows (B, T + 1).
        target: the shape to reach (from `surgery.target_shape` or `target_for_params`).
        order: the stages, "width" (channels, heads, neurons) and "depth" (layers), each scored anew.
        layer_metric: "bi" or "loss" (see `importance`).
    """
    source = model
    for stage in order:
        cfg = model.config
        if stage not in ORDERS:
            raise TinylmError(f"unknown pruning stage {stage!r} (known: {', '.join(ORDERS)})")
        if stage == "width" and _width_differs(cfg, target):
            imp = importance(model, batches, "bi")
            model = slice_model(model, width_keep(imp, cfg, target))
        elif stage == "depth" and cfg.n_layers != target.n_layers:
            model = slice_model(model, depth_keep(importance(model, batches, layer_metric), target))
    if model.config.n_layers != target.n_layers or _width_differs(model.config, target):
        raise TinylmError(f"prune: --order {','.join(order)} does not reach the target shape (add width/depth)")
    return slice_model(model, Keep()) if model is source else model  # the caller always gets a new model


def interpolate(src: ModelConfig, target: ModelConfig, t: float) -> ModelConfig:
    """The shape a fraction t in [0, 1] of the way from `src` to `target` (sizes linear in t, rounded;
    n_heads = n_kv_heads * the interpolated group size, so GQA holds at every step)."""
    def lerp(a: int, b: int) -> int:
        return int(round(a + (b - a) * t))

    n_kv = lerp(src.n_kv_heads, target.n_kv_heads)
    r = lerp(src.n_heads // src.n_kv_heads, target.n_heads // target.n_kv_heads)
    return dataclasses.replace(src, dim=lerp(src.dim, target.dim), ffn_dim=lerp(src.ffn_dim, target.ffn_dim),
                               n_layers=lerp(src.n_layers, target.n_layers), n_kv_heads=n_kv, n_heads=n_kv * r)


def train_steps(model: Llama, data: TokenData, steps: int, batch_size: int, seq_len: int, lr: float,
                seed: int = 1, start: int = 0) -> list[float]:
    """A few steps of the training loop's `train_step` (next-token loss, AdamW with its parameter groups,
    gradient clipping at 1, constant lr) on a model in memory; returns the step losses.

    Args:
        model: trained in place (left in eval mode).
        data: the token stream; step s reads the batch of data step start + s (`TokenData.batches`).
        steps, batch_size, seq_len: how much to train on.
        lr: constant learning rate (width-scaled per train.optim.param_groups).
        seed: data seed (keep it apart from the calibration seed).
        start: the first data step.
    """
    cfg = TrainConfig(data=DataSection(seq_len=seq_len, batch_tokens=batch_size * seq_len, micro_batch=batch_size,
                                       seed=seed),
                      optim=OptimSection(lr=lr), schedule=ScheduleSection(kind="constant", steps=start + steps,
                                                                           warmup_steps=1),
                      run=RunSection(device="cpu", compile=False, progress=False))
    run = setup_model(cfg, model, data.batches(seed, batch_size, seq_len))
    run.step = start
    losses = [train_step(run, lm_loss)["loss"] for _ in range(steps)]
    model.eval()
    return losses


def prune_iterative(model: Llama, data: TokenData, target: ModelConfig, steps: int, steps_between: int,
                    batch_size: int, seq_len: int, n_batches: int, lr: float = 3e-4,
                    order: Iterable[str] = ORDERS, layer_metric: str = "bi",
                    log: Callable[[str], object] = print) -> Llama:
    """Adapt-Pruner-style pruning (Pan et al. 2025): `steps` small pruning steps along the straight
    line from the source's shape to `target`, each re-scored on fresh calibration batches and followed
    by `steps_between` optimizer steps (none after the last). Per-layer adaptive widths, the other
    half of Adapt-Pruner, are not expressible in one Llama config and are not done.

    Args:
        model: the source (unchanged).
        data: calibration and training tokens.
        target: the final shape.
        steps: number of pruning steps.
        steps_between: optimizer steps after each pruning step but the last.
        batch_size, seq_len, n_batches: calibration batches per step (training uses batch_size too).
        lr: training learning rate.
        order, layer_metric: as for `prune_model`.
        log: where progress lines go.
    """
    src = model.config
    for i in range(1, steps + 1):
        shape = interpolate(src, target, i / steps)
        model = prune_model(model, calib_batches(data, n_batches, batch_size, seq_len, seed=i), shape,
                            order, layer_metric)
        log(f"prune step {i}/{steps}: {model.num_params():,} parameters")
        if i < steps and steps_between:
            losses = train_steps(model, data, steps_between, batch_size, seq_len, lr, seed=10_000 + i)
            log(f"  trained {steps_between} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return model


def target_for_params(cfg: ModelConfig, n_params: int) -> ModelConfig:
    """The shape `--target-params` picks: the largest s in (0, 1] with ffn_dim * s (rounded down to a
    multiple of 32) and dim * sqrt(s) (rounded down to a multiple of lcm(n_heads, 8), since
    transformers wants dim divisible by n_heads) fitting in n_params; heads and layers are kept.

    Minitron's order of preference (finding 4, and its 8B -> 4B shape, ffn x0.64 and dim x0.75):
    width before depth, the MLP shrinking fastest, attention heads kept. Only if the smallest width
    (s = 0.05) is still too large are layers dropped as well.

    Args:
        cfg: the source shape (after any vocabulary trim: embeddings count).
        n_params: the parameter budget (tied embeddings count once).
    """
    if n_params >= cfg.param_count():
        raise TinylmError(f"prune: --target-params {n_params:,} is not below the source's {cfg.param_count():,}")
    step = math.lcm(cfg.n_heads, 8)

    def shape(s: float, n_layers: int) -> ModelConfig:
        ffn = max(32, int(cfg.ffn_dim * s) // 32 * 32)
        dim = max(step, int(cfg.dim * math.sqrt(s)) // step * step)
        return dataclasses.replace(cfg, dim=min(dim, cfg.dim), ffn_dim=min(ffn, cfg.ffn_dim), n_layers=n_layers)

    lo, hi = 0.05, 1.0
    if shape(lo, cfg.n_layers).param_count() > n_params:
        fits = [n for n in range(cfg.n_layers, 0, -1) if shape(lo, n).param_count() <= n_params]
        if not fits:
            raise TinylmError(f"prune: --target-params {n_params:,} is too small for this vocabulary "
                              f"({cfg.vocab_size} x dim); trim the vocabulary or aim higher")
        return shape(lo, fits[0])
    for _ in range(40):  # bisection on s; param_count is non-decreasing in s
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if shape(mid, cfg.n_layers).param_count() <= n_params else (lo, mid)
    return shape(lo, cfg.n_layers)


# ----- the stage -----------------------------------------------------------------------------------


@dataclass
class PruneConfig:
    """What `tinylm prune` does: what to prune, to which shape, on which calibration data."""

    source: str  # checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)
    calib: str  # calibration data: a data dir, or text (file, dir, tinytales:N)
    out: str  # checkpoint dir to write
    target_params: Count | None = None  # parameter budget, e.g. 45e6 (picks the shape); or the sizes below
    dim: Count | None = None  # target width (none: the source's)
    ffn_dim: Count | None = None  # target SwiGLU width (none: the source's)
    n_heads: Count | None = None  # target query heads (none: the source's)
    n_kv_heads: Count | None = None  # target key/value heads (none: the source's)
    n_layers: Count | None = None  # target blocks (none: the source's)
    trim_vocab: Count | None = None  # first keep the K most used tokens of the calibration text
    token_map: str | None = None  # or keep the tokens of a `tinylm tokenizer trim` dir
    order: Annotated[tuple[str, ...], Check(choices=ORDERS)] = ORDERS  # pruning stages in order: width,depth (Minitron) or depth,width
    layer_metric: one_of("bi", "loss") = "bi"  # bi (Block Influence) or loss (skip-a-block calibration loss)
    calib_batches: Count = 8  # calibration batches
    batch_size: Count = 8  # windows per calibration batch
    seq_len: Count = 256  # tokens per calibration window (at most the source's max_seq_len)
    iterative: bool = False  # Adapt-Pruner-style steps with training between them
    steps: Count = 4  # pruning steps with --iterative
    steps_between: Interval = 50  # optimizer steps between pruning steps
    lr: Positive = 3e-4  # learning rate of the training between steps
    overwrite: bool = False  # replace an existing out


def main(cfg: PruneConfig) -> None:
    """`tinylm prune`."""
    print(f"wrote {prune(cfg)}")


def _check_prune(cfg: PruneConfig) -> None:
    sizes = (cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers)
    if cfg.target_params is not None and any(v is not None for v in sizes):
        raise TinylmError("prune: give either --target-params or explicit sizes, not both")
    if cfg.trim_vocab is not None and cfg.token_map is not None:
        raise TinylmError("prune: give either --trim-vocab or --token-map, not both")
    if cfg.trim_vocab is not None and (Path(cfg.calib) / "meta.json").is_file():
        raise TinylmError("prune: --trim-vocab counts tokens in text, and --calib is a data dir; "
                          "trim with `tinylm tokenizer trim` and pass --token-map")
    check_out(cfg.out, cfg.overwrite)


def _target_after_trim(cfg: "PruneConfig", source: ModelConfig, trim_later: bool) -> ModelConfig:
    # With a data dir the vocabulary is trimmed after pruning: budget the trimmed embedding, not the
    # full one, then keep the source's vocabulary for the pruning passes themselves.
    if not (trim_later and cfg.token_map):
        return target_for_params(source, cfg.target_params)
    kept, _ = read_token_map(cfg.token_map, source.vocab_size)
    target = target_for_params(dataclasses.replace(source, vocab_size=len(kept)), cfg.target_params)
    return dataclasses.replace(target, vocab_size=source.vocab_size)


def _vocab_step(cfg: PruneConfig, model: Llama, tok: Tokenizer | None) -> tuple[Llama, Tokenizer | None, dict]:
    """Apply --trim-vocab / --token-map; returns the model, its tokenizer and the facts for meta."""
    if cfg.token_map:
        kept, tok = read_token_map(cfg.token_map, model.config.vocab_size)
    elif cfg.trim_vocab:
        kept, tok = trimmed_tokenizer(tok, cfg.calib, cfg.trim_vocab)
    else:
        return model, tok, {}
    return trim_vocab(model, kept), tok, {"vocab_trimmed_from": model.config.vocab_size}


def prune(cfg: PruneConfig, log: Callable[[str], object] = print) -> Path:
    """Load, (trim the vocabulary,) prune, save; returns the checkpoint dir.

    The vocabulary is trimmed first when the calibration data is text (it is tokenised again with
    the trimmed tokenizer, and every later pass is cheaper), last when it is a prepared data dir
    (whose ids belong to the source's tokenizer).

    Args:
        cfg: the prune config.
        log: where progress lines go.
    """
    _check_prune(cfg)
    loaded = checkpoint.load(cfg.source)
    check_context("--seq-len", cfg.seq_len, loaded.config.max_seq_len, str(cfg.source))
    model, tok = loaded.model, loaded.tokenizer
    is_dir = (Path(cfg.calib) / "meta.json").is_file()
    vocab_meta: dict[str, Any] = {}
    if not is_dir:
        model, tok, vocab_meta = _vocab_step(cfg, model, tok)
    data = open_tokens(cfg.calib, tok, max_tokens=max(2_000_000, 4 * cfg.calib_batches * cfg.batch_size * cfg.seq_len))
    data.check_vocab(model.config.vocab_size, str(cfg.source))
    sizes = dict(dim=cfg.dim, ffn_dim=cfg.ffn_dim, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, n_layers=cfg.n_layers)
    target = (_target_after_trim(cfg, model.config, is_dir) if cfg.target_params is not None
              else target_shape(model.config, **sizes))
    log(f"pruning {model.num_params():,} -> {target.param_count():,} parameters: dim {target.dim}, "
        f"ffn_dim {target.ffn_dim}, heads {target.n_heads}/{target.n_kv_heads}, layers {target.n_layers}")
    if cfg.iterative:
        model = prune_iterative(model, data, target, cfg.steps, cfg.steps_between, cfg.batch_size, cfg.seq_len,
                                cfg.calib_batches, cfg.lr, cfg.order, cfg.layer_metric, log)
    else:
        batches = calib_batches(data, cfg.calib_batches, cfg.batch_size, cfg.seq_len)
        model = prune_model(model, batches, target, cfg.order, cfg.layer_metric)
    if is_dir:
        model, tok, vocab_meta = _vocab_step(cfg, model, tok)
    meta = {"derived_from": str(cfg.source), "method": "prune-iterative" if cfg.iterative else "prune",
            "calib": cfg.calib, "order": list(cfg.order), "layer_metric": cfg.layer_metric, **vocab_meta}
    return checkpoint.save(model, cfg.out, tokenizer=tok, meta=meta)
