"""Load test and throughput of an OpenAI-compatible server: `tinylm serve`, or any other (llama-server, vLLM).

Load test (issue 15's acceptance): --requests streamed completions from --concurrency clients, prompts of mixed
lengths (TinyTales text cut to 8..--max-prompt-words words), replies of mixed lengths (1..--max-tokens tokens,
greedy), and a --disconnect fraction of the requests hung up after 1-5 tokens. It reports requests done,
disconnected, refused (4xx) and lost (a 5xx, a broken connection or a timeout), p50 / p99 latency and time to
the first token, and generated tokens/s; against tinylm it then reads /metrics until no request runs or
waits, and reports any that stay as leaked slots. The exit code is 1 when a request was lost or a slot leaked.

    python bench/bench_serve.py --model smollm2-135m --requests 500 --concurrency 32 --disconnect 0.1
    python bench/bench_serve.py --url http://127.0.0.1:8000 --requests 500 --concurrency 32

--model starts `tinylm serve MODEL --port 0` in a subprocess for the run (--server-args adds options);
--url uses a running server (its first model unless --model-name).

Throughput (--sweep 1,4,16,64): for each concurrency c, max(--requests, 2c) requests without disconnects from c
clients; generated tokens/s of `tinylm serve MODEL --max-concurrent c`, of llama.cpp's `llama-server --parallel c`
on --gguf (c slots of --ctx positions, continuous batching, the same --threads), and of transformers' batched
`generate` on --hf (static batches of c). The systems alternate within each of --rounds rounds; the table gives
median tokens/s and the median of the per-round ratios:

    python bench/bench_serve.py --model smollm2-135m --sweep 1,4,16,64 --requests 32 --max-tokens 64 \\
        --threads 2 --gguf smollm2-f32.gguf --llama-server build/bin/llama-server --hf smollm2-hf
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm.data import tinytales  # noqa: E402


@dataclass
class Spec:
    prompt: str
    max_tokens: int
    hang_up_after: int  # 0: read to the end


@dataclass
class Outcome:
    kind: str  # done | disconnected | refused | lost
    latency: float | None = None
    ttft: float | None = None
    tokens: int = 0
    why: str = ""


def specs(n: int, max_words: int, max_tokens: int, disconnect: float, seed: int) -> list[Spec]:
    """n requests: a TinyTales passage of 8..max_words words, 1..max_tokens new tokens, some hung up early."""
    rng = random.Random(seed)
    words = " ".join(tinytales.generate(max(8, n // 4), seed=seed)).split()
    out = []
    for _ in range(n):
        length = rng.randint(8, max(8, max_words))
        start = rng.randrange(max(1, len(words) - length))
        hang_up = rng.randint(1, 5) if rng.random() < disconnect else 0
        out.append(Spec(" ".join(words[start:start + length]), rng.randint(1, max_tokens), hang_up))
    return out


async def ask(client: openai.AsyncOpenAI, model: str, spec: Spec) -> Outcome:
    """One streamed completion; hangs up after `spec.hang_up_after` text chunks if that is set."""
    start, ttft, pieces, tokens = time.perf_counter(), None, 0, 0
    try:
        stream = await client.completions.create(model=model, prompt=spec.prompt, max_tokens=spec.max_tokens,
                                                 temperature=0, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                pieces += 1
                if spec.hang_up_after and pieces >= spec.hang_up_after:
                    await stream.close()
                    return Outcome("disconnected", None, ttft, pieces)
            if getattr(chunk, "usage", None):
                tokens = chunk.usage.completion_tokens
        return Outcome("done", time.perf_counter() - start, ttft, tokens or pieces)
    except openai.APIStatusError as e:
        return Outcome("refused" if e.status_code < 500 else "lost", why=f"{e.status_code} {str(e)[:120]}")
    except (openai.APIConnectionError, openai.APITimeoutError) as e:
        return Outcome("lost", why=f"{type(e).__name__}: {str(e)[:120]}")


async def load(url: str, model: str, todo: list[Spec], concurrency: int, timeout: float, retries: int = 0
               ) -> tuple[list[Outcome], float]:
    """Run `todo` from `concurrency` clients; returns the outcomes and the wall-clock seconds. `retries`: the
    client's own retries of a request refused or dropped before its reply starts (the load test counts them
    as lost instead)."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=retries, timeout=timeout)
    queue: asyncio.Queue[Spec] = asyncio.Queue()
    for spec in todo:
        queue.put_nowait(spec)
    outcomes: list[Outcome] = []

    async def worker() -> None:
        while not queue.empty():
            outcomes.append(await ask(client, model, queue.get_nowait()))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    return outcomes, wall


