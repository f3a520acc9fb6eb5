"""The measurements behind the one-row decode path and deterministic compiled training (BENCHMARKS.md).

    python bench/bench_kernels.py gemv          # one-row products: weight layouts and int8 kernels
    python bench/bench_kernels.py rows          # M rows x SmolLM2's weights (M = 1, 4, 16, 64): the engine's
                                                # batched decode; fp32 and int8 kernels, GFLOP/s
    python bench/bench_kernels.py torchao       # torchao's int8 CPU configs on SmolLM2's shapes, beside PyTorch's
                                                # int8 kernel (`pip install torchao`; not a tinylm dependency)
    python bench/bench_kernels.py step          # the compiled 15m int8 step: guards, attention
    python bench/bench_kernels.py teacher       # SmolLM2 forward over 8 x 128 tokens: full head vs kept rows
    python bench/bench_kernels.py determinism   # two identical compiled CPU runs, with and without
                                                # torch.use_deterministic_algorithms

Timings are the best of 5 repeats (gemv) or medians of 7 alternated rounds (step); --threads sets torch's
thread count (default 2, both cores here).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm.infer import decode as D
from tinylm.model import llama as L
from tinylm.model.config import preset
from tinylm.model.llama import Llama
from tinylm.stages.quantize import quantize_model


def best_us(fn, n: int = 50) -> float:
    for _ in range(5):
        fn()
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n)
    return min(runs) * 1e6


def gemv(args: argparse.Namespace) -> None:
    """One row times a weight: fp32 from (out, in) and (in, out); int8 kernel with bf16/fp16/fp32
    activations; PyTorch's (deprecated) fbgemm dynamic-quantised linear; an inductor-generated int8 gemv."""
    import warnings

    warnings.filterwarnings("ignore")

    @torch.compile(dynamic=False)
    def inductor_gemv(x, codes, scales):  # (K,), (N, K) int8, (N,)
        return (codes.to(torch.float32) * x).sum(-1) * scales

    print("| weight (out x in) | fp32 (out, in) us | fp32 (in, out) us | int8 kernel bf16 / fp16 / fp32 act. us "
          "| fbgemm dynamic int8 us | inductor int8 gemv us |")
    print("|---|---|---|---|---|---|")
    for out, inp in [(32000, 288), (768, 288), (288, 288), (49152, 576), (1536, 576)]:
        x, w = torch.randn(1, inp), torch.randn(out, inp)
        wt = w.t().contiguous()
        codes, scales = torch.randint(-127, 128, (out, inp), dtype=torch.int8), torch.rand(out)
        k = {dt: best_us(lambda dt=dt: torch.ops.aten._weight_int8pack_mm(x.to(dt), codes, scales.to(dt)))
             for dt in (torch.bfloat16, torch.float16, torch.float32)}
        lin = torch.nn.Sequential(torch.nn.Linear(inp, out, bias=False))
        dyn = torch.ao.quantization.quantize_dynamic(lin, {torch.nn.Linear}, dtype=torch.qint8)
        print(f"| {out} x {inp} | {best_us(lambda: F.linear(x, w)):.0f} | {best_us(lambda: x @ wt):.0f} | "
              f"{k[torch.bfloat16]:.0f} / {k[torch.float16]:.0f} / {k[torch.float32]:.0f} | "
              f"{best_us(lambda: dyn(x)):.0f} | {best_us(lambda: inductor_gemv(x[0], codes, scales)):.0f} |",
              flush=True)


