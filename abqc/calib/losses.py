"""Block losses of the calibration passes.

DLC (ABQ-LLM): -log cos(y_q, y_fp) - log cos(y_q, y_fp*), the cosine taken over the hidden dimension and
averaged over tokens; y_fp* is the FP block applied to the quantized previous block's output, so the
quantized block is asked both to match the FP model and not to amplify the error it was handed.
AKL: symmetric KL between the quantized and FP attention probabilities, per head and query row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def neg_log_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1).mean()
    return -torch.log(cos.clamp(min=1e-6))


def dlc_loss(y_q: torch.Tensor, y_fp: torch.Tensor, y_fp_star: torch.Tensor) -> torch.Tensor:
    return neg_log_cos(y_q, y_fp) + neg_log_cos(y_q, y_fp_star)


def akl_loss(logp_q: torch.Tensor, logp_fp: torch.Tensor) -> torch.Tensor:
    """KL(p_q||p_fp) + KL(p_fp||p_q) = sum_k (p_q - p_fp)(log p_q - log p_fp), averaged over heads and rows.

    One fused expression: the two maps and their difference are the only [B, heads, L, L] tensors alive.
    """
    return ((logp_q.exp() - logp_fp.exp()) * (logp_q - logp_fp)).sum(-1).mean()