def live_requests(url: str, wait: float = 10.0) -> float | None:
    """Running + queued engine requests in tinylm's /metrics once they settle (None: no tinylm metrics)."""
    deadline, live = time.monotonic() + wait, None
    while time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
        except OSError:
            return None
        found = [re.search(rf"^{name} (\S+)$", text, re.M) for name in ("tinylm_running_requests", "tinylm_queue_depth")]
        if not all(found):
            return None
        live = sum(float(m.group(1)) for m in found)
        if live == 0:
            return 0.0
        time.sleep(0.1)
    return live


def first_model(url: str, client_timeout: float = 30) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=client_timeout)
    return client.models.list().data[0].id


@contextmanager
def started(model: str, extra: list[str], env: dict[str, str] | None = None) -> Iterator[str]:
    """`tinylm serve MODEL --port 0` in a subprocess; yields its base URL."""
    words = [sys.executable, "-m", "tinylm", "serve", model, "--port", "0", "--log-level", "warning", *extra]
    proc = subprocess.Popen(words, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
                            env={**os.environ, **(env or {})})
    try:
        line = proc.stderr.readline()
        found = re.search(r"at (http://\S+)/v1", line)
        if not found:
            raise SystemExit(f"tinylm serve did not start: {line}{proc.stderr.read() if proc.poll() is not None else ''}")
        threading.Thread(target=lambda: [sys.stderr.write(x) for x in proc.stderr], daemon=True).start()
        yield found.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values or [0.0])[0]


def report(outcomes: list[Outcome], wall: float) -> dict[str, float]:
    done = [o for o in outcomes if o.kind == "done"]
    lat, ttft = [o.latency for o in done], [o.ttft for o in outcomes if o.ttft is not None]
    count = {k: sum(o.kind == k for o in outcomes) for k in ("done", "disconnected", "refused", "lost")}
    return {**count, "p50": percentile(lat, 50), "p99": percentile(lat, 99), "ttft50": percentile(ttft, 50),
            "ttft99": percentile(ttft, 99), "tok/s": sum(o.tokens for o in outcomes) / wall}


