"""DPO step cost on SmolLM2-135M-Instruct: tinylm's cached reference log-probs vs recomputing them each step.

`tinylm dpo` computes the reference's summed response log-probs once, before training (`stages.dpo`,
`reference_logps`), and holds no reference model. The "recompute" side is TRL's way (DPOTrainer without
`precompute_ref_log_probs`): a reference forward under no_grad on every batch, from a second, frozen copy of
the starting model for full fine-tuning, from the policy with its adapters switched off for LoRA (what
TRL does with a PEFT model). Both sides are the same `tinylm dpo` process with the same data, settings
and steps; the recompute side wraps the stage's loss step (`stages.dpo.preference_loss`) so that it
first overwrites the batch's reference log-probs with a fresh reference forward (inside the timed step),
and skips the stage's up-front pass (its result would be overwritten). The loss curves of the two sides
must then agree, which the script checks.

Each run is its own process, the two sides alternated (order swapped every pair). Per step: the logged
tokens_per_s of `train.loop.fit` (first step left out as warmup, median of the rest). Peak RSS: the
child's `ru_maxrss` (`os.wait4`). The cached side also reports the one-off reference pass over all pairs.

    # needs no TRL: the recompute side is written here with tinylm's public functions
    python bench/bench_dpo_ref.py --pairs 2 --steps 4 --methods lora,full --n 64 --work /path/to/scratch
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
SEQ_LEN, ROWS, LR, R, ALPHA = 256, 2, 1e-4, 16, 32.0  # the longest of the 64 rendered sequences has 226 tokens


def tinylm_args(method: str, work: Path, steps: int, out: Path) -> list[str]:
    peft = [] if method == "full" else ["--peft.method", "lora", "--peft.r", str(R), "--peft.alpha", str(ALPHA)]
    return ["dpo", MODEL, "--data", str(work / "pairs.jsonl"), "--out", str(out), "--data.seq_len", str(SEQ_LEN),
            "--data.batch_tokens", str(SEQ_LEN * ROWS), "--data.micro_batch", str(ROWS), "--schedule.steps",
            str(steps), "--schedule.kind", "constant", "--schedule.warmup_steps", "1", "--optim.lr", str(LR),
            "--optim.width_scaling", "false", "--optim.weight_decay", "0", "--run.dtype", "float32",
            "--run.compile", "false", "--run.eval_every", "0", "--run.ckpt_every", "0", "--run.log_every", "1",
            "--run.progress", "false", "--run.plot", "false", *peft]


# ----- the child: `tinylm dpo`, as is (cached) or with the reference recomputed every step ---------------------

@contextlib.contextmanager
def adapters_off(model: Any) -> Iterator[None]:
    """The base model's forward: every LoraLinear returns its base layer's output (as PEFT's disable_adapter)."""
    from tinylm.model.lora import lora_layers

    layers = [m for m in lora_layers(model).values() if not m.merged]
    for m in layers:
        m.merged = True  # LoraLinear.forward skips the adapter of a merged layer
    try:
        yield
    finally:
        for m in layers:
            m.merged = False


def recompute_reference(dpo_mod: Any) -> None:
    """Patch the stage: no up-front reference pass; the loss step recomputes the batch's reference log-probs."""
    import torch

    from tinylm.model.lora import lora_layers
    from tinylm.train.preference import response_logps

    original = dpo_mod.preference_loss
    dpo_mod.reference_logps = lambda model, pairs, micro, device="cpu": torch.zeros(pairs.n, 2)

    def preference_loss(*args: Any, **kw: Any) -> Any:
        inner, held = original(*args, **kw), {}

        def loss_fn(model: Any, batch: Any) -> Any:
            if not lora_layers(model) and "ref" not in held:  # full fine-tuning: a frozen copy of the start
                held["ref"] = copy.deepcopy(model).requires_grad_(False).eval()
            ref = held.get("ref", model)
            tokens = torch.cat([batch.tokens, batch.extras["rejected"]])  # (2B, T + 1)
            mask = torch.cat([batch.mask, batch.extras["rejected_mask"]])
            with torch.no_grad(), adapters_off(ref) if ref is model else contextlib.nullcontext():
                logps, _ = response_logps(ref, tokens, mask)  # (2B,)
            n = len(batch.tokens)
            batch.extras.update(ref_chosen=logps[:n], ref_rejected=logps[n:])
            return inner(model, batch)

        return loss_fn

    dpo_mod.preference_loss = preference_loss


def child(mode: str, argv: list[str], out: Path) -> None:
    import tinylm.stages.dpo as dpo_mod
    from tinylm.cli import main as cli_main

    if mode == "recompute":
        recompute_reference(dpo_mod)
    else:  # time the one-off reference pass
        original = dpo_mod.reference_logps

        def timed(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            ref = original(*args, **kw)
            (out.parent / f"{out.name}.ref_s").write_text(str(time.perf_counter() - t0))
            return ref

        dpo_mod.reference_logps = timed
    sys.exit(cli_main(argv))


# ----- the parent -----------------------------------------------------------------------------------------

def run_child(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Run one child to the end; (wall seconds, its peak RSS in bytes). Raises on failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024  # Linux reports KiB


def steps_of(out: Path) -> tuple[list[float], list[float]]:
    """(per-step seconds, per-step loss) from OUT/metrics.jsonl."""
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"tokens_per_s"' in line]
    return [SEQ_LEN * ROWS / r["tokens_per_s"] for r in rows], [r["loss"] for r in rows]


def summarise(results: dict[str, dict[str, list[dict]]]) -> str:
    """Markdown: per method, s/step, peak RSS and the one-off pass of each side, the per-pair ratio, the losses."""
    lines = []
    for method, sides in results.items():
        s = {k: [statistics.median(r["step_s"][1:]) for r in runs] for k, runs in sides.items()}
        ratios = [b / a for a, b in zip(s["cached"], s["recompute"])]
        lines += [f"### {method}", "", "| reference | s/step (median of runs) | runs | peak RSS | one-off reference pass s |",
                  "|---|---|---|---|---|"]
        for k in ("cached", "recompute"):
            ref = [r["ref_s"] for r in sides[k] if r.get("ref_s") is not None]
            once = f"{statistics.median(ref):.1f}" if ref else "none"
            lines.append(f"| {k} | {statistics.median(s[k]):.2f} | {', '.join(f'{x:.2f}' for x in s[k])} | "
                         f"{statistics.median(r['rss'] for r in sides[k]) / 1e9:.2f} GB | {once} |")
        lc, lr = sides["cached"][0]["loss"], sides["recompute"][0]["loss"]
        lines += ["", f"recompute / cached s/step per pair: {', '.join(f'{x:.2f}' for x in ratios)}; median "
                      f"{statistics.median(ratios):.2f}; losses cached {[round(x, 5) for x in lc]}, recompute "
                      f"{[round(x, 5) for x in lr]}, max |difference| {max(abs(a - b) for a, b in zip(lc, lr)):.1e}", ""]
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []  # a child's `tinylm dpo` arguments
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--pairs", type=int, default=2, help="cached / recompute pairs of runs per method")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=64, help="preference pairs written to WORK/pairs.jsonl if it is absent")
    p.add_argument("--work", type=Path, default=Path("bench-dpo-ref"))
    p.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.role != "parent":
        return child(a.role, rest, a.out)
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads), "PYTHONPATH": str(ROOT)}
    if not (work / "pairs.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "tinylm", "data", "task", "tinytales-instruct", "--pairs", "--n", str(a.n),
                        "--out", str(work / "pairs.jsonl")], check=True, env=env, stdout=subprocess.DEVNULL)
    results: dict[str, dict[str, list[dict]]] = {}
    for method in a.methods.split(","):
        results[method] = {"cached": [], "recompute": []}
        for i in range(a.pairs):
            for side in ("recompute", "cached") if i % 2 == 0 else ("cached", "recompute"):
                out = work / f"{method}-{side}-{i}"
                subprocess.run(["rm", "-rf", str(out), f"{out}.ref_s"], check=True)
                cmd = [sys.executable, __file__, "--role", side, "--out", str(out), "--threads", str(a.threads),
                       "--", *tinylm_args(method, work, a.steps, out)]
                wall, rss = run_child(cmd, env)
                step_s, loss = steps_of(out)
                ref_file = Path(f"{out}.ref_s")
                ref_s = float(ref_file.read_text()) if ref_file.is_file() else None
                results[method][side].append(dict(step_s=step_s, loss=loss, rss=rss, wall=wall, ref_s=ref_s))
                print(f"{method} {side} pair {i + 1}: {statistics.median(step_s[1:]):.2f} s/step, peak RSS "
                      f"{rss / 1e9:.2f} GB, wall {wall:.1f} s, reference pass {ref_s} s, losses "
                      f"{[round(x, 5) for x in loss]}", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(summarise(results))


if __name__ == "__main__":
    main()
