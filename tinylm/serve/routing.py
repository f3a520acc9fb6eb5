"""Routing's arithmetic, shared by `tinylm serve SMALL --fallback ...` (serve.router) and `tinylm route
calibrate`: a small model's signals about its own answer, the quality-against-fallback-share curve of a
labelled set, the threshold that meets a target, and the route file (route.json).

A request goes to the fallback when the small model's signal is below the threshold (strictly), or when its
answer fails a JSON schema or tool call that the request asked for. The signals are the token-level
uncertainty measures that Gupta et al. 2024 ("Language Model Cascades: Token-level uncertainty and beyond")
compare for deferral; each is higher when the model is surer, so one rule ("below: fall back") serves all:

* mean_logprob: the mean log-probability of the answer's tokens under the model's raw distribution (before
  repetition penalty, temperature, top-k/p and constraints; the end-of-turn token counts);
* min_logprob: the lowest of those log-probabilities (one token the model was unsure of);
* neg_entropy: minus the mean entropy, in nats, of the model's raw next-token distributions over the answer.

The curve sorts a labelled set by signal and routes its least sure answers first: routing the k lowest gives
a fallback share k / n and a quality of (small model's right answers kept + fallback's right answers among
the routed) / n. Answers with equal signals are routed together (no threshold separates them).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from tinylm.core.errors import TinylmError
from tinylm.data.tokenizer import Tokenizer
from tinylm.infer.engine import Engine, EngineConfig, Request
from tinylm.model.llama import Llama

SIGNALS = ("mean_logprob", "min_logprob", "neg_entropy")
ROUTE_FORMAT = "tinylm-route-v1"


def signal(name: str, logprobs: Sequence[float], entropies: Sequence[float] | None = None) -> float:
    """One answer's signal (see the module's docstring); an answer of no tokens scores 0 (nothing to doubt).

    Args:
        name: one of SIGNALS.
        logprobs: the raw log-probability of each answer token (the engine's Completion.logprobs).
        entropies: the entropy of each answer token's distribution (`answer_entropies`); neg_entropy only.
    """
    if not logprobs:
        return 0.0
    if name == "mean_logprob":
        return sum(logprobs) / len(logprobs)
    if name == "min_logprob":
        return min(logprobs)
    if name == "neg_entropy" and entropies is not None:
        return -sum(entropies) / len(entropies)
    raise ValueError(f"signal {name!r} needs {'entropies' if name == 'neg_entropy' else 'one of ' + str(SIGNALS)}")


@torch.no_grad()
def answer_entropies(model: Llama, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> list[float]:
    """The entropy (nats) of the model's next-token distribution at each answer token, from one forward pass
    over prompt + answer (the engine reports only the chosen token's log-probability).

    Args:
        model: the model (eval mode).
        prompt_ids: the prompt's ids (at least one).
        answer_ids: the answer's ids.
    """
    if not answer_ids:
        return []
    device = next(model.parameters()).device
    x = torch.tensor([list(prompt_ids) + list(answer_ids)[:-1]], device=device)  # (1, T): the last id predicts none
    logp = model(x)[0, len(prompt_ids) - 1:].float().log_softmax(-1)  # (len(answer), V)
    return (-(logp.exp() * logp).sum(-1)).tolist()


def answer_signals(model: Llama, tokenizer: Tokenizer, prompts: list[list[int]], budgets: list[int],
                   stops: list[list[int] | None], names: Sequence[str], max_batch: int = 16,
                   constraint: Callable[[], Any] | None = None) -> list[tuple[str, dict[str, float]]]:
    """Each prompt's greedy answer and its signals, decoded together by the engine as the server decodes them.

    Args:
        model, tokenizer: the small model (eval mode) and its tokenizer.
        prompts: the prompts' ids.
        budgets: the most new tokens of each prompt's answer.
        stops: each prompt's ids that end its answer (None: the tokenizer's eos).
        names: the signals to compute (of SIGNALS).
        max_batch: answers decoded together.
        constraint: a factory of per-answer constraints (infer.constrained), or None.
    """
    longest = max((len(p) + b for p, b in zip(prompts, budgets)), default=1)
    engine = Engine(model, tokenizer, EngineConfig(max_batch=max_batch, kv_tokens=max_batch * longest + longest))
    done = engine.run([Request(p, b, stop_ids=s, constraint=constraint() if constraint else None)
                       for p, b, s in zip(prompts, budgets, stops)])
    out = []
    for ids, c in zip(prompts, done):
        entropies = answer_entropies(model, ids, c.token_ids) if "neg_entropy" in names else None
        out.append((c.text, {name: signal(name, c.logprobs, entropies) for name in names}))
    return out


# ----- the curve and the threshold --------------------------------------------------------------------

@dataclass
class Point:
    """One way to route a labelled set.

    Args:
        threshold: route the answers whose signal is below this.
        routed: how many answers that routes.
        share: routed / n.
        quality: the share of right answers of the routed system.
    """

    threshold: float
    routed: int
    share: float
    quality: float


def curve(signals: Sequence[float], small_ok: Sequence[bool], fallback_ok: Sequence[bool] | None = None) -> list[Point]:
    """Quality against fallback share for every threshold that routes a different set, from routing nothing to
    routing everything (see the module's docstring).

    Args:
        signals: the small model's signal on each example.
        small_ok: whether the small model's answer to each is acceptable.
        fallback_ok: whether the fallback's is (None: always).
    """
    n = len(signals)
    if n == 0:
        raise TinylmError("no labelled examples to calibrate on")
    fallback_ok = [True] * n if fallback_ok is None else fallback_ok
    values = sorted(set(signals))
    gain: dict[float, int] = dict.fromkeys(values, 0)  # right answers won by routing the answers of one signal
    count: dict[float, int] = dict.fromkeys(values, 0)
    for s, ok, fb in zip(signals, small_ok, fallback_ok):
        gain[s] += int(fb) - int(ok)
        count[s] += 1
    right, routed = sum(map(int, small_ok)), 0
    points = [Point(values[0], 0, 0.0, right / n)]  # below the lowest signal: nothing routed
    for k, v in enumerate(values):
        right, routed = right + gain[v], routed + count[v]
        # between this signal and the next (a threshold the set cannot tell from either); past the highest
        threshold = (v + values[k + 1]) / 2 if k + 1 < len(values) else math.nextafter(v, math.inf)
        points.append(Point(threshold, routed, routed / n, right / n))
    return points


def choose(points: list[Point], target_quality: float | None = None, fallback_share: float | None = None) -> Point:
    """The point that meets a target: the smallest fallback share whose quality reaches target_quality, or the
    largest share that is at most fallback_share.

    Args:
        points: `curve`'s points (shares ascending).
        target_quality, fallback_share: exactly one of them, each in [0, 1].
    """
    if (target_quality is None) == (fallback_share is None):
        raise TinylmError("give one target: --target-quality Q or --fallback-share S")
    eps = 1e-9  # shares and qualities are ratios of counts: compare them up to rounding
    if fallback_share is not None:
        return [p for p in points if p.share <= fallback_share + eps][-1]
    for p in points:
        if p.quality >= target_quality - eps:
            return p
    best = max(points, key=lambda p: (p.quality, -p.share))
    raise TinylmError(f"no threshold reaches quality {target_quality:g}: the best is {best.quality:.4f}, routing "
                      f"{100 * best.share:.1f}% to the fallback")


# ----- the route file ---------------------------------------------------------------------------------

def route_record(name: str, chosen: Point, points: list[Point], **about: Any) -> dict[str, Any]:
    """route.json's content: the signal, the chosen threshold and its share and quality, the whole curve.

    Args:
        name: the signal.
        chosen: the chosen point.
        points: the curve.
        about: more keys to record (the small model, the data, the target).
    """
    return {"format": ROUTE_FORMAT, "signal": name, "threshold": chosen.threshold, "share": chosen.share,
            "quality": chosen.quality, **about, "curve": [asdict(p) for p in points]}


def read_route(path: str) -> tuple[str, float]:
    """The signal and threshold of a route file written by `tinylm route calibrate`, or a one-line error.

    Args:
        path: the route.json file.
    """
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TinylmError(f"cannot read the route file {path}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise TinylmError(f"the route file {path} is not JSON: {e}") from None
    why = None
    if not isinstance(record, dict) or record.get("format") != ROUTE_FORMAT:
        why = f'it has no "format": "{ROUTE_FORMAT}"'
    elif record.get("signal") not in SIGNALS:
        why = f"its signal {record.get('signal')!r} is none of {', '.join(SIGNALS)}"
    else:
        threshold = record.get("threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            why = f"its threshold {threshold!r} is not a finite number"
    if why:
        raise TinylmError(f"{path} is not a route file written by `tinylm route calibrate`: {why}")
    return record["signal"], float(record["threshold"])


def plot_curves(curves: dict[str, list[Point]], png: str | Path, chosen: Point | None = None,
                title: str = "") -> None:
    """Quality against fallback share, one line per curve, with the straight line of routing at random (from
    the small model alone to the fallback alone) and the chosen point marked.

    Args:
        curves: label -> points.
        png: the image to write.
        chosen: a point to mark, or None.
        title: the plot's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, points in curves.items():
        ax.step([p.share for p in points], [p.quality for p in points], where="post", label=label)
    first = next(iter(curves.values()))
    ax.plot([0, 1], [first[0].quality, first[-1].quality], ls=":", color="gray", label="random routing")
    if chosen is not None:
        ax.plot([chosen.share], [chosen.quality], "o", color="black",
                label=f"threshold {chosen.threshold:.3g}")
    ax.set_xlabel("share sent to the fallback")
    ax.set_ylabel("quality of the routed system")
    ax.set_xlim(0, 1)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=100, format="png")
    plt.close(fig)
