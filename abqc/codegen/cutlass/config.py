"""Declarative configs of the CUTLASS path: (w_planes, a_bits, tile, stages, arch) -> CUDA sources.

The GEMM is an instance of nvidia-cutlass's own catalogue: `cutlass_library.generator.
GenerateSM80_TensorOp_168256` lists the sm_80 b1 tensor-op GEMMs (RowMajor A x ColumnMajor B ->
ColumnMajor int32 C, m16n8k256); we keep its AND-popc ones (`MathOperation.and_popc`, never XOR:
emulated on Hopper) and print the chosen one with cutlass_library's `EmitGemmUniversalInstance`. The
instance does not depend on the bit widths: all P*Q plane products come out of ONE b1 GEMM of stacked
planes (activations [Q*M, K], weights [P*N, K]), so one cubin per (tile, stages, arch) serves every bit
pair, and a small generated reduction kernel per (P, Q) applies 2^(i+j) and the epilogue.

Invariant: a config names exactly one catalogue operation and one source text; its key hashes that
text with the compiler and CUTLASS versions, so a cached cubin is always the one the config describes.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache
from importlib import metadata, resources
from pathlib import Path
from types import MappingProxyType

from ...errors import AbqcError
from ..config import ARCHS

DEFAULT_TILE = (128, 128, 512)
DEFAULT_STAGES = 5
_INSTALL = "`pip install -e \".[gpu]\"` (nvidia-cutlass)"


def _cutlass_library():
    try:
        import cutlass_library
        from cutlass_library import gemm_operation, generator, library
    except ImportError as e:
        raise AbqcError(f"the CUTLASS path needs nvidia-cutlass's cutlass_library: {_INSTALL}") from e
    return cutlass_library, generator, gemm_operation, library


class _Collect:
    """The part of cutlass_library's Manifest the generator uses: a non-empty kernel_filter makes it
    list every tile, not just the first."""

    kernel_filter = "*"

    def __init__(self):
        self.operations = []

    def append(self, operation):
        self.operations.append(operation)


@lru_cache(maxsize=1)
def catalogue() -> MappingProxyType:
    """{(tile, stages): operation} of the b1 AND-popc GEMMs cutlass_library offers (read-only)."""
    _, generator, _, library = _cutlass_library()
    m = _Collect()
    generator.GenerateSM80_TensorOp_168256(m, "13.0")
    return MappingProxyType({(tuple(op.tile_description.threadblock_shape), op.tile_description.stages): op
                             for op in m.operations
                             if op.tile_description.math_instruction.math_operation == library.MathOperation.and_popc})


def cutlass_include_dir() -> Path:
    lib = _cutlass_library()[0]
    inc = Path(lib.__file__).parent / "source" / "include"
    if not (inc / "cutlass" / "cutlass.h").exists():
        raise AbqcError(f"nvidia-cutlass is installed without its C++ headers ({inc}): reinstall it, {_INSTALL}")
    return inc


def cuda_header_dirs() -> list[Path]:
    """CCCL (libcu++) and CUDA runtime headers, which CUTLASS includes, from a toolkit or the pip wheels."""
    try:
        from cuda.pathfinder import find_nvidia_header_directory
    except ImportError as e:
        raise AbqcError(f"the CUTLASS path needs cuda-bindings (cuda.pathfinder): {_INSTALL}") from e
    out = []
    # CUTLASS 4.2 compiles against CCCL 3.0 (CUDA 13.0); the 13.3 cccl wheel's headers clash with cute
    for lib, wheels in (("cccl", "'nvidia-cuda-cccl>=13.0,<13.1'"),
                        ("cudart", "'nvidia-cuda-runtime>=13,<14' 'nvidia-cuda-crt>=13.0,<13.1'")):
        found = find_nvidia_header_directory(lib)
        if found is None:
            raise AbqcError(f"CUTLASS needs the CUDA {lib} headers: install a CUDA 13.0 toolkit (CUDA_HOME) or "
                            f"`pip install {wheels}`")
        out.append(Path(found))
        if lib == "cccl" and Path(found).name == "cccl":
            out.append(Path(found).parent)      # CUTLASS includes both <cuda/std/...> and "cccl/cuda/std/..."
    return out


def _cutlass_version() -> str:
    try:
        return metadata.version("nvidia-cutlass")
    except metadata.PackageNotFoundError:
        return "unknown"


def _key(source: str, arch: str, compiler: str) -> str:
    return hashlib.sha256((source + arch + compiler).encode()).hexdigest()[:24]


def _template(name: str) -> str:
    return resources.files("abqc.codegen.cutlass").joinpath("templates").joinpath(name).read_text()


@dataclass(frozen=True)
class GemmConfig:
    """One catalogue GEMM: tile = (weight-plane rows P*N, activation-plane rows Q*M, K bits) per
    threadblock and stage (cutlass_library names the tile of a column-major-output operation in the
    transposed problem it emits), `stages` cp.async pipeline stages."""

    tile: tuple = DEFAULT_TILE
    stages: int = DEFAULT_STAGES
    arch: str = "sm_90a"

    def __post_init__(self):
        object.__setattr__(self, "tile", tuple(self.tile))
        if self.arch not in ARCHS:
            raise AbqcError(f"arch {self.arch!r} unsupported: the b1 AND-popc GEMM needs one of {ARCHS}")
        if (self.tile, self.stages) not in catalogue():
            have = ", ".join(f"{'x'.join(map(str, t))}/{s}" for t, s in sorted(catalogue()))
            raise AbqcError(f"no b1 AND-popc CUTLASS GEMM with tile {self.tile} and {self.stages} stages; "
                            f"cutlass_library offers (tile/stages): {have}")

    @cached_property
    def operation(self):
        """The catalogue operation, with the identity swizzle our launcher's grid assumes."""
        op = copy.copy(catalogue()[(self.tile, self.stages)])
        op.swizzling_functor = _cutlass_library()[3].SwizzlingFunctor.Identity1
        return op

    @property
    def name(self) -> str:
        t = self.tile
        return f"abqc_cutlass_b1and_{t[0]}x{t[1]}x{t[2]}_s{self.stages}"

    @property
    def threads(self) -> int:
        w = self.operation.tile_description.warp_count
        return 32 * w[0] * w[1] * w[2]

    @property
    def k_align_bits(self) -> int:
        """K of every group is padded with zero bits to this multiple (the operands' 128-bit accesses)."""
        return self.operation.A.alignment

    @property
    def c_align(self) -> int:
        """The int32 C row stride (ldc) is a multiple of this many elements (the epilogue's alignment)."""
        return self.operation.C.alignment

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory: the multistage operand buffers (checked >= CUTLASS's SharedStorage
        by a static_assert in the source)."""
        t = self.tile
        return self.stages * (t[0] + t[1]) * t[2] // 8

    def source(self) -> str:
        op = self.operation
        _, _, gemm_operation, _ = _cutlass_library()
        instance = gemm_operation.EmitGemmUniversalInstance().emit(op)
        t = self.tile
        defines = [f"#define KERNEL_NAME {self.name}", f"#define TILE_WROWS {t[0]}", f"#define TILE_AROWS {t[1]}",
                   f"#define TILE_K {t[2]}", f"#define THREADS {self.threads}", f"#define SMEM_BYTES {self.smem_bytes}",
                   f"#define K_ALIGN_BITS {self.k_align_bits}"]
        body = _template("gemm.cu").replace("ABQC_INSTANCE", instance).replace("ABQC_OPERATION", op.procedural_name())
        head = f"// generated by abqc.codegen.cutlass from {asdict(self)!r}, nvidia-cutlass {_cutlass_version()}"
        return "\n".join([head] + defines) + "\n" + body

    @property
    def nvrtc_options(self) -> tuple[str, ...]:
        """CUTLASS headers compile under NVRTC with unannotated functions taken as device code."""
        dirs = [cutlass_include_dir(), *cuda_header_dirs()]
        return ("-default-device", "-diag-suppress=20044", *(f"-I{d}" for d in dirs))

    def key(self, compiler: str = "") -> str:
        return _key(self.source(), self.arch, compiler + _cutlass_version())


@dataclass(frozen=True)
class ReduceConfig:
    """The per-(P, Q) reduction: 2^(i+j) recombination, zero-point correction, scales, output dtype."""

    w_planes: int
    a_bits: int
    arch: str = "sm_90a"

    def __post_init__(self):
        if not (1 <= self.w_planes <= 8 and 1 <= self.a_bits <= 8):
            raise AbqcError(f"bit-planes must be 1..8, got P={self.w_planes}, Q={self.a_bits}")
        if self.arch not in ARCHS:
            raise AbqcError(f"arch {self.arch!r} unsupported: use one of {ARCHS}")

    @property
    def name(self) -> str:
        return f"abqc_cutlass_reduce_p{self.w_planes}_q{self.a_bits}"

    def source(self) -> str:
        common = resources.files("abqc.codegen").joinpath("templates").joinpath("common.cuh").read_text()
        defines = [f"// generated by abqc.codegen.cutlass from {asdict(self)!r}", f"#define KERNEL_NAME {self.name}",
                   f"#define P {self.w_planes}", f"#define Q {self.a_bits}"]
        return "\n".join(defines) + "\n" + common + "\n" + _template("reduce.cu")

    def key(self, compiler: str = "") -> str:
        return _key(self.source(), self.arch, compiler)


@dataclass(frozen=True)
class CutlassConfig:
    """A W(P)A(Q) linear on the CUTLASS path: the shared b1 GEMM plus its (P, Q) reduction."""

    w_planes: int
    a_bits: int
    tile: tuple = DEFAULT_TILE
    stages: int = DEFAULT_STAGES
    arch: str = "sm_90a"

    @property
    def gemm(self) -> GemmConfig:
        return GemmConfig(tuple(self.tile), self.stages, self.arch)

    @property
    def reduce(self) -> ReduceConfig:
        return ReduceConfig(self.w_planes, self.a_bits, self.arch)

    def __post_init__(self):
        object.__setattr__(self, "tile", tuple(self.tile))
        GemmConfig(self.tile, self.stages, self.arch)        # refuse a bad tile or arch now, not at launch
        ReduceConfig(self.w_planes, self.a_bits, self.arch)
