"""Perplexity with the protocol of GPTQ / OmniQuant: join the test documents with "\\n\\n", tokenize
once, cut non-overlapping windows of seqlen tokens (the remainder is dropped), average the token NLL
of every predicted token over all windows, exponentiate."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from . import data
from .errors import DataError


@torch.no_grad()
def perplexity(model, tokenizer=None, corpus: str = "wiki", seqlen: int = 2048, limit: int | None = None,
               ids: torch.Tensor | None = None, progress: bool = True, desc: str = "ppl") -> dict:
    """{'ppl', 'nll', 'windows', 'tokens', 'seqlen', 'corpus'} on the evaluation part of `corpus`."""
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_len is not None and seqlen > max_len:
        raise DataError(f"seqlen {seqlen} exceeds the model's maximum of {max_len} positions; pass a smaller --seqlen")
    if ids is None:
        if tokenizer is None:
            raise DataError("perplexity needs a tokenizer or pre-tokenized ids")
        ids = data.tokenize(tokenizer, data.split_text(corpus, "eval"))
    n = ids.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    if n < 1:
        raise DataError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters(), torch.empty(0)).device
    total, count = 0.0, 0
    for w in tqdm(range(n), desc=desc, disable=not progress, leave=False):
        x = ids[w * seqlen:(w + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(x, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
        if not torch.isfinite(nll):
            raise FloatingPointError(f"non-finite loss in window {w}: the model produces NaN/inf logits")
        total += nll.item()
        count += seqlen - 1
    return {"ppl": math.exp(total / count), "nll": total / count, "windows": n, "tokens": count,
            "seqlen": seqlen, "corpus": corpus}
