"""Where models differ: val loss on the tokens a model can copy from earlier in the same story, and on the rest.

For each model (a checkpoint dir, or a run folder whose final/ is one) the val split of --data is scored in the
consecutive windows `tinylm eval` uses (tinylm.evals.perplexity: seq_len each, every token predicted once: the
quickstart's bits per byte), and every target is put in one of three groups:
  - cut: before the window's first BOS, the tail of a story whose start is outside the window;
  - repeat: after it, a token that already occurred in its story (a name, an object, a word the story has
    introduced, which a model can predict by finding it earlier and copying it: an induction head's job); with
    --common K, not one of the split's K most frequent tokens;
  - new: after it, every other token.
It prints each model's mean loss (nats/token) over all targets and over each group, and each group's share.
The speedrun's seeds that miss bits per byte at a token budget lose it on the repeats, and training rows that
start at a story (data.document_rows) buy repeats and cost the cut tails (BENCHMARKS.md).

    python bench/copy_loss.py --data W/tinytales-30000-v2048/data W/runs/tinytales-default-3.7Mt-0 \\
        W/runs/tinytales-default-3.7Mt-1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinylm.core.errors import TinylmError  # noqa: E402
from tinylm.data.tokens import TokenData  # noqa: E402
from tinylm.formats.checkpoint import load  # noqa: E402


def groups(windows: torch.Tensor, bos: int | None, common: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """(cut, repeat), each (N, T) bool over the targets of the windows (see the module text)."""
    cut = np.zeros((windows.size(0), windows.size(1) - 1), dtype=bool)
    repeat = np.zeros_like(cut)
    for n, row in enumerate(windows.tolist()):
        seen: set[int] | None = None  # None until the window's first BOS
        for t in range(len(row) - 1):
            if row[t] == bos:
                seen = set()
            if seen is None:
                cut[n, t] = True
                continue
            seen.add(row[t])
            repeat[n, t] = row[t + 1] in seen and row[t + 1] not in common
    return cut, repeat


def losses(model: torch.nn.Module, windows: torch.Tensor, batch: int = 16) -> np.ndarray:
    """(N, T) loss of every target."""
    out = []
    with torch.no_grad():
        for i in range(0, windows.size(0), batch):
            w = windows[i:i + batch]
            logits = model(w[:, :-1]).float()
            out.append(F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none"))
    return torch.cat(out).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="+", help="checkpoint dirs, or run folders holding final/")
    ap.add_argument("--data", type=Path, required=True, help="a data dir (`tinylm data prepare`) with a val split")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    ap.add_argument("--common", type=int, default=0, help="this many most frequent val tokens never count as repeats")
    args = ap.parse_args()
    if args.seq_len < 1 or args.common < 0:
        ap.error("--seq-len must be at least 1 and --common at least 0")
    try:
        val = TokenData.open(args.data, "val")
        if val.meta.get("bos_id") is None:
            raise TinylmError(f"{args.data}: its tokenizer has no BOS token, so its documents are not marked")
        windows = torch.stack(list(val.eval_windows(args.seq_len))).long()
        counts = np.bincount(windows[:, 1:].flatten().numpy(), minlength=val.vocab_size)
        common = set(np.argsort(-counts)[:args.common].tolist())
        cut, repeat = groups(windows, val.meta.get("bos_id"), common)
        new = ~cut & ~repeat
        print(f"{windows.size(0)} windows of {args.seq_len}; of the targets {cut.mean():.1%} cut, {repeat.mean():.1%} "
              f"repeats, {new.mean():.1%} new\n")
        print("| model | all | cut | repeats | new |\n|---|---|---|---|---|")
        for source in args.models:
            path = source / "final" if (source / "final").is_dir() else source
            loaded = load(path)
            val.check_vocab(loaded.model.config.vocab_size)
            loss = losses(loaded.model.eval(), windows)
            print(f"| {source.name} | {loss.mean():.4f} | {loss[cut].mean():.4f} | {loss[repeat].mean():.4f} | "
                  f"{loss[new].mean():.4f} |", flush=True)
        print(f"\n    python bench/copy_loss.py {' '.join(sys.argv[1:])}\n")
    except TinylmError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
