"""Speculative decoding at batch 1: acceptance rate and wall-clock speed-up over plain greedy decoding, with
prompt lookup and (given --draft) a draft model, on free text and on a structured task (JSON extraction).

    python bench/bench_speculative.py --model smollm2-135m --draft runs/kd-draft/final --prompts 8 --new 128 \\
        --runs 3 --draft-k 5 --threads 4

Free text: chat requests for short stories and explanations. JSON extraction: a passage about a person,
generated from fixed lists, and a request for a JSON object whose fields are copied from it (the case where
prompt lookup shines: most of the answer is in the prompt). Both go through the model's chat template when it
has one. Every decode is greedy up to --new tokens or eos. Within a round each prompt is decoded plainly
(`generate_ids`) and speculatively (`speculative_generate_ids`) one after the other, so a shared machine's load
hits both alike; the table gives the medians over --runs rounds of tokens/s, the median per-round speed-up,
the acceptance rate (accepted / drafted tokens), the mean accepted length (accepted draft tokens per target
forward) and whether every speculative output equalled the plain one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm.formats import checkpoint
from tinylm.infer.generate import generate_ids
from tinylm.infer.speculative import Drafter, SpecStats, speculative_generate_ids
from tinylm.model.kvcache import KVCache
from tinylm.stages.generate import load_drafter

STORIES = ["Write a short story about a dragon who learns to bake bread.",
           "Explain how rainbows form, in a few paragraphs.",
           "Describe a day in the life of a lighthouse keeper.",
           "Write a letter from a cat to its owner about the new dog.",
           "Explain why the sky is blue to a ten-year-old.",
           "Tell a story about two friends lost in a forest at night.",
           "Describe the water cycle step by step.",
           "Write a short fable about a patient tortoise and a busy bee."]
NAMES = ["Maria Lopez", "James Carter", "Aiko Tanaka", "Samuel Okafor", "Elena Petrova", "Lucas Martin",
         "Priya Sharma", "Noah Fischer"]
CITIES = ["Lisbon", "Denver", "Osaka", "Lagos", "Kazan", "Lyon", "Pune", "Graz"]
JOBS = [("nurse", "Santa Maria Hospital"), ("carpenter", "Oakline Builders"), ("teacher", "Minato High School"),
        ("engineer", "Delta Power"), ("chemist", "Volga Labs"), ("baker", "Maison Dupont"),
        ("pilot", "Sky India"), ("architect", "Studio Berg")]


def free_text(n: int) -> list[str]:
    return [STORIES[i % len(STORIES)] for i in range(n)]


def json_extraction(n: int) -> list[str]:
    """Passages about a person and a request for their details as JSON copied from the passage."""
    prompts = []
    for i in range(n):
        name, city, (job, employer) = NAMES[i % 8], CITIES[(3 * i + 1) % 8], JOBS[(5 * i + 2) % 8]
        age = 23 + (7 * i) % 40
        passage = (f"{name} is a {age}-year-old {job} who lives in {city}. Since moving there, {name.split()[0]} "
                   f"has worked at {employer}, where colleagues describe the work as careful and steady. "
                   f"On weekends {name.split()[0]} walks along the river and visits the market in {city}.")
        prompts.append(f"Passage: {passage}\n\nExtract the person's details from the passage as a JSON object "
                       f'with the fields "name", "age", "city", "occupation" and "employer". Copy the values '
                       f"exactly as they appear in the passage. Answer with the JSON only.")
    return prompts


TASKS = {"free": free_text, "json": json_extraction}


def encode(tok, text: str) -> list[int]:
    if tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tok.encode(text)


def one_round(model, drafter: Drafter, prompts: list[list[int]], new: int, k: int, eos: list[int]
              ) -> tuple[float, float, SpecStats, bool]:
    """Plain and speculative tokens/s over all prompts (alternating per prompt), the acceptance counts, and
    whether every speculative output equalled the plain one."""
    plain_s = spec_s = 0.0
    plain_n = spec_n = 0
    stats, equal = SpecStats(), True
    for ids in prompts:
        t = time.perf_counter()
        want = generate_ids(model, ids, new, temperature=0.0, stop_ids=eos)
        plain_s += time.perf_counter() - t
        t = time.perf_counter()
        got, counts = speculative_generate_ids(model, ids, drafter.fresh(), new, temperature=0.0, stop_ids=eos,
                                               k_max=k)
        spec_s += time.perf_counter() - t
        plain_n, spec_n = plain_n + len(want), spec_n + len(got)
        stats.add(counts)
        equal &= got == want
    return plain_n / plain_s, spec_n / spec_s, stats, equal


def verify_cost(model, k: int, context: int = 64, n: int = 20) -> tuple[float, float]:
    """Median ms of the target's cached forward over 1 position and over k + 1 (a verification), after
    `context` cached positions: what a drafted token costs the target on this machine."""
    times = {}
    for t in (1, k + 1):
        runs = []
        for _ in range(n):
            cache = KVCache.new(model, 1, context + t)
            model(torch.randint(3, 1000, (1, context)), cache=cache)
            ids = torch.randint(3, 1000, (1, t))
            start = time.perf_counter()
            model(ids, cache=cache)
            runs.append(time.perf_counter() - start)
        times[t] = 1e3 * statistics.median(runs)
    return times[1], times[k + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="the target model (any model source)")
    parser.add_argument("--draft", default=None, help="a draft model sharing the target's tokenizer (row skipped "
                                                      "without it)")
    parser.add_argument("--tasks", nargs="*", choices=sorted(TASKS), default=["free", "json"],
                        help="none: only the verification cost")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per task")
    parser.add_argument("--new", type=int, default=128, help="most tokens generated per prompt")
    parser.add_argument("--draft-k", type=int, default=5, help="most draft tokens per step")
    parser.add_argument("--runs", type=int, default=3, help="alternated rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = checkpoint.load(args.model)
    model, tok = loaded.model.eval(), loaded.tokenizer
    eos = [tok.eos_id] if tok.eos_id is not None else []
    drafters = {"prompt lookup": load_drafter("ngram", loaded)}
    if args.draft:
        drafters[f"draft {args.draft}"] = load_drafter(args.draft, loaded)
    with torch.no_grad():
        generate_ids(model, encode(tok, "Hello"), 4, temperature=0.0)  # warm-up outside the timed rounds
        one, many = verify_cost(model, args.draft_k)
    print(f"target forward: 1 position {one:.1f} ms, {args.draft_k + 1} positions {many:.1f} ms "
          f"({many / one:.2f}x)\n")
    print("| task | drafter | plain tok/s | speculative tok/s | speed-up | acceptance | mean accepted length "
          "| same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for task in args.tasks:
        prompts = [encode(tok, p) for p in TASKS[task](args.prompts)]
        for name, drafter in drafters.items():
            rounds = [one_round(model, drafter, prompts, args.new, args.draft_k, eos) for _ in range(args.runs)]
            plain, spec = [r[0] for r in rounds], [r[1] for r in rounds]
            stats = rounds[0][2]
            ratio = statistics.median(s / p for p, s in zip(plain, spec))
            print(f"| {task} | {name} | {statistics.median(plain):.1f} | {statistics.median(spec):.1f} | "
                  f"{ratio:.2f}x | {100 * stats.acceptance_rate:.0f}% | {stats.mean_accepted:.2f} | "
                  f"{'yes' if all(r[3] for r in rounds) else 'NO'} |", flush=True)
    draft = f" --draft {args.draft}" if args.draft else ""
    print(f"\n`python bench/bench_speculative.py --model {args.model}{draft} --tasks {' '.join(args.tasks)} "
          f"--prompts {args.prompts} --new {args.new} --draft-k {args.draft_k} --runs {args.runs} "
          f"--threads {args.threads}`")


if __name__ == "__main__":
    main()
