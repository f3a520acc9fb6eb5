"""Benchmark the core: SmolLM2-135M load time / peak RSS, and forward tokens/s, tinylm against transformers.

load:    `checkpoint.load("smollm2-135m")` (model + tokenizer from the Q4_1 GGUF) against transformers'
         `AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)` + `AutoTokenizer
         .from_pretrained(dir, gguf_file=...)`, each in a fresh process (import time, load time and peak
         RSS are per process), alternating A, B, A, B, ...; medians.
forward: one full forward (B, 256 tokens, all logits) of `tinylm.model.Llama` and of transformers'
         `LlamaForCausalLM` holding the same fp32 weights, in one process, same thread count,
         alternating; medians. Shapes: the `15m` and `smollm2-135m` presets.

Both report wall and process CPU time: on a shared machine CPU time is the steadier figure. On a busy
2-core machine two OpenMP threads stall each other, so forward runs there use `--threads 1`.
Prints markdown table rows and the command that reproduces them.

    python bench/bench_core.py --what load --runs 3
    python bench/bench_core.py --what forward --runs 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

# Child programs: each prints one JSON line {import_s, load_s, peak_rss_mb}.
_CHILD_PRELUDE = (
    "import resource, time, json, sys\n"
    "def cpu():\n    r = resource.getrusage(resource.RUSAGE_SELF)\n    return r.ru_utime + r.ru_stime\n"
    "t0, c0 = time.perf_counter(), cpu()\n"
)
_CHILD_REPORT = (
    "t2, c2 = time.perf_counter(), cpu()\n"
    "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"  # Linux: KiB
    "print(json.dumps({'import_s': t1 - t0, 'load_s': t2 - t1, 'import_cpu_s': c1 - c0, 'load_cpu_s': c2 - c1,"
    " 'peak_rss_mb': rss}))\n"
)
LOADERS = {
    "tinylm": (
        "import torch\nfrom tinylm.formats import checkpoint\nt1, c1 = time.perf_counter(), cpu()\n"
        "loaded = checkpoint.load('smollm2-135m')\nassert loaded.tokenizer is not None\n"
    ),
    "transformers": (
        "import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from pathlib import Path\npath = Path(sys.argv[1])\nt1, c1 = time.perf_counter(), cpu()\n"
        "model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)\n"
        "tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)\n"
    ),
}


def _load_once(name: str, gguf_path: str) -> dict[str, float]:
    code = _CHILD_PRELUDE + LOADERS[name] + _CHILD_REPORT
    out = subprocess.run([sys.executable, "-c", code, gguf_path], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_load(runs: int) -> None:
    """Alternate fresh-process loads; print one row per implementation and the ratio."""
    from tinylm.formats.checkpoint import resolve

    gguf_path = str(resolve("smollm2-135m"))  # resolved here so that no child pays for it
    results: dict[str, list[dict[str, float]]] = {name: [] for name in LOADERS}
    for _ in range(runs):
        for name in LOADERS:
            results[name].append(_load_once(name, gguf_path))
            print(f"  {name}: {results[name][-1]}", file=sys.stderr)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
    print("\n| SmolLM2-135M Q4_1 GGUF -> fp32 | import s | load s | import + load s | load CPU s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m['import_s']:.2f} | {m['load_s']:.2f} | {m['import_s'] + m['load_s']:.2f} "
              f"| {m['load_cpu_s']:.2f} | {m['peak_rss_mb']:.0f} |")
    t, h = med["tinylm"], med["transformers"]
    print(f"| transformers / tinylm | {h['import_s'] / t['import_s']:.2f}x | {h['load_s'] / t['load_s']:.2f}x "
          f"| {(h['import_s'] + h['load_s']) / (t['import_s'] + t['load_s']):.2f}x "
          f"| {h['load_cpu_s'] / t['load_cpu_s']:.2f}x | {h['peak_rss_mb'] / t['peak_rss_mb']:.2f}x |")


def _models(shape: str):
    """A tinylm Llama of a preset shape and transformers' LlamaForCausalLM with the same fp32 weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinylm.model.config import preset
    from tinylm.model.llama import Llama

    torch.manual_seed(0)
    ours = Llama(preset(shape)).eval()
    hf_cfg = {k: v for k, v in ours.config.to_hf().items() if k != "architectures"}
    ref = LlamaForCausalLM(LlamaConfig(**hf_cfg)).eval()
    result = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    return ours, ref


def _time_forward(model, x, hf: bool) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one forward pass."""
    import torch

    with torch.no_grad():
        t, c = time.perf_counter(), time.process_time()
        out = model(x)
        if hf:
            out = out.logits
        return time.perf_counter() - t, time.process_time() - c


def bench_forward(shapes: list[str], batches: list[int], seq_len: int, runs: int) -> None:
    """Alternate tinylm and transformers forwards on the same input; print tokens/s medians and the ratio."""
    import torch

    print(f"\n| shape | batch x tokens | tinylm tok/s | transformers tok/s | tinylm / transformers (wall) "
          f"| tinylm / transformers (CPU time) |  (torch threads: {torch.get_num_threads()})")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        ours, ref = _models(shape)
        with torch.no_grad():  # same logits, or the comparison means nothing
            x = torch.randint(0, ours.config.vocab_size, (1, 32))
            assert (ours(x) - ref(x).logits).abs().max().item() < 1e-3
        for batch in batches:
            x = torch.randint(0, ours.config.vocab_size, (batch, seq_len))
            _time_forward(ours, x, False), _time_forward(ref, x, True)  # warm-up
            times: dict[str, list[tuple[float, float]]] = {"tinylm": [], "transformers": []}
            for _ in range(runs):
                times["tinylm"].append(_time_forward(ours, x, False))
                times["transformers"].append(_time_forward(ref, x, True))
            wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
            cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
            t, h = batch * seq_len / wall["tinylm"], batch * seq_len / wall["transformers"]
            print(f"| {shape} | {batch} x {seq_len} | {t:.0f} | {h:.0f} | {t / h:.2f} "
                  f"| {cpu['transformers'] / cpu['tinylm']:.2f} |", flush=True)
        del ours, ref


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=["load", "forward", "all"], default="all")
    p.add_argument("--runs", type=int, default=3, help="runs of each implementation (medians reported)")
    p.add_argument("--shapes", nargs="+", default=["15m", "smollm2-135m"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch threads for the forward runs (default: torch's)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.what in ("load", "all"):
        bench_load(args.runs)
    if args.what in ("forward", "all"):
        bench_forward(args.shapes, args.batches, args.seq_len, args.runs)
    print(f"\ncommand: python bench/bench_core.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
