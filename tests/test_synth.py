"""`tinylm synth`: resumable after kill -9, the checks and their rejection counts, rows that `data prepare`, `sft`
and `dpo` read as they are, and a teacher behind `tinylm serve` on loopback (tiny random-weight models)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
from helpers import REPO, chat_checkpoint, serving

from tinylm import cli
from tinylm.data import synth as S
from tinylm.data import tinytales
from tinylm.data.chat import read_examples
from tinylm.data.sources import clean_text, iter_texts
from tinylm.stages import synth as synth_stage
from tinylm.stages.dpo import read_pairs

CONTEXT = 512  # a story prompt is ~250 tokens of the tiny tokenizer
LOOSE = ["--min-simple", "0", "--no-seed-words", "--min-words", "1", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return chat_checkpoint(list(tinytales.generate(200, 0)), tmp_path_factory.mktemp("synth") / "ck",
                           max_seq_len=CONTEXT)


def _args(ckpt: Path, out: Path, n: int, *extra: str) -> list[str]:
    return ["synth", "stories", "--teacher", str(ckpt), "--n", str(n), "--out", str(out), "--batch", "4",
            "--max-tokens", "12", *LOOSE, *extra]


def _lines(path: Path) -> list[str]:
    data = path.read_text(encoding="utf-8")
    assert data.endswith("\n"), "a partial last line"
    return data.splitlines()


# ----- resuming ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill9_at_random_points_then_rerun_equals_an_uninterrupted_run(ckpt, tmp_path, rng):
    n = 32

    def args(out: Path) -> list[str]:  # some short answers are rejected, into a --rejects file beside `out`
        return _args(ckpt, out, n, "--min-words", "3", "--rejects", str(out.with_suffix(".rejects.jsonl")))

    ref = tmp_path / "ref.jsonl"
    assert cli.main(args(ref)) == 0
    want, want_rejects = _lines(ref), _lines(ref.with_suffix(".rejects.jsonl"))
    assert len(want) == n and len({json.loads(x)["id"] for x in want}) == n and want_rejects
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    kills = []
    for _ in range(3):
        lines_before = len(out.read_text().splitlines()) if out.exists() else 0
        if lines_before >= n - 1:
            break
        # kill once the file holds `at` rows (a few more than now), plus a random delay
        at = int(rng.integers(lines_before + 1, min(n, lines_before + 6)))
        delay = float(rng.uniform(0, 0.05))
        kills.append((at, round(delay, 3)))
        proc = subprocess.Popen([sys.executable, "-m", "tinylm", *args(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and (not out.exists() or out.read_bytes().count(b"\n") < at):
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert kills and out.read_bytes().count(b"\n") < n, f"no kill landed before the end: {kills}"
    assert cli.main(args(out)) == 0, kills
    got = _lines(out)
    assert len(got) == len(set(got)), f"duplicates after kills at {kills}"
    assert got == want, f"kills at {kills}"
    assert _lines(out.with_suffix(".rejects.jsonl")) == want_rejects, f"kills at {kills}"


def test_a_partial_last_line_is_dropped_and_the_run_completes_equal(ckpt, tmp_path, rng):
    ref = tmp_path / "ref.jsonl"
    assert cli.main(_args(ckpt, ref, 10)) == 0
    want = _lines(ref)
    k = int(rng.integers(1, 9))
    out = tmp_path / "out.jsonl"
    out.write_text("".join(x + "\n" for x in want[:k]) + want[k][: len(want[k]) // 2])  # killed mid-write
    assert cli.main(_args(ckpt, out, 10)) == 0
    assert _lines(out) == want, f"cut after {k} rows"
    assert cli.main(_args(ckpt, out, 10)) == 0  # complete: nothing more to do
    assert _lines(out) == want


def test_rejected_rows_go_to_rejects_once_each_across_resumes(ckpt, tmp_path, capsys):
    strict = ("--min-words", "3")  # some of the random model's short answers fail
    ref, ref_rej = tmp_path / "ref.jsonl", tmp_path / "ref-rejects.jsonl"
    assert cli.main(_args(ckpt, ref, 10, *strict, "--rejects", str(ref_rej))) == 0
    summary = capsys.readouterr().out
    refused = [json.loads(x) for x in _lines(ref_rej)]
    assert refused and all(r["reason"] == "too short" and len(r["text"].split()) < 3 for r in refused)
    assert f"too short {len(refused)}" in summary
    out, rej = tmp_path / "out.jsonl", tmp_path / "rejects.jsonl"
    assert cli.main(_args(ckpt, out, 5, *strict, "--rejects", str(rej))) == 0  # stops halfway, then resumed
    assert cli.main(_args(ckpt, out, 10, *strict, "--rejects", str(rej))) == 0
    assert _lines(out) == _lines(ref) and _lines(rej) == _lines(ref_rej)
    assert f"(every run): too short {len(refused)}" in capsys.readouterr().out


def test_a_file_of_another_kind_or_seed_is_not_resumed(ckpt, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert cli.main(_args(ckpt, out, 2)) == 0
    assert cli.main(_args(ckpt, out, 4, "--seed", "3")) == 2
    assert "--seed 0" in capsys.readouterr().err
    assert len(_lines(out)) == 2


# ----- checks -------------------------------------------------------------------------------------------------

class ScriptedTeacher:
    """Answers story prompts in groups of five: a TinyTales story with the seed words (passes), one without
    them, one too short, one in hard words, and the group's first story again with its own seed words."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls = 0
        self.stories = list(tinytales.generate(20, 7))

    def answer(self, asks: list[Any], on_done: Any = None) -> list[str]:
        out = []
        for ask in asks:
            verb, noun, adj = re.findall(r'"(\w+)"', ask.messages[-1]["content"])[:3]
            seeds = f' "Look!" said Lily. The {adj} {noun} liked to {verb}.'
            story = self.stories[self.calls // 5]
            out.append([story + seeds, '"Look!" said Lily. ' + "la " * 12, "Too short.",
                        f'"Quantum chromodynamics elucidates asymmetric hadronization," said {verb} {noun} {adj}.',
                        story + seeds][self.calls % 5])
            self.calls += 1
        return out


def test_checks_reject_by_reason_and_count_each(tmp_path):
    out = tmp_path / "s.jsonl"
    cfg = synth_stage.SynthConfig("stories", "scripted", str(out), n=4, batch=5, min_words=8, dedup=0.5,
                                  progress=False, device="cpu")
    result = synth_stage.synth(cfg, ScriptedTeacher())
    rows = [json.loads(x) for x in _lines(out)]
    # every fifth answer passes, each of the other four fails one check; the run ends at its fourth row (index 15)
    assert result["total"] == 4 and result["asked"] == 16
    assert result["rejected"] == {"missing seed word": 3, "too short": 3, "not simple": 3, "near duplicate": 3}
    assert [r["index"] for r in rows] == [0, 5, 10, 15]
    for row in rows:
        assert not S.missing_seeds(row["seeds"], row["text"])
        assert row["id"] == S.content_id("stories", row["prompt"], row["text"])
        assert row["messages"][0]["content"] == row["prompt"] and row["messages"][1]["content"] == row["text"]


def test_seed_words_match_any_inflection_and_simplicity_is_a_share():
    assert S.missing_seeds({"verb": "run", "noun": "puppy", "adjective": "big"}, "The puppies ran to a bigger hill.") == []
    assert S.missing_seeds({"verb": "run", "noun": "cat"}, "The dog sat.") == ["run", "cat"]
    text = "the cat sat on the mat with zyxw"
    simple = sum(w in S.simple_words() for w in text.split())
    assert S.simple_share(text) == simple / 8 and 0 < simple < 8


class ArithmeticTeacher:
    """Answers word problems right, wrong or without an answer line, in turn."""

    name = "arithmetic"

    def answer(self, asks: list[Any], on_done: Any = None) -> list[str]:
        out = []
        for i, ask in enumerate(asks):
            q = ask.messages[-1]["content"]
            nums = [int(x) for x in re.findall(r"\d+", q)]
            gold = nums[0] + nums[1] if "more" in q else nums[0] - nums[1] if "away" in q else nums[0] * nums[1]
            out.append([f"We work it out step by step.\nAnswer: {gold}", f"We just make a guess here.\nAnswer: {gold + 1}",
                        "I do not know the answer here."][i % 3])
        return out


def test_rationales_keep_right_answers_only(tmp_path):
    out = tmp_path / "r.jsonl"
    cfg = synth_stage.SynthConfig("rationales", "arithmetic", str(out), n=3, batch=9, progress=False, device="cpu",
                                  dedup=1.0)
    result = synth_stage.synth(cfg, ArithmeticTeacher())
    assert result["rejected"] == {"wrong answer": 2, "no answer line": 2}
    rows = [json.loads(x) for x in _lines(out)]
    assert [r["answer"] for r in rows] == [r["seeds"]["gold"] for r in rows]


# ----- the pieces chain ---------------------------------------------------------------------------------------

def test_rows_feed_data_prepare_sft_and_dpo_as_they_are(ckpt, tmp_path):
    stories, pairs, instr = tmp_path / "s.jsonl", tmp_path / "p.jsonl", tmp_path / "i.jsonl"
    assert cli.main(_args(ckpt, stories, 3)) == 0
    assert cli.main(["synth", "instructions", "--teacher", str(ckpt), "--n", "2", "--out", str(instr), "--batch",
                     "2", "--max-tokens", "8", *LOOSE]) == 0
    assert cli.main(["synth", "pairs", "--teacher", str(ckpt), "--n", "2", "--out", str(pairs), "--batch", "2",
                     "--max-tokens", "8", *LOOSE]) == 0
    rows = [json.loads(x) for x in _lines(stories)]
    assert list(iter_texts([str(stories)])) == [t for r in rows if (t := clean_text(r["text"]))]
    examples, _ = read_examples([str(stories), str(instr)])
    assert len(examples) == 5 and examples[0].messages[-1]["content"] == rows[0]["text"]
    got, _ = read_pairs([str(pairs)])
    prs = [json.loads(x) for x in _lines(pairs)]
    assert len(got) == 2 and got[0][0].messages[-1]["content"] == prs[0]["chosen"]
    for p in prs:  # ranked by the checker: the chosen story has at least the rejected one's points
        item = {"seeds": p["seeds"], "features": p["features"]}
        assert S.checker_points(item, p["chosen"]) > S.checker_points(item, p["rejected"])
        assert p["ranking"]["by"] == "checker"


# ----- a teacher behind an endpoint ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def url(ckpt) -> Iterator[str]:
    from tinylm.stages.serve import ServeConfig, build_app

    with serving(build_app(ServeConfig(str(ckpt), name="tiny", max_concurrent=4, max_queue=64))) as base:
        yield base + "/v1"


def test_a_teacher_behind_tinylm_serve_writes_the_local_teachers_rows(ckpt, url, tmp_path):
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    assert cli.main(_args(ckpt, local, 6)) == 0  # seeded sampling: the server takes each request's seed
    assert cli.main(_remote_args(url, remote, 6)) == 0
    strip = ("teacher",)
    a = [{k: v for k, v in json.loads(x).items() if k not in strip} for x in _lines(local)]
    b = [{k: v for k, v in json.loads(x).items() if k not in strip} for x in _lines(remote)]
    assert a == b
    assert json.loads(_lines(remote)[0])["teacher"] == "tiny"


def _remote_args(url: str, out: Path, n: int, *extra: str) -> list[str]:
    return ["synth", "stories", "--teacher", url, "--n", str(n), "--out", str(out), "--batch", "4",
            "--max-tokens", "12", *LOOSE, *extra]


class _Malformed(BaseHTTPRequestHandler):
    """Lists one model; its chat completions are not OpenAI's shape."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._send({"object": "list", "data": [{"id": "m", "object": "model"}]})

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send({"choices": [{"text": 42}]})

    def _send(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


class _GoodThenMalformed(_Malformed):
    """Answers its first four chat completions with a story, then malformed ones."""

    answered = 0

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.answered += 1
        if cls.answered > 4:
            self._send({"choices": []})
            return
        text = f"A story for seed {body['seed']} about a dog."
        self._send({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}]})


def test_rows_written_before_the_endpoint_fails_are_kept(tmp_path, capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GoodThenMalformed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "s.jsonl"
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        assert cli.main(_remote_args(url, out, 8, "--dedup", "1")) == 2
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "malformed response" in err[0], err
    rows = [json.loads(x) for x in _lines(out)]  # the first chunk, whole
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and all(r["text"].startswith("A story") for r in rows)


@pytest.fixture
def malformed() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Malformed)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("problem", ["no answer", "unknown model", "malformed"])
def test_a_failing_endpoint_is_one_line_exit_2_and_rows_written_are_kept(problem, ckpt, url, malformed, tmp_path,
                                                                         capsys):
    out = tmp_path / "s.jsonl"
    assert cli.main(_args(ckpt, out, 4)) == 0
    before = out.read_bytes()
    capsys.readouterr()
    teacher, extra, says = {"no answer": ("http://127.0.0.1:9/v1", [], "cannot reach it"),
                            "unknown model": (url, ["--teacher-model", "gpt-9"], "does not serve --teacher-model"),
                            "malformed": (malformed, [], "malformed response")}[problem]
    assert cli.main(_remote_args(teacher, out, 8, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert out.read_bytes() == before


class PairTeacher:
    """Writes two stories per prompt (its second sample is told by the seed's parity) and judges pairs: the
    story marked GOOD wins; rows whose index is a multiple of 3 get two GOOD stories (a tie)."""

    name = "pairs"

    def __init__(self) -> None:
        self.verdict_asks = []

    def answer(self, asks: list[Any], on_done: Any = None) -> list[str]:
        out = []
        for ask in asks:
            text = ask.messages[-1]["content"]
            if ask.schema is not None:
                self.verdict_asks.append(text)
                a, b = re.search(r"\[Answer A\]\n(.*)\n\n\[Answer B\]\n(.*)\n\nReply", text, re.S).groups()
                out.append(json.dumps({"winner": "tie" if ("GOOD" in a) == ("GOOD" in b) else
                                       "A" if "GOOD" in a else "B"}))
                continue
            index, sample = (ask.seed // 2) % 1_000_003, ask.seed % 2
            good = sample == 1 or index % 3 == 0
            out.append(f"{'GOOD' if good else 'meh'} story number {index} sample {sample} about a dog and a cat.")
        return out


def test_pairs_ranked_by_the_judge_in_both_orders(tmp_path):
    teacher = PairTeacher()
    out = tmp_path / "p.jsonl"
    cfg = synth_stage.SynthConfig("pairs", "pairs", str(out), n=4, batch=6, rank="judge", min_simple=0.0,
                                  seed_words=False, progress=False, device="cpu")
    result = synth_stage.synth(cfg, teacher)
    rows = [json.loads(x) for x in _lines(out)]
    assert [r["index"] for r in rows] == [1, 2, 4, 5] and result["rejected"] == {"tie": 2}
    assert all(r["chosen"].startswith("GOOD") and r["rejected"].startswith("meh") for r in rows)
    assert all(r["ranking"] == {"by": "judge", "first_as_a": "B", "first_as_b": "A", "winner": "second",
                                "consistent": True} for r in rows)
    assert len(teacher.verdict_asks) == 2 * 6  # every pair of the chunk, in both orders
    got, _ = read_pairs([str(out)])
    assert [p[1].completion if p[1].messages is None else p[1].messages[-1]["content"] for p in got] == \
        [r["rejected"] for r in rows]


def test_a_url_teacher_without_the_serve_extra_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "httpx2", None)  # import httpx2 raises ImportError
    assert cli.main(_remote_args("http://127.0.0.1:9/v1", tmp_path / "s.jsonl", 2)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'tinylm[serve]'" in err, err
    assert not (tmp_path / "s.jsonl").exists()