def load_test(url: str, model: str, args: argparse.Namespace) -> int:
    todo = specs(args.requests, args.max_prompt_words, args.max_tokens, args.disconnect, args.seed)
    outcomes, wall = asyncio.run(load(url, model, todo, args.concurrency, args.timeout))
    r = report(outcomes, wall)
    leaked = live_requests(url)
    print("| requests | concurrency | done | disconnected | refused | lost | p50 s | p99 s | TTFT p50 s | TTFT p99 s "
          "| generated tok/s | leaked slots |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {len(todo)} | {args.concurrency} | {r['done']} | {r['disconnected']} | {r['refused']} | {r['lost']} | "
          f"{r['p50']:.3f} | {r['p99']:.3f} | {r['ttft50']:.3f} | {r['ttft99']:.3f} | {r['tok/s']:.1f} | "
          f"{'n/a' if leaked is None else f'{leaked:g}'} |")
    for o in [o for o in outcomes if o.why][:5]:
        print(f"  {o.kind}: {o.why}")
    return 1 if r["lost"] or leaked else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def llama_server(binary: str, gguf: str, slots: int, ctx: int, threads: int) -> Iterator[str]:
    """llama.cpp's `llama-server` with `slots` parallel slots of `ctx` positions each; yields its base URL."""
    port = free_port()
    words = [binary, "-m", gguf, "--port", str(port), "--parallel", str(slots), "-c", str(slots * ctx),
             "-t", str(threads), "-tb", str(threads), "--log-disable"]
    try:
        proc = subprocess.Popen(words, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as e:
        raise SystemExit(f"cannot run llama-server {binary!r} ({e.strerror}): build it with "
                         "bench/build_llama_server.sh and pass its path as --llama-server")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"llama-server did not start: {shlex.join(words)}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


class HFBatched:
    """transformers' batched `generate`: the requests in static batches of `concurrency`, left-padded, greedy.

    A batch runs until its longest request is done, as static batching does; only the tokens each request asked
    for (up to its own end of text) are counted.
    """

    def __init__(self, path: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.set_num_threads(threads)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.tok.pad_token = self.tok.pad_token or self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def tokens_per_s(self, todo: list[Spec], concurrency: int) -> float:
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(todo), concurrency):
            batch = todo[i:i + concurrency]
            enc = self.tok([s.prompt for s in batch], return_tensors="pt", padding=True)
            with self.torch.no_grad():
                out = self.model.generate(**enc, do_sample=False, max_new_tokens=max(s.max_tokens for s in batch),
                                          pad_token_id=self.tok.pad_token_id)
            for row, spec in zip(out[:, enc["input_ids"].shape[1]:].tolist(), batch):
                row = row[:spec.max_tokens]
                tokens += row.index(self.tok.eos_token_id) + 1 if self.tok.eos_token_id in row else len(row)
        return tokens / (time.perf_counter() - start)


def sweep(args: argparse.Namespace) -> int:
    """Generated tokens/s at each concurrency: tinylm serve (and llama-server, transformers) alternated in rounds."""
    hf = HFBatched(args.hf, args.threads) if args.hf else None
    names = ["tinylm"] + (["llama.cpp"] if args.gguf else []) + (["transformers"] if hf else [])
    head = "| concurrency | requests | " + " | ".join(f"{n} tok/s" for n in names)
    head += "".join(f" | tinylm / {n}" for n in names[1:]) + " |"
    print(head)
    print("|---:" * (head.count("|") - 1) + "|")
    env_threads = {"OMP_NUM_THREADS": str(args.threads)}
    for c in [int(x) for x in args.sweep.split(",")]:
        todo = specs(max(args.requests, 2 * c), args.max_prompt_words, args.max_tokens, 0.0, args.seed)
        warm = specs(min(c, 4), 16, 4, 0.0, args.seed + 1)
        with ExitStack() as stack:
            urls = {"tinylm": stack.enter_context(started(args.model, [
                "--max-concurrent", str(c), *shlex.split(args.server_args)], env_threads))}
            if args.gguf:
                urls["llama.cpp"] = stack.enter_context(llama_server(args.llama_server, args.gguf, c, args.ctx,
                                                                     args.threads))
            ids = {n: first_model(u) for n, u in urls.items()}
            for n, u in urls.items():
                asyncio.run(load(u, ids[n], warm, c, args.timeout))
            rates: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(args.rounds):
                for n in names:
                    if n == "transformers":
                        rates[n].append(hf.tokens_per_s(todo, c))
                        continue
                    # llama-server drops a kept-alive connection now and then (1 request in 16 in some rounds):
                    # retried, so that its tokens/s is not understated
                    outcomes, wall = asyncio.run(load(urls[n], ids[n], todo, c, args.timeout, retries=2))
                    if any(o.kind != "done" for o in outcomes):
                        print(f"  {n} at {c}: {[o.why for o in outcomes if o.kind != 'done'][:3]}")
                    rates[n].append(report(outcomes, wall)["tok/s"])
        row = f"| {c} | {len(todo)} | " + " | ".join(f"{statistics.median(rates[n]):.1f}" for n in names)
        row += "".join(f" | {statistics.median(a / b for a, b in zip(rates['tinylm'], rates[n])):.2f}x"
                       for n in names[1:])
        print(row + " |", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server's base URL (without /v1)")
    where.add_argument("--model", help="start `tinylm serve MODEL` for the run")
    parser.add_argument("--model-name", help="the model id to send (default: the server's first)")
    parser.add_argument("--server-args", default="", help="more `tinylm serve` options, e.g. '--max-concurrent 32'")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--disconnect", type=float, default=0.1, help="share of requests hung up after 1-5 tokens")
    parser.add_argument("--max-prompt-words", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=128, help="each request asks for 1..this many tokens")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a request counts as lost")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", help="throughput at these concurrencies instead, e.g. 1,4,16,64")
    parser.add_argument("--rounds", type=int, default=3, help="with --sweep: alternated rounds (medians)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="with --sweep: threads of every system")
    parser.add_argument("--gguf", help="with --sweep: run llama-server on this GGUF beside tinylm")
    parser.add_argument("--llama-server", default="llama-server", help="the llama-server binary")
    parser.add_argument("--ctx", type=int, default=256, help="llama-server's positions per slot")
    parser.add_argument("--hf", help="with --sweep: transformers' batched generate on this HF dir beside tinylm")
    args = parser.parse_args()
    print("$ python bench/bench_serve.py " + shlex.join(sys.argv[1:]))
    if args.sweep:
        if not args.model:
            parser.error("--sweep starts its servers itself: give --model")
        return sweep(args)
    run = load_test
    if args.url:
        url = args.url.rstrip("/")
        return run(url, args.model_name or first_model(url), args)
    with started(args.model, shlex.split(args.server_args)) as url:
        return run(url, args.model_name or first_model(url), args)


if __name__ == "__main__":
    sys.exit(main())
