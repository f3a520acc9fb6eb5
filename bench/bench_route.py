"""Routing: quality against the share of requests sent to the fallback, on a labelled set, as a curve.

A built-in task's held-out examples (function calling by default) are answered greedily by the small model
(through its chat template, unconstrained unless --small-constrained) and by the fallback (constrained to a
valid call of the tools unless --no-fallback-constrained), and each answer is judged by the task's checker.
For each signal of the small model (mean_logprob, min_logprob, neg_entropy: tinylm.serve.routing) the curve
routes its least sure answers first, as `tinylm serve SMALL --fallback ...` does at the threshold between
them; random routing (the straight line between the two models alone) is the baseline a signal must beat.
It prints and writes a table (quality at fallback shares 0, 10, ..., 100%; the share each signal needs to
reach the fallback's own quality) and a PNG of the curves.

    python bench/bench_route.py --small smollm2-135m --fallback smollm2-135m --n 100 --out-dir bench-work/route
    python bench/bench_route.py --small bench-work/tasks/fc-lora21-merged --fallback smollm2-135m --n 100

The small and the fallback may be the same source (then loaded once): SmolLM2-135M zero-shot and unconstrained
as the small model, the same model under the tools' JSON schema as the fallback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm.core.devices import resolve_device  # noqa: E402
from tinylm.data import tasks  # noqa: E402
from tinylm.data.chat import end_of_turn_id  # noqa: E402
from tinylm.evals.tasks import answer  # noqa: E402
from tinylm.formats.checkpoint import load  # noqa: E402
from tinylm.serve.routing import SIGNALS, Point, answer_signals, curve, plot_curves  # noqa: E402

SHARES = [k / 10 for k in range(11)]


def small_answers(loaded: Any, examples: list[dict[str, Any]], args: argparse.Namespace) -> list[tuple[str, dict]]:
    """The small model's greedy answers with every signal, decoded as the server would."""
    tok = loaded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(e["messages"][:-1], add_generation_prompt=True)) for e in examples]
    stops = sorted({end_of_turn_id(tok)} | ({tok.eos_id} - {None}))
    constraint = None
    if args.small_constrained:
        from tinylm.infer.constrained import JsonConstraint, JsonIndex

        index = JsonIndex(tasks.function_calling.call_schema(), tok, loaded.config.vocab_size)
        constraint = lambda: JsonConstraint(index)  # noqa: E731
    return answer_signals(loaded.model.eval(), tok, prompts, [args.max_tokens] * len(prompts), [stops] * len(prompts),
                          SIGNALS, args.max_batch, constraint)


def at_share(points: list[Point], share: float) -> float:
    """The quality when routing at most `share` of the requests."""
    return [p for p in points if p.share <= share + 1e-9][-1].quality


def table(curves: dict[str, list[Point]], n: int) -> list[str]:
    """Markdown: quality per signal at each fallback share, random routing beside them, then the share each
    signal needs to reach the fallback's own quality."""
    first = next(iter(curves.values()))
    q0, q1 = first[0].quality, first[-1].quality
    lines = [f"| fallback share | {' | '.join(curves)} | random routing |", "|---" * (len(curves) + 2) + "|"]
    for s in SHARES:
        cells = [f"{at_share(points, s):.3f}" for points in curves.values()]
        lines.append(f"| {100 * s:.0f}% | {' | '.join(cells)} | {q0 + s * (q1 - q0):.3f} |")
    needs = []
    for name, points in curves.items():
        reach = next((p for p in points if p.quality >= q1 - 1e-9), points[-1])
        needs.append(f"{name} {100 * reach.share:.0f}%")
    lines += ["", f"n = {n}; the small model alone {q0:.3f}, the fallback alone {q1:.3f}; share sent to the "
                  f"fallback to reach its quality: {', '.join(needs)}"]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", default="smollm2-135m", help="the small model (any tinylm model source)")
    parser.add_argument("--fallback", default="smollm2-135m", help="the fallback model (any tinylm model source)")
    parser.add_argument("--small-constrained", action="store_true", help="decode the small model's calls under "
                        "the tools' JSON schema too (function calling)")
    parser.add_argument("--no-fallback-constrained", dest="fallback_constrained", action="store_false",
                        help="decode the fallback unconstrained")
    parser.add_argument("--task", default="function-calling", choices=list(tasks.TASKS))
    parser.add_argument("--n", type=int, default=100, help="held-out examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=80, help="the most new tokens per answer")
    parser.add_argument("--max-batch", type=int, default=16, help="answers decoded together")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-dir", default="bench-work/route", help="where route.md and route.png go")
    args = parser.parse_args()
    if args.task != "function-calling" and (args.small_constrained or args.fallback_constrained):
        parser.error("constrained decoding is for function-calling: add --no-fallback-constrained")
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    examples = tasks.examples(args.task, args.n, "test", args.seed)
    small = load(args.small, device=device)
    answers = small_answers(small, examples, args)
    small_ok = [tasks.judge(args.task, e, text)[0] for e, (text, _) in zip(examples, answers)]
    fallback = small if args.fallback == args.small else load(args.fallback, device=device)
    replies = answer(fallback.model.eval(), fallback.tokenizer, examples, args.max_tokens, args.fallback_constrained,
                     max_batch=args.max_batch)
    fallback_ok = [tasks.judge(args.task, e, text)[0] for e, text in zip(examples, replies)]
    curves = {name: curve([values[name] for _, values in answers], small_ok, fallback_ok) for name in SIGNALS}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/bench_route.py " + shlex.join(sys.argv[1:])
    about = (f"{args.task}, {args.n} held-out examples: small {args.small} "
             f"({'constrained' if args.small_constrained else 'unconstrained'}), fallback {args.fallback} "
             f"({'constrained' if args.fallback_constrained else 'unconstrained'})")
    lines = [f"# {about}", "", *table(curves, args.n), "", f"`{command}` ({time.perf_counter() - t0:.0f} s)"]
    (out / "route.md").write_text("\n".join(lines) + "\n")
    plot_curves(curves, out / "route.png", title=f"{args.task}: {Path(args.small).name} -> {Path(args.fallback).name}")
    print("\n".join(lines))
    print(f"wrote {out / 'route.md'} and {out / 'route.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
