"""A 1m model pretrained on teacher-written stories vs on as many bytes of TinyTales (issue 16's benchmark).

1. `tinylm synth stories --teacher TEACHER` until the file holds --mb megabytes of accepted stories (resumed
   where an earlier run of this script stopped: the synth file is append-only);
2. the same number of bytes of TinyTales (`tinylm data tinytales`, whole stories);
3. `tinylm quickstart --data FILE --minutes M` on each text (its own tokenizer, shards, the automatic recipe
   for that data and budget: both corpora get the same treatment);
4. each model's --samples stories sampled from BOS: the TinyTales validator (valid sentences, stories with
   consistent names and pronouns) and the judge's TinyStories rubric on the same stories (`tinylm judge`).

    python bench/bench_synth_corpus.py --teacher smollm2-135m --mb 5 --minutes 10 --judge smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def tl(*words: object, log: Path) -> float:
    """`tinylm WORDS` (output to LOG); its wall-clock seconds. A failure prints the log's tail and exits."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", "tinylm", *map(str, words)], stdout=f,
                              stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"tinylm {words[0]} failed (exit {code}):\n" + "".join(log.read_text().splitlines(True)[-15:]))
    return time.perf_counter() - t0


def synth_text(args: argparse.Namespace, work: Path) -> tuple[Path, int, float]:
    """The teacher's accepted stories, whole, up to --mb MB: (text file, stories, seconds this call spent)."""
    rows_file, target, spent = work / "synth-stories.jsonl", int(args.mb * 1e6), 0.0

    def stories() -> list[str]:
        if not rows_file.exists():
            return []
        return [json.loads(line)["text"].strip() for line in rows_file.read_text().splitlines() if line.strip()]

    got = stories()
    while (size := sum(len(s.encode()) + 2 for s in got)) < target:
        mean = size / len(got) if got else 600.0
        n = len(got) + max(args.batch, math.ceil((target - size) / mean * 1.1))
        spent += tl("synth", "stories", "--teacher", args.teacher, "--n", n, "--out", rows_file, "--batch", args.batch,
                    "--max-tokens", args.max_tokens, "--seed", args.seed, "--no-progress", "--device", "cpu",
                    "--seed-words" if args.seed_words else "--no-seed-words", log=work / "synth.log")
        got = stories()
    return cut(got, target, work / "synth.txt"), len(got), spent


def cut(stories: list[str], target: int, out: Path) -> Path:
    """Whole stories, blank-line separated, until `target` bytes."""
    kept, size = [], 0
    for s in stories:
        if size >= target:
            break
        kept.append(s)
        size += len(s.encode()) + 2
    out.write_text("\n\n".join(kept) + "\n")
    return out


def tinytales_text(target: int, work: Path) -> Path:
    full = work / "tinytales-all.txt"
    tl("data", "tinytales", "--stories", max(1000, target // 300), "--seed", 0, "--out", full, "--overwrite",
       log=work / "tinytales.log")
    return cut([s.strip() for s in full.read_text().split("\n\n") if s.strip()], target, work / "tinytales.txt")


def score(args: argparse.Namespace, work: Path, name: str) -> dict[str, float]:
    """The final model's stories from BOS: validator figures and the judge's grades."""
    import torch

    from tinylm.data.tinytales import SEPARATOR
    from tinylm.evals.tinytales import sample_tinytales
    from tinylm.formats import checkpoint
    from tinylm.infer.generate import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    final = checkpoint.load(work / f"run-{name}" / "train" / "final")
    checked = sample_tinytales(final.model, final.tokenizer, args.samples, seed=args.seed)
    texts = generate(final.model, final.tokenizer, "", max_new_tokens=256, temperature=0.8, seed=args.seed,
                     stop=[SEPARATOR], n=args.samples, add_bos=final.tokenizer.bos_id is not None)
    samples = work / f"samples-{name}.jsonl"
    # the prompt the judge's calibration uses for a story (evals.judge.calibrate)
    samples.write_text("".join(json.dumps({"prompt": "Write a short story for young children.",
                                           "completion": t.strip()}) + "\n" for t in texts))
    report = work / f"judge-{name}.json"
    tl("judge", samples, "--rubric", "tinystories", "--judge", args.judge, "--json", "--device", "cpu",
       "--out", work / f"judged-{name}.jsonl", "--overwrite", log=report)
    text = report.read_text()
    graded = json.loads(text[text.index("\n{\n") + 1:] if not text.startswith("{") else text)  # the JSON summary
    return {"valid": checked["valid_fraction"], "consistent": checked["consistent_valid_fraction"],
            **{k: graded[k] for k in ("grammar", "creativity", "consistency", "plot", "overall") if k in graded}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="smollm2-135m", help="the story writer (model source or URL)")
    p.add_argument("--judge", default="smollm2-135m", help="the judge (model source or URL)")
    p.add_argument("--mb", type=float, default=5.0, help="megabytes of text of each corpus")
    p.add_argument("--minutes", type=float, default=10.0, help="`tinylm quickstart --minutes` of each model")
    p.add_argument("--work", default="bench-work/synth-corpus")
    p.add_argument("--batch", type=int, default=16, help="stories the teacher writes together")
    p.add_argument("--max-tokens", type=int, default=320, help="the longest story")
    p.add_argument("--seed-words", action="store_true",
                   help="keep only stories that use all three seed words (SmolLM2-135M: 0 of 16 in a trial)")
    p.add_argument("--samples", type=int, default=20, help="stories sampled from each trained model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the scoring (default: torch's)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    synth_file, rows, synth_s = synth_text(args, work)
    texts = {"teacher-written": synth_file, "TinyTales": tinytales_text(synth_file.stat().st_size, work)}
    lines = [f"teacher {args.teacher}: {rows} accepted stories in the synth file ({synth_s:.0f} s of synth in this "
             f"call); each corpus {synth_file.stat().st_size / 1e6:.2f} MB", "",
             "| corpus | valid sentences | consistent stories (parsed) | grammar | creativity | consistency | plot "
             "| overall |", "|---|---|---|---|---|---|---|---|"]
    for name, text in texts.items():
        if not (work / f"run-{name}" / "train" / "final").is_dir():  # a model trained by an earlier call is kept
            tl("quickstart", "--data", text, "--out", work / f"run-{name}", "--minutes", args.minutes, "--overwrite",
               "--seed", args.seed, log=work / f"quickstart-{name}.log")
        s = score(args, work, name)
        lines.append(f"| {name} | {s['valid']:.1%} | {s['consistent']:.0%} | "
                     + " | ".join(f"{s.get(k, float('nan')):.2f}" for k in ("grammar", "creativity", "consistency",
                                                                                "plot", "overall")) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines.append(f"\n    python bench/bench_synth_corpus.py {' '.join(sys.argv[1:])}")
    print("\n".join(lines))
    with open(work / "results.txt", "a") as f:
        f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
