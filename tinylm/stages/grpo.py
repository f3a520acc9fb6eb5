"""`tinylm grpo MODEL --data prompts.jsonl --reward checker|judge|FILE.py:FUNC`: reinforcement learning on
rewards that can be checked, by group-relative policy optimisation (GRPO, Shao et al. 2024, DeepSeekMath).

Pretraining's loop (`train.loop.begin` -> `start` -> `fit`) with another batch source and loss. Each sampling
round draws prompts_per_step = rows / group_size prompts (rows: data.batch_tokens / data.seq_len completions a
step), samples group_size completions of each through the inference engine (`infer.engine`: continuous
batching, the group's shared prompt computed once through the prefix cache, every completion's sampling
seeded by (data.seed, round, row)), scores them with the reward (`evals.rewards`), and turns the rewards into
group-relative advantages (`train.grpo.group_advantages`). The round's log-probabilities under the reference
model (for the KL term) and, when a round is trained on more than once (grpo.iterations, DeepSeekMath's mu),
under the sampling weights, are computed once, right after sampling, and cached in the round's rows; the loss
(`train.grpo.grpo_loss`) then runs one forward of the policy.

The reference is the starting model: with LoRA / QLoRA its base with the adapters off (no copy: the same
tensors), with full fine-tuning a frozen copy made before training (and none at all with grpo.beta 0).

Prompts: rows {"prompt": text or messages[, "tools"]} or {"messages": [...][, "tools"]}; a final assistant
message is the gold answer (a built-in task's record, `tinylm data task`), not shown to the model. Every row is
passed whole to the reward. `--resume auto` continues a killed run; with grpo.iterations 1 it samples what
the uninterrupted run sampled (a round depends only on the weights and its seeds). One process only.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.distributed as dist

from tinylm.core.devices import _autocast
from tinylm.core.errors import TinylmError
from tinylm.core.recipe import Check, Count, NonNegative, Positive, one_of
from tinylm.data.chat import end_of_turn_id, generation_prompt, read_rows, to_example
from tinylm.data.tokenizer import Tokenizer
from tinylm.data.tokens import Batch, BatchSource
from tinylm.evals.judge import Judge
from tinylm.evals.rewards import Reward, checker_task, load_reward, score
from tinylm.infer.engine import Engine, EngineConfig, Request
from tinylm.infer.sampling import SamplingConfig
from tinylm.model.llama import Llama
from tinylm.model.lora import base_model, lora_layers
from tinylm.serve.client import open_teacher
from tinylm.train.config import TrainConfig
from tinylm.train.finetune import PeftSection, load_model
from tinylm.train.grpo import (
    LOSSES,
    batch_weight,
    group_advantages,
    grpo_loss,
    token_logps,
)
from tinylm.train.loop import batch_layout, begin, fit, start

GroupSize = Annotated[int, Check(ge=2)]  # a group of one has no relative advantage
ClipRange = Annotated[float, Check(gt=0, lt=1)]


@dataclass
class GrpoChatSection:
    """The prompts and how they are shown to the model."""

    # prompts JSONL / .json / parquet or a dir: {"prompt": text or messages} or {"messages"} (a final assistant
    # message is the gold answer, kept for the reward and not shown); every field reaches the reward
    data: str | None = None
    end_of_turn: str | None = None  # the token that ends an assistant turn (none: <|im_end|> if known, else eos)
    skip_bad_rows: bool = False  # skip rows with missing fields or bad values and report how many
    epochs: Positive = 1.0  # passes over the prompts when neither schedule.steps nor schedule.tokens is set


@dataclass
class GrpoSection:
    """Sampling, reward and the GRPO objective."""

    reward: str = "checker"  # checker (the built-in tasks' checkers), judge, or FILE.py:FUNC (runs that file's code)
    group_size: GroupSize = 8  # completions sampled per prompt (DeepSeekMath: 64; data.batch_tokens / seq_len rows a step)
    max_tokens: Count = 128  # the most tokens of a completion (prompt + max_tokens at most data.seq_len + 1)
    temperature: Positive = 1.0  # sampling temperature of the completions (the policy trained is the tempered one)
    beta: NonNegative = 0.04  # KL coefficient to the reference (DeepSeekMath sec. 4.2: 0.04; 0: no reference)
    epsilon: ClipRange = 0.2  # clip range of the ratio: [1 - epsilon, 1 + epsilon_high] (PPO's 0.2, as TRL's)
    epsilon_high: Positive | None = None  # upper clip (DAPO's clip-higher: 0.28); none: epsilon
    iterations: Count = 1  # optimizer steps on each sampling round (DeepSeekMath's mu; above 1 the ratio clips)
    loss: one_of(*LOSSES) = "sequence"  # sequence (per-completion token mean, DeepSeekMath) | token (DAPO)
    scale_rewards: bool = True  # divide advantages by the group's std (false: Dr. GRPO's mean-centred rewards)
    sample_batch: Count = 64  # completions the engine decodes together
    judge: str | None = None  # with reward judge: the judge, a model source or an OpenAI-compatible URL
    judge_rubric: one_of("instruction", "tinystories") = "instruction"  # what the judge grades
    judge_model: str | None = None  # with a judge URL: the model id (none: $TINYLM_JUDGE_MODEL or its only one)


@dataclass
class GrpoConfig(TrainConfig):
    """Everything `tinylm grpo` needs: the pretraining sections (model.init is the policy to tune) plus `chat`
    (the prompts), `peft` (full fine-tuning or adapters) and `grpo` (sampling, reward, objective)."""

    chat: GrpoChatSection = field(default_factory=GrpoChatSection)
    peft: PeftSection = field(default_factory=PeftSection)
    grpo: GrpoSection = field(default_factory=GrpoSection)


# ----- prompts ------------------------------------------------------------------------------------------------

@dataclass
class Prompt:
    """One prompt: the row as read (what the reward sees), and what the model is shown.

    Args:
        row: the JSON object of the prompts file.
        messages: the conversation before the answer (None for a plain text prompt).
        text: the plain text prompt (None for a conversation).
        tools: the functions the conversation may call.
        where: file:line of the row.
    """

    row: Any
    messages: list[dict[str, Any]] | None
    text: str | None
    tools: list[dict[str, Any]] | None
    where: str


def to_prompt(record: Any, where: str) -> Prompt:
    """A prompts-file row as a Prompt; a bad row is a one-line TinylmError naming `where`.

    Args:
        record: {"prompt": text or messages[, "tools"]} or {"messages": [...][, "tools"]}.
        where: file:line of the row.
    """
    if not isinstance(record, dict) or not ("prompt" in record or "messages" in record):
        raise TinylmError(f"{where}: a prompt row needs a 'prompt' (text or messages) or 'messages' field")
    if isinstance(record.get("prompt"), str):
        if not record["prompt"]:
            raise TinylmError(f"{where}: empty prompt")
        return Prompt(record, None, record["prompt"], None, where)
    messages = record.get("prompt", record.get("messages"))
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant":
        messages = messages[:-1]  # the gold answer
    if not isinstance(messages, list) or not messages:
        raise TinylmError(f"{where}: the prompt must be a string or a non-empty list of messages before the answer")
    tools = {"tools": record["tools"]} if record.get("tools") is not None else {}
    # the sft reader's checks, on the prompt with a stand-in answer
    example = to_example({"prompt": messages, "completion": "-", **tools}, where)
    return Prompt(record, example.messages[:-1], None, example.tools, where)


def read_prompts(inputs: list[str], skip_bad: bool = False) -> tuple[list[Prompt], list[str]]:
    """Every prompt of the user's files, in order, and the problems of the rows skipped.

    Args:
        inputs: files or dirs (see `data.chat.read_rows`).
        skip_bad: skip a bad row (its problem is returned) instead of refusing the data.
    """
    return read_rows(inputs, to_prompt, skip_bad, "prompts")


def prompt_ids(p: Prompt, tokenizer: Tokenizer) -> list[int]:
    """The token ids the model continues: a conversation through the chat template with the generation
    prompt (tools folded in as sft renders them), a plain prompt as it is."""
    text = p.text if p.text is not None else generation_prompt(p.messages, tokenizer, p.tools)
    return tokenizer.encode(text)


# ----- sampling rounds: the batch source ------------------------------------------------------------------

@dataclass
class Round:
    """One sampling round's completions, rows grouped by prompt (group_size rows each).

    Args:
        tokens: (R, seq_len + 1) prompt + completion ids, padded.
        mask: (R, seq_len) True on the completion's targets.
        advantages: (R,) group-relative advantages.
        extras: further (R, seq_len) per-target tensors ("old_logps", "ref_logps") and (R,) metrics.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    extras: dict[str, torch.Tensor]


