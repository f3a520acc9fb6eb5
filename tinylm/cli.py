"""The `tinylm` command: argument parsing only, one subcommand per stage, no logic.

Each subcommand is a pair `_add_<name>(sub)` (the parser) and `_run_<name>(args)` (a call into the
stage module, imported lazily so `tinylm --help` starts fast). A TinylmError becomes one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from tinylm.config import TinylmError

Handler = Callable[[argparse.Namespace], int | None]


# ----- info / generate (core) ----------------------------------------------------------------------

def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a model: shape, parameters, vocabulary, size, FLOPs/token")
    p.add_argument("source", help="checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> None:
    from tinylm.checkpoint import describe

    describe(args.source, as_json=args.json)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt (streams to stdout)")
    p.add_argument("source", help="checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text (repeat for several prompts)")
    src.add_argument("--prompt-file", help="a file with one prompt per line, or - for stdin")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per sample (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--add-bos", action="store_true", help="start the prompt with the bos token")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> None:
    from tinylm.checkpoint import load
    from tinylm.generate import GenerateConfig, read_prompts, run

    cfg = GenerateConfig(
        prompts=read_prompts(args.prompt, args.prompt_file), chat=args.chat, system=args.system,
        max_new_tokens=args.max_tokens, temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        n=args.n, stop=args.stop, add_bos=args.add_bos)
    loaded = load(args.source)
    run(loaded.model, loaded.tokenizer, cfg)


# ----- data (group: `tinylm data <sub>`) -----------------------------------------------------------
# Sub-subcommands register here: `_add_data_<name>(dsub)`.
DATA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="corpora: the built-in TinyTales generator, preparing token shards")
    dsub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    for add in DATA_COMMANDS:
        add(dsub)


# ----- tokenizer (group: `tinylm tokenizer <sub>`) -------------------------------------------------
TOKENIZER_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train, inspect and trim byte-level BPE tokenizers")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="TOKENIZER_COMMAND")
    for add in TOKENIZER_COMMANDS:
        add(tsub)


# ----- data prepare, tokenizer train / stats / trim -------------------------------------------------

def _add_data_prepare(dsub: argparse._SubParsersAction) -> None:
    p = dsub.add_parser("prepare", help="clean, dedup, split and tokenise a corpus into token shards")
    p.add_argument("inputs", nargs="+", help=".txt (blank-line separated documents), .jsonl, .parquet, dirs "
                   "of these, a datasets.save_to_disk dir, tinytales:<n>, or a hub dataset name")
    p.add_argument("--tokenizer", required=True, help="tokenizer dir, checkpoint dir, .gguf or alias")
    p.add_argument("--out", required=True, help="data dir to write")
    p.add_argument("--text-field", default="text", help="JSON field / column holding the text")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-chars", type=int, default=1)
    p.add_argument("--max-chars", type=int, default=None)
    p.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep exact and near duplicates")
    p.add_argument("--near-dedup-threshold", type=float, default=0.8,
                   help="MinHash Jaccard threshold of word 5-grams (0 turns near-dedup off)")
    p.add_argument("--near-dedup-window", type=int, default=100_000, help="documents the near-dedup index holds")
    p.add_argument("--workers", type=int, default=None, help="tokenizer threads (default: all cores)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_data_prepare)


def _run_data_prepare(args: argparse.Namespace) -> None:
    from tinylm.data import PrepareConfig, prepare

    cfg = PrepareConfig(**{k: v for k, v in vars(args).items()
                           if k not in ("command", "data_command", "run")})
    meta = prepare(cfg)
    splits = ", ".join(f"{s} {v['documents']} docs {v['tokens']} tokens" for s, v in meta["splits"].items())
    print(f"wrote {cfg.out}: {splits}; removed {meta['filters']}; skipped {len(meta['skipped_files'])} files")


def _add_tokenizer_train(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("train", help="train a byte-level BPE tokenizer on a corpus")
    p.add_argument("inputs", nargs="+", help="corpus inputs, as for `tinylm data prepare`")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="tokenizer dir to write")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--text-field", default="text")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_tokenizer_train)


def _run_tokenizer_train(args: argparse.Namespace) -> None:
    from tinylm.data import train_tokenizer_on

    tok = train_tokenizer_on(args.inputs, args.vocab_size, args.out, args.min_frequency, args.text_field,
                             args.overwrite)
    print(f"wrote {args.out}: {tok.vocab_size} tokens")


def _add_tokenizer_stats(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("stats", help="bytes per token, tokens per word and vocabulary coverage on a corpus")
    p.add_argument("tokenizer", help="tokenizer dir, checkpoint dir, .gguf or alias")
    p.add_argument("--corpus", nargs="+", required=True, help="corpus inputs, as for `tinylm data prepare`")
    p.add_argument("--text-field", default="text")
    p.set_defaults(run=_run_tokenizer_stats)


def _run_tokenizer_stats(args: argparse.Namespace) -> None:
    import json

    from tinylm.data import tokenizer_stats_on

    print(json.dumps(tokenizer_stats_on(args.tokenizer, args.corpus, args.text_field), indent=2))


def _add_tokenizer_trim(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("trim", help="keep the K most used tokens of a tokenizer on a corpus")
    p.add_argument("source", help="tokenizer dir, checkpoint dir, .gguf or alias")
    p.add_argument("--corpus", nargs="+", required=True, help="corpus inputs, as for `tinylm data prepare`")
    p.add_argument("--keep", type=int, required=True, help="tokens to keep, bytes and special tokens included")
    p.add_argument("--out", required=True, help="tokenizer dir to write (with token_map.json)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_tokenizer_trim)


def _run_tokenizer_trim(args: argparse.Namespace) -> None:
    from tinylm.data import trim_tokenizer_on

    tok, kept = trim_tokenizer_on(args.source, args.corpus, args.keep, args.out, args.text_field, args.overwrite)
    print(f"wrote {args.out}: {tok.vocab_size} tokens kept")


DATA_COMMANDS.append(_add_data_prepare)
TOKENIZER_COMMANDS.extend([_add_tokenizer_train, _add_tokenizer_stats, _add_tokenizer_trim])


# ----- pretrain / eval -----------------------------------------------------------------------------

def _accept_section_options(p: argparse.ArgumentParser) -> None:
    """Let `p` take any `--section.key VALUE` (into args.overrides, in order).

    The keys are checked against the stage's config dataclass when the command runs (train.load_config
    raises a one-line error naming an unknown key or a wrong type); listing them here would import
    torch for every `tinylm` invocation.
    """
    parse = p.parse_known_args

    def parse_known_args(args=None, namespace=None):  # type: ignore[no-untyped-def]
        ns, extra = parse(args, namespace)
        ns.overrides = list(getattr(ns, "overrides", None) or []) + extra
        return ns, []

    p.parse_known_args = parse_known_args  # type: ignore[method-assign]


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain a model on a data dir (YAML recipe + --section.key VALUE overrides)",
        epilog="Any recipe key can be given as --section.key VALUE, e.g. --model.preset 5m --optim.lr 2e-3 "
               "--schedule.tokens 2e8 --run.out runs/x. Several processes: torchrun --nproc_per_node N "
               "-m tinylm pretrain ...")
    p.add_argument("--config", help="a YAML recipe (sections model, data, optim, schedule, run)")
    p.add_argument("--resume", help="auto (latest complete checkpoint in run.out, or a fresh start), "
                                    "never, or a checkpoint dir (same as --run.resume)")
    p.add_argument("--decay-from", help="a stable-phase WSD checkpoint: run only the decay from it")
    p.set_defaults(run=_run_pretrain)
    _accept_section_options(p)


def _run_pretrain(args: argparse.Namespace) -> None:
    from tinylm.train import TrainConfig, load_config, parse_overrides, pretrain

    overrides = parse_overrides(args.overrides)
    if args.resume is not None:
        overrides["run.resume"] = args.resume
    if args.decay_from is not None:
        overrides["run.decay_from"] = args.decay_from
    final = pretrain(load_config(TrainConfig, args.config, overrides))
    print(f"wrote {final}")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte on a data split or a text file")
    p.add_argument("source", help="checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)")
    p.add_argument("--data", required=True, help="a data dir (tinylm data prepare) or a UTF-8 text file")
    p.add_argument("--split", default="val", help="split of a data dir (default: val)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    p.add_argument("--seq-len", type=int, default=None, help="context per window (default: min(max_seq_len, 1024))")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--tinytales", type=int, default=0, metavar="N",
                   help="also sample N stories and score them with the TinyTales validator")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    from tinylm.evaluate import evaluate_source

    evaluate_source(args.source, args.data, split=args.split, max_tokens=args.max_tokens, seq_len=args.seq_len,
                    batch_size=args.batch_size, tinytales=args.tinytales, device=args.device, as_json=args.json)


# ----- data tinytales ------------------------------------------------------------------------------

def _add_data_tinytales(dsub: argparse._SubParsersAction) -> None:
    p = dsub.add_parser("tinytales", help="generate the built-in TinyTales story corpus")
    p.add_argument("--stories", type=int, default=10_000, help="number of stories (default 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="text file to write: each story, then a blank line "
                   "(default: stdout, or nothing when only --stats is asked for)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--stats", action="store_true",
                   help="print stories, MB, distinct words, the entropy bound in bits/byte and MB/s")
    p.set_defaults(run=_run_data_tinytales)


def _run_data_tinytales(args: argparse.Namespace) -> None:
    from tinylm import tinytales

    if args.out:
        stats = tinytales.write_corpus(args.out, args.stories, args.seed, args.overwrite)
    elif args.stats:
        stats = tinytales.corpus_stats(args.stories, args.seed)
    else:
        stats = tinytales.stream_corpus(sys.stdout, args.stories, args.seed)
    if args.stats:
        print(tinytales.format_stats(stats))


DATA_COMMANDS.append(_add_data_tinytales)


# ----- registry ------------------------------------------------------------------------------------
# Helpers add their `_add_<name>` to this list; order is the order in `tinylm --help`.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_info,
    _add_generate,
    _add_data,
    _add_tokenizer,
    _add_pretrain,
    _add_eval,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinylm", description="The tiny language model foundry.")
    parser.add_argument("--version", action="version", version=f"tinylm {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _version() -> str:
    from tinylm import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tinylm` console script. Returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        code = args.run(args)
    except TinylmError as e:
        print(f"tinylm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinylm: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
