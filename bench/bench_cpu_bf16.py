"""bf16 training on a CPU with bf16 matrix units (Intel AMX): a training step in bf16 against fp32, and its parts.

Three measurements, each alternating its two sides round by round and reporting medians:
  1. matmul: (4096 x k) @ (k x n) in fp32 and bf16, the shapes of a 1m model's step (dim 128, ffn 512, vocab 2048);
  2. parts: attention (torch's scaled_dot_product_attention, forward + backward, causal, (16, 4, 256, 32)) in
     bf16 and fp32, and the loss (fp32 cross-entropy of (4096, 2048) bf16 logits, forward + backward) eager
     and compiled (`train.losses._compiled_nll`);
  3. step: `train.train_step` of the quickstart's recipe (seq 256, 16 rows) for each --presets, run.dtype
     float32 against bfloat16, compiled and eager: the median step time of each and the fp32 / bf16 ratio.
On a CPU without bf16 units torch emulates bf16 matmuls and the bf16 side is the slow one.

    python bench/bench_cpu_bf16.py                          # presets 260k 1m 5m, 5 rounds
    python bench/bench_cpu_bf16.py --presets 1m --rounds 7 --parts-only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import make_data  # noqa: E402

from tinylm.core.devices import cpu_bf16_units  # noqa: E402
from tinylm.core.recipe import load_config  # noqa: E402
from tinylm.train.config import TrainConfig  # noqa: E402
from tinylm.train.loop import setup, train_step  # noqa: E402
from tinylm.train.losses import _compiled_nll, _nll, lm_loss  # noqa: E402

SEQ, ROWS, VOCAB = 256, 16, 2048


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def alternate(sides: dict[str, callable], rounds: int, repeats: int) -> dict[str, float]:
    """Median over rounds of each side's median time, the sides alternated within each round."""
    got: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            got[name].append(timed(fn, repeats))
    return {name: statistics.median(v) for name, v in got.items()}


def matmuls(rounds: int) -> None:
    print("| (4096 x k) @ (k x n) | fp32 ms | bf16 ms | fp32 / bf16 |\n|---|---|---|---|")
    for k, n in ((128, 128), (128, 512), (512, 128), (128, 2048), (2048, 128)):
        a, b = torch.randn(4096, k), torch.randn(k, n)
        a16, b16 = a.bfloat16(), b.bfloat16()
        t = alternate({"fp32": lambda: a @ b, "bf16": lambda: a16 @ b16}, rounds, 20)
        print(f"| k {k}, n {n} | {t['fp32'] * 1e3:.3f} | {t['bf16'] * 1e3:.3f} | {t['fp32'] / t['bf16']:.1f}x |")


def parts(rounds: int) -> None:
    def attention(dtype: torch.dtype):
        q, k, v = (torch.randn(ROWS, 4, SEQ, 32, dtype=dtype, requires_grad=True) for _ in range(3))
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def loss(fn):
        logits = torch.randn(ROWS * SEQ, VOCAB, dtype=torch.bfloat16, requires_grad=True)
        targets = torch.randint(0, VOCAB, (ROWS * SEQ,))
        return lambda: fn(logits, targets, "mean").backward()

    t = alternate({"fp32": attention(torch.float32), "bf16": attention(torch.bfloat16)}, rounds, 10)
    print(f"\nattention forward + backward, (16, 4, 256, 32) causal: fp32 {t['fp32'] * 1e3:.1f} ms, "
          f"bf16 {t['bf16'] * 1e3:.1f} ms (bf16 / fp32 {t['bf16'] / t['fp32']:.2f}x)")
    t = alternate({"eager": loss(_nll), "compiled": loss(_compiled_nll())}, rounds, 10)
    print(f"loss forward + backward, (4096, 2048) bf16 logits: eager {t['eager'] * 1e3:.1f} ms, compiled "
          f"{t['compiled'] * 1e3:.1f} ms (eager / compiled {t['eager'] / t['compiled']:.1f}x)")


def steps(presets: list[str], rounds: int, repeats: int) -> None:
    print("\n| preset | parameters | compiled | fp32 step ms | bf16 step ms | fp32 / bf16 |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data", VOCAB)
        for name in presets:
            for compiled in (True, False):
                sides = {}
                for dtype in ("float32", "bfloat16"):
                    cfg = load_config(TrainConfig, None, {
                        "model.preset": name, "data.dir": str(data), "data.seq_len": SEQ,
                        "data.batch_tokens": ROWS * SEQ, "data.micro_batch": ROWS, "schedule.steps": 10**6,
                        "run.out": f"{tmp}/{name}-{compiled}-{dtype}", "run.compile": compiled, "run.dtype": dtype,
                        "run.progress": False, "run.device": "cpu", "run.peak_flops": 1.0})
                    run = setup(cfg)
                    for _ in range(3):  # compile, warm up
                        train_step(run, lm_loss)
                    sides[dtype] = lambda run=run: train_step(run, lm_loss)
                t = alternate(sides, rounds, repeats)
                params = run.model.num_params()
                print(f"| {name} | {params:,} | {'yes' if compiled else 'no'} | {t['float32'] * 1e3:.0f} | "
                      f"{t['bfloat16'] * 1e3:.0f} | {t['float32'] / t['bfloat16']:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["260k", "1m", "5m"])
    ap.add_argument("--rounds", type=int, default=5, help="alternations of the two sides")
    ap.add_argument("--repeats", type=int, default=5, help="timed training steps per side and round")
    ap.add_argument("--parts-only", action="store_true", help="matmuls, attention and loss only")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 matrix units: {cpu_bf16_units()}\n")
    matmuls(args.rounds)
    parts(args.rounds)
    if not args.parts_only:
        steps(args.presets, args.rounds, args.repeats)
    print(f"\n    python bench/bench_cpu_bf16.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
