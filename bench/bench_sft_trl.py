"""tinylm sft vs TRL's SFTTrainer on SmolLM2-135M-Instruct: steps' tokens/s, peak RSS and the loss curves.

Both tools train the same rows in the same order from the same weights with the same settings, each
run its own process, alternated (the order swapped every pair) so a shared machine's drift falls on
both:

- data: 400 TinyTales-Instruct chat examples (`tinylm data task tinytales-instruct`) rendered with
  SmolLM2's chat template, loss on the assistant tokens only, packed by tinylm into rows of 513 tokens
  (512 targets), attention and positions restarting at each example. TRL gets exactly the rows tinylm
  trains on, step by step (`input_ids`, `labels` with -100 off the assistant tokens, and `seq_lengths`,
  TRL's packed-row format, which its padding-free collator turns into restarting `position_ids`; HF's
  sdpa mask then keeps examples apart as tinylm's does). TRL's own packing (`packing=True`, BFD) would
  put other examples into other rows and change the loss curve; it is a data-preparation step and adds
  nothing to a training step.
- 2 rows per step, lr 1e-4 constant without warmup, AdamW (0.9, 0.95, eps 1e-8), no weight decay, gradient
  clipping at 1.0, fp32, no gradient checkpointing, no compile, sdpa attention, `--threads` threads.
- LoRA r 16, alpha 32, dropout 0 on every linear layer but lm_head; TRL's adapters get tinylm's initial A
  matrices (the same seeded kaiming-uniform draw, `init_lora_like_tinylm`), so the curves can agree
  after the first step too. Full fine-tuning trains every weight (embeddings tied to lm_head).

Step time: tinylm's logged per-step `tokens_per_s` (`train.loop.fit`, `--run.log_every 1`), TRL's interval
between consecutive `on_step_end` callbacks; the first step is warmup and left out, and a run's figure is
the median of the others. Peak RSS: the child's own `ru_maxrss` (`os.wait4`). TRL's QLoRA needs
bitsandbytes on CUDA and is not compared.

    pip install trl==1.16.0            # a bench tool, not a tinylm dependency
    python bench/bench_sft_trl.py --pairs 3 --steps 6 --methods lora,full --work /path/to/scratch
    python bench/bench_sft_trl.py --role profile --work /path/to/scratch   # one LoRA step's op breakdown
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
SEQ_LEN, ROWS, LR, R, ALPHA, SEED = 512, 2, 1e-4, 16, 32.0, 0


# ----- preparation (the parent process) ---------------------------------------------------------------------

def tinylm(*args: str) -> list[str]:
    return [sys.executable, "-m", "tinylm", *args]


def prepare(work: Path, steps: int) -> None:
    """chat.jsonl, the HF export of the base for TRL, and rows.pt: tinylm's packed rows of each step."""
    import torch

    from tinylm.data.chat import add_chatml, read_examples
    from tinylm.formats import checkpoint
    from tinylm.stages.sft import SftChatSection, pack_examples

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "chat.jsonl").is_file():
        subprocess.run(tinylm("data", "task", "tinytales-instruct", "--n", "400", "--out", str(work / "chat.jsonl")),
                       check=True, stdout=subprocess.DEVNULL)
    if not (work / "hf").is_dir():
        subprocess.run(tinylm("export", MODEL, "--format", "hf", "--out", str(work / "hf")), check=True,
                       stdout=subprocess.DEVNULL)
    loaded = checkpoint.load(MODEL)
    tokenizer, _ = add_chatml(loaded.tokenizer, loaded.model)  # what `tinylm sft` does (SmolLM2 has a template)
    examples, _ = read_examples([str(work / "chat.jsonl")])
    packed = pack_examples(examples, tokenizer, SftChatSection(), SEQ_LEN)
    source = packed.batches(SEED, ROWS)  # the batch source `tinylm sft` trains on (data.seed 0)
    rows: dict[str, list[Any]] = {"input_ids": [], "labels": [], "seq_lengths": []}
    for step in range(steps):
        b = source(step, 0, ROWS)
        labels = b.targets.masked_fill(~b.mask, -100)  # (B, T): -100 off the assistant tokens and across examples
        for tok, lab, seg in zip(b.tokens, labels, b.segments):
            rows["input_ids"].append(tok.tolist())  # 513 tokens: HF shifts the labels inside the model
            rows["labels"].append([-100] + lab.tolist())
            rows["seq_lengths"].append(torch.unique_consecutive(seg, return_counts=True)[1].tolist())
    torch.save(rows, work / "rows.pt")


