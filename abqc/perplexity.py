"""Perplexity with the protocol of GPTQ / OmniQuant: join the test documents with "\\n\\n", tokenize
once, cut non-overlapping windows of seqlen tokens (the remainder is dropped), average the token NLL
of every predicted token over all windows, exponentiate."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from . import data
from .errors import DataError, NumericalError


@torch.no_grad()
def perplexity(model, tokenizer=None, corpus: str = "wiki", seqlen: int = 2048, limit: int | None = None,
               ids: torch.Tensor | None = None, progress: bool = True, desc: str = "ppl") -> dict:
    """{'ppl', 'nll', 'windows', 'tokens', 'seqlen', 'corpus'} on the evaluation part of `corpus`."""
    cfg = getattr(model, "config", None)
    max_len = getattr(cfg, "max_position_embeddings", None)
    if seqlen < 2:
        raise DataError(f"seqlen {seqlen} is too short: a window must hold at least 2 tokens (pass --seqlen >= 2)")
    if limit is not None and limit < 1:
        raise DataError(f"limit {limit} leaves no window to evaluate: pass limit >= 1, or None for every window")
    if max_len is not None and seqlen > max_len:
        raise DataError(f"seqlen {seqlen} exceeds the model's maximum of {max_len} positions; pass a smaller --seqlen")
    if ids is None:
        if tokenizer is None:
            raise DataError("perplexity needs a tokenizer or pre-tokenized ids")
        ids = data.tokenize(tokenizer, data.split_text(corpus, "eval"))
    if torch.is_tensor(ids) and ids.dim() != 1:
        raise DataError(f"ids must be a 1-D tensor of the whole evaluation text, got shape {tuple(ids.shape)}: "
                        "pass ids.flatten()")
    data.check_ids(ids, getattr(cfg, "vocab_size", None))
    n = ids.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    if n < 1:
        raise DataError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}: "
                        "use a smaller seqlen or a longer text")
    device = next(model.parameters(), torch.empty(0)).device
    total, count = 0.0, 0
    for w in tqdm(range(n), desc=desc, disable=not progress, leave=False):
        x = ids[w * seqlen:(w + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(x, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
        if not torch.isfinite(nll):
            raise NumericalError(f"non-finite loss in window {w}: the model produces NaN/inf logits; check its "
                                 "weights (abqc.models.check_finite) or compile with more bits for the failing layers")
        total += nll.item()
        count += seqlen - 1
    return {"ppl": math.exp(total / count), "nll": total / count, "windows": n, "tokens": count,
            "seqlen": seqlen, "corpus": corpus}
