"""Compile generated kernels just in time with NVRTC (cuda-python bindings; no GPU needed), cache the
cubin by config key, and disassemble it with cuobjdump to check which instructions it uses."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import AbqcError
from ..models import cache_dir
from .config import KernelConfig


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise AbqcError("GPU kernels need NVRTC: `pip install 'cuda-bindings>=13,<14' 'nvidia-cuda-nvrtc>=13,<14'`") from e
    return nvrtc


def compiler_version() -> str:
    nv = _nvrtc()
    err, major, minor = nv.nvrtcVersion()
    return f"nvrtc-{major}.{minor}"


def _check(nv, err, prog=None, what="nvrtc"):
    if err != nv.nvrtcResult.NVRTC_SUCCESS:
        log = ""
        if prog is not None:
            _, n = nv.nvrtcGetProgramLogSize(prog)
            buf = b" " * n
            nv.nvrtcGetProgramLog(prog, buf)
            log = buf.decode(errors="replace")
        raise AbqcError(f"{what} failed ({err}):\n{log}")


def compile_cubin(cfg: KernelConfig, use_cache: bool = True) -> bytes:
    """cubin bytes for cfg (compiled once, then read from ABQC_CACHE/kernels)."""
    nv = _nvrtc()
    path = cache_dir() / "kernels" / f"{cfg.name}-{cfg.arch}-{cfg.key(compiler_version())}.cubin"
    if use_cache and path.exists():
        return path.read_bytes()
    err, prog = nv.nvrtcCreateProgram(cfg.source().encode(), f"{cfg.name}.cu".encode(), 0, [], [])
    _check(nv, err)
    # no fast-math: the activation quantizer must round exactly like the CPU reference
    opts = [f"--gpu-architecture={cfg.arch}".encode(), b"-std=c++17", b"--extra-device-vectorization"]
    opts += [o.encode() for o in getattr(cfg, "nvrtc_options", ())]   # e.g. include paths (CUTLASS path)
    err, = nv.nvrtcCompileProgram(prog, len(opts), opts)
    _check(nv, err, prog, f"compiling {cfg.name} for {cfg.arch}")
    err, n = nv.nvrtcGetCUBINSize(prog)
    _check(nv, err)
    buf = b" " * n
    _check(nv, nv.nvrtcGetCUBIN(prog, buf)[0])
    nv.nvrtcDestroyProgram(prog)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(buf)
    tmp.replace(path)
    return buf


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for base in map(Path, sys.path):
        cand = base / "nvidia" / "cu13" / "bin" / name
        if cand.exists():
            return str(cand)
    raise AbqcError(f"{name} not found: `pip install 'nvidia-cuda-cuobjdump>=13,<14' 'nvidia-cuda-nvdisasm>=13,<14'`")


def sass(cubin: bytes, tmpdir: str | os.PathLike) -> str:
    """Disassembly of a cubin (cuobjdump -sass)."""
    p = Path(tmpdir) / "k.cubin"
    p.write_bytes(cubin)
    env = dict(os.environ, PATH=os.path.dirname(_tool("nvdisasm")) + os.pathsep + os.environ.get("PATH", ""))
    r = subprocess.run([_tool("cuobjdump"), "-sass", str(p)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise AbqcError(f"cuobjdump failed: {r.stderr}")
    return r.stdout


def precompile(configs, workers: int = 0) -> int:
    """Compile many configs in parallel (NVRTC runs outside the GIL); returns how many."""
    from concurrent.futures import ThreadPoolExecutor
    workers = workers or max(1, (os.cpu_count() or 2))
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(compile_cubin, configs))
    return len(configs)
