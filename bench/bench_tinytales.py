"""Benchmark: TinyTales generation and validation speed, and the corpus entropy bound.

Speeds are medians over several runs pinned to one core, alternating with a reference in the same
run: a unigram sampler (`random.choices` over the vocabulary, the cheapest text generator there
is) producing the same number of bytes. The entropy bound (bits per byte) is set against lzma's
compressed size of the same corpus, another upper bound.

    python bench/bench_tinytales.py [--stories 20000] [--runs 5]
"""

from __future__ import annotations

import argparse
import lzma
import os
import random
import statistics
import sys
import time

from tinylm.data import tinytales as T


def _unigram_bytes(n_bytes: int, seed: int) -> float:
    """Seconds to sample about n_bytes of words uniformly from the vocabulary (the reference)."""
    rng, words, done = random.Random(seed), sorted(T.VOCABULARY), 0
    t0 = time.perf_counter()
    while done < n_bytes:
        done += len(" ".join(rng.choices(words, k=1000))) + 1
    return time.perf_counter() - t0


def _generate(n: int, seed: int) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    texts = list(T.generate(n, seed))
    return time.perf_counter() - t0, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stories", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    gen, ref, chk = [], [], []
    for run in range(args.runs):  # alternate generator, reference and validator
        seconds, texts = _generate(args.stories, run)
        n_bytes = sum(len(t) + len(T.SEPARATOR) for t in texts)
        gen.append(n_bytes / 1e6 / seconds)
        ref.append(n_bytes / 1e6 / _unigram_bytes(n_bytes, run))
        t0 = time.perf_counter()
        result = T.check_many(texts)
        chk.append(n_bytes / 1e6 / (time.perf_counter() - t0))
        assert result.fraction == 1.0 and result.consistent
    stats = T.corpus_stats(args.stories, seed=0)
    corpus = "".join(t + T.SEPARATOR for t in T.generate(args.stories, 0)).encode()
    lzma_bpb = 8 * len(lzma.compress(corpus, preset=9)) / len(corpus)
    g, r, c = (statistics.median(x) for x in (gen, ref, chk))
    print("| stories | MB | distinct words | bound bits/byte | lzma bits/byte | generate MB/s "
          "| unigram ref MB/s | gen/ref | check MB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {stats['stories']} | {stats['bytes'] / 1e6:.2f} | {stats['distinct_words']} "
          f"| {stats['bits_per_byte']:.4f} | {lzma_bpb:.3f} | {g:.2f} | {r:.2f} | {g / r:.2f} | {c:.2f} |")
    print(f"\ncommand: python bench/bench_tinytales.py --stories {args.stories} --runs {args.runs}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
