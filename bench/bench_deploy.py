"""Deploy benchmarks: decode speed (tinylm eager / tinylm --fast / transformers / llama.cpp), size on
disk and peak RSS per quantisation scheme, perplexity and TinyTales validity per scheme, and the
llama.cpp agreement check on a trained model.

    python bench/bench_deploy.py decode --models 1m 15m smollm2-135m --batch 1 8 --runs 5
    python bench/bench_deploy.py schemes --model CKPT_DIR
    python bench/bench_deploy.py llama-cpp --model CKPT_DIR

Speeds are medians over `--runs` rounds; within a round the engines alternate, so the shared machine's
load hits them alike. Ratios are against tinylm --fast measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm.core.fs import disk_size
from tinylm.data import tinytales
from tinylm.data.tokenizer import Tokenizer, train_tokenizer
from tinylm.formats import checkpoint
from tinylm.formats import gguf as gguf_format
from tinylm.infer.generate import generate_ids
from tinylm.model.config import preset
from tinylm.model.llama import Llama
from tinylm.stages.quantize import quantize_model

PROMPT = list(range(10, 26))  # 16 prompt tokens


def _model(name: str) -> tuple[Llama, Tokenizer]:
    # A random preset gets a small TinyTales tokenizer: the GGUF pads it with unused tokens to the vocab size.
    if name in ("smollm2-135m",):
        loaded = checkpoint.load(name)
        return loaded.model, loaded.tokenizer
    torch.manual_seed(0)
    return Llama(preset(name)).eval(), train_tokenizer(tinytales.generate(300, seed=5), 300)


def _tinylm(model: Llama, batch: int, new: int, fast: bool) -> float:
    t = time.perf_counter()
    generate_ids(model, [PROMPT] * batch if batch > 1 else PROMPT, new, temperature=0.0, fast=fast)
    return batch * new / (time.perf_counter() - t)


def _transformers(hf, batch: int, new: int) -> float:
    ids = torch.tensor([PROMPT] * batch)
    t = time.perf_counter()
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return batch * new / (time.perf_counter() - t)


def _llama_cpp(llm, new: int) -> float:
    llm.reset()
    t, n = time.perf_counter(), 0
    for _ in llm.generate(PROMPT, temp=0.0, top_k=1, repeat_penalty=1.0):
        n += 1
        if n == new:
            break
    return new / (time.perf_counter() - t)


def decode(args: argparse.Namespace) -> None:
    """Decode tokens/s per model and batch size, as a markdown table."""
    from transformers import AutoModelForCausalLM

    print("| model | batch | tinylm eager tok/s | tinylm fast tok/s | transformers tok/s | llama.cpp tok/s "
          "| fast/eager | fast/transformers | fast/llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model, tok = _model(name)
        tmp = Path(tempfile.mkdtemp())
        checkpoint.save(model, tmp / "hf")
        hf = AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32).eval()
        llm = None
        if args.llama_cpp:
            import llama_cpp

            gguf_format.export_gguf(model, tmp / "m.gguf", tok, "q8_0" if args.scheme == "int8" else "f32")
            llm = llama_cpp.Llama(str(tmp / "m.gguf"), n_ctx=256, n_threads=torch.get_num_threads(),
                                  n_batch=64, verbose=False, vocab_only=False)
        if args.scheme == "int8":  # tinylm per-channel int8 (lm_head included) vs llama.cpp Q8_0; HF stays fp32
            quantize_model(model, "int8", 0)
        for batch in args.batch:
            _tinylm(model, batch, args.new, fast=True)  # compile (same cache shape) outside the timed rounds
            rows: dict[str, list[float]] = {"eager": [], "fast": [], "hf": [], "cpp": []}
            for _ in range(args.runs):
                rows["fast"].append(_tinylm(model, batch, args.new, fast=True))
                rows["eager"].append(_tinylm(model, batch, args.new, fast=False))
                rows["hf"].append(_transformers(hf, batch, args.new))
                if llm is not None and batch == 1:
                    rows["cpp"].append(_llama_cpp(llm, args.new))
            med = {k: statistics.median(v) if v else float("nan") for k, v in rows.items()}
            print(f"| {name} | {batch} | {med['eager']:.0f} | {med['fast']:.0f} | {med['hf']:.0f} | "
                  f"{med['cpp']:.0f} | {med['fast'] / med['eager']:.2f} | {med['fast'] / med['hf']:.2f} | "
                  f"{med['fast'] / med['cpp']:.2f} |", flush=True)
    print(f"\n`python bench/bench_deploy.py decode --scheme {args.scheme} --models {' '.join(args.models)} --batch "
          f"{' '.join(map(str, args.batch))} --runs {args.runs} --new {args.new}"
          f"{'' if args.llama_cpp else ' --no-llama-cpp'}` (torch threads: {torch.get_num_threads()})")


_RSS_CHILD = """
import resource, sys, torch
from tinylm.formats import checkpoint
from tinylm.infer.generate import generate_ids
torch.set_num_threads({threads})
m = checkpoint.load(sys.argv[1]).model
generate_ids(m, [1, 2, 3, 4], 32, temperature=0.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_mb(path: Path) -> float:
    code = _RSS_CHILD.format(threads=torch.get_num_threads())
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return int(out.stdout.split()[-1]) / 1024


def schemes(args: argparse.Namespace) -> None:
    """Size on disk, peak RSS (load + 32 tokens), held-out perplexity and TinyTales validity per scheme."""
    from tinylm.stages.quantize import QuantizeConfig, held_out_ids, perplexity, quantize

    tmp = Path(tempfile.mkdtemp())
    base = checkpoint.load(args.model)
    ids = held_out_ids(base.tokenizer, None, args.eval_tokens)
    paths = {"fp32": Path(args.model)}
    for scheme in ("int8", "int4"):
        quantize(QuantizeConfig(args.model, scheme, str(tmp / scheme), eval_tokens=2048))
        paths[scheme] = tmp / scheme
    for gtype in ("f32", "q8_0", "q4_0"):
        paths[f"gguf {gtype}"] = gguf_format.export_gguf(base.model, tmp / f"{gtype}.gguf", base.tokenizer, gtype)
    print("| scheme | size on disk (kB) | peak RSS (MB) | held-out perplexity | change | TinyTales sentences valid |")
    print("|---|---|---|---|---|---|")
    ref = None
    for name, path in paths.items():
        loaded = checkpoint.load(path)
        ppl = perplexity(loaded.model, ids)
        ref = ref or ppl
        tok = loaded.tokenizer
        rows = generate_ids(loaded.model, [tok.encode("Once")] * args.stories, args.story_tokens, temperature=0.8,
                            seed=0, stop_ids=[tok.eos_id])
        result = tinytales.check_many("Once" + tok.decode([t for t in r if t != tok.eos_id]) for r in rows)
        print(f"| {name} | {disk_size(path) / 1e3:.0f} | {_peak_rss_mb(path):.0f} | {ppl:.3f} | "
              f"{100 * (ppl / ref - 1):+.2f}% | {result.fraction:.3f} |", flush=True)
    print(f"\n`python bench/bench_deploy.py schemes --model {args.model}` (held-out: 200 TinyTales stories, seed "
          f"987654321, first {args.eval_tokens} tokens; {args.stories} stories of {args.story_tokens} tokens)")


def llama_cpp_check(args: argparse.Namespace) -> None:
    """The f32 GGUF of a trained model in llama.cpp: tokens, greedy continuation and perplexity vs tinylm."""
    import llama_cpp
    import numpy as np

    from tinylm.stages.quantize import perplexity

    loaded = checkpoint.load(args.model)
    tok, model = loaded.tokenizer, loaded.model
    path = gguf_format.export_gguf(model, Path(tempfile.mkdtemp()) / "m.gguf", tok, "f32")
    n_ctx = model.config.max_seq_len
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False)
    texts = list(tinytales.generate(50, seed=4242))
    same_tokens = all(llm.tokenize(t.encode(), add_bos=False, special=True) == tok.encode(t) for t in texts)
    prompt = tok.encode(texts[0])[:12]
    ours = generate_ids(model, prompt, 64, temperature=0.0)
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        theirs.append(t)
        if len(theirs) == 64 or t == tok.eos_id:
            break
    ids = tok.encode("\n\n".join(texts))[: n_ctx + 1]
    llm.reset()
    llm.eval(ids[:-1])
    logp = torch.tensor(np.array(llm.scores[: len(ids) - 1])).log_softmax(-1)
    ppl_cpp = torch.exp(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean()).item()
    ppl_ours = perplexity(model, ids, seq_len=n_ctx)
    print("| model | same tokens (50 stories) | same greedy 64 tokens | tinylm ppl | llama.cpp ppl | ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.model} | {same_tokens} | {theirs == ours[:len(theirs)]} | {ppl_ours:.4f} | {ppl_cpp:.4f} | "
          f"{ppl_cpp / ppl_ours:.5f} |")
    print(f"\n`python bench/bench_deploy.py llama-cpp --model {args.model}`")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--models", nargs="+", default=["1m", "15m", "smollm2-135m"])
    d.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    d.add_argument("--runs", type=int, default=5)
    d.add_argument("--new", type=int, default=128)
    d.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false")
    d.add_argument("--scheme", choices=["fp32", "int8"], default="fp32",
                   help="int8: tinylm's per-channel int8 model against llama.cpp on the Q8_0 GGUF")
    s = sub.add_parser("schemes")
    s.add_argument("--model", required=True)
    s.add_argument("--eval-tokens", type=int, default=16384)
    s.add_argument("--stories", type=int, default=20)
    s.add_argument("--story-tokens", type=int, default=200)
    c = sub.add_parser("llama-cpp")
    c.add_argument("--model", required=True)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"decode": decode, "schemes": schemes, "llama-cpp": llama_cpp_check}[args.what](args)


if __name__ == "__main__":
    main()
