"""Benchmark distillation from SmolLM2-135M on a CPU: online vs cached tokens/s, and quality at equal tokens.

Setup (once, under --work): a TinyTales corpus, the SmolLM2 tokenizer trimmed to --keep tokens
(`tinylm.data.trim_tokenizer_on`), and a data dir prepared with it.

- speed: for each student (5m, 15m), runs of --steps optimizer steps alternate online (teacher forward
  on every micro-batch) and cached (top-64 fp16 cache of the same windows, no teacher in memory), --repeats
  times each; the tokens/s of each run is the median of its per-step figures after the first (warm-up).
  The cache's one-off teacher pass is reported separately (teacher tokens/s, bytes/token).
- quality: the 15m student trained for --quality-steps steps by cross-entropy alone vs distilled from
  SmolLM2-135M (the recipe's loss: 0.9 top-64 forward KL + 0.1 CE, from a cache of the same windows):
  val loss on the held-out split after the same number of tokens.
- prune (needs tinylm/prune.py): SmolLM2-135M pruned to ~45M (vocabulary trimmed to the same tokens),
  distilled for --prune-steps steps, vs the same shape from scratch (CE) for --scratch-steps steps: the
  val loss curves, and how many times more tokens scratch needs to reach the distilled model's val loss
  (a lower bound when it never does within its budget).

Each part prints markdown table rows and the command that reproduces them.

    python bench/bench_distill.py --part speed quality prune
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from tinylm.core.recipe import load_config
from tinylm.stages.distill import DistillConfig, build_cache, distill
from tinylm.train.metrics import read_metrics

TEACHER = "smollm2-135m"
LOSSES = [{"kind": "fkl", "weight": 0.9, "top_k": 64}, {"kind": "ce", "weight": 0.1}]


def pydoc_documents(chars: int = 2000) -> list[str]:
    """CPython's own reference documentation (`pydoc_data.topics`, ~465 kB of English prose that ships
    with every Python), cut at paragraph boundaries into documents of about `chars` characters."""
    import pydoc_data.topics

    docs: list[str] = []
    for _, text in sorted(pydoc_data.topics.topics.items()):
        current = ""
        for para in text.split("\n\n"):
            current = f"{current}\n\n{para}" if current else para
            if len(current) >= chars:
                docs.append(current)
                current = ""
        if current.strip():
            docs.append(current)
    return docs


def prepare(work: Path, stories: int, keep: int, corpus: str = "tinytales") -> Path:
    """Corpus -> SmolLM2 tokenizer trimmed to `keep` tokens -> data dir (each step skipped if done).

    corpus: "tinytales" (`stories` generated stories) or "pydoc" (`pydoc_documents`: real English, where
    the teacher knows more than a small student can learn from the data, unlike TinyTales, whose
    procedural grammar a student learns below the teacher's loss).
    """
    from tinylm.data import tinytales
    from tinylm.data.prepare import PrepareConfig
    from tinylm.data.prepare import prepare as prepare_data
    from tinylm.data.vocab import trim_tokenizer_on

    work.mkdir(parents=True, exist_ok=True)
    text = work / ("tinytales.txt" if corpus == "tinytales" else "pydoc.jsonl")
    tok, data = work / f"smollm2-{keep}", work / f"data-{keep}"
    if not text.exists():
        if corpus == "tinytales":
            tinytales.write_corpus(text, stories, seed=0)
        else:
            text.write_text("".join(json.dumps({"text": d}) + "\n" for d in pydoc_documents()))
    if not tok.exists():
        trim_tokenizer_on(TEACHER, [str(text)], keep, tok)
    if not data.exists():
        prepare_data(PrepareConfig(inputs=[str(text)], tokenizer=str(tok), out=str(data),
                                   val_fraction=0.02 if corpus == "tinytales" else 0.05))
    return data


def config(data: Path, out: Path, preset: str, steps: int, seq_len: int, batch_tokens: int, **extra: object):
    args = {"data.dir": str(data), "model.preset": preset, "data.seq_len": seq_len, "data.batch_tokens": batch_tokens,
            "data.micro_batch": batch_tokens // seq_len, "schedule.steps": steps, "schedule.warmup_steps": 1,
            "run.out": str(out), "run.eval_every": 0, "run.eval_tokens": 256, "run.ckpt_every": 0,
            "run.log_every": 1, "run.compile": False, "run.progress": False, "run.plot": False, "run.device": "cpu",
            "run.peak_flops": 1e11, "distill.losses": LOSSES, **extra}
    return load_config(DistillConfig, None, args)


def step_rate(out: Path) -> float:
    """Median tokens/s of the steps after the first."""
    recs = [r for r in read_metrics(out / "metrics.jsonl") if "tokens_per_s" in r]
    return statistics.median(r["tokens_per_s"] for r in recs[1:])


SEQ, BATCH = 128, 1024  # tokens per row and per optimizer step of every run here (8 rows)


def shared_cache(data: Path, work: Path, steps: int) -> tuple[Path, dict]:
    """One top-64 fp16 cache of the first `steps` batches; every run here reads its windows (same plan)."""
    cache = work / f"cache-{steps}"
    if not cache.exists():
        build_cache(config(data, work / "x", "15m", steps, SEQ, BATCH, **{"distill.teacher": TEACHER}), 64, cache)
    return cache, json.loads((cache / "meta.json").read_text())


def speed(data: Path, work: Path, cache: Path, meta: dict, steps: int, repeats: int) -> None:
    print("| student | params | online tok/s | cached tok/s | cached / online | cache: teacher tok/s, bytes/token |")
    print("|---|---|---|---|---|---|")
    for preset in ("5m", "15m"):
        online, cached = [], []
        for _ in range(repeats):  # alternate, so both see the same load on this shared machine
            for kind, rates in (("online", online), ("cached", cached)):
                out = work / f"speed-{preset}-{kind}"
                shutil.rmtree(out, ignore_errors=True)
                extra = {"distill.teacher": TEACHER} if kind == "online" else {"distill.cache": str(cache)}
                distill(config(data, out, preset, steps, SEQ, BATCH, **extra))
                rates.append(step_rate(out))
        params = json.loads((work / f"speed-{preset}-cached" / "final" / "config.json").read_text())
        from tinylm.model.config import ModelConfig

        n = ModelConfig.from_hf(params).param_count()
        on, ca = statistics.median(online), statistics.median(cached)
        print(f"| {preset} | {n / 1e6:.1f}M | {on:,.0f} | {ca:,.0f} | {ca / on:.1f}x | "
              f"{meta['teacher_tokens_per_s']:,.0f}, {meta['bytes_per_token']:.0f} |", flush=True)
    print(f"\n    python bench/bench_distill.py --part speed --steps {steps} --repeats {repeats} "
          f"--quality-steps {meta['steps']}\n")


def val_curve(out: Path) -> list[tuple[int, float]]:
    return [(r["tokens"] if "tokens" in r else r["step"], r["val_loss"]) for r in read_metrics(out / "metrics.jsonl")
            if r.get("val_loss") is not None]


def quality(data: Path, work: Path, cache: Path, steps: int) -> None:
    seq, bt = SEQ, BATCH
    common = {"run.eval_every": max(1, steps // 4), "run.eval_tokens": 16384, "optim.lr": 3e-3}
    runs = {"cross-entropy only": {"distill.losses": [{"kind": "ce"}]},
            "distilled (0.9 fkl top-64 + 0.1 ce)": {"distill.cache": str(cache)}}
    print("| 15m student, equal tokens | tokens | val loss (nats/token) |")
    print("|---|---|---|")
    for name, extra in runs.items():
        out = work / f"quality-{name.split()[0]}"
        shutil.rmtree(out, ignore_errors=True)
        distill(config(data, out, "15m", steps, seq, bt, **common, **extra))
        curve = val_curve(out)
        print(f"| {name} | {curve[-1][0]:,} | {curve[-1][1]:.3f} (curve: "
              f"{', '.join(f'{v:.2f}' for _, v in curve)}) |", flush=True)
    print(f"\n    python bench/bench_distill.py --part quality --quality-steps {steps}\n")


def prune_part(data: Path, work: Path, cache: Path, keep: int, distill_steps: int, scratch_steps: int) -> None:
    from tinylm.formats.checkpoint import load, save
    from tinylm.stages.prune import PruneConfig, prune

    pruned = work / "smollm2-pruned-45m"
    if not pruned.exists():
        prune(PruneConfig(source=TEACHER, calib=str(data), out=str(pruned), target_params=45_000_000,
                          token_map=str(work / f"smollm2-{keep}"), calib_batches=2, batch_size=4, seq_len=128))
    shape = load(pruned).config
    seq, bt = SEQ, BATCH
    common = {"run.eval_every": max(1, distill_steps // 2), "run.eval_tokens": 8192, "optim.lr": 1e-3}
    d_out, s_out = work / "prune-distilled", work / "prune-scratch"
    if not (d_out / "final").exists():
        shutil.rmtree(d_out, ignore_errors=True)
        distill(config(data, d_out, "15m", distill_steps, seq, bt,
                       **{**common, "distill.cache": str(cache), "model.init": str(pruned)}))
    shutil.rmtree(s_out, ignore_errors=True)
    scratch_init = work / "pruned-shape-random-init"
    if not scratch_init.exists():  # the pruned shape (head_dim 64 with dim 288: no preset expresses it), re-initialised
        loaded = load(pruned)
        torch.manual_seed(0)
        loaded.model.init_weights()
        save(loaded.model, scratch_init, loaded.tokenizer)
    distill(config(data, s_out, "15m", scratch_steps, seq, bt,
                   **{**common, "model.init": str(scratch_init), "distill.losses": [{"kind": "ce"}],
                      "run.eval_every": max(1, scratch_steps // 4), "optim.lr": 3e-3}))
    target = val_curve(d_out)[-1]
    scratch = val_curve(s_out)
    reach = next((t for t, v in scratch if v <= target[1]), None)
    ratio = f"{reach / target[0]:.1f}x" if reach else f"> {scratch[-1][0] / target[0]:.1f}x (not reached)"
    print(f"| pruned {shape.param_count() / 1e6:.1f}M + distilled | {target[0]:,} tokens | val {target[1]:.3f} | "
          f"scratch: {', '.join(f'{t:,}: {v:.2f}' for t, v in scratch)} | {ratio} |")
    print(f"\n    python bench/bench_distill.py --part prune --prune-steps {distill_steps} "
          f"--scratch-steps {scratch_steps}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", nargs="+", default=["speed", "quality"], choices=["speed", "quality", "prune"])
    ap.add_argument("--work", default="/tmp/tinylm-bench-distill")
    ap.add_argument("--corpus", choices=["tinytales", "pydoc"], default="tinytales")
    ap.add_argument("--stories", type=int, default=6000)
    ap.add_argument("--keep", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quality-steps", type=int, default=24)
    ap.add_argument("--prune-steps", type=int, default=10)
    ap.add_argument("--scratch-steps", type=int, default=40)
    a = ap.parse_args()
    torch.manual_seed(0)
    work = Path(a.work)
    t0 = time.time()
    data = prepare(work, a.stories, a.keep, a.corpus)
    print(f"setup {time.time() - t0:.0f}s; torch threads {torch.get_num_threads()}", file=sys.stderr)
    cache, meta = shared_cache(data, work, a.quality_steps)
    print(f"cache: {meta['teacher_tokens_per_s']:,.0f} teacher tokens/s, {meta['bytes_per_token']:.0f} bytes/token",
          file=sys.stderr)
    if "speed" in a.part:
        speed(data, work, cache, meta, a.steps, a.repeats)
    if "quality" in a.part:
        quality(data, work, cache, a.quality_steps)
    if "prune" in a.part:
        prune_part(data, work, cache, a.keep, a.prune_steps, a.scratch_steps)
    print(f"(this run: python bench/bench_distill.py {' '.join(sys.argv[1:])}; "
          f"torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
