"""Training throughput: tinylm's pretraining step against a plain transformers + torch AdamW loop.

For each preset (vocab 4096 by default), both sides train the same shape on the same batch with the
same thread count and gradient clipping: tinylm through `train.setup` + `train.train_step` (the real
loop: torch.compile as `run.compile` decides, fused AdamW, width-aware groups), the reference as
`LlamaForCausalLM` (eager, sdpa attention) + `torch.optim.AdamW` (its default foreach kernel). Rounds
alternate the two; each reports the median tokens/s over its rounds. MFU = tokens/s x
`flops_per_token(seq_len, training=True)` / peak, the peak being the best of 4 timed 2048^3 fp32
matmuls at this thread count (`train.matmul_flops`), measured in every round beside the two sides so that
a shared machine's load affects both; the reported MFU is the median over rounds.

    python bench/bench_train.py                       # presets 1m 5m 15m, 5 rounds of 8 steps
    python bench/bench_train.py --presets 15m --rounds 7 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinylm.core.devices import matmul_flops
from tinylm.core.recipe import load_config
from tinylm.train.config import TrainConfig
from tinylm.train.loop import setup, train_step
from tinylm.train.losses import lm_loss


def make_data(directory: Path, vocab: int, n_tokens: int = 1 << 20) -> Path:
    """A random-token data dir (throughput does not depend on the tokens)."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    np.random.default_rng(0).integers(0, vocab, n_tokens, dtype=np.uint16).tofile(directory / "train_0000.bin")
    meta = {"format": "tinylm-tokens-v1", "dtype": "uint16", "vocab_size": vocab,
            "splits": {"train": {"shards": [{"file": "train_0000.bin", "tokens": n_tokens}], "bytes": 3 * n_tokens}}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def ours(name: str, data: Path, out: Path, seq_len: int, rows: int, compile_: bool, dtype: str = "float32",
         extra: dict[str, object] | None = None):
    """A tinylm Run and a function doing one optimizer step of it (run.dtype `dtype`; `extra`: more recipe
    overrides, e.g. {"optim.name": "muon"})."""
    cfg = load_config(TrainConfig, None, {
        "model.preset": name, "data.dir": str(data), "data.seq_len": seq_len, "data.batch_tokens": rows * seq_len,
        "data.micro_batch": rows, "schedule.steps": 10**6, "schedule.warmup_steps": 10, "run.out": str(out),
        "run.compile": compile_, "run.progress": False, "run.device": "cpu", "run.peak_flops": 1.0,
        "run.dtype": dtype,  # fp32 the reference by default (auto is bf16 on a CPU with bf16 units: bench_cpu_bf16.py)
        **(extra or {})})
    run = setup(cfg)
    return run, lambda: train_step(run, lm_loss)


def reference(run, seq_len: int, rows: int):
    """The same shape as a transformers LlamaForCausalLM with torch AdamW, one step per call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = {k: v for k, v in run.model.config.to_hf().items() if k != "architectures"}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**hf, attn_implementation="sdpa")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    state = {"step": 0}

    def step() -> None:
        tokens = run.batches(state["step"], 0, rows).tokens  # the batch tinylm's step reads
        logits = model(input_ids=tokens[:, :-1]).logits  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1

    return step


def timed(step, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - t


def bench_preset(name: str, vocab: int, seq_len: int, rows: int, rounds: int, steps: int, tmp: Path,
                 eager_too: bool) -> dict:
    data = make_data(tmp / f"data-{vocab}", vocab)
    sides = {}
    run, sides["tinylm"] = ours(name, data, tmp / f"out-{name}", seq_len, rows, compile_=True)
    if eager_too:
        _, sides["tinylm eager"] = ours(name, data, tmp / f"out-{name}-eager", seq_len, rows, compile_=False)
    sides["hf"] = reference(run, seq_len, rows)
    t0 = time.perf_counter()
    for fn in sides.values():  # warm-up: compilation, allocator, first-touch of the optimizer state
        timed(fn, 3)
    warm_s = time.perf_counter() - t0
    tok_s: dict[str, list[float]] = {k: [] for k in sides}
    peaks = []
    for _ in range(rounds):  # alternate the sides (and the peak) so that machine noise hits all of them
        peaks.append(matmul_flops(torch.device("cpu"), repeats=4))
        for k, fn in sides.items():
            tok_s[k].append(steps * rows * seq_len / timed(fn, steps))
    med = {k: statistics.median(v) for k, v in tok_s.items()}
    flops = run.model.config.flops_per_token(seq_len, training=True)
    mfu = {k: statistics.median(t * flops / p for t, p in zip(v, peaks)) for k, v in tok_s.items()}
    return dict(name=name, params=run.model.num_params(), med=med, mfu=mfu, peak=statistics.median(peaks),
                warm_s=warm_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["1m", "5m", "15m"])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rows", type=int, default=8, help="rows per step (batch = rows x seq_len tokens)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="steps per round")
    ap.add_argument("--no-eager", action="store_true", help="skip the uncompiled tinylm column")
    args = ap.parse_args()
    print(f"threads {torch.get_num_threads()}; MFU against the fp32 matmul peak measured in each round\n")
    print("| preset | params | tinylm tok/s | tinylm eager tok/s | HF + AdamW tok/s | ratio | tinylm MFU | HF MFU "
          "| peak GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets:
            r = bench_preset(name, args.vocab, args.seq_len, args.rows, args.rounds, args.steps, Path(tmp),
                             not args.no_eager)
            m = r["med"]
            eager = f"{m['tinylm eager']:,.0f}" if "tinylm eager" in m else "-"
            print(f"| {name} (vocab {args.vocab}) | {r['params'] / 1e6:.2f}M | {m['tinylm']:,.0f} | {eager} | "
                  f"{m['hf']:,.0f} | {m['tinylm'] / m['hf']:.2f}x | {r['mfu']['tinylm']:.0%} | {r['mfu']['hf']:.0%} "
                  f"| {r['peak'] / 1e9:.1f} |", flush=True)
    print(f"\ncommand: python bench/bench_train.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
