"""The math of one Llama-family decoder layer as a pure function of its weights.

Invariant: BlockMath(layer).forward(x, rope, BlockMath.weights()) equals the Hugging Face layer's output
(eager attention, float32) for Llama, Qwen2 and Mistral layers — tested. Calibration passes rewrite the
weights (smoothing, compensation), wrap the linears (fake quantization) and read the attention
log-probabilities, without touching the HF module until they fold their result back in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..bits import ROLES

LINEAR_PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@dataclass
class BlockWeights:
    """Float weights a block computes with: role -> (W [out, in], bias or None) and the two norm weights."""

    linears: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
    norm_attn: torch.Tensor
    norm_mlp: torch.Tensor
    extra: dict = field(default_factory=dict)

    def replace(self, **linears) -> "BlockWeights":
        return BlockWeights({**self.linears, **linears}, self.norm_attn, self.norm_mlp, self.extra)


# linear_fn(role, x, W, bias) -> y; the default is a plain float linear
LinearFn = Callable[[str, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _plain_linear(role, x, w, b):
    return F.linear(x, w, b)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class BlockMath:
    """Shapes and hyper-parameters of one decoder layer plus its functional forward."""

    def __init__(self, layer: nn.Module, config):
        attn = layer.self_attn
        self.layer = layer
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.eps_attn = layer.input_layernorm.variance_epsilon
        self.eps_mlp = layer.post_attention_layernorm.variance_epsilon
        self.act = layer.mlp.act_fn
        self.window = getattr(attn, "sliding_window", None)
        # an input transform a linear applies first (the rotate pass's online Hadamard on down_proj)
        self.pre = {r: p for r in ROLES if (p := getattr(self.module(r), "pre", None)) is not None}

    def module(self, role: str) -> nn.Module:
        return self.layer.get_submodule(LINEAR_PATHS[role])

    def weights(self, device=None, dtype=torch.float32) -> BlockWeights:
        """Detached copies of the layer's weights (float32 by default: calibration runs in float32)."""
        def t(p):
            return None if p is None else p.detach().to(device=device, dtype=dtype).clone()
        lin = {r: (t(self.module(r).weight), t(self.module(r).bias)) for r in ROLES}
        return BlockWeights(lin, t(self.layer.input_layernorm.weight), t(self.layer.post_attention_layernorm.weight))

    def write(self, w: BlockWeights) -> None:
        """Copy weights back into the HF layer (in the layer's dtype)."""
        with torch.no_grad():
            for r, (wt, b) in w.linears.items():
                m = self.module(r)
                m.weight.copy_(wt.to(m.weight.dtype))
                if b is not None:
                    m.bias.copy_(b.to(m.bias.dtype))
            self.layer.input_layernorm.weight.copy_(w.norm_attn)
            self.layer.post_attention_layernorm.weight.copy_(w.norm_mlp)

    def smoothing_pairs(self, pairs) -> tuple:
        """The pairs that stay exact for this layer: up->down needs down's input to be act(gate)*up
        channel by channel, which an online Hadamard in front of down mixes."""
        return tuple(p for p in pairs if not (p == "up_down" and "down" in self.pre))

    def kv_expand(self, s: torch.Tensor) -> torch.Tensor:
        """Per-channel vector over v's outputs [n_kv*hd] -> over o's inputs [n_heads*hd] (GQA groups)."""
        groups = self.n_heads // self.n_kv
        return s.view(self.n_kv, 1, self.head_dim).expand(self.n_kv, groups, self.head_dim).reshape(-1)

    def _mask(self, n: int, device) -> torch.Tensor:
        i = torch.arange(n, device=device)
        allowed = i[None, :] <= i[:, None]
        if self.window is not None and n > self.window:
            allowed &= i[:, None] - i[None, :] < self.window
        return allowed

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], w: BlockWeights,
                linear_fn: LinearFn = _plain_linear, want_logp: bool = False,
                observe: Callable[[str, torch.Tensor], None] | None = None):
        """x [B, L, H] -> (y [B, L, H], attention log-probabilities [B, heads, L, L] or None).

        observe(role, input) sees every linear's input (activation statistics).
        """
        def lin(role, h):
            if role in self.pre:
                h = self.pre[role](h)
            if observe is not None:
                observe(role, h)
            wt, b = w.linears[role]
            return linear_fn(role, h, wt, b)

        bsz, n, _ = x.shape
        h = rms_norm(x, w.norm_attn, self.eps_attn)
        q = lin("q", h).view(bsz, n, -1, self.head_dim).transpose(1, 2)
        k = lin("k", h).view(bsz, n, -1, self.head_dim).transpose(1, 2)
        v = lin("v", h).view(bsz, n, -1, self.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in rope)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        groups = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        mask = self._mask(n, x.device)
        logp = None
        if want_logp:
            scores = (q @ k.transpose(2, 3)) * self.scaling
            # finite fill: masked entries get p = 0 and a finite log p, so KL terms stay finite
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            logp = torch.log_softmax(scores.float(), dim=-1)
            a = logp.exp().to(q.dtype) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        a = a.transpose(1, 2).reshape(bsz, n, -1)
        x = x + lin("o", a)
        h = rms_norm(x, w.norm_mlp, self.eps_mlp)
        m = self.act(lin("gate", h)) * lin("up", h)
        return x + lin("down", m), logp



@torch.no_grad()
def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 1) -> torch.Tensor:
    """fn over x in slices of `batch` samples, concatenated (bounds attention memory at long seqlens)."""
    return torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)])