def tinylm_cmd(method: str, work: Path, steps: int, out: Path) -> list[str]:
    peft = [] if method == "full" else ["--peft.method", "lora", "--peft.r", str(R), "--peft.alpha", str(ALPHA)]
    return tinylm("sft", MODEL, "--data", str(work / "chat.jsonl"), "--out", str(out),
                  "--data.seq_len", str(SEQ_LEN), "--data.batch_tokens", str(SEQ_LEN * ROWS), "--data.micro_batch",
                  str(ROWS), "--schedule.steps", str(steps), "--schedule.kind", "constant", "--schedule.warmup_steps",
                  "1", "--optim.lr", str(LR), "--optim.width_scaling", "false", "--optim.weight_decay", "0",
                  "--run.dtype", "float32", "--run.compile", "false", "--run.eval_every", "0", "--run.ckpt_every",
                  "0", "--run.log_every", "1", "--run.progress", "false", "--run.plot", "false",
                  "--chat.val_fraction", "0", *peft)


def trl_cmd(method: str, work: Path, steps: int, out: Path, threads: int) -> list[str]:
    return [sys.executable, __file__, "--role", "trl", "--methods", method, "--work", str(work), "--steps", str(steps),
            "--out", str(out), "--threads", str(threads)]


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Run one child to the end; (wall seconds, its peak RSS in bytes). Raises on failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def tinylm_steps(out: Path) -> tuple[list[float], list[float]]:
    """(per-step seconds, per-step loss) from OUT/metrics.jsonl (one line per step with log_every 1)."""
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"tokens_per_s"' in line]
    return [SEQ_LEN * ROWS / r["tokens_per_s"] for r in rows], [r["loss"] for r in rows]


# ----- the TRL child ----------------------------------------------------------------------------------------

def init_lora_like_tinylm(model: Any, seed: int) -> int:
    """Give PEFT's lora_A matrices tinylm's initial values: `model.lora.apply_lora` draws each A, in
    `named_modules` order of the target layers (the same order in HF's Llama), kaiming-uniform (a = sqrt(5))
    from one generator seeded with run.seed. Returns the number of layers set."""
    import math

    import torch

    generator = torch.Generator().manual_seed(seed)
    n = 0
    for name, module in model.named_modules():
        if name.endswith(".lora_A.default"):
            with torch.no_grad():
                torch.nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            n += 1
    return n


def trl_child(method: str, work: Path, steps: int, out: Path, threads: int) -> None:
    """Train with TRL's SFTTrainer on rows.pt; write OUT/steps.json (per-step seconds and losses)."""
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = [time.perf_counter()]  # replaced at the first step's start
            self.losses: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 0:
                self.ends = [time.perf_counter()]

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ends.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    rows = torch.load(work / "rows.pt")
    data = Dataset.from_dict(rows)
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    cfg = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=ROWS, gradient_accumulation_steps=1,
                    learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
                    adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, bf16=False, fp16=False,
                    gradient_checkpointing=False, use_cpu=True, packing=False, padding_free=True, max_length=None,
                    train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to="none",
                    disable_tqdm=True, seed=SEED, dataloader_num_workers=0)
    peft = None if method == "full" else LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                                    task_type="CAUSAL_LM")
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tokenizer, peft_config=peft,
                         callbacks=[timer])
    if peft is not None and init_lora_like_tinylm(trainer.model, SEED) != 30 * 7:
        raise SystemExit("expected 210 LoRA layers (30 blocks x 7 linear layers)")
    trainer.train()
    step_s = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    (out / "steps.json").write_text(json.dumps({"step_s": step_s, "loss": timer.losses, "optim": cfg.optim}))


