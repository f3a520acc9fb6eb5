"""`tinylm sft`: supervised fine-tuning through the shared loop, on a tiny model and a tokenizer trained here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    REPO,
    assert_bitwise,
    chat_checkpoint,
    kill_note,
    plain_tokenizer,
    run_and_kill,
    run_bad_data,
    tiny_model,
    tune_args,
    weights,
    write_jsonl,
)

from tinylm import cli
from tinylm.core.recipe import load_config
from tinylm.data.chat import read_examples, render
from tinylm.data.tokenizer import Tokenizer
from tinylm.formats import checkpoint
from tinylm.formats.peft import load_adapter
from tinylm.stages.sft import SftConfig, pack_examples, sft
from tinylm.train.losses import eval_batches
from tinylm.train.metrics import read_metrics

SEQ = 64


def _rows(n: int = 48) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 10, 2))
        rows.append({"messages": [{"role": "system", "content": "you add"},
                                  {"role": "user", "content": f"{a} plus {b}"},
                                  {"role": "assistant", "content": f"it is {a + b}"}]})
    return rows


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint with a tokenizer trained here (ChatML through add_chatml)."""
    texts = [m["content"] for r in _rows() for m in r["messages"]] * 4
    return chat_checkpoint(texts, tmp_path_factory.mktemp("base") / "ck")


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", _rows())


def _args(base: Path, chat: Path, out: Path, steps: int = 12, **extra: object) -> dict[str, object]:
    return tune_args(base, chat, out, SEQ, rows=4, micro=2, steps=steps, warmup=2, lr=3e-3, **extra)


def _train(args: dict[str, object]) -> Path:
    return sft(load_config(SftConfig, None, args))


def _packed(ckpt: Path, chat: Path):
    loaded = checkpoint.load(ckpt)
    examples, _ = read_examples([str(chat)])
    return loaded, pack_examples(examples, loaded.tokenizer, load_config(SftConfig, None, {}).chat, SEQ)


def _masked_loss(model: torch.nn.Module, packed) -> float:
    rows = packed.rows(list(range(packed.n_rows)))
    model.eval()
    nats, count, _ = eval_batches(model, [rows])
    return nats / count


