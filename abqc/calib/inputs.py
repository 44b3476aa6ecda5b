"""Calibration ids -> the first decoder layer's inputs, and the rotary tables every layer shares."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import AbqcError


def check_ids(model: nn.Module, ids: torch.Tensor) -> None:
    cfg = model.config
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise AbqcError("calibration ids must be a LongTensor [n_samples, seqlen] "
                        "(see abqc.data.calibration_samples)")
    if ids.numel() == 0:
        raise AbqcError("calibration ids are empty: pass at least one sample")
    if int(ids.max()) >= cfg.vocab_size or int(ids.min()) < 0:
        raise AbqcError(f"calibration ids must lie in [0, {cfg.vocab_size}) for this model's vocabulary; "
                        "were they made with another tokenizer?")
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and ids.shape[1] > limit:
        raise AbqcError(f"calibration seqlen {ids.shape[1]} exceeds the model's max_position_embeddings {limit}: "
                        "use shorter samples")


@torch.no_grad()
def embed_inputs(model: nn.Module, ids: torch.Tensor, device) -> torch.Tensor:
    """Token embeddings of ids as float32 [n, seqlen, hidden] on device (Llama/Qwen2/Mistral do not scale them)."""
    check_ids(model, ids)
    emb = model.get_input_embeddings()
    dev = emb.weight.device
    return torch.cat([emb(ids[i:i + 1].to(dev)).float().to(device) for i in range(ids.shape[0])])


@torch.no_grad()
def rope_tables(model: nn.Module, seqlen: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [1, seqlen, head_dim] float32 from the model's own rotary embedding."""
    rot = model.model.rotary_emb
    buf = next(rot.buffers(), None)
    dev = buf.device if buf is not None else device
    pos = torch.arange(seqlen, device=dev).unsqueeze(0)
    cos, sin = rot(torch.zeros(1, seqlen, 1, device=dev, dtype=torch.float32), pos)
    return cos.float().to(device), sin.float().to(device)
