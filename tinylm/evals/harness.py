"""tinylm as an lm-evaluation-harness model backend: `lm_eval --model tinylm --model_args pretrained=SOURCE`.

Any lm-eval task then runs on any tinylm source (checkpoint dir, HF Llama dir, .gguf file, alias; quantised,
pruned, distilled) wherever the task's data is reachable. Log-likelihoods go through `evals.loglik` (each
context computed once, its continuations batched behind it; lm-eval's own `TemplateLM` encodes the requests,
as its HF backend does), generation through tinylm's engine (`infer.engine`, continuous batching).

Registration: importing this module registers "tinylm" with lm-eval's model registry. lm-eval releases that
discover plugins load it through the `lm_eval.models` entry point in pyproject.toml; for those that do not
(0.4.13), the installed wheel's tinylm-lm-eval.pth adds an import hook (_tinylm_lm_eval.py) that registers
the name, lazily, when lm-eval's registry is first imported. In-process, `import tinylm.evals.harness` is
enough (then `lm_eval.simple_evaluate(model="tinylm", ...)`).

Model arguments: pretrained (the source), device (auto, cpu, cuda), batch_size (continuations per forward
pass; "auto" takes 16), max_gen_toks (the default generation limit, 256).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from tinylm.core.devices import resolve_device
from tinylm.core.errors import TinylmError
from tinylm.evals.loglik import loglikelihoods
from tinylm.formats import checkpoint
from tinylm.infer.engine import Engine, EngineConfig, Request
from tinylm.infer.sampling import SamplingConfig


@register_model("tinylm")
class TinylmLM(TemplateLM):
    """An lm-eval `LM` over a tinylm model.

    Args:
        pretrained: the model source.
        device: auto (cuda if available), cpu, cuda or cuda:N; lm-eval's command line passes cuda:0 unless told
            otherwise, which falls back to the CPU where there is no GPU.
        batch_size: continuations per forward pass, and requests decoded together; "auto" means 16.
        max_gen_toks: generation's token limit when a request sets none.
    """

    def __init__(self, pretrained: str, device: str = "auto", batch_size: int | str = 16, max_gen_toks: int = 256,
                 **unused: Any) -> None:
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():  # lm-eval's CLI defaults to cuda:0
            logging.getLogger(__name__).warning("tinylm: no CUDA device here, evaluating on the CPU")
            device = "cpu"
        loaded = checkpoint.load(pretrained, device=resolve_device(str(device)))
        if loaded.tokenizer is None:
            raise TinylmError(f"{pretrained} has no tokenizer: lm-eval's requests are text")
        self.model, self.tokenizer, self.source = loaded.model.eval(), loaded.tokenizer, str(pretrained)
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_id
        return eos if eos is not None else self.model.config.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # what an empty context and a rolling window condition on: bos if the tokenizer has one (HF backend's)
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        from tinylm import __version__

        return {"model_source": self.source, "model_num_parameters": self.model.num_params(),
                "tinylm_version": __version__}

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Requests with equal context ids form one group: the context runs once."""
        order: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, _) in enumerate(requests):
            order.setdefault(tuple(context), []).append(i)
        groups = [[(requests[i][1], requests[i][2]) for i in members] for members in order.values()]
        answers: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for members, scored in zip(order.values(), loglikelihoods(self.model, groups, self.batch_size)):
            for i, s in zip(members, scored):
                answers[i] = (s.logprob, s.greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answers[i])
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood in disjoint windows of the model's context (lm-eval's rolling windows,
        every token predicted once, the first from the prefix token)."""
        windows, owner = [], []
        for k, request in enumerate(requests):
            (text,) = request.args
            pairs = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                       prefix_token=self.prefix_token_id,
                                                       max_seq_len=self.max_length, context_len=1)
            for pair in map(lm_utils.make_disjoint_window, pairs):
                windows.append([pair])
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, scored in zip(owner, loglikelihoods(self.model, windows, self.batch_size)):
            totals[k] += scored[0].logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string, eos or the token limit, decoded together by the engine
        (greedy unless the request sets do_sample)."""
        prepared = [self._generation_request(*request.args) for request in requests]
        longest = max((len(r.prompt_ids) + r.max_tokens for r in prepared), default=1)
        engine = Engine(self.model, self.tokenizer,
                        EngineConfig(max_batch=self.batch_size, kv_tokens=(self.batch_size + 1) * longest))
        texts = [c.text for c in engine.run(prepared)]
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def _generation_request(self, context: str, gen_kwargs: dict[str, Any]) -> Request:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
        sampling = SamplingConfig(temperature=temperature if sample else 0.0, top_k=kwargs.pop("top_k", None),
                                  top_p=kwargs.pop("top_p", None), seed=kwargs.pop("seed", None))
        # the prompt keeps its end, leaving room for the continuation (lm-eval's HF backend cuts the same way)
        ids = self.tok_encode(context)[-max(1, self.max_length - max_tokens):] or [self.prefix_token_id]
        return Request(ids, max_tokens, sampling=sampling, stop=[u for u in until if u])