def test_sft_lowers_the_masked_loss_and_writes_a_loadable_checkpoint(base: Path, chat: Path, tmp_path: Path) -> None:
    final = _train(_args(base, chat, tmp_path / "run", steps=12, **{"chat.val_fraction": 0.2, "optim.lr": 1e-2,
                                                                    "run.eval_every": 6}))
    before, packed = _packed(base, chat)
    after = checkpoint.load(final)
    assert _masked_loss(after.model, packed) < _masked_loss(before.model, packed) - 0.5
    vals = [r["val_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(final).eval()
    ids = torch.tensor([packed.tokens[0, :SEQ].tolist()])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, after.model.eval()(ids), rtol=1e-5, atol=1e-5)
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(final).chat_template


def test_first_step_loss_is_the_mean_over_exactly_the_assistant_tokens(base: Path, chat: Path,
                                                                      tmp_path: Path) -> None:
    loaded, packed = _packed(base, chat)
    # one global batch holds every packed row once: the first step's loss is the mean over all examples
    _train(_args(base, chat, tmp_path / "run", steps=1, **{"data.batch_tokens": packed.n_rows * SEQ}))
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["loss"]
    tok: Tokenizer = loaded.tokenizer
    examples, _ = read_examples([str(chat)])
    total, count = 0.0, 0
    for ex in examples:  # by hand: each example alone, unpacked, its assistant tokens only
        r = render(ex, tok)
        said = tok.decode([i for i, m in zip(r.ids, r.mask) if m])
        assert said == ex.messages[-1]["content"] + "<|im_end|>"
        ids = torch.tensor([r.ids])
        with torch.no_grad():
            logp = F.log_softmax(loaded.model.eval()(ids[:, :-1]).float(), -1)[0]  # (T, V)
        targets = torch.tensor(r.ids[1:])
        keep = torch.tensor(r.mask[1:])
        total -= float(logp[torch.arange(len(targets)), targets][keep].sum())
        count += int(keep.sum())
    assert first == pytest.approx(total / count, rel=1e-5)


def test_lora_sft_changes_only_the_adapter_and_peft_loads_it(base: Path, chat: Path, tmp_path: Path) -> None:
    final = _train(_args(base, chat, tmp_path / "run", steps=8, **{"peft.method": "lora", "peft.r": 4,
                                                                   "optim.lr": 1e-2}))
    assert_bitwise(weights(base), weights(final), "(the base in final/ is the original)")
    ours = load_adapter(checkpoint.load(final).model, final).eval()
    assert any(float(p.detach().abs().sum()) > 0 for n, p in ours.named_parameters() if ".lora_B." in n)
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    ids = torch.tensor([[5, 40, 77, 120, 9, 200, 31]])
    for base_dir in (final, base):  # final/'s own base, and the original one it equals
        ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), final).eval()
        with torch.no_grad():
            torch.testing.assert_close(ref(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
        plain = checkpoint.load(base).model.eval()(ids)
        assert not torch.allclose(plain, ours(ids))
    assert cli.main(["merge", str(final), "--adapter", str(final), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():  # W + s B A rounded once into fp32 against x W + s (x A) B: a few ulps of the logits apart
        torch.testing.assert_close(checkpoint.load(tmp_path / "merged").model.eval()(ids), ours(ids),
                                   rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_lora_trains_the_rows_of_added_chatml_tokens_and_peft_loads_them(tie: bool, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    tok = plain_tokenizer([m["content"] for r in _rows() for m in r["messages"]] * 4)
    plain = checkpoint.save(tiny_model(vocab_size=tok.vocab_size, tie=tie), tmp_path / "plain", tok)  # no template
    chat = write_jsonl(tmp_path / "chat.jsonl", _rows())
    lora = {"peft.method": "lora", "peft.r": 4, "optim.lr": 1e-2}
    final = _train(_args(plain, chat, tmp_path / "run", steps=8, **lora, **{"run.ckpt_every": 4}))
    # resumed from step 4 (the adapter and the rows put back onto the resized base): the same bits
    resumed = _train(_args(plain, chat, tmp_path / "resumed", steps=8, **lora,
                           **{"run.resume": str(tmp_path / "run" / "checkpoints" / "step_0000004")}))
    assert_bitwise(*(load_file(str(d / "adapter_model.safetensors")) for d in (final, resumed)))
    saved = checkpoint.load(final)
    new = [saved.tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>")]
    assert min(new) >= tok.vocab_size
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == (new if tie else {"embed_tokens": new, "lm_head": new})
    ours = load_adapter(saved.model, final).eval()
    ids = torch.tensor([[new[0], 5, 40, 77, new[1], 120, 9, new[0], 31]])
    ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(final), final).eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
    assert cli.main(["merge", str(final), "--adapter", str(final), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():  # W + s B A rounded once into fp32 against x W + s (x A) B: a few ulps of the logits apart
        torch.testing.assert_close(checkpoint.load(tmp_path / "merged").model.eval()(ids), ours(ids),
                                   rtol=1e-5, atol=5e-5)
    merged, start, original = weights(tmp_path / "merged"), weights(final), weights(plain)
    old = torch.tensor([i for i in range(saved.model.config.vocab_size) if i not in new])
    for key in ["model.embed_tokens.weight"] + ([] if tie else ["lm_head.weight"]):
        assert torch.equal(start[key][:tok.vocab_size], original[key])  # final/'s base: the original rows
        assert torch.equal(merged[key][old], start[key][old])  # no old row trained
        assert bool(((merged[key][new] - start[key][new]).abs().amax(-1) > 1e-4).all())  # each new row did


def _cli_words(args: dict[str, object]) -> list[str]:
    words = [sys.executable, "-m", "tinylm", "sft"]
    for k, v in args.items():
        words += [f"--{k}", str(v)]
    return words


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "lora"])
def test_kill9_then_resume_is_bitwise_identical(method: str, base: Path, chat: Path, tmp_path: Path,
                                                rng: np.random.Generator) -> None:
    steps = 24
    extra = {"peft.method": method, "chat.val_fraction": 0.2, "run.eval_every": 6}
    reference = _train(_args(base, chat, tmp_path / "straight", steps=steps, **extra))
    args = _args(base, chat, tmp_path / "killed", steps=steps, **extra, **{"run.ckpt_every": 4})
    kill_at = int(rng.integers(5, 20))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    run_and_kill(_cli_words(args), tmp_path / "killed" / "metrics.jsonl", kill_at, env)
    resumed = subprocess.run(_cli_words({**args, "run.resume": "auto"}), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, f"{kill_note(kill_at)} {resumed.stderr}"
    assert_bitwise(weights(reference), weights(tmp_path / "killed" / "final"), kill_note(kill_at))
    if method == "lora":
        from safetensors.torch import load_file

        assert_bitwise(load_file(str(reference / "adapter_model.safetensors")),
                       load_file(str(tmp_path / "killed" / "final" / "adapter_model.safetensors")), kill_note(kill_at))


def _ddp_worker(rank: int, world: int, port: int, args: dict[str, object]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _train(args)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "lora"])
def test_ddp_two_processes_match_one(method: str, base: Path, chat: Path, tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # 4 packed rows a step: 2 ranks x 2 micro-steps x 1 row, against 4 micro-steps in one process; the rows
    # hold unequal numbers of assistant tokens, so only the weighting over micro-batches and ranks makes them agree
    extra = {"peft.method": method, "peft.r": 4, "data.micro_batch": 1, "chat.val_fraction": 0.2,
             "run.eval_every": 3, "optim.lr": 1e-2}
    mp.spawn(_ddp_worker, args=(2, port, _args(base, chat, tmp_path / "ddp", steps=6, **extra)), nprocs=2)
    _train(_args(base, chat, tmp_path / "one", steps=6, **extra))
    one, two = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("one", "ddp"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
        assert a.get("val_loss", 0.0) == pytest.approx(b.get("val_loss", 0.0), abs=1e-5), (a, b)
    assert len([r for r in two if "val_loss" in r]) == 2
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    got, want = (load_file(str(tmp_path / run / "final" / name)) for run in ("ddp", "one"))
    assert got.keys() == want.keys()
    for k in want:  # the ranks sum in another order (~1e-7); Adam's normalised steps lift that on tiny gradients
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-4)
    if method == "none":  # the runs trained: full fine-tuning moved the weights
        start = load_file(str(base / "model.safetensors"))
        assert any(not torch.equal(want[k], start[k]) for k in want)


ASSISTANT = {"role": "assistant", "content": "it is 3"}
USER = {"role": "user", "content": "1 plus 2"}


@pytest.mark.parametrize("row, says", [
    ({"text": "no fields"}, "no 'messages'"),
    ({"messages": [USER, {"role": "assistant", "content": "  "}]}, "empty assistant turn"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "{1"}}]}]},
     "do not parse"),
    ({"messages": [USER, {"role": "assistant", "content": "it is " + "3 " * 200}]}, "longer than the context"),
])
def test_bad_data_is_one_line_exit_2_and_nothing_written(row: dict, says: str, base: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", _rows(3) + [row])
    out = tmp_path / "out"
    code, err = run_bad_data("sft", base, data, out, SEQ, capsys)
    assert code == 2 and err.startswith("tinylm: error: ") and err.count("\n") == 1, err
    assert says in err, err
    assert not out.exists()


def test_qlora_sft_saves_the_quantised_base_and_the_adapter(base: Path, chat: Path, tmp_path: Path) -> None:
    from tinylm.model.qlinear import QLinear
    from tinylm.stages.merge import merge_into

    final = _train(_args(base, chat, tmp_path / "run", steps=3, **{"peft.method": "qlora", "peft.quantize": "int8"}))
    assert json.loads((final / "config.json").read_text())["tinylm"]["quantization"]["scheme"] == "int8"
    saved = checkpoint.load(final).model
    layer = saved.model.layers[0].self_attn.q_proj
    want = QLinear.from_linear(checkpoint.load(base).model.model.layers[0].self_attn.q_proj, "int8", 0)
    assert isinstance(layer, QLinear) and torch.equal(layer.qweight, want.qweight)  # the base is not trained
    ours = load_adapter(saved, final).eval()
    ids = torch.tensor([[5, 40, 77, 120, 9]])
    with torch.no_grad():
        merged, n = merge_into(checkpoint.load(final).model, final)
        assert n == 14  # 2 layers x 7 linear layers
        # the unmerged int8 layers run PyTorch's kernel on bf16 activations: agreement to bf16 rounding
        torch.testing.assert_close(merged.eval()(ids), ours(ids), rtol=2e-2, atol=2e-2)