def profile_step(work: Path, threads: int, step: int = 1) -> None:
    """Where one LoRA step's time goes, tinylm vs HF + PEFT (TRL's model), on the rows of `step`: torch.profiler
    op totals of forward + backward + AdamW, after one untimed step each. Both models in one process."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tinylm.data.tokens import Batch
    from tinylm.formats import checkpoint
    from tinylm.model.lora import ALL_LINEAR, apply_lora
    from tinylm.train.losses import lm_loss

    torch.set_num_threads(threads)
    rows = torch.load(work / "rows.pt")
    pick = range(step * ROWS, (step + 1) * ROWS)
    examples = [{k: rows[k][i] for k in rows} for i in pick]
    tokens = torch.tensor([e["input_ids"] for e in examples])  # (B, T + 1)
    labels = torch.tensor([e["labels"] for e in examples])[:, 1:]  # (B, T)
    segments = torch.stack([torch.repeat_interleave(torch.arange(len(e["seq_lengths"])), torch.tensor(e["seq_lengths"]))
                            for e in examples])  # (B, T + 1)
    batch = Batch(tokens, mask=labels != -100, segments=segments)
    ours = apply_lora(checkpoint.load(MODEL).model, R, ALPHA, 0.0, ALL_LINEAR, seed=SEED).train()
    hf = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa")
    hf = get_peft_model(hf, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                       task_type="CAUSAL_LM")).train()
    hf_batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    hf_batch = {k: v for k, v in hf_batch.items() if k in ("input_ids", "labels", "position_ids")}
    steps = {"tinylm": (ours, lambda: lm_loss(ours, batch)[0]),
             "HF + PEFT": (hf, lambda: hf(**hf_batch, use_cache=False).loss)}
    for name, (model, loss_of) in steps.items():
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=LR)

        def one() -> float:
            loss = loss_of()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

        one()  # warmup
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss = one()
        print(f"## {name}: one step {time.perf_counter() - t0:.2f} s under the profiler, loss {loss:.4f}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40))


# ----- the report -------------------------------------------------------------------------------------------

def summarise(results: dict[str, dict[str, list[dict]]]) -> str:
    """Markdown: per method, tokens/s and peak RSS of each tool with the per-pair ratio, and the loss curves."""
    lines = []
    tokens = SEQ_LEN * ROWS
    for method, tools in results.items():
        t, h = tools["tinylm"], tools["trl"]
        tps = {k: [tokens / statistics.median(r["step_s"][1:]) for r in runs] for k, runs in tools.items()}
        ratios = [a / b for a, b in zip(tps["tinylm"], tps["trl"])]
        lines += [f"### {method}", "", "| | steps' tokens/s (median of runs) | runs | peak RSS | wall s |", "|---|---|---|---|---|"]
        for k in ("tinylm", "trl"):
            runs = tools[k]
            lines.append(f"| {k} | {statistics.median(tps[k]):.0f} | {', '.join(f'{x:.0f}' for x in tps[k])} | "
                         f"{statistics.median(r['rss'] for r in runs) / 1e9:.2f} GB | "
                         f"{statistics.median(r['wall'] for r in runs):.1f} |")
        lines += ["", f"tinylm / TRL tokens/s per pair: {', '.join(f'{x:.2f}' for x in ratios)}; "
                      f"median {statistics.median(ratios):.2f}", ""]
        lt, lh = t[0]["loss"], h[0]["loss"]
        diff = max(abs(a - b) for a, b in zip(lt, lh))
        lines += ["| step | tinylm loss | TRL loss |", "|---|---|---|"]
        lines += [f"| {i + 1} | {a:.4f} | {b:.4f} |" for i, (a, b) in enumerate(zip(lt, lh))]
        same = all(r["loss"] == lt for r in t) and all(r["loss"] == lh for r in h)
        lines += ["", f"max |loss difference| {diff:.2e}; every run of a tool gave the same curve: {same}", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3, help="tinylm / TRL pairs per method")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    p.add_argument("--methods", default="lora,full", help="lora, full or both")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("bench-sft-trl"))
    p.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.role == "trl":
        return trl_child(a.methods, a.work, a.steps, a.out, a.threads)
    if a.role == "profile":  # after a run of the bench has written WORK/rows.pt
        return profile_step(a.work, a.threads)
    a.work = a.work.resolve()
    prepare(a.work, a.steps)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, dict[str, list[dict]]] = {}
    for method in a.methods.split(","):
        results[method] = {"tinylm": [], "trl": []}
        for i in range(a.pairs):
            for tool in ("tinylm", "trl") if i % 2 == 0 else ("trl", "tinylm"):
                out = a.work / f"{method}-{tool}-{i}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                if tool == "tinylm":
                    wall, rss = run_child(tinylm_cmd(method, a.work, a.steps, out), env)
                    step_s, loss = tinylm_steps(out)
                else:
                    out.mkdir(parents=True)
                    wall, rss = run_child(trl_cmd(method, a.work, a.steps, out, a.threads), env)
                    rec = json.loads((out / "steps.json").read_text())
                    step_s, loss = rec["step_s"], rec["loss"]
                results[method][tool].append(dict(step_s=step_s, loss=loss, rss=rss, wall=wall))
                print(f"{method} {tool} pair {i + 1}: {SEQ_LEN * ROWS / statistics.median(step_s[1:]):.0f} tokens/s, "
                      f"peak RSS {rss / 1e9:.2f} GB, wall {wall:.1f} s, losses {[round(x, 4) for x in loss]}", flush=True)
    (a.work / "results.json").write_text(json.dumps(results, indent=1))
    print(summarise(results))


if __name__ == "__main__":
    main()
