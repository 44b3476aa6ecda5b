"""What a benchmark record says about the code that made it.

The git revision alone can mislead: the lent GPU machine runs a copy of the working tree whose .git may be
older than the files (seen: records stamped with a revision two commits behind the code measured). So a
record also carries a digest of abqc's own sources (every .py / .cu / .cuh under abqc/, by path and
content), which any checkout can recompute to tell whether it is the code measured.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_digest(root: Path = ROOT) -> str:
    """sha256 (first 12 hex digits) over abqc/'s .py, .cu and .cuh files: relative path, then content."""
    h = hashlib.sha256()
    for p in sorted(q for q in (root / "abqc").rglob("*") if q.suffix in (".py", ".cu", ".cuh") and q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def git_revision(root: Path = ROOT) -> str:
    """Short HEAD, '+changes' when tracked files differ from it, or '' without a usable git checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{rev}+changes" if rev and dirty else rev


def software() -> str:
    """'torch X, [transformers Y, ]abqc Z, code <git revision>, source <digest>'."""
    import torch

    import abqc
    parts = [f"torch {torch.__version__}"]
    try:
        import transformers
        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    rev = git_revision()
    parts += [f"abqc {abqc.__version__}", f"code {rev or 'unknown (no git checkout)'}", f"source {source_digest()}"]
    return ", ".join(parts)