class Sampler:
    """The batch source of a GRPO run: a Round per (step // iterations), sampled when first asked for, with
    the policy's current weights.

    Args:
        cfg: the grpo config.
        model: the policy (trained in place by the loop).
        reference: the reference model (None without a KL term).
        tokenizer: the model's tokenizer.
        prompts: the prompts and their token ids.
        reward: the reward and its name.
        rows: completions per step.
    """

    def __init__(self, cfg: GrpoConfig, model: Llama, reference: Llama | None, tokenizer: Tokenizer,
                 prompts: list[tuple[Prompt, list[int]]], reward: tuple[Reward, str], rows: int) -> None:
        self.cfg, self.g = cfg, cfg.grpo
        self.model, self.reference, self.tokenizer = model, reference, tokenizer
        self.prompts, self.reward, self.rows = prompts, reward, rows
        self.stops = sorted({end_of_turn_id(tokenizer, cfg.chat.end_of_turn)} | ({tokenizer.eos_id} - {None}))
        self.pad = next((t for t in (tokenizer.pad_id, tokenizer.eos_id) if t is not None), 0)
        self.current: tuple[int, Round] | None = None
        self.amp_dtype: torch.dtype | None = None  # the run's autocast dtype (set once the run is built)

    def source(self) -> BatchSource:
        """The loop's batch source: rows [first, first + count) of step's round."""
        def batches(step: int, first: int, count: int) -> Batch:
            r = step // self.g.iterations
            if self.current is None or self.current[0] != r:
                self.current = (r, self.sample(r))
            return self.slice(self.current[1], first, count, index=step * self.rows + first)

        return batches

    def round_prompts(self, r: int) -> list[int]:
        """The prompts of round r: epochs over the prompts, each in an order drawn from (seed, epoch)."""
        per, n = self.rows // self.g.group_size, len(self.prompts)
        g = r * per + np.arange(per, dtype=np.int64)
        perms = {int(e): np.random.default_rng([self.cfg.data.seed, int(e)]).permutation(n) for e in set(g // n)}
        return [int(perms[int(e)][i]) for e, i in zip(g // n, g % n)]

    @torch.no_grad()
    def sample(self, r: int) -> Round:
        """Sample, score and cache round r."""
        chosen = [i for i in self.round_prompts(r) for _ in range(self.g.group_size)]
        seeds = np.random.default_rng([self.cfg.data.seed, r, 1]).integers(0, 2**62, len(chosen))
        completions = self.generate([self.prompts[i][1] for i in chosen], [int(s) for s in seeds])
        texts = [self.tokenizer.decode([t for t in c if t not in self.stops]) for c in completions]
        rewards = torch.tensor(score(self.reward[0], [self.prompts[i][0].row for i in chosen], texts, self.reward[1]))
        tokens, mask = self.pack([self.prompts[i][1] for i in chosen], completions)
        extras = self.logps(tokens, mask)
        grouped = rewards.view(-1, self.g.group_size)
        stats = {"reward": rewards.mean(), "reward_std": grouped.std(-1).mean(),
                 "flat_groups": (grouped.std(-1) == 0).float().mean(), "completion_tokens": mask.sum(-1).float().mean()}
        extras.update({k: v.expand(len(chosen)).clone() for k, v in stats.items()})
        return Round(tokens, mask, group_advantages(rewards, self.g.group_size, self.g.scale_rewards), extras)

    def generate(self, prompts: list[list[int]], seeds: list[int]) -> list[list[int]]:
        """Every prompt's completion ids (a stop token included), sampled through the engine; a fresh engine
        each round, since the weights changed (a cached prefix of the last round's is stale)."""
        longest = max(len(p) for p in prompts) + self.g.max_tokens
        batch = min(self.g.sample_batch, len(prompts))
        cache = EngineConfig(max_batch=batch)
        cache.kv_tokens = batch * (longest + cache.block_size)  # whole blocks: every request of a batch fits at once
        engine = Engine(self.model, self.tokenizer, cache)
        requests = [Request(p, self.g.max_tokens, SamplingConfig(self.g.temperature, seed=s), stop_ids=self.stops)
                    for p, s in zip(prompts, seeds)]
        self.model.eval()
        try:
            return [c.token_ids for c in engine.run(requests)]
        finally:
            self.model.train()

    def pack(self, prompts: list[list[int]], completions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, seq_len + 1) prompt + completion rows, padded, and (R, seq_len) True on the completion targets."""
        width = self.cfg.data.seq_len + 1
        tokens = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(prompts), width - 1, dtype=torch.bool)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            tokens[i, :len(p) + len(c)] = torch.tensor(p + c)
            mask[i, len(p) - 1:len(p) + len(c) - 1] = True  # targets p + c[:k] -> c[k]
        return tokens, mask

    def logps(self, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The round's cached per-target log-probabilities: under the sampling weights when the round trains
        more than one step, under the reference with a KL term. In eval mode, over the very micro-batches the
        loss step will see (the same rows, cut to the same width, under the run's autocast), so a round's first
        step computes the same numbers again: its ratio is 1."""
        models = {"old_logps": self.model if self.g.iterations > 1 else None,
                  "ref_logps": self.reference if self.g.beta > 0 else None}
        micro = min(self.cfg.data.micro_batch, self.rows)
        out = {}
        for key, model in models.items():
            if model is None:
                continue
            model.to(self.device).eval()  # the reference follows the policy to its device
            out[key] = torch.zeros(mask.shape)
            for i in range(0, len(tokens), micro):
                width = _width(mask[i:i + micro])
                with _autocast(self.device, self.amp_dtype):
                    lp = token_logps(model, tokens[i:i + micro, :width + 1].to(self.device), self.g.temperature)
                out[key][i:i + micro, :width] = lp.cpu()
        self.model.train()
        return out

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def slice(self, rnd: Round, first: int, count: int, index: int) -> Batch:
        """Rows [first, first + count) of a round, cut to their longest prompt + completion."""
        sl = slice(first, first + count)
        mask = rnd.mask[sl]
        width = _width(mask)
        extras: dict[str, Any] = {k: (v[sl, :width] if v.dim() == 2 else v[sl]) for k, v in rnd.extras.items()}
        extras["advantages"] = rnd.advantages[sl]
        return Batch(rnd.tokens[sl, :width + 1], index=index, mask=mask[:, :width], extras=extras,
                     weight=batch_weight(mask, self.g.loss))


def _width(mask: torch.Tensor) -> int:
    """The targets of rows up to their last completion token: what a micro-batch of (B, T) `mask` is cut to."""
    return int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1


# ----- the stage ----------------------------------------------------------------------------------------------

def check_config(cfg: GrpoConfig) -> Reward | None:
    """The config's own problems (before anything is loaded), and the reward it names (None for the judge,
    which `open_judge` loads once the config is known to be good)."""
    if not cfg.chat.data:
        raise TinylmError("no prompts: tinylm grpo MODEL --data prompts.jsonl")
    if cfg.optim.z_loss:
        raise TinylmError("optim.z_loss regularises the LM loss of pretrain and sft, not grpo's objective")
    if cfg.data.batch_warmup_tokens:
        raise TinylmError("data.batch_warmup_tokens does not apply to grpo: a step's batch is its sampled groups")
    if cfg.data.document_rows:
        raise TinylmError("data.document_rows does not apply to grpo: a step's batch is its sampled groups")
    rows = cfg.data.batch_tokens // cfg.data.seq_len
    if rows % cfg.grpo.group_size:
        raise TinylmError(f"a step's {rows} completions (data.batch_tokens / data.seq_len) are not a multiple of "
                          f"grpo.group_size {cfg.grpo.group_size}")
    if cfg.grpo.judge and cfg.grpo.reward != "judge":
        raise TinylmError(f"--judge is given but --reward is {cfg.grpo.reward}: use --reward judge or drop --judge")
    if cfg.grpo.reward == "judge":
        if not cfg.grpo.judge:
            load_reward("judge")  # its one-line error: the judge is missing
        return None
    return load_reward(cfg.grpo.reward)


def open_judge(cfg: GrpoConfig, device: torch.device) -> Reward:
    """The judge's reward: a local model (decoding grpo.sample_batch grades together on `device`) or an
    OpenAI-compatible endpoint, checked before any work."""
    teacher = open_teacher(cfg.grpo.judge, "--judge", cfg.grpo.judge_model, max_batch=cfg.grpo.sample_batch,
                           device=device)
    return load_reward("judge", Judge(teacher, cfg.grpo.judge_rubric, seed=cfg.data.seed))


def check_prompts(prompts: list[tuple[Prompt, list[int]]], cfg: GrpoConfig) -> None:
    """Every prompt fits with a whole completion, and the checker can judge every row."""
    longest = max(prompts, key=lambda p: len(p[1]))
    if len(longest[1]) + cfg.grpo.max_tokens > cfg.data.seq_len + 1:
        raise TinylmError(f"{longest[0].where}: its prompt of {len(longest[1])} tokens and grpo.max_tokens "
                          f"{cfg.grpo.max_tokens} exceed data.seq_len {cfg.data.seq_len} + 1: raise data.seq_len")
    if cfg.grpo.reward == "checker":
        for p, _ in prompts:
            if checker_task(p.row) is None:
                raise TinylmError(f"{p.where}: the checker needs a built-in task's record (a TinyTales-Instruct "
                                  "'spec' or a gold function call): write them with `tinylm data task`")


def reference_of(model: Llama, beta: float) -> Llama | None:
    """The reference: none without a KL term; with adapters the base with them off (the same tensors); else
    a frozen copy of the starting weights."""
    if beta == 0:
        return None
    if lora_layers(model):
        return base_model(model)
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def grpo(cfg: GrpoConfig) -> Path:
    """Tune a model by GRPO on checkable rewards; returns OUT/final.

    Every user error (config, reward, prompts, template, context, adapters) is raised before anything is
    written. Raises KeyboardInterrupt after a signal checkpoint, as pretraining does.

    Args:
        cfg: the grpo config.
    """
    reward = check_config(cfg)
    d, device = begin(cfg)
    try:
        if d.world > 1:
            raise TinylmError("grpo runs in one process (it samples through the engine): run it without torchrun")
        if reward is None:
            reward = open_judge(cfg, device)
        raw, skipped = read_prompts([cfg.chat.data], cfg.chat.skip_bad_rows)
        model, tokenizer = load_model(cfg, "grpo")
        prompts = [(p, prompt_ids(p, tokenizer)) for p in raw]
        check_prompts(prompts, cfg)
        rows = batch_layout(cfg.data, d.world)[0]
        per_round = rows // cfg.grpo.group_size
        if cfg.schedule.steps is None and cfg.schedule.tokens is None:
            cfg.schedule.steps = max(1, math.ceil(cfg.chat.epochs * len(prompts) / per_round)) * cfg.grpo.iterations
        reference = reference_of(model, cfg.grpo.beta)  # before `start`: a resumed run restores trained weights
        sampler = Sampler(cfg, model, reference, tokenizer, prompts, (reward, f"--reward {cfg.grpo.reward}"), rows)
        print(f"grpo: {len(prompts)} prompts, {len(skipped)} bad rows skipped; {per_round} prompts x "
              f"{cfg.grpo.group_size} completions a round; reward {cfg.grpo.reward}; reference "
              f"{'none' if reference is None else 'the base without adapters' if lora_layers(model) else 'a copy'}")
        run = start(cfg, model, sampler.source(), d, device, None, tokenizer)
        sampler.amp_dtype = run.amp_dtype
        run.meta.update(stage="grpo", base=str(cfg.model.init), peft=dataclasses.asdict(cfg.peft),
                        grpo=dataclasses.asdict(cfg.grpo), prompts=len(prompts))
        g = cfg.grpo
        high = g.epsilon if g.epsilon_high is None else g.epsilon_high
        return fit(run, grpo_loss(g.loss, g.beta, g.epsilon, high, g.temperature))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(cfg: GrpoConfig) -> None:
    """`tinylm grpo`."""
    print(f"wrote {grpo(cfg)}")
