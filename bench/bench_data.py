"""Benchmark `tinylm data prepare`: throughput (MB/s of UTF-8 text) and peak RSS on TinyTales corpora of
growing size, against plain HF `tokenizers` encode_batch over the same documents (the floor: no reading
of documents through tinylm, no cleaning, no dedup, no split, no writing).

Runs alternate (reference, prepare, reference, prepare, ...) in fresh processes; medians are reported.
Prints one markdown table row per corpus size and the command that reproduces it.

    python bench/bench_data.py --sizes 100 500 --repeats 3 1
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

STORIES_SEED = 1
PART_MB = 250


def make_corpus(path: Path, megabytes: int) -> None:
    """TinyTales stories separated by blank lines: one 250 MB part per started 250 MB (part k drawn with
    seed STORIES_SEED + k), generated in parallel processes, concatenated. A corpus of <= 250 MB is a
    prefix of every larger one."""
    if path.exists():
        return
    n_parts = -(-megabytes // PART_MB)
    sizes = [min(PART_MB, megabytes - k * PART_MB) for k in range(n_parts)]
    parts = [path.with_suffix(f".part{k}") for k in range(n_parts)]
    with multiprocessing.Pool(min(n_parts, os.cpu_count() or 1)) as pool:
        pool.starmap(_write_stories, [(p, mb, STORIES_SEED + k) for k, (p, mb) in enumerate(zip(parts, sizes))])
    with path.with_suffix(".tmp").open("wb") as out:
        for p in parts:
            with p.open("rb") as src:
                shutil.copyfileobj(src, out)
            p.unlink()
    path.with_suffix(".tmp").rename(path)


def _write_stories(path: Path, megabytes: int, seed: int) -> None:
    from tinylm.data.tinytales import generate

    written = 0
    with path.open("w", encoding="utf-8") as f:
        for story in generate(10**9, seed):
            f.write(story + "\n\n")
            written += len(story.encode("utf-8")) + 2
            if written >= megabytes * 10**6:
                break


def make_tokenizer(corpus: Path, out: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on the first 20 MB of the corpus."""
    if (out / "tokenizer.json").exists():
        return
    head = out.parent / "tokenizer_train.txt"
    with corpus.open("rb") as src:
        head.write_bytes(src.read(20 * 10**6).rsplit(b"\n\n", 1)[0])
    subprocess.run([sys.executable, "-m", "tinylm", "tokenizer", "train", str(head), "--vocab-size",
                    str(vocab_size), "--out", str(out), "--overwrite"], check=True)


def reference(corpus: str, tokenizer: str) -> None:
    """Plain tokenizers: split on blank lines, encode_batch 1000 documents at a time, keep nothing."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(Path(tokenizer) / "tokenizer.json"))
    batch: list[str] = []
    n = 0
    with open(corpus, encoding="utf-8") as f:
        for doc in _blank_line_docs(f):
            batch.append(doc)
            if len(batch) == 1000:
                n += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
                batch = []
    n += sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
    print(n)


def _blank_line_docs(lines):
    # the same document split as tinylm.data's .txt reader, repeated so the reference process never
    # imports tinylm (its RSS and start-up are those of plain tokenizers)
    doc: list[str] = []
    for line in lines:
        if line.strip():
            doc.append(line)
        elif doc:
            yield "".join(doc)
            doc = []
    if doc:
        yield "".join(doc)


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024  # ru_maxrss is in KB on Linux


def bench(size: int, repeats: int, work: Path, tokenizer: Path) -> str:
    corpus = work / f"tales_{size}mb.txt"
    make_corpus(corpus, size)
    mb = corpus.stat().st_size / 10**6
    out = work / f"out_{size}mb"
    ref_cmd = [sys.executable, __file__, "--reference", str(corpus), str(tokenizer)]
    prep_cmd = [sys.executable, "-m", "tinylm", "data", "prepare", str(corpus), "--tokenizer", str(tokenizer),
                "--out", str(out), "--overwrite"]
    ref, prep = [], []
    for _ in range(repeats):
        ref.append(timed(ref_cmd))
        prep.append(timed(prep_cmd))
    ratios = [r[0] / p[0] for r, p in zip(ref, prep)]  # prepare throughput / encode_batch throughput
    import json

    meta = json.loads((out / "meta.json").read_text())
    docs = sum(s["documents"] for s in meta["splits"].values())
    removed = sum(meta["filters"].values())
    return (f"| {mb:.0f} MB ({docs + removed:,} docs, {removed:,} removed) | "
            f"{mb / statistics.median(p[0] for p in prep):.2f} | {mb / statistics.median(r[0] for r in ref):.2f} | "
            f"{statistics.median(ratios):.2f} | {max(p[1] for p in prep):.0f} | {max(r[1] for r in ref):.0f} | {repeats} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--reference":
        reference(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 500], help="corpus sizes in MB")
    ap.add_argument("--repeats", type=int, nargs="+", default=[3, 1], help="alternating runs per size")
    ap.add_argument("--work", default="/tmp/tinylm_bench_data")
    ap.add_argument("--vocab-size", type=int, default=4096)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    repeats = args.repeats + [args.repeats[-1]] * (len(args.sizes) - len(args.repeats))
    make_corpus(work / f"tales_{min(args.sizes)}mb.txt", min(args.sizes))
    tokenizer = work / "tokenizer"
    make_tokenizer(work / f"tales_{min(args.sizes)}mb.txt", tokenizer, args.vocab_size)
    print("| corpus | prepare MB/s | encode_batch MB/s | ratio | prepare peak RSS MB | encode_batch peak RSS MB | runs |")
    print("|---|---|---|---|---|---|---|")
    for size, n in zip(args.sizes, repeats):
        print(bench(size, n, work, tokenizer), flush=True)
    print(f"\ncommand: python bench/bench_data.py --sizes {' '.join(map(str, args.sizes))} "
          f"--repeats {' '.join(map(str, repeats))} --vocab-size {args.vocab_size}")


if __name__ == "__main__":
    main()
