"""The `tinylm` command: argument parsing only, one subcommand per stage, no logic.

Each subcommand is a pair `_add_<name>(sub)` (the parser) and `_run_<name>(args)` (a call into the
stage module, imported lazily so `tinylm --help` starts fast). A TinylmError becomes one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from tinylm.core.errors import TinylmError

Handler = Callable[[argparse.Namespace], int | None]


# ----- info / generate (core) ----------------------------------------------------------------------

def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a model: shape, parameters, vocabulary, size, FLOPs/token")
    p.add_argument("source", help="checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> None:
    from tinylm.stages.info import describe

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
    p.add_argument("--json-schema", metavar="FILE", help="constrain the output to JSON valid for this JSON Schema")
    p.add_argument("--fast", action="store_true", help="compiled fixed-shape decoding (torch.compile; same tokens)")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> None:
    from tinylm.formats.checkpoint import load
    from tinylm.stages.generate import GenerateConfig, read_prompts, run

    cfg = GenerateConfig(
        prompts=read_prompts(args.prompt, args.prompt_file), chat=args.chat, system=args.system,
        max_new_tokens=args.max_tokens, temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        n=args.n, stop=args.stop, add_bos=args.add_bos, fast=args.fast)
    schema = None
    if args.json_schema:
        from tinylm.infer.constrained import constraint_factory, load_schema, validate

        schema = load_schema(args.json_schema)  # a bad schema fails before the model loads
    loaded = load(args.source)
    if schema is not None and loaded.tokenizer is not None:
        cfg.constraint = constraint_factory(schema, loaded.tokenizer, loaded.config.vocab_size)
    for text in run(loaded.model, loaded.tokenizer, cfg):
        if schema is not None:
            validate(text, schema)  # the automaton guarantees it; a failure here is a tinylm bug


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
    p.add_argument("--near-dedup-window", type=int, default=250_000, help="documents the near-dedup index holds")
    p.add_argument("--workers", type=int, default=None, help="tokenizer threads (default: all cores)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.set_defaults(run=_run_data_prepare)


def _run_data_prepare(args: argparse.Namespace) -> None:
    from tinylm.data.prepare import PrepareConfig, prepare

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
    from tinylm.data.vocab import train_tokenizer_on

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

    from tinylm.data.vocab import tokenizer_stats_on

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
    from tinylm.data.vocab import trim_tokenizer_on

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
    from tinylm.core.recipe import load_config, parse_overrides
    from tinylm.stages.pretrain import pretrain
    from tinylm.train.config import TrainConfig

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
    from tinylm.stages.evaluate import evaluate_source

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
    from tinylm.data import tinytales

    if args.out:
        stats = tinytales.write_corpus(args.out, args.stories, args.seed, args.overwrite)
    elif args.stats:
        stats = tinytales.corpus_stats(args.stories, args.seed)
    else:
        stats = tinytales.stream_corpus(sys.stdout, args.stories, args.seed)
    if args.stats:
        print(tinytales.format_stats(stats))


DATA_COMMANDS.append(_add_data_tinytales)


# ----- prune / trim-vocab / init --from / grow (derive models from models) --------------------------

def _add_shape_args(p: argparse.ArgumentParser) -> None:
    """Explicit target sizes shared by `prune` and `init --from` (unset: the source's)."""
    for flag in ("--dim", "--ffn-dim", "--n-heads", "--n-kv-heads", "--n-layers"):
        p.add_argument(flag, type=int, default=None)


def _shape_kwargs(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("dim", "ffn_dim", "n_heads", "n_kv_heads", "n_layers")}


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="Minitron-style structured pruning from activations (+ vocabulary trim)",
                       epilog="--target-params keeps layers and heads and shrinks ffn_dim by s and dim by "
                              "sqrt(s) for the largest s that fits (embeddings count, after any vocabulary trim).")
    p.add_argument("source", help="checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)")
    p.add_argument("--calib", required=True, help="calibration data: a data dir, or text (file, dir, tinytales:N)")
    p.add_argument("--out", required=True, help="checkpoint dir to write")
    p.add_argument("--target-params", type=float, default=None, help="parameter budget, e.g. 45e6")
    _add_shape_args(p)
    p.add_argument("--trim-vocab", type=int, default=None, metavar="K",
                   help="first keep the K most used tokens of the calibration text")
    p.add_argument("--token-map", default=None, help="or keep the tokens of a `tinylm tokenizer trim` dir")
    p.add_argument("--order", default="width,depth", help="pruning stages in order (default width,depth)")
    p.add_argument("--layer-metric", default="bi", help="bi (Block Influence, default) or loss (skip-a-block loss)")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--iterative", action="store_true", help="Adapt-Pruner-style steps with training between")
    p.add_argument("--steps", type=int, default=4, help="pruning steps with --iterative (default 4)")
    p.add_argument("--steps-between", type=int, default=50, help="optimizer steps between pruning steps")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of the training between steps")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_prune)


