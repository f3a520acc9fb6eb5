"""`tinylm dpo MODEL --data pairs.jsonl`: preference tuning on (prompt, chosen, rejected) pairs.

Pretraining's loop (`train.loop.begin` -> `start` -> `fit`) with another batch source and loss: each row
of a Batch is one pair (the chosen sequence in tokens / mask, the rejected one in extras), the loss
masks on the response tokens only (`data.chat.render` of the prompt followed by the response), and a
preference loss from `train.preference`: sigmoid DPO (Rafailov et al. 2023), IPO (Azar et al. 2023) or
the reference-free SimPO (Meng et al. 2024).

The reference model is the starting model; with LoRA / QLoRA, its base with the adapters off (the
quantised base for QLoRA, as TRL's `disable_adapter` reference: LoftQ's adapters do not start at zero). Its
summed response log-probabilities are computed once, before training, in eval mode, and cached in
OUT/reference_logps.safetensors with the rendered data's hash, the model's hash and seq_len in its
metadata; epochs and `--resume auto` reuse it, a cache made for other data or another model is
recomputed. No reference model is held during training (TRL #3985).

Held-out pairs (`chat.val_fraction`) are chosen by a hash of their content, as sft's examples are; the
cache covers them too, and at each validation the run logs the preference loss on them (val_loss) with
their reward accuracy and margin (val_reward_accuracy, val_reward_margin: the loop scores val Batches
with the run's own loss step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from tinylm.core.errors import TinylmError
from tinylm.core.fs import atomic_file
from tinylm.core.recipe import Fraction, NonNegative, Positive, one_of
from tinylm.data.chat import Example, is_held_out, read_rows, render, to_example
from tinylm.data.tokenizer import Tokenizer
from tinylm.data.tokens import Batch, BatchSource
from tinylm.model.llama import Llama
from tinylm.model.lora import base_model, lora_layers
from tinylm.train.config import TrainConfig
from tinylm.train.finetune import PeftSection, load_model
from tinylm.train.loop import batch_layout, begin, fit, start
from tinylm.train.preference import LOSSES, preference_loss, response_logps

CACHE = "reference_logps.safetensors"
CACHE_FORMAT = "tinylm-dpo-reference-v1"


@dataclass
class DpoChatSection:
    """The preference pairs and how they become training rows."""

    data: str | None = None  # pairs JSONL ({"prompt", "chosen", "rejected"}: messages or plain text), parquet, or a dir
    too_long: one_of("refuse", "truncate") = "refuse"  # a pair with a sequence longer than seq_len + 1 tokens
    skip_bad_rows: bool = False  # skip rows with missing fields or bad values and report how many
    end_of_turn: str | None = None  # the token that ends an assistant turn (none: <|im_end|> if known, else eos)
    val_fraction: Fraction = 0.0  # share of the pairs held out for validation (chosen by a hash of each)
    epochs: Positive = 1.0  # passes over the pairs when neither schedule.steps nor schedule.tokens is set


@dataclass
class DpoSection:
    """The preference loss."""

    loss: one_of(*LOSSES) = "sigmoid"  # sigmoid (DPO) | ipo | simpo (reference-free)
    beta: Positive = 0.1  # inverse temperature (DPO paper: 0.1; SimPO's paper uses 2.0-2.5)
    label_smoothing: Fraction = 0.0  # sigmoid / simpo: assumed share of flipped labels, below 0.5 (cDPO)
    gamma: NonNegative = 0.5  # simpo: target reward margin (SimPO's paper: gamma / beta 0.5)


@dataclass
class DpoConfig(TrainConfig):
    """Everything `tinylm dpo` needs: the pretraining sections (model.init is the model to tune) plus
    `chat` (the pairs), `peft` (full fine-tuning or adapters) and `dpo` (the loss)."""

    chat: DpoChatSection = field(default_factory=DpoChatSection)
    peft: PeftSection = field(default_factory=PeftSection)
    dpo: DpoSection = field(default_factory=DpoSection)


# ----- data -------------------------------------------------------------------------------------------------

def to_pair(record: Any, where: str) -> tuple[Example, Example]:
    """A pairs row as (prompt + chosen, prompt + rejected) Examples, each checked like an sft row.

    Args:
        record: {"prompt", "chosen", "rejected"[, "tools"]}: the prompt a list of messages and the responses
            lists of messages or strings, or all three plain strings.
        where: file:line of the row.
    """
    if not isinstance(record, dict) or not all(k in record for k in ("prompt", "chosen", "rejected")):
        raise TinylmError(f"{where}: a pair needs 'prompt', 'chosen' and 'rejected' fields")
    plain = isinstance(record["prompt"], str)
    for k in ("prompt", "chosen", "rejected"):
        if not isinstance(record[k], str if plain else (str, list)):
            raise TinylmError(f"{where}: '{k}' must be a string" + ("" if plain else " or a list of messages") +
                              f" like 'prompt', not {type(record[k]).__name__}")
    tools = {"tools": record["tools"]} if record.get("tools") else {}
    pair = []
    for k in ("chosen", "rejected"):
        try:
            pair.append(to_example({"prompt": record["prompt"], "completion": record[k], **tools}, where))
        except TinylmError as e:  # the sft reader's words: the completion here is the chosen / rejected one
            raise TinylmError(str(e).replace("completion", f"'{k}' response")) from None
    return pair[0], pair[1]


def read_pairs(inputs: list[str], skip_bad: bool = False) -> tuple[list[tuple[Example, Example]], list[str]]:
    """Every pair of the user's files, in order, and the problems of the rows skipped.

    Args:
        inputs: files or dirs (see `data.chat.read_rows`).
        skip_bad: skip a bad row (its problem is returned) instead of refusing the data.
    """
    return read_rows(inputs, to_pair, skip_bad, "pairs")


@dataclass
class Pairs:
    """Rendered pairs, one per row, each sequence padded to seq_len + 1 tokens.

    Args:
        tokens: (N, 2, seq_len + 1) token ids of the chosen [:, 0] and rejected [:, 1] sequences.
        loss: (N, 2, seq_len + 1) True on the response tokens (targets that carry loss).
        ref: (N, 2) the reference's summed response log-probabilities (set by `reference_logps`).
        held: (N,) True on the pairs held out for validation.
        truncated, dropped: pairs cut to seq_len + 1 tokens; pairs left out since a response was cut away.
    """

    tokens: torch.Tensor
    loss: torch.Tensor
    ref: torch.Tensor | None = None
    held: torch.Tensor | None = None
    truncated: int = 0
    dropped: int = 0

    @property
    def n(self) -> int:
        return len(self.tokens)

    def digest(self) -> str:
        """sha256 of the rendered rows: the data, tokenizer, template and seq_len they came from."""
        return hashlib.sha256(self.tokens.numpy().tobytes() + self.loss.numpy().tobytes()).hexdigest()

    def select(self, held: bool) -> Pairs:
        """The held-out pairs (held True) or the training ones, with their reference log-probabilities."""
        keep = self.held == held if self.held is not None else torch.full((self.n,), not held)
        ref = self.ref[keep] if self.ref is not None else None
        return Pairs(self.tokens[keep], self.loss[keep], ref, torch.full((int(keep.sum()),), held))

    def val_batches(self, micro: int) -> list[Batch]:
        """Every pair in order, as Batches of `micro` pairs (validation)."""
        return [self.rows(list(range(i, min(i + micro, self.n))), index=i) for i in range(0, self.n, micro)]

    def rows(self, idx: list[int], index: int = 0) -> Batch:
        """The Batch of pairs `idx` (its loss a mean over the pairs: weight = the number of pairs)."""
        i = torch.as_tensor(idx, dtype=torch.long)
        tok, loss = self.tokens[i], self.loss[i, :, 1:]  # (B, 2, T + 1), (B, 2, T)
        extras = {"rejected": tok[:, 1], "rejected_mask": loss[:, 1]}
        if self.ref is not None:
            extras.update(ref_chosen=self.ref[i, 0], ref_rejected=self.ref[i, 1])
        return Batch(tok[:, 0], index=index, mask=loss[:, 0], extras=extras, weight=float(len(idx)))

    def batches(self, seed: int, global_batch: int) -> BatchSource:
        """The loop's batch source: epochs over the pairs, each in an order drawn from (seed, epoch), so a
        step's batch depends only on (seed, step) and a resumed run reads the pairs it would have read."""
        perms: dict[int, np.ndarray] = {}

        def source(step: int, first: int, count: int) -> Batch:
            g = step * global_batch + first + np.arange(count, dtype=np.int64)
            for e in set((g // self.n).tolist()) - perms.keys():
                perms[e] = np.random.default_rng([seed, e]).permutation(self.n)
            return self.rows([int(perms[int(e)][r]) for e, r in zip(g // self.n, g % self.n)], index=int(g[0]))

        return source


def render_pairs(pairs: list[tuple[Example, Example]], tokenizer: Tokenizer, c: DpoChatSection, seq_len: int) -> Pairs:
    """Render each pair with response-only loss masks into rows of seq_len + 1 tokens.

    Args:
        pairs: from `read_pairs`.
        tokenizer: the model's tokenizer (with a chat template for conversations).
        c: the chat section (too_long, end_of_turn, val_fraction: which pairs are held out).
        seq_len: tokens per input row.
    """
    cap = seq_len + 1
    rendered = [[render(e, tokenizer, True, c.end_of_turn) for e in pair] for pair in pairs]
    long = [max(len(r.ids) for r in rs) for rs in rendered if max(len(r.ids) for r in rs) > cap]
    if long and c.too_long != "truncate":
        raise TinylmError(f"{len(long)} of {len(pairs)} pairs are longer than the context ({cap} tokens with seq_len "
                          f"{seq_len}; the longest has {max(long)}): raise data.seq_len or set chat.too_long truncate")
    keep = [all(any(r.mask[:cap]) for r in rs) for rs in rendered]
    kept = [rs for rs, k in zip(rendered, keep) if k]
    held = torch.tensor([is_held_out(p, c.val_fraction) for p, k in zip(pairs, keep) if k], dtype=torch.bool)
    if not kept:
        raise TinylmError("no pair has response tokens within the context")
    pad = next((t for t in (tokenizer.pad_id, tokenizer.eos_id) if t is not None), 0)
    tokens = np.full((len(kept), 2, cap), pad, dtype=np.int64)
    loss = np.zeros((len(kept), 2, cap), dtype=bool)
    for i, rs in enumerate(kept):
        for j, r in enumerate(rs):
            n = min(len(r.ids), cap)
            tokens[i, j, :n], loss[i, j, :n] = r.ids[:n], r.mask[:n]
    return Pairs(torch.from_numpy(tokens), torch.from_numpy(loss), held=held, truncated=len(long),
                 dropped=len(pairs) - len(kept))


# ----- the reference log-probabilities, once ------------------------------------------------------------

def model_digest(model: Llama) -> str:
    """sha256 of the model's weights, adapters left out (with LoRA the reference is the base)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" not in name:
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def reference_logps(model: Llama, pairs: Pairs, micro: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, 2) summed response log-probabilities of every pair's chosen and rejected sequences under `model`
    in eval mode, in fp32 (`response_logps`, the training forward), `micro` pairs per forward pass.

    Args:
        model: the reference (the starting model, or its base with the adapters off); left in train mode.
        pairs: the rendered pairs.
        micro: pairs per forward pass.
        device: where to run.
    """
    model.eval()
    out = torch.empty(pairs.n, 2, dtype=torch.float32)
    for i in range(0, pairs.n, micro):
        b = pairs.rows(list(range(i, min(i + micro, pairs.n))))
        tokens = torch.cat([b.tokens, b.extras["rejected"]]).to(device)
        mask = torch.cat([b.mask, b.extras["rejected_mask"]]).to(device)
        logps, _ = response_logps(model, tokens, mask)  # (2B,)
        out[i:i + len(b.tokens)] = logps.view(2, -1).T.cpu()
    model.train()
    return out


def cached_reference(path: Path, meta: dict[str, str]) -> torch.Tensor | None:
    """The cached (N, 2) reference log-probabilities at `path` if its metadata is `meta`, else None
    (with one line saying why a cache there is not used)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            found, ref = f.metadata() or {}, f.get_tensor("ref")
    except Exception:  # a torn or foreign file: recompute it
        print(f"dpo: {path} is not a readable reference cache; recomputing it")
        return None
    stale = [k for k in meta if found.get(k) != meta[k]]
    if stale:
        print(f"dpo: {path} was made for another {', '.join(stale)}; recomputing it")
        return None
    return ref


def save_reference(path: Path, ref: torch.Tensor, meta: dict[str, str]) -> None:
    """Write the cache atomically (a reader sees the old file or the whole new one)."""
    with atomic_file(path) as tmp:
        save_file({"ref": ref.contiguous()}, str(tmp), metadata=meta)


# ----- the stage ----------------------------------------------------------------------------------------------

def dpo(cfg: DpoConfig) -> Path:
    """Preference-tune a model on (prompt, chosen, rejected) pairs; returns OUT/final.

    Every user error (config, data rows, template, context, adapters) is raised before anything is
    written. Raises KeyboardInterrupt after a signal checkpoint, as pretraining does.

    Args:
        cfg: the dpo config.
    """
    c, p = cfg.chat, cfg.dpo
    if not c.data:
        raise TinylmError("no preference pairs: tinylm dpo MODEL --data pairs.jsonl")
    if cfg.optim.z_loss:
        raise TinylmError("optim.z_loss regularises the LM loss of pretrain and sft, not dpo's preference loss")
    if cfg.data.document_rows:
        raise TinylmError("data.document_rows starts pretraining rows at documents of a token stream; dpo reads "
                          "whole pairs")
    if p.label_smoothing >= 0.5:
        raise TinylmError(f"dpo.label_smoothing must be below 0.5, got {p.label_smoothing}")
    d, device = begin(cfg)
    try:
        raw, skipped = read_pairs([c.data], c.skip_bad_rows)
        model, tokenizer = load_model(cfg, "dpo")
        pairs = render_pairs(raw, tokenizer, c, cfg.data.seq_len)
        n_val = int(pairs.held.sum())
        if n_val == pairs.n:
            raise TinylmError(f"chat.val_fraction {c.val_fraction} holds out all {pairs.n} pairs")
        rows, micro, _ = batch_layout(cfg.data, d.world)
        if cfg.schedule.steps is None and cfg.schedule.tokens is None:
            cfg.schedule.steps = max(1, math.ceil(c.epochs * (pairs.n - n_val) / rows))
        cache = Path(cfg.run.out) / CACHE
        meta = {"format": CACHE_FORMAT, "data_sha256": pairs.digest(), "model_sha256": model_digest(model),
                "seq_len": str(cfg.data.seq_len), "pairs": str(pairs.n)}
        pairs.ref = cached_reference(cache, meta) if p.loss != "simpo" else torch.zeros(pairs.n, 2)
        fresh = pairs.ref is None
        if fresh:  # before `start`: a resumed run restores trained weights into the model
            reference = base_model(model) if lora_layers(model) else model  # adapters off; the base's tensors
            pairs.ref = reference_logps(reference.to(device), pairs, micro, device)
            model.to("cpu")
        if d.main:
            print(f"dpo: {pairs.n - n_val} pairs, {n_val} held out, {len(skipped)} bad rows skipped, "
                  f"{pairs.truncated} truncated, {pairs.dropped} dropped; loss {p.loss}; reference log-probs "
                  f"{'none (reference-free)' if p.loss == 'simpo' else 'computed' if fresh else 'from ' + str(cache)}")
        train, val = pairs.select(False), pairs.select(True)
        run = start(cfg, model, train.batches(cfg.data.seed, rows), d, device, val.val_batches(micro) if n_val else None,
                    tokenizer)
        if fresh and p.loss != "simpo" and d.main:
            save_reference(cache, pairs.ref, meta)
        run.meta.update(stage="dpo", base=str(cfg.model.init), peft=dataclasses.asdict(cfg.peft),
                        dpo=dataclasses.asdict(p), pairs=train.n, held_out=n_val)
        return fit(run, preference_loss(p.loss, p.beta, p.label_smoothing, p.gamma))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(cfg: DpoConfig) -> None:
    """`tinylm dpo`."""
    print(f"wrote {dpo(cfg)}")
