"""Inference engine throughput: generated tokens/s with 1, 4, 16 concurrent requests, the engine (continuous
batching over the paged KV pool) against the same requests decoded one after another by `generate_ids`.

    python bench/bench_engine.py --models 15m smollm2-135m --concurrency 1 4 16 --new 32 --runs 2 --threads 1

Every request has its own random prompt (16-48 ids, no shared prefix) and decodes exactly `--new` tokens
greedily (no stop ids). Within a round the engine and the sequential decode alternate, so a shared machine's
load hits both alike; the table gives medians over `--runs` rounds and the median of the per-round ratios.
A preset name is a random model of that shape (fp32); smollm2-135m is the real model, dequantised to fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm.formats import checkpoint
from tinylm.infer.engine import Engine, EngineConfig, Request
from tinylm.infer.generate import generate_ids
from tinylm.model.config import preset
from tinylm.model.llama import Llama


def _model(name: str) -> Llama:
    if name == "smollm2-135m":
        return checkpoint.load(name).model.eval()
    torch.manual_seed(0)
    return Llama(preset(name)).eval()


def _prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 49, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for length in lengths]


def _engine(model: Llama, prompts: list[list[int]], new: int) -> float:
    engine = Engine(model, cfg=EngineConfig(max_batch=len(prompts), kv_tokens=len(prompts) * (48 + new + 16)))
    t = time.perf_counter()
    done = engine.run([Request(p, new, stop_ids=[]) for p in prompts])
    assert all(len(c.token_ids) == new for c in done)
    return len(prompts) * new / (time.perf_counter() - t)


def _sequential(model: Llama, prompts: list[list[int]], new: int) -> float:
    t = time.perf_counter()
    for p in prompts:
        generate_ids(model, p, new, temperature=0.0)
    return len(prompts) * new / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["15m", "smollm2-135m"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--new", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--runs", type=int, default=2, help="alternated rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | concurrent | engine tok/s | sequential tok/s | engine / sequential |")
    print("|---|---|---|---|---|")
    for name in args.models:
        model = _model(name)
        with torch.no_grad():
            _engine(model, _prompts(model.config.vocab_size, 2, 99), 4)  # warm-up outside the timed rounds
        for n in args.concurrency:
            prompts = _prompts(model.config.vocab_size, n, n)
            eng, seq = [], []
            for _ in range(args.runs):
                eng.append(_engine(model, prompts, args.new))
                seq.append(_sequential(model, prompts, args.new))
            ratio = statistics.median(e / s for e, s in zip(eng, seq))
            print(f"| {name} | {n} | {statistics.median(eng):.0f} | {statistics.median(seq):.0f} | {ratio:.2f} |",
                  flush=True)
    print(f"\n`python bench/bench_engine.py --models {' '.join(args.models)} --concurrency "
          f"{' '.join(map(str, args.concurrency))} --new {args.new} --runs {args.runs} --threads {args.threads}`")


if __name__ == "__main__":
    main()