def _run_prune(args: argparse.Namespace) -> None:
    from tinylm.stages.prune import PruneConfig, prune

    target = int(args.target_params) if args.target_params is not None else None
    cfg = PruneConfig(args.source, args.calib, args.out, target, **_shape_kwargs(args), trim_vocab=args.trim_vocab,
                      token_map=args.token_map, order=tuple(s.strip() for s in args.order.split(",")),
                      layer_metric=args.layer_metric, calib_batches=args.calib_batches, batch_size=args.batch_size,
                      seq_len=args.seq_len, iterative=args.iterative, steps=args.steps,
                      steps_between=args.steps_between, lr=args.lr, overwrite=args.overwrite)
    print(f"wrote {prune(cfg)}")


def _add_trim_vocab(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trim-vocab", help="keep only some tokens' embedding and LM-head rows (+ trimmed tokenizer)")
    p.add_argument("source", help="checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)")
    p.add_argument("--out", required=True, help="checkpoint dir to write")
    p.add_argument("--token-map", default=None, help="a `tinylm tokenizer trim` dir (token_map.json)")
    p.add_argument("--corpus", default=None, help="or text to count token use on (file, dir, tinytales:N)")
    p.add_argument("--keep", type=int, default=None, help="tokens to keep with --corpus")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_trim_vocab)


def _run_trim_vocab(args: argparse.Namespace) -> None:
    from tinylm.stages.trim_vocab import TrimConfig, trim

    print(f"wrote {trim(TrimConfig(args.source, args.out, args.token_map, args.corpus, args.keep, args.overwrite))}")