def rows(args: argparse.Namespace) -> None:
    """M rows times SmolLM2-135M's weights, as one batched decode step of M requests multiplies them: fp32
    nn.Linear (MKL sgemm), fp32 from (in, out), MKL's packed sgemm (what inductor's weight prepacking calls),
    and the int8 kernel with bf16 activations; microseconds and GFLOP/s (2 M out in / time)."""
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]  # q|k|v, o, gate|up, down, head
    print("| weight (out x in) | rows | fp32 nn.Linear us | fp32 (in, out) us | MKL packed us | int8 kernel us "
          "| best GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for out, inp in shapes:
        w = torch.randn(out, inp)
        wt = w.t().contiguous()
        codes, scales = torch.randint(-127, 128, (out, inp), dtype=torch.int8), torch.rand(out).bfloat16()
        for m in args.rows:
            x = torch.randn(m, inp)
            xb = x.bfloat16()
            packed = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
            t = [best_us(lambda: F.linear(x, w), 10), best_us(lambda: x @ wt, 10),
                 best_us(lambda: torch.ops.mkl._mkl_linear(x, packed, w, None, m), 10),
                 best_us(lambda: torch.ops.aten._weight_int8pack_mm(xb, codes, scales), 10)]
            print(f"| {out} x {inp} | {m} | " + " | ".join(f"{v:.0f}" for v in t)
                  + f" | {2 * m * out * inp / min(t) / 1e3:.1f} |", flush=True)


def torchao_int8(args: argparse.Namespace) -> None:
    """torchao's int8 weight-only and dynamic int8 configs (`quantize_` on an nn.Linear, eager) against PyTorch's
    weight-only int8 kernel that tinylm's QLinear calls, at 1, 4 and 16 rows."""
    import warnings

    warnings.filterwarnings("ignore")
    try:
        import torchao.quantization as tq
    except ImportError:
        raise SystemExit("torchao is not installed: pip install torchao")
    print("| weight (out x in) | rows | torchao Int8WeightOnly us | torchao Int8DynamicActivationInt8Weight us "
          "| PyTorch int8 kernel us |")
    print("|---|---|---|---|---|")
    for out, inp in [(3072, 576), (49152, 576)]:
        codes, scales = torch.randint(-127, 128, (out, inp), dtype=torch.int8), torch.rand(out).bfloat16()
        for m in (1, 4, 16):
            x = torch.randn(m, inp)
            times = []
            for config in (tq.Int8WeightOnlyConfig(), tq.Int8DynamicActivationInt8WeightConfig()):
                layer = torch.nn.Sequential(torch.nn.Linear(inp, out, bias=False))
                tq.quantize_(layer, config)
                with torch.no_grad():
                    times.append(best_us(lambda: layer(x), 5))
            xb = x.bfloat16()
            times.append(best_us(lambda: torch.ops.aten._weight_int8pack_mm(xb, codes, scales), 10))
            print(f"| {out} x {inp} | {m} | " + " | ".join(f"{v:.0f}" for v in times) + " |", flush=True)


def _sdpa_one_query(q, k, v, visible):  # the library kernel the written-out attention replaced
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=k.shape[1] != q.shape[1])


def step(args: argparse.Namespace) -> None:
    """us per compiled one-token step of the 15m int8 model (one row, M = 192 cache slots): guards checked
    vs skipped, the written-out one-query attention vs the SDPA kernel, inductor's C++ vs Python wrapper."""
    torch.manual_seed(0)
    model = quantize_model(Llama(preset(args.model)).eval(), "int8", 0)
    cfg, slots = model.config, 192
    caches = [[torch.zeros(1, cfg.n_kv_heads, slots, cfg.head_dim) for _ in range(cfg.n_layers)] for _ in range(2)]
    fast = D.decode_model(model)  # fused / int8-kernel layers swapped in, as StaticDecoder decodes one row
    fast.reserve(slots)
    # Attention reads the module global one_query_attention when traced, and dynamo guards on it:
    # each variant is set before its every call, so each compiled step keeps its own attention.
    original, ids, compiled, times = L.one_query_attention, torch.tensor([[5]]), {}, {}
    variants = {"written-out attention": original, "SDPA kernel": _sdpa_one_query,
                "written-out attention, Python wrapper": original}
    for name, attention in variants.items():
        L.one_query_attention = attention
        options = None if "Python wrapper" in name else {"cpp_wrapper": True}
        compiled[name] = torch.compile(partial(D.static_step, fast), dynamic=False,
                                       fullgraph=True, options=options)
        with torch.no_grad():
            compiled[name](ids, torch.tensor(3), *caches)

    def timed(name: str, skip: bool) -> float:
        L.one_query_attention, fn = variants[name], compiled[name]
        with torch.no_grad(), torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip):
            t = time.perf_counter()
            for i in range(150):
                fn(ids, torch.tensor(20 + i), *caches)
        return (time.perf_counter() - t) / 150 * 1e6

    for _ in range(7):
        for name in compiled:
            for skip in (False, True):
                times.setdefault((name, skip), []).append(timed(name, skip))
    L.one_query_attention = original
    print("| step | guards checked us | guards skipped us |")
    print("|---|---|---|")
    for name in compiled:
        print(f"| {args.model} int8, {name} | {statistics.median(times[(name, False)]):.0f} | "
              f"{statistics.median(times[(name, True)]):.0f} |")


