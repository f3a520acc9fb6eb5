"""`tinylm synth stories|instructions|rationales|pairs --teacher SOURCE_or_URL --n N --out FILE.jsonl`.

A teacher (a local model through the engine, or an OpenAI-compatible URL) writes rows; rows that fail the checks
of `data.synth` are counted by reason and dropped; the others are appended to FILE.jsonl, one JSON object a
line, keyed by the hash of their content ("id"). Every row keeps its prompt, seeds and features, and carries
"messages" (read by `tinylm sft`), "text" (read by `tinylm data prepare`), and for pairs "prompt" / "chosen" /
"rejected" (read by `tinylm dpo`).

Resuming: rows are made in chunks of --batch consecutive indices; row `index`'s prompt and sampling seed depend
only on (--seed, index), and a chunk is always asked together, so a chunk asked again gives the same answers.
Accepted rows are appended in index order and flushed after every chunk. Running the same command again after
a kill -9 drops a partial last line, reads the rows there (their ids and their texts, back into the
near-duplicate index), asks the last written row's chunk again and skips rows already written: the file ends
equal to an uninterrupted run's, with no duplicate and no lost row. With --rejects FILE.jsonl every rejected row
is kept too, with its reason, once per row index (written before its chunk's accepted rows), so the counts by
reason add up over every run of the command.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm.core.devices import resolve_device
from tinylm.core.errors import TinylmError
from tinylm.core.fs import check_out
from tinylm.core.recipe import Count, Fraction, Interval, NonNegative, Seed, one_of
from tinylm.data import synth as S
from tinylm.data.dedup import NearDedup
from tinylm.evals.judge import Judge
from tinylm.infer.teacher import Ask
from tinylm.serve.client import open_teacher


@dataclass
class SynthConfig:
    """What `tinylm synth` asks its teacher for, and the checks its answers must pass."""

    kind: one_of(*S.KINDS)  # stories, instructions, rationales or pairs (two stories per prompt, ranked, for dpo)
    teacher: str  # a checkpoint dir, HF dir, .gguf or alias (smollm2-135m), or an OpenAI-compatible URL .../v1
    out: str  # the JSONL file rows are appended to; the same command again resumes it
    n: Count = 100  # rows to write (accepted rows)
    seed: Seed = 0  # prompts and sampling seeds (row i's depend only on the seed and i)
    batch: Count = 16  # rows asked together (engine batch or requests in flight); a resumed run needs the same
    max_tokens: Count = 384  # the most tokens of one answer
    temperature: NonNegative = 0.8  # the teacher's sampling temperature (0: greedy)
    min_words: Interval = 5  # reject answers shorter than this many words
    max_words: Count = 1000  # reject answers longer than this many words
    min_simple: Fraction = 0.75  # stories and pairs: reject a story with a smaller share of simple words
    seed_words: bool = True  # stories and pairs: reject a story without its seed words (any inflection)
    dedup: Fraction = 0.8  # reject a row this similar (MinHash Jaccard) to an accepted one; 1 keeps near-duplicates
    rank: one_of("checker", "judge") = "checker"  # pairs: rank the two stories by the checks or by --judge (both orders)
    judge: str | None = None  # pairs with --rank judge: the judge (model source or URL; none: the teacher)
    attempts: Count | None = None  # stop after this many rows were asked for, accepted or not (none: 20 x --n)
    # also append every rejected row here, with its "reason" (resumed like --out; the summary then counts all runs')
    rejects: str | None = None
    teacher_model: str | None = None  # a URL teacher's model id (none: $TINYLM_TEACHER_MODEL, else its only one)
    teacher_key_env: str = "OPENAI_API_KEY"  # environment variable holding a URL teacher's API key
    judge_model: str | None = None  # a URL judge's model id (none: $TINYLM_JUDGE_MODEL, else its only one)
    judge_key_env: str = "OPENAI_API_KEY"  # environment variable holding a URL judge's API key
    device: str = "auto"  # a local teacher's device: auto, cpu or cuda
    overwrite: bool = False  # start FILE again instead of resuming it
    progress: bool = True  # a progress bar on stderr (rows/s and the acceptance rate)


@dataclass
class Existing:
    """The rows already in the output file."""

    ids: dict[str, int]  # id -> the row's index
    texts: list[str]  # their dedup texts, in file order
    last_index: int  # the highest row index written (-1: none)


def read_existing(path: Path, cfg: SynthConfig) -> Existing:
    """The rows of a file being resumed, after cutting a partial last line (a kill -9 during a write).

    Args:
        path: the output file.
        cfg: the run's config (its rows must be of the same kind and seed).
    """
    found = Existing({}, [], -1)
    for row in _rows(path, cfg, "id", "--out"):
        index = int(row["index"])
        found.ids[row["id"]] = index
        found.texts.append(_dedup_text(row))
        found.last_index = max(found.last_index, index)
    return found


def _rows(path: Path, cfg: SynthConfig, key: str, flag: str) -> list[dict[str, Any]]:
    """The whole rows of a synth file (a partial last line, from a kill -9 during a write, is cut off), each
    checked to be of this run's kind and seed and to hold `key`."""
    data = path.read_bytes()
    whole = data[:data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    rows = []
    for lineno, line in enumerate(whole.decode("utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("index"), int) or key not in row:
            raise TinylmError(f"{path}:{lineno} is not a `tinylm synth` row; {flag} another file or --overwrite")
        if (row.get("kind"), row.get("seed")) != (cfg.kind, cfg.seed):
            raise TinylmError(f"{path} holds {row.get('kind')} rows of --seed {row.get('seed')}, not {cfg.kind} of "
                              f"--seed {cfg.seed}; {flag} another file or --overwrite")
        rows.append(row)
    return rows


def _dedup_text(row: dict[str, Any]) -> str:
    """What near-duplicates are judged on: the new task for instructions, else the answer."""
    return row.get("instruction") or row["text"]


# ----- asking the teacher --------------------------------------------------------------------------------------

def _asks(cfg: SynthConfig, items: list[dict[str, Any]], indices: range, sample: int = 0) -> list[Ask]:
    seeds = [(cfg.seed * 1_000_003 + i) * 2 + sample for i in indices]  # one sampling seed per row and sample
    return [Ask([{"role": "user", "content": it["prompt"]}], cfg.max_tokens, cfg.temperature, s % 2**63)
            for it, s in zip(items, seeds)]


def make_rows(cfg: SynthConfig, teacher: Any, indices: range) -> list[tuple[int, dict[str, Any], str, Any]]:
    """The teacher's answers for rows `indices`: (index, prompt item, answer text, extra) per row; extra is
    the new task (instructions) or the second story (pairs).

    Args:
        cfg: the run's config.
        teacher: the teacher.
        indices: the chunk's row indices.
    """
    items = [S.PROMPTS[cfg.kind](S.row_rng(cfg.seed, i)) for i in indices]
    texts = teacher.answer(_asks(cfg, items, indices))
    if cfg.kind == "instructions":  # the new task, then the teacher's answer to it
        tasks = [t.strip() for t in texts]
        questions = [dict(it, prompt=t or "(empty)") for it, t in zip(items, tasks)]
        texts = teacher.answer(_asks(cfg, questions, indices, 1))
        return [(i, it, t, task) for i, it, t, task in zip(indices, items, texts, tasks)]
    if cfg.kind == "pairs":
        seconds = teacher.answer(_asks(cfg, items, indices, 1))
        return [(i, it, a, b) for i, it, a, b in zip(indices, items, texts, seconds)]
    return [(i, it, t, None) for i, it, t in zip(indices, items, texts)]


def build_row(cfg: SynthConfig, name: str, index: int, item: dict[str, Any], text: str, extra: Any,
              ranking: dict[str, Any] | None) -> dict[str, Any]:
    """One output row (every kind keeps its prompt, seeds and features)."""
    text = text.strip()
    row: dict[str, Any] = {"kind": cfg.kind, "seed": cfg.seed, "index": index, "teacher": name,
                           "seeds": item["seeds"], "features": item["features"]}
    if cfg.kind == "pairs":
        chosen, rejected = (text, extra.strip()) if ranking["winner"] == "first" else (extra.strip(), text)
        row.update(prompt=[{"role": "user", "content": item["prompt"]}], chosen=chosen, rejected=rejected,
                   ranking=ranking, text=chosen)
        row["id"] = S.content_id(cfg.kind, item["prompt"], chosen + "\x00" + rejected)
        return row
    question = extra if cfg.kind == "instructions" else item["prompt"]
    row.update(prompt=item["prompt"], text=text,
               messages=[{"role": "user", "content": question}, {"role": "assistant", "content": text}])
    if cfg.kind == "instructions":
        row["instruction"] = extra
    if cfg.kind == "rationales":
        row.update(question=item["seeds"]["question"], answer=S.final_answer(text))
    row["id"] = S.content_id(cfg.kind, question, text)
    return row


def _rank(cfg: SynthConfig, judge: Judge | None, rows: list[tuple[int, dict[str, Any], str, Any]]) -> list[Any]:
    """Per pair {"by", "winner": "first" | "second" | "tie", ...}: the checks' points, or the judge's verdicts
    in both orders."""
    if judge is None:
        out = []
        for _, item, a, b in rows:
            pa, pb = S.checker_points(item, a), S.checker_points(item, b)
            out.append({"by": "checker", "points": [pa, pb],
                        "winner": "first" if pa > pb else "second" if pb > pa else "tie"})
        return out
    verdicts = judge.compare([it["prompt"] for _, it, _, _ in rows], [a for _, _, a, _ in rows],
                             [b for _, _, _, b in rows])
    return [{"by": "judge", **v} for v in verdicts]


# ----- the run -------------------------------------------------------------------------------------------------

class Writer:
    """Appends rows to a JSONL file (opened at the first row, so a run that fails before any row
    leaves no file); each chunk's rows are flushed and synced together.

    Args:
        path: the file.
        fresh: --overwrite: the file is started again at the first row.
    """

    def __init__(self, path: Path, fresh: bool) -> None:
        self.path, self.fresh, self.file = path, fresh, None

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "w" if self.fresh else "a", encoding="utf-8", newline="\n")
        self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _check_flags(cfg: SynthConfig) -> None:
    if cfg.min_words > cfg.max_words:
        raise TinylmError(f"--min-words {cfg.min_words} is above --max-words {cfg.max_words}")
    if cfg.judge is not None and (cfg.kind != "pairs" or cfg.rank != "judge"):
        raise TinylmError("--judge ranks pairs: it needs `synth pairs --rank judge`")
    for flag, path in (("--out", cfg.out), ("--rejects", cfg.rejects)):
        if path is not None and not path.endswith((".jsonl", ".ndjson")):
            raise TinylmError(f"{flag} {path}: synth writes JSON Lines; name it FILE.jsonl")
    if cfg.rejects is not None and Path(cfg.rejects).resolve() == Path(cfg.out).resolve():
        raise TinylmError("--rejects must be another file than --out")


def synth(cfg: SynthConfig, teacher: Any = None) -> dict[str, Any]:
    """Write (or resume) cfg.out until it holds cfg.n rows or cfg.attempts rows were asked for.

    Returns {"written", "total", "asked", "rejected": {reason: count}, "seconds": spent asking and checking}
    of this invocation.

    Args:
        cfg: the command's config.
        teacher: an opened teacher (serve.client) to use instead of opening cfg.teacher.
    """
    _check_flags(cfg)
    out = Path(cfg.out)
    check_out(out, True, kind="file")
    existing = read_existing(out, cfg) if out.exists() and not cfg.overwrite else Existing({}, [], -1)
    earlier_rejects: dict[int, str] = {}  # index -> reason of the rows in --rejects
    if cfg.rejects is not None:
        check_out(cfg.rejects, True, kind="file")
        if Path(cfg.rejects).exists() and not cfg.overwrite:
            earlier_rejects = {int(r["index"]): r["reason"] for r in _rows(Path(cfg.rejects), cfg, "reason",
                                                                            "--rejects")}
    device = resolve_device(cfg.device)
    teacher = teacher or open_teacher(cfg.teacher, "--teacher", cfg.teacher_model, cfg.teacher_key_env, cfg.batch,
                                      device)
    judge = None
    if cfg.kind == "pairs" and cfg.rank == "judge":
        judging = teacher if cfg.judge in (None, cfg.teacher) else \
            open_teacher(cfg.judge, "--judge", cfg.judge_model, cfg.judge_key_env, cfg.batch, device)
        judge = Judge(judging, "pairwise")
    dedup = NearDedup(threshold=cfg.dedup) if cfg.dedup < 1 else None
    if dedup is not None and existing.texts:
        dedup.duplicates(existing.texts)
    sinks = Sinks(Writer(out, cfg.overwrite), Writer(Path(cfg.rejects), cfg.overwrite) if cfg.rejects else None,
                  earlier_rejects)
    try:
        return _loop(cfg, teacher, judge, dedup, existing, sinks)
    finally:
        sinks.rows.close()
        if sinks.rejects is not None:
            sinks.rejects.close()


@dataclass
class Sinks:
    """Where rows go: accepted ones, rejected ones (--rejects), and the rejected indices already there."""

    rows: Writer
    rejects: Writer | None
    rejected: dict[int, str]  # index -> reason, in --rejects

    def reject(self, cfg: SynthConfig, index: int, item: dict[str, Any], text: str, extra: Any, reason: str,
               pending: list[dict[str, Any]]) -> None:
        """Queue a rejected row for --rejects (once per index, however often its chunk is asked)."""
        if self.rejects is None or index in self.rejected:
            return
        self.rejected[index] = reason
        pending.append({"kind": cfg.kind, "seed": cfg.seed, "index": index, "reason": reason,
                        "prompt": item["prompt"], "seeds": item["seeds"], "features": item["features"],
                        "text": text, **({"second": extra} if extra is not None else {})})


def _loop(cfg: SynthConfig, teacher: Any, judge: Judge | None, dedup: NearDedup | None, existing: Existing,
          sinks: Sinks) -> dict[str, Any]:
    """Chunks of rows from the last written one's chunk on, until n rows are written or attempts are used."""
    from tqdm import tqdm

    attempts = cfg.attempts or 20 * cfg.n
    total, start = len(existing.ids), max(0, existing.last_index) // cfg.batch * cfg.batch
    rejected: Counter[str] = Counter()
    asked = written = 0
    if hasattr(teacher, "check"):  # a prompt too long for a local teacher's context: one line, before the bar
        first = range(start, start + cfg.batch)
        teacher.check(_asks(cfg, [S.PROMPTS[cfg.kind](S.row_rng(cfg.seed, i)) for i in first], first))
    bar = tqdm(total=cfg.n, initial=min(total, cfg.n), unit="row", file=sys.stderr, disable=not cfg.progress,
               desc=f"synth {cfg.kind}", dynamic_ncols=True)
    index, began = start, time.perf_counter()
    try:
        while total < cfg.n and index < attempts:
            indices = range(index, min(index + cfg.batch, attempts))
            rows = make_rows(cfg, teacher, indices)
            rankings = _rank(cfg, judge, rows) if cfg.kind == "pairs" else [None] * len(rows)
            accepted, refused = [], []
            for (i, item, text, extra), ranking in zip(rows, rankings):
                row, reason = _checked(cfg, teacher.name, i, item, text, extra, ranking, existing, dedup)
                if row is not None and existing.ids.get(row["id"]) == i:
                    continue  # written before a kill: neither new nor a rejection
                asked += 1
                if reason is not None:
                    rejected[reason] += 1
                    sinks.reject(cfg, i, item, text, extra, reason, refused)
                    continue
                existing.ids[row["id"]] = i
                accepted.append(row)
                if total + len(accepted) == cfg.n:
                    break
            if sinks.rejects is not None:
                sinks.rejects.write(refused)  # before the chunk's rows: a resumed run asks this chunk again
            sinks.rows.write(accepted)
            total, written, index = total + len(accepted), written + len(accepted), indices.stop
            bar.update(len(accepted))
            bar.set_postfix(accepted=f"{written / max(1, asked):.0%}", refresh=False)
    finally:
        bar.close()
    every = Counter(sinks.rejected.values()) if sinks.rejects is not None else None
    return {"written": written, "total": total, "asked": asked, "rejected": dict(rejected.most_common()),
            "rejected_all_runs": dict(every.most_common()) if every is not None else None,
            "seconds": time.perf_counter() - began}


def _checked(cfg: SynthConfig, name: str, index: int, item: dict[str, Any], text: str, extra: Any,
             ranking: dict[str, Any] | None, existing: Existing,
             dedup: NearDedup | None) -> tuple[dict[str, Any] | None, str | None]:
    """(the row, None) when it passes every check; (row or None, reason) when it is rejected. A pair is checked
    on its chosen story (the rejected one may fail anything: it is the worse of the two)."""
    if cfg.kind == "pairs" and ranking["winner"] == "tie":
        return None, "tie"
    row = build_row(cfg, name, index, item, text, extra, ranking)  # a pair's "text" is its chosen story
    reason = S.reject_reason(cfg.kind, item, row["text"], cfg.min_words, cfg.max_words, cfg.min_simple,
                             cfg.seed_words)
    if reason is None and cfg.kind == "instructions" and not extra:
        reason = "no task"
    if reason is not None or existing.ids.get(row["id"]) == index:
        return row, reason
    if row["id"] in existing.ids:
        return row, "duplicate"
    if dedup is not None and dedup.duplicates([_dedup_text(row)])[0]:
        return row, "near duplicate"
    return row, None


def main(cfg: SynthConfig) -> None:
    """`tinylm synth`: write the rows, then a summary with the rejections by reason.

    Args:
        cfg: the command's config.
    """
    result = synth(cfg)
    reasons = ", ".join(f"{r} {c}" for r, c in result["rejected"].items()) or "none"
    print(f"wrote {result['written']} {cfg.kind} rows to {cfg.out} ({result['total']} in all); this run asked "
          f"{result['asked']}, accepted {result['written']} ({result['written'] / max(1, result['asked']):.0%}); "
          f"rejected: {reasons}")
    if result["rejected_all_runs"] is not None:
        every = ", ".join(f"{r} {c}" for r, c in result["rejected_all_runs"].items()) or "none"
        print(f"rejected rows in {cfg.rejects} (every run): {every}")
    if result["total"] < cfg.n:
        print(f"tinylm: only {result['total']} of --n {cfg.n} rows passed the checks within --attempts "
              f"{cfg.attempts or 20 * cfg.n}: loosen the checks or raise --attempts", file=sys.stderr)