def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="a smaller model from a larger one: weight selection, Inheritune, or random")
    p.add_argument("--from", dest="source", required=True, help="model source to derive from")
    p.add_argument("--method", default="select", help="select (default), inherit (first --n-layers) or random")
    p.add_argument("--preset", default=None, help="target shape preset (head_dim and vocabulary stay the source's)")
    _add_shape_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of --method random")
    p.add_argument("--out", required=True, help="checkpoint dir to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_init)


def _run_init(args: argparse.Namespace) -> None:
    from tinylm.stages.init import InitConfig, init

    cfg = InitConfig(args.source, args.out, args.method, args.preset, **_shape_kwargs(args), seed=args.seed,
                     overwrite=args.overwrite)
    print(f"wrote {init(cfg)}")


def _add_grow(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grow", help="function-preserving growth: HyperCloning (width) or G_stack (depth)")
    p.add_argument("source", help="checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)")
    p.add_argument("--method", required=True, help="hypercloning (needs --dim) or stack (needs --factor)")
    p.add_argument("--dim", type=int, default=None, help="new width, a multiple of the source's")
    p.add_argument("--factor", type=int, default=None, help="copies of the block stack")
    p.add_argument("--noise", type=float, default=0.0, help="HyperCloning: function-preserving noise (relative std)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint dir to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_grow)


def _run_grow(args: argparse.Namespace) -> None:
    from tinylm.stages.grow import GrowConfig, grow

    cfg = GrowConfig(args.source, args.out, args.method, args.dim, args.factor, args.noise, args.seed, args.overwrite)
    print(f"wrote {grow(cfg)}")


# ----- distill (knowledge distillation; `tinylm distill cache` writes an offline teacher cache) -------------

def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill", help="train a student on a teacher's distributions (online, or `distill cache` first)",
        epilog="Any recipe key can be given as --section.key VALUE (sections model, data, optim, schedule, run, "
               "distill), e.g. --distill.losses '[{kind: fkl, weight: 1, temperature: 2}]'. Offline: "
               "`tinylm distill cache --teacher T --data DIR --top-k K --out CACHE [same recipe and options]`, "
               "then `tinylm distill --cache CACHE ...` (see `tinylm distill cache --help`).")
    _distill_common(p)
    p.add_argument("--cache", help="a teacher cache dir (tinylm distill cache); no teacher is loaded")
    p.add_argument("--student", help="student model source to continue from (same as --model.init)")
    p.add_argument("--preset", help="student preset, e.g. 5m (same as --model.preset)")
    p.add_argument("--resume", help="auto, never, or a checkpoint dir (same as --run.resume)")
    p.set_defaults(run=_run_distill)
    cache = argparse.ArgumentParser(
        prog="tinylm distill cache", description="Run the teacher once over every window the planned run "
        "reads (same recipe: data, seq_len, batch_tokens, seed, steps) and store its top-K log-probs.")
    _distill_common(cache)
    cache.add_argument("--top-k", type=int, required=True, help="tokens per position (>= vocabulary: full rows)")
    cache.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="log-prob storage")
    cache.add_argument("--temperature", type=float, default=1.0, help="teacher temperature of a top-K cache")
    cache.add_argument("--batch-size", type=int, default=8, help="windows per teacher forward pass")
    cache.add_argument("--overwrite", action="store_true")
    cache.set_defaults(run=_run_distill_cache)
    _accept_section_options(cache)
    _accept_section_options(p)
    parse = p.parse_known_args

    def parse_known_args(args=None, namespace=None):  # type: ignore[no-untyped-def]
        words = list(sys.argv[2:] if args is None else args)
        if words[:1] == ["cache"]:  # `tinylm distill cache ...`: a subcommand that shares the recipe options
            return cache.parse_known_args(words[1:], namespace)
        return parse(words, namespace)

    p.parse_known_args = parse_known_args  # type: ignore[method-assign]


def _distill_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML recipe (sections model, data, optim, schedule, run, distill)")
    p.add_argument("--teacher", help="teacher source: checkpoint dir, HF dir, .gguf or alias (smollm2-135m)")
    p.add_argument("--data", help="data dir (tinylm data prepare) (same as --data.dir)")
    p.add_argument("--out", help="output dir (same as --run.out)")


def _distill_config(args: argparse.Namespace, flags: dict[str, str]):  # type: ignore[no-untyped-def]
    from tinylm.core.recipe import load_config, parse_overrides
    from tinylm.stages.distill import DistillConfig

    overrides = parse_overrides(args.overrides)
    for attr, key in flags.items():
        if getattr(args, attr, None) is not None:
            overrides[key] = getattr(args, attr)
    return load_config(DistillConfig, args.config, overrides)


def _run_distill(args: argparse.Namespace) -> None:
    from tinylm.stages.distill import distill

    cfg = _distill_config(args, {"teacher": "distill.teacher", "cache": "distill.cache", "data": "data.dir",
                                 "out": "run.out", "student": "model.init", "preset": "model.preset",
                                 "resume": "run.resume"})
    print(f"wrote {distill(cfg)}")


def _run_distill_cache(args: argparse.Namespace) -> None:
    from tinylm.stages.distill import build_cache

    cfg = _distill_config(args, {"teacher": "distill.teacher", "data": "data.dir"})
    if not args.out:
        raise TinylmError("tinylm distill cache needs --out CACHE")
    meta = build_cache(cfg, args.top_k, args.out, args.dtype, args.temperature, args.batch_size, args.overwrite)
    print(f"wrote {args.out}: {meta['steps']} steps x {meta['rows']} windows x {meta['seq_len']} tokens, top-"
          f"{meta['top_k']} of {meta['vocab_size']}, {meta['bytes_per_token']:.0f} bytes/token, teacher "
          f"{meta['teacher_tokens_per_s']:,.0f} tokens/s")


# ----- quantize / export (deploy) ------------------------------------------------------------------

def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="weight-only int8 / int4 quantisation; reports size and perplexity change")
    p.add_argument("source", help="checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)")
    p.add_argument("--scheme", required=True, help="int8 or int4")
    p.add_argument("--group-size", type=int, default=None,
                   help="inputs per scale (default: 32 for int4, per channel for int8; 0 = per channel)")
    p.add_argument("--out", required=True, help="checkpoint dir to write")
    p.add_argument("--skip-lm-head", action="store_true",
                   help="keep the lm_head in float (by default it is quantised too, tied or not)")
    p.add_argument("--eval-text", help="UTF-8 text for the perplexity report (default: held-out TinyTales)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> None:
    from tinylm.stages.quantize import QuantizeConfig, format_report, quantize

    cfg = QuantizeConfig(source=args.source, scheme=args.scheme, out=args.out, group_size=args.group_size,
                         skip_lm_head=args.skip_lm_head, eval_text=args.eval_text, overwrite=args.overwrite)
    print(format_report(quantize(cfg)))
    print(f"wrote {args.out}")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model as an HF dir, a GGUF file (llama.cpp) or an ONNX graph")
    p.add_argument("source", help="checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)")
    p.add_argument("--format", required=True, help="hf, gguf or onnx")
    p.add_argument("--out", required=True, help="dir (hf) or file (gguf, onnx) to write")
    p.add_argument("--gguf-type", default="f16", help="f32, f16 (default), q8_0 or q4_0")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from tinylm.stages.export import ExportConfig, export

    cfg = ExportConfig(source=args.source, format=args.format, out=args.out, gguf_type=args.gguf_type,
                       overwrite=args.overwrite)
    print(f"wrote {export(cfg)}")


# ----- quickstart ----------------------------------------------------------------------------------

def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="TinyTales corpus -> tokenizer -> shards -> pretrain -> eval -> stories")
    p.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    p.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of the whole run (default 9)")
    p.add_argument("--stories", type=int, default=30000, help="TinyTales stories in the corpus (default 30000)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary (default 2048)")
    p.add_argument("--samples", type=int, default=20, help="stories sampled and validated (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", default=None, help="training recipe (default recipes/quickstart.yaml)")
    p.set_defaults(run=_run_quickstart)


def _run_quickstart(args: argparse.Namespace) -> None:
    from tinylm.stages.quickstart import QuickstartConfig, quickstart

    quickstart(QuickstartConfig(out=args.out, minutes=args.minutes, stories=args.stories,
                                vocab_size=args.vocab_size, samples=args.samples, seed=args.seed,
                                recipe=args.recipe))


# ----- registry ------------------------------------------------------------------------------------
# Helpers add their `_add_<name>` to this list; order is the order in `tinylm --help`.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_quickstart,
    _add_info,
    _add_generate,
    _add_data,
    _add_tokenizer,
    _add_pretrain,
    _add_eval,
    _add_prune,
    _add_trim_vocab,
    _add_init,
    _add_grow,
    _add_distill,
    _add_quantize,
    _add_export,
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