def teacher(args: argparse.Namespace) -> None:
    """Seconds per forward of SmolLM2-135M over 8 x 128 tokens: all 49,152 logits, or only 4,096 rows."""
    from tinylm.formats import checkpoint

    model = checkpoint.load("smollm2-135m").model.eval()
    x, kept = torch.randint(0, 49152, (8, 128)), torch.randperm(49152)[:4096]
    rows: dict[str, list[float]] = {"full head": [], "4,096 kept rows": []}
    with torch.no_grad():
        model(x, logits_for=kept)
        for _ in range(3):
            for name, extra in (("full head", {}), ("4,096 kept rows", {"logits_for": kept})):
                t = time.perf_counter()
                model(x, **extra)
                rows[name].append(time.perf_counter() - t)
    for name, times in rows.items():
        s = statistics.median(times)
        print(f"| {name} | {s:.2f} s | {1024 / s:,.0f} tokens/s |")


_RUN = """
import sys, torch
sys.path.insert(0, "tests")
from helpers import make_data
from tinylm.core.recipe import load_config
from tinylm.stages.pretrain import pretrain
from tinylm.train.config import TrainConfig
if sys.argv[2] == "0":  # what pretrain did before: compile without the deterministic switch
    torch.use_deterministic_algorithms = lambda *args, **kwargs: None
data = make_data(__import__("pathlib").Path(sys.argv[1]) / "d")
pretrain(load_config(TrainConfig, None, {"data.dir": str(data), "model.dim": 64, "model.n_layers": 2,
    "model.n_heads": 4, "data.seq_len": 32, "data.batch_tokens": 256, "data.micro_batch": 8,
    "schedule.steps": 12, "schedule.warmup_steps": 2, "run.out": sys.argv[1] + "/out", "run.eval_every": 0,
    "run.ckpt_every": 0, "run.compile": True, "run.progress": False, "run.plot": False, "run.device": "cpu",
    "run.peak_flops": 1e11}))
"""


def determinism(args: argparse.Namespace) -> None:
    """Largest weight difference between two identical compiled 12-step CPU runs (fresh processes).

    `pretrain` switches deterministic algorithms on when it compiles on a CPU; "off" disables that switch,
    showing what inductor's default CPU code does."""
    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parent.parent
    for det in ("0", "1"):
        finals = []
        for _ in range(2):
            tmp = tempfile.mkdtemp()
            subprocess.run([sys.executable, "-c", _RUN, tmp, det], cwd=repo, check=True, capture_output=True)
            finals.append(load_file(f"{tmp}/out/final/model.safetensors"))
        diff = max((finals[0][k] - finals[1][k]).abs().max().item() for k in finals[0])
        print(f"| deterministic algorithms {'on' if det == '1' else 'off'} | {diff:.2e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["gemv", "rows", "torchao", "step", "teacher", "determinism"])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64], help="rows: batch sizes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="15m", help="step: the preset")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"gemv": gemv, "rows": rows, "torchao": torchao_int8, "step": step, "teacher": teacher, "determinism": determinism}[args.what](args)
    print(f"\n`python bench/bench_kernels.py {' '.join(sys.argv[1:])}` (torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
