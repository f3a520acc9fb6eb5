"""Training steps with glibc's default malloc against `keep_freed_cpu_memory` (freed blocks kept for reuse).

Each round starts two fresh processes in turn, A (the training setup's mallopt calls, as tinylm makes
them) and B (glibc's defaults: the call replaced by a no-op), the order alternating round by round; each
builds the quickstart's shape (`bench_train.ours`: 1m preset, vocab 2,048, 16 x 256 tokens, compiled, run.dtype
--dtype: fp32 unless told), takes 8 warm-up steps, then times 40 and counts the system time and minor page
faults they cost (`getrusage`). Prints per-round figures, the medians and the A/B step-time ratios pair by pair.

    python bench/bench_cpu_malloc.py --rounds 7
    python bench/bench_cpu_malloc.py --rounds 5 --dtype bfloat16      # bf16 autocast, as on a CPU with bf16 units
    python bench/bench_cpu_malloc.py --quickstart W --rounds 1        # whole quickstarts instead (seed = round)
    python bench/bench_cpu_malloc.py --pretrain SHARDS --rounds 1 --set data.batch_warmup_tokens=0

With --quickstart, each process is `tinylm quickstart --out W/{keep,default}-R --seed R` (R the round) and the
figures are its report's (tokens trained, val bits per byte, valid sentences, consistent stories) and the
median tokens/s its training logged after step 300.
With --pretrain, each process is a plain `tinylm pretrain` of recipes/quickstart.yaml (its 250 steps) on SHARDS (a
quickstart's data/), with each --set KEY=VALUE as `--KEY VALUE`; the figures are its tokens and faults per step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(keep: bool, steps: int, dtype: str) -> None:
    from bench_train import make_data, ours

    import tinylm.train.loop as loop

    if not keep:  # glibc's defaults, as before: the training setup (ours -> setup) calls it on CPU
        loop.keep_freed_cpu_memory = lambda: False
    with tempfile.TemporaryDirectory() as tmp:
        run, step = ours("1m", make_data(Path(tmp) / "data", 2048), Path(tmp) / "out", 256, 16, compile_=True,
                         dtype=dtype)
        for _ in range(8):
            step()
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(steps):
            step()
        dt, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"step_ms": dt / steps * 1e3, "sys_ms": (r1.ru_stime - r0.ru_stime) / steps * 1e3,
                      "faults": (r1.ru_minflt - r0.ru_minflt) / steps, "peak_mib": r1.ru_maxrss / 1024}))


def quickstart_child(keep: bool, out: str, seed: int) -> None:
    import tinylm.train.loop as loop
    from tinylm.cli import main as tinylm
    from tinylm.train.metrics import read_metrics

    if not keep:
        loop.keep_freed_cpu_memory = lambda: False
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    assert tinylm(["quickstart", "--out", out, "--seed", str(seed)]) == 0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    rep = json.loads((Path(out) / "report.json").read_text())
    logged = [r for r in read_metrics(Path(out) / "train" / "metrics.jsonl") if "tokens_per_s" in r]
    tok_s = statistics.median(r["tokens_per_s"] for r in logged if r["step"] > 300)  # past the ramp and compiles
    print(json.dumps({"tokens": rep["train"]["tokens"], "bpb": rep["eval"]["bits_per_byte"],
                      "valid": rep["stories"]["valid_fraction"],
                      "consistent": rep["stories"]["consistent_valid_fraction"],
                      "median_tokens_per_s": round(tok_s), "sys_s": r1.ru_stime - r0.ru_stime,
                      "faults": r1.ru_minflt - r0.ru_minflt}))


def pretrain_child(keep: bool, shards: str, sets: list[str]) -> None:
    import tinylm.train.loop as loop
    from tinylm.cli import main as tinylm
    from tinylm.train.metrics import read_metrics

    if not keep:
        loop.keep_freed_cpu_memory = lambda: False
    recipe = Path(__file__).resolve().parents[1] / "tinylm" / "recipes" / "quickstart.yaml"
    overrides = [arg for kv in sets for arg in (f"--{kv.partition('=')[0]}", kv.partition("=")[2])]
    with tempfile.TemporaryDirectory() as tmp:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        assert tinylm(["pretrain", "--config", str(recipe), "--data.dir", shards, "--run.out", tmp,
                       "--run.progress", "false", *overrides]) == 0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        last = [r for r in read_metrics(Path(tmp) / "metrics.jsonl") if "tokens_per_s" in r][-1]
    faults = r1.ru_minflt - r0.ru_minflt
    print(json.dumps({"steps": last["step"], "tokens": last["tokens"], "sys_s": round(r1.ru_stime - r0.ru_stime, 2),
                      "faults_per_step": round(faults / last["step"]),
                      "faults_per_token": round(faults / last["tokens"], 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="run.dtype of the steps")
    ap.add_argument("--quickstart", metavar="W", help="whole quickstarts, written under W")
    ap.add_argument("--pretrain", metavar="SHARDS", help="plain pretrain runs of the quickstart recipe on SHARDS")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a --pretrain override")
    ap.add_argument("--child", choices=["keep", "default"], help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child and args.quickstart:
        quickstart_child(args.child == "keep", f"{args.quickstart}/{args.child}-{args.seed}", args.seed)
        return
    if args.child and args.pretrain:
        pretrain_child(args.child == "keep", args.pretrain, args.set)
        return
    if args.child:
        child(args.child == "keep", args.steps, args.dtype)
        return
    if args.quickstart:
        for r in range(args.rounds):
            for side in (("keep", "default") if r % 2 == 0 else ("default", "keep")):
                out = subprocess.run([sys.executable, __file__, "--child", side, "--quickstart", args.quickstart,
                                      "--seed", str(r)], capture_output=True, text=True, check=True).stdout
                print(f"seed {r} {side}: {out.strip().splitlines()[-1]}", flush=True)
        return
    if args.pretrain:
        sets = [arg for kv in args.set for arg in ("--set", kv)]
        for r in range(args.rounds):
            for side in (("keep", "default") if r % 2 == 0 else ("default", "keep")):
                out = subprocess.run([sys.executable, __file__, "--child", side, "--pretrain", args.pretrain, *sets],
                                     capture_output=True, text=True, check=True).stdout
                print(f"round {r} {side}: {out.strip().splitlines()[-1]}", flush=True)
        return
    runs: dict[str, list[dict]] = {"keep": [], "default": []}
    for r in range(args.rounds):
        for side in (("keep", "default") if r % 2 == 0 else ("default", "keep")):
            out = subprocess.run([sys.executable, __file__, "--child", side, "--steps", str(args.steps),
                                  "--dtype", args.dtype],
                                 capture_output=True, text=True, check=True).stdout
            runs[side].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r} {side}: {runs[side][-1]}", flush=True)
    print("\n| | ms per step | system ms per step | minor faults per step | peak MiB |\n|---|---|---|---|---|")
    for side, label in (("default", "glibc default"), ("keep", "freed blocks kept")):
        med = {k: statistics.median(x[k] for x in runs[side]) for k in runs[side][0]}
        print(f"| {label} | {med['step_ms']:.1f} | {med['sys_ms']:.1f} | {med['faults']:,.0f} "
              f"| {med['peak_mib']:.0f} |")
    ratios = sorted(a["step_ms"] / b["step_ms"] for a, b in zip(runs["keep"], runs["default"]))
    print(f"\nstep-time ratio kept/default, pair by pair: median {statistics.median(ratios):.3f} "
          f"[{ratios[0]:.3f}, {ratios[-1]:.3f}]")
    print(f"command: python bench/bench_cpu_malloc.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
