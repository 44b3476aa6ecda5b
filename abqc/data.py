"""Corpora shipped by pip packages, split deterministically into calibration and evaluation text.

"wiki": English Wikipedia articles (`exllamav2/conversion/standard_cal_data/wiki.utf8` from
exllamav2==0.3.2, installed --no-deps and never imported). Articles are stripped of their <doc> tags;
article i goes to evaluation if i % 5 == 4, else to calibration: the parts never share an article.
"c4": web text from the same folder, one document per line, split the same way; useful for
calibrating on one corpus and evaluating on another.
"""
from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

import torch

from .errors import DataError

CORPORA = {"wiki": "wiki.utf8", "c4": "c4.utf8"}
EVAL_EVERY = 5  # every 5th document is held out for evaluation
_DOC = re.compile(r"<doc[^>]*>\n?(.*?)</doc>", re.S)


def corpus_file(name: str) -> Path:
    if name not in CORPORA:
        p = Path(name)
        if p.is_file():
            return p
        raise DataError(f"unknown corpus {name!r}: use one of {', '.join(CORPORA)} or a path to a UTF-8 text file")
    spec = importlib.util.find_spec("exllamav2")  # locate only: importing it builds a C++ extension
    root = Path(list(spec.submodule_search_locations)[0]) if spec else None
    path = root / "conversion" / "standard_cal_data" / CORPORA[name] if root else None
    if path is None or not path.exists():
        raise DataError(f"corpus {name!r} is not installed: run `pip install --no-deps exllamav2==0.3.2`")
    return path


@lru_cache(maxsize=8)
def documents(name: str) -> tuple[str, ...]:
    text = corpus_file(name).read_text(encoding="utf-8")
    docs = [d.strip() for d in _DOC.findall(text)] if "<doc" in text else text.split("\n")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"corpus {name!r} is empty")
    return tuple(docs)


def split_text(name: str, part: str) -> str:
    """The 'calib' or 'eval' part of a corpus, documents joined with blank lines."""
    if part not in ("calib", "eval"):
        raise ValueError("part must be 'calib' or 'eval'")
    docs = documents(name)
    held = [d for i, d in enumerate(docs) if (i % EVAL_EVERY == EVAL_EVERY - 1) == (part == "eval")]
    return "\n\n".join(held)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids


def calibration_samples(tokenizer, n: int = 128, seqlen: int = 2048, corpus: str = "wiki",
                        seed: int = 0) -> torch.Tensor:
    """n random windows of seqlen tokens from the calibration part: LongTensor [n, seqlen]."""
    ids = tokenize(tokenizer, split_text(corpus, "calib"))
    if n <= 0 or seqlen <= 1:
        raise DataError("calibration needs at least one sample of at least 2 tokens")
    if ids.numel() <= seqlen:
        raise DataError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}: "
                        "use a shorter seqlen or a larger corpus")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
