"""The Llama decoder in one file: RMSNorm -> RoPE -> grouped-query attention -> SwiGLU -> block -> model.

Parameter names are HF `LlamaForCausalLM`'s, so a state dict saved from here loads there unchanged and
the other way round. No I/O, no training code, no transformers import (STYLE.md rule 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinylm.model.config import ModelConfig
from tinylm.model.fused import project
from tinylm.model.kvcache import KVCache, PagedCache, StaticCache


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 as HF Llama does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, length: int, theta: float, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin tables, each (length, head_dim), in fp32 (Su et al. 2021, HF "rotate_half" layout).

    Args:
        head_dim: width of one attention head (even).
        length: number of positions.
        theta: RoPE base frequency.
        device: where to build the tables.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    pos = torch.arange(length, dtype=torch.int64, device=device).float()
    freqs = torch.outer(pos, inv_freq)  # (length, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (length, head_dim): first half and second half share angles
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, head_dim) by position; cos/sin are (T, head_dim), or (B, 1, T, head_dim) per row."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def packed_layout(segments: Tensor) -> tuple[Tensor, Tensor]:
    """Positions and attention mask of packed rows, several examples side by side in each row.

    An example is a maximal run of equal ids in a row; its positions restart at 0, and its tokens see
    the earlier tokens of the same run only. A negative id marks padding: a padding token sees itself
    only (a query that sees nothing would make softmax NaN) and no other token sees it.

    Args:
        segments: (B, T) integer example ids.

    Returns:
        positions (B, T) int64, and mask (B, 1, T, T) bool, True where query t may attend to key s.
    """
    B, T = segments.shape
    idx = torch.arange(T, device=segments.device)  # (T,)
    starts = torch.ones(B, T, dtype=torch.bool, device=segments.device)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]  # (B, T) the first token of each run
    first = torch.where(starts, idx, 0).cummax(-1).values  # (B, T) where each token's run starts
    run = starts.cumsum(-1)  # (B, T) the run's number in its row
    visible = (run[:, :, None] == run[:, None, :]) & (idx[:, None] >= idx[None, :])  # (B, T, T) causal, in-run
    visible &= (segments >= 0)[:, :, None] | torch.eye(T, dtype=torch.bool, device=segments.device)
    return idx - first, visible[:, None]


def one_query_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor:
    """scaled_dot_product_attention for one query per row, written out so that the compiler fuses it
    (the CPU flash kernel takes ~20% of a fast int8 decode step at T = 1).

    Args:
        q: (B, H, 1, hd); k, v: (B, Hkv, M, hd), query head h reading key head h // (H / Hkv) as GQA does;
        visible: (1, M) bool, the slots the query may attend to, or (B, 1, 1, M), each row's own.
    """
    B, H, _, hd = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, H // Hkv, hd)  # query heads grouped under their key head
    scores = (qg @ k.transpose(-1, -2)) * hd**-0.5  # (B, Hkv, G, M)
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ v).view(B, H, 1, hd)


class Attention(nn.Module):
    """Grouped-query self-attention (Ainslie et al. 2023) through `scaled_dot_product_attention`."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # over head_dim, one gain per channel shared by the heads (OLMo 2, Qwen3: HF's q_norm, k_norm)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | StaticCache | PagedCache | None,
                packed: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)  # one product once fused for decoding
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd), (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = packed  # (B, 1, T, T) bool for packed rows (packed_layout), None for plain causal
        if cache is not None:  # k, v: (B, Hkv, S, hd), every key so far; mask (T, S) or None for causal
            k, v, mask = cache.update(self.layer, k, v)
        if T == 1 and mask is not None:  # one query over a static cache's slots
            y = one_query_attention(q, k, v, mask)
        elif x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # bf16 training on a CPU: the projections run in bf16 (AMX), attention in fp32, where torch's CPU
            # flash attention (forward + backward) is 1.8x faster than in bf16 (BENCHMARKS.md, "bf16 on a CPU with AMX")
            with torch.autocast("cpu", enabled=False):
                y = self._attend(q.float(), k.float(), v.float(), mask).to(q.dtype)
        else:
            y = self._attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                              enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, hd)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)  # (B, T, ffn_dim) each
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | StaticCache | PagedCache | None,
                packed: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, packed)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embeddings, blocks and final norm: HF's `LlamaModel` (the `model.` prefix of parameter names)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # _weight skips nn.Embedding's own N(0, 1) init: Llama.init_weights sets every weight anyway.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Llama(nn.Module):
    """A Llama-style causal language model with HF `LlamaForCausalLM` parameter names.

    Args:
        cfg: the model's shape and numerics.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Built on the CPU even under a meta-device context (checkpoint.build), where it would be empty.
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, torch.device("cpu"))
        # Not in the state dict: derived from the config, rebuilt on load.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise as GPT-2 / nanoGPT do, the scheme llama2.c trains its TinyStories models with.

        Linear and embedding weights ~ N(0, init_std); the two projections that write into the residual
        stream (o_proj, down_proj) ~ N(0, init_std / sqrt(2 * n_layers)), so the residual's variance does
        not grow with depth (Radford et al. 2019, GPT-2 section 2.3); RMSNorm weights = 1.
        """
        if self.lm_head.weight.is_meta:  # a shell about to receive loaded weights
            return
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                p.normal_(0.0, std)

    def _rope(self, start: int | Tensor, length: int) -> tuple[Tensor, Tensor]:
        """cos and sin (length, head_dim) of positions start..start+length-1; (B, 1, length, head_dim) when
        `start` is a (B,) tensor, each row at its own position (a paged cache's rows)."""
        if isinstance(start, Tensor) and start.dim() == 1:
            positions = start[:, None] + torch.arange(length, device=start.device)  # (B, length)
            return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        if isinstance(start, Tensor):  # a static cache's position: gather rows, one graph for every step
            positions = start + torch.arange(length, device=start.device)  # (length,)
            return self.rope_cos[positions], self.rope_sin[positions]
        self.reserve(start + length)
        return self.rope_cos[start:start + length], self.rope_sin[start:start + length]

    def reserve(self, length: int) -> None:
        """Make the rotary tables cover positions [0, length), beyond max_seq_len too (same formula).

        A compiled or traced forward calls it with the sizes it was traced for, so it never grows there.
        """
        if length > self.rope_cos.shape[0]:
            cos, sin = rope_tables(self.config.head_dim, max(length, 2 * self.rope_cos.shape[0]),
                                   self.config.rope_theta, self.rope_cos.device)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.dtype), sin.to(self.rope_sin.dtype)

    def forward(self, input_ids: Tensor, cache: KVCache | StaticCache | PagedCache | None = None,
                output_hidden_states: bool = False,
                logits_for: Tensor | None = None,
                segments: Tensor | None = None,
                last_only: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Next-token logits.

        Args:
            input_ids: (B, T) token ids; with a cache, the tokens after the cache's `pos`.
            cache: a KVCache, StaticCache or PagedCache to read past keys/values from and write to; its
                `pos` advances by T (out of place: a static cache's `pos` is a tensor its caller owns; a
                paged cache's is (B,), each row at its own position).
            output_hidden_states: also return [embeddings, block 1 output, ..., block L output],
                each (B, T, dim), the residual stream before the final norm.
            logits_for: (V',) vocabulary ids: compute only these columns of the logits (a teacher
                restricted to a trimmed vocabulary skips the rest of its head).
            segments: (B, T) integer example ids of packed rows (see `packed_layout`): positions
                restart at each example and attention stays inside it; -1 marks padding. No cache.
            last_only: the head at the last position only (a prefill needs nothing else; on a 49,152-token
                vocabulary the head over a long prompt costs more than the blocks).

        Returns:
            logits (B, T, vocab_size) or (B, T, V') ((B, 1, ...) with last_only), or (logits, hidden_states).
        """
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0
        if cache is not None:
            self.reserve(cache.max_len)  # every slot's angles (a static cache gathers them by position)
        packed = None
        if segments is not None:
            if cache is not None:
                raise ValueError("packed rows (segments) are for training: no KV cache")
            # A boolean block-diagonal mask through scaled_dot_product_attention: on this CPU its forward
            # and backward take as long as is_causal's (B=4, T=512, 9 heads); flex_attention has no CPU
            # backward in torch 2.13.
            positions, packed = packed_layout(segments)  # (B, T), (B, 1, T, T)
            self.reserve(T)
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, hd)
        else:
            cos, sin = self._rope(start, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, dim)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # once per forward, not once per block
        hidden = [x] if output_hidden_states else None
        for block in self.model.layers:
            x = block(x, cos, sin, cache, packed)
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.pos = cache.pos + T
        x = self.model.norm(x[:, -1:] if last_only else x)
        if logits_for is not None and isinstance(self.lm_head, nn.Linear):
            logits = F.linear(x, self.lm_head.weight[logits_for])  # (B, T, V')
        elif logits_for is not None:  # a quantised head: all columns, then the chosen ones
            logits = self.lm_head(x)[..., logits_for]
        else:
            logits = self.lm_head(x)  # (B, T, vocab_size)
        cap = self.config.logit_softcap
        if cap is not None:  # Gemma 2's soft-capping: smooth, monotone, |logit| < cap
            logits = cap * torch.tanh(logits / cap)
        return (logits, hidden) if hidden is not None else logits

    def num_params(self) -> int:
        """Parameters, a tied matrix counted once."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
