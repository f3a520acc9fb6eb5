"""Benchmark: SmolLM2-135M to one ~45M shape by (a) Minitron pruning, (b) weight selection,
(c) Inheritune, (d) random initialisation; each then trained on the same held-out tokens.

All four start from the same vocabulary-trimmed SmolLM2 (the K most used tokens of the calibration
TinyTales, seed 0). Training and validation text are TinyTales stories of other seeds (1 and 2), held
out from calibration. Reports validation loss (nats/token) before training and after the same
number of tokens, plus the seconds each derivation took. Inheritune keeps the width, so it gets
the most layers that fit in the same parameter count.

    python bench/bench_derive.py --steps 40 --batch-size 8 --seq-len 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from tinylm.data.tinytales import write_corpus
from tinylm.data.vocab import trimmed_tokenizer
from tinylm.formats import checkpoint
from tinylm.model.growth import inherit, random_like, select
from tinylm.model.llama import Llama
from tinylm.model.surgery import trim_vocab
from tinylm.stages.prune import calib_batches, open_tokens, prune_model, target_for_params, train_steps
from tinylm.train.losses import eval_nats


def val_loss(model: Llama, data, seq_len: int, windows: int) -> float:
    model.eval()
    nats, count = eval_nats(model, data.eval_windows(seq_len, max_windows=windows), batch_size=8)
    return nats / count


def inherit_layers(model: Llama, budget: int) -> int:
    """The most leading blocks whose model fits in `budget` parameters."""
    cfg = model.config
    per_layer = (cfg.param_count(include_embeddings=False) - cfg.dim) // cfg.n_layers
    fixed = cfg.param_count() - cfg.n_layers * per_layer
    return max(1, min(cfg.n_layers, (budget - fixed) // per_layer))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--calib-stories", type=int, default=2000)
    ap.add_argument("--train-stories", type=int, default=3000)
    ap.add_argument("--keep", type=int, default=8192, help="vocabulary kept")
    ap.add_argument("--target-params", type=float, default=45e6)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--val-windows", type=int, default=32)
    ap.add_argument("--work", default="/tmp/bench_derive")
    a = ap.parse_args()
    torch.manual_seed(0)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    for name, seed, n in (("train.txt", 1, a.train_stories), ("val.txt", 2, 500)):
        if not (work / name).exists():
            write_corpus(work / name, n, seed)

    t0 = time.perf_counter()
    loaded = checkpoint.load(a.source)
    calib = f"tinytales:{a.calib_stories}"
    kept, tok = trimmed_tokenizer(loaded.tokenizer, calib, a.keep)
    base = trim_vocab(loaded.model, kept)
    t_trim = time.perf_counter() - t0
    calib_data = open_tokens(calib, tok)
    train, val = open_tokens(str(work / "train.txt"), tok), open_tokens(str(work / "val.txt"), tok)
    target = target_for_params(base.config, int(a.target_params))
    print(f"source {loaded.model.num_params():,} -> trimmed {base.num_params():,} ({t_trim:.0f} s); target "
          f"dim {target.dim} ffn {target.ffn_dim} heads {target.n_heads}/{target.n_kv_heads} layers {target.n_layers}; "
          f"train tokens {a.steps * a.batch_size * a.seq_len:,} of {train.n_tokens:,}", file=sys.stderr)
    print(f"trimmed source: val loss {val_loss(base, val, a.seq_len, a.val_windows):.3f}", file=sys.stderr)

    makers = {
        "prune (Minitron, width)": lambda: prune_model(base, calib_batches(calib_data, 8, 8, 256), target),
        "select (Xu et al.)": lambda: select(base, target),
        "inherit (Inheritune)": lambda: inherit(base, inherit_layers(base, target.param_count())),
        "random init": lambda: random_like(target, seed=0),
    }
    rows = []
    for name, make in makers.items():
        t0 = time.perf_counter()
        model = make()
        t_make = time.perf_counter() - t0
        before = val_loss(model, val, a.seq_len, a.val_windows)
        t0 = time.perf_counter()
        losses = train_steps(model, train, a.steps, a.batch_size, a.seq_len, a.lr, seed=0)
        t_train = time.perf_counter() - t0
        after = val_loss(model, val, a.seq_len, a.val_windows)
        cfg = model.config
        rows.append(f"| {name} | {model.num_params() / 1e6:.1f}M | {cfg.dim}/{cfg.ffn_dim}/{cfg.n_heads}/"
                    f"{cfg.n_layers} | {t_make:.1f} | {before:.3f} | {after:.3f} | {losses[-1]:.3f} | {t_train:.0f} |")
        print(rows[-1], file=sys.stderr)
    print("| method | params | dim/ffn/heads/layers | derive s | val loss before | val loss after | "
          "last train loss | train s |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\ncommand: python bench/bench_derive.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
