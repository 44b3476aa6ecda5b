"""Orthonormal Hadamard transforms of any supported order, and the online Hadamard of the runtime.

An order n = 2^k * m transform is H_n = H_(2^k) (Sylvester) Kronecker B_m, where B_m is the smallest
known Hadamard matrix of such an order m (Sylvester m = 1, Paley I for q + 1 and Paley II for
2(q + 1) with q a prime power) or, when none of the orders n / 2^j has a construction here, sqrt(m)
times a seeded random orthogonal matrix of the odd part m. Invariant: B_m B_m^T = m I, so
`hadamard(x, B) = x H_n^T / sqrt(n)` is orthonormal along the last dim for every n.

`abqc::hadamard` computes it in O(n log n + n m): a fast Walsh-Hadamard transform over the 2^k
factor, then the dense m x m factor. The torch reference runs on any device; on CUDA a generated
kernel (codegen/templates/hadamard.cu, NVRTC) takes over. `OnlineHadamard` is that op as a module;
`HadamardLinear` is an nn.Linear that applies one to its input (down(x) = (W H^T)(H x)).
"""
from __future__ import annotations

import ctypes
import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import torch
from torch import nn

from ..errors import AbqcError

# ---------------------------------------------------------------------------------------------------
# Hadamard matrices


def sylvester(n: int) -> torch.Tensor:
    """H_n for n a power of two, natural (Sylvester) order: H_2h = [[H_h, H_h], [H_h, -H_h]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for a prime p, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k, r = 0, q
    while r % p == 0:
        r, k = r // p, k + 1
    return (p, k) if r == 1 else None


def _polymod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficient lists, lowest degree first, f monic."""
    a = a[:]
    for i in range(len(a) - 1, len(f) - 2, -1):
        c = a[i]
        if c:
            for j, fj in enumerate(f):
                a[i - len(f) + 1 + j] = (a[i - len(f) + 1 + j] - c * fj) % p
    return (a + [0] * len(f))[:len(f) - 1]


def _polymul(a: list[int], b: list[int], p: int) -> list[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            out[i + j] = (out[i + j] + ai * bj) % p
    return out


def _digits(x: int, p: int, k: int) -> list[int]:
    return [(x // p ** i) % p for i in range(k)]


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic degree-k polynomial over GF(p) with no monic factor of degree 1..k//2."""
    for low in range(p ** k):
        f = _digits(low, p, k) + [1]
        divisors = (_digits(c, p, d) + [1] for d in range(1, k // 2 + 1) for c in range(p ** d))
        if all(any(_polymod(f, g, p)) for g in divisors):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _quadratic_character(q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """chi over GF(q) (elements as base-p digit vectors, index = sum d_i p^i) and the digit table."""
    p, k = _prime_power(q)
    f = _irreducible(p, k) if k > 1 else [0, 1]
    digits = [_digits(x, p, k) for x in range(q)]
    squares = {sum(c * p ** i for i, c in enumerate(_polymod(_polymul(d, d, p), f, p))) for d in digits[1:]}
    chi = torch.tensor([0] + [1 if x in squares else -1 for x in range(1, q)], dtype=torch.float64)
    return chi, torch.tensor(digits, dtype=torch.int64)


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = chi(a - b) over GF(q)."""
    chi, d = _quadratic_character(q)
    p = _prime_power(q)[0]
    diff = (d[:, None, :] - d[None, :, :]) % p
    return chi[(diff * p ** torch.arange(d.shape[1])).sum(-1)]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 (q = 3 mod 4): H = I + [[0, 1^T], [-1, Q]] (Q antisymmetric)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) (q = 1 mod 4) from the symmetric conference matrix C = [[0, 1^T], [1, Q]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    off = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron(torch.eye(q + 1, dtype=torch.float64), off)


def _construction(m: int) -> str | None:
    """Name of a Hadamard construction of order m available here, or None."""
    if m in (1, 2):
        return "sylvester"
    if m % 4:
        return None
    pp1 = _prime_power(m - 1)
    if pp1 and (m - 1) % 4 == 3:
        return f"paley1(q={m - 1})"
    pp2 = _prime_power(m // 2 - 1)
    if pp2 and (m // 2 - 1) % 4 == 1:
        return f"paley2(q={m // 2 - 1})"
    return None


def factorize(n: int) -> tuple[int, int, str]:
    """(2^k, m, construction of B_m) with n = 2^k * m and m as small as possible; the construction is
    "random_orthogonal" (m the odd part of n) when no order n / 2^j has a known Hadamard matrix."""
    if n < 1:
        raise AbqcError(f"a Hadamard transform needs a positive size, got {n}")
    pow2 = n & -n
    odd = n // pow2
    j = pow2
    while j >= 1:
        kind = _construction(n // j)
        if kind:
            return j, n // j, kind
        j //= 2
    return pow2, odd, "random_orthogonal"


@lru_cache(maxsize=None)
def _hadamard_block(m: int) -> torch.Tensor:
    kind = _construction(m)
    if kind == "sylvester":
        return sylvester(m)
    q = int(kind.split("=")[1].rstrip(")"))
    return _paley1(q) if kind.startswith("paley1") else _paley2(q)


def block_matrix(n: int, seed: int = 0) -> torch.Tensor:
    """B_m (float64, B B^T = m I) of the factorisation of n; seed only matters for the random fallback."""
    _, m, kind = factorize(n)
    if kind != "random_orthogonal":
        return _hadamard_block(m).clone()
    g = torch.Generator().manual_seed(seed)
    qm, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    return (qm * torch.sign(torch.diagonal(r)) * math.sqrt(m)).contiguous()   # sign fix: Haar-distributed


def explicit_matrix(n: int, seed: int = 0) -> torch.Tensor:
    """The dense orthonormal H_n / sqrt(n) (float64) that `hadamard` applies; for tests and small n."""
    pow2, _, _ = factorize(n)
    return torch.kron(sylvester(pow2), block_matrix(n, seed)) / math.sqrt(n)


# ---------------------------------------------------------------------------------------------------
# The transform: torch reference, CUDA kernel, op


def _check_block(n: int, block: torch.Tensor) -> int:
    """2^k for x of last dim n and block [m, m]; a clear error if they do not fit."""
    if block.dim() != 2 or block.shape[0] != block.shape[1]:
        raise AbqcError(f"the Hadamard block must be square [m, m], got {tuple(block.shape)}")
    m = block.shape[0]
    pow2 = n // m if n % m == 0 else 0
    if pow2 < 1 or pow2 & (pow2 - 1):
        raise AbqcError(f"last dim {n} is not 2^k times the block order {m}: build the block with "
                        f"abqc.runtime.hadamard.block_matrix({n})")
    return pow2


def hadamard_reference(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """x H_n^T / sqrt(n) along the last dim, H_n = H_(2^k) kron block; float32 math (float64 for float64)."""
    n = x.shape[-1]
    pow2 = _check_block(n, block)
    m = block.shape[0]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(dt).reshape(-1, pow2, m)
    rows = y.shape[0]
    h = 1
    while h < pow2:                  # butterfly stage: pairs (i, i + h) inside blocks of 2h
        y = y.view(rows, pow2 // (2 * h), 2, h, m)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    y = y.reshape(rows, pow2, m) @ block.to(dt).T
    return (y * (1.0 / math.sqrt(n))).reshape(x.shape).to(x.dtype)


@dataclass(frozen=True)
class HadamardKernel:
    """The CUDA online-Hadamard kernel for one arch, duck-typed like codegen.KernelConfig (name,
    source, key) so codegen.nvrtc compiles and caches it and runtime.cuda loads it. pack_bits > 0: the
    build that also quantizes and packs the transformed rows to that many activation planes."""

    arch: str = "sm_90a"
    pack_bits: int = 0

    def __post_init__(self):
        if not 0 <= self.pack_bits <= 8:
            raise ValueError(f"pack_bits must be 0 (transform only) or 1..8 activation bits, got {self.pack_bits}")

    @property
    def name(self) -> str:
        return f"abqc_hadamard_pack_q{self.pack_bits}" if self.pack_bits else "abqc_hadamard"

    def source(self) -> str:
        templates = resources.files("abqc.codegen").joinpath("templates")
        body = templates.joinpath("hadamard.cu").read_text()
        defines = f"#define KERNEL_NAME {self.name}\n"
        if self.pack_bits:      # the packers' activation grid (act_grid.cuh) for the fused quantizer
            defines += f"#define HADAMARD_PACK\n#define Q {self.pack_bits}\n" + templates.joinpath("act_grid.cuh").read_text()
        return f"// generated by abqc.runtime.hadamard for {self.arch}\n{defines}{body}"

    def key(self, compiler: str = "") -> str:
        return hashlib.sha256((self.source() + self.arch + compiler).encode()).hexdigest()[:24]


class _HArgs(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("out", ctypes.c_void_p), ("block", ctypes.c_void_p),
                ("rows", ctypes.c_int), ("pow2", ctypes.c_int), ("m", ctypes.c_int), ("dtype", ctypes.c_int),
                ("scale", ctypes.c_float), ("cols", ctypes.c_int), ("sub", ctypes.c_int),
                ("counter", ctypes.c_void_p), ("planes", ctypes.c_void_p), ("sums", ctypes.c_void_p),
                ("a_scale", ctypes.c_void_p), ("a_zero", ctypes.c_void_p),
                ("KW", ctypes.c_int), ("gw", ctypes.c_int), ("G", ctypes.c_int), ("symmetric", ctypes.c_int)]


HADAMARD_BLOCKS = 512   # blocks to aim for: a decode row's dense factor spreads over many SMs


def launch_shape(rows: int, n: int, m: int, groups: int = 1) -> tuple[int, int, int, int] | None:
    """(B columns per block, blocks per row, B rows staged at a time, shared-memory bytes) of the kernel,
    or None when a row does not fit in shared memory (the torch path takes those). At least one output per
    thread per block; more blocks per row while rows are few (every block redoes the row's cheap stage 1)."""
    from . import cuda
    pow2 = n // m
    sub = (cuda.MAX_SMEM - 4 * n) // (4 * (m + 4))
    if sub < 1:
        return None
    min_cols = max(1, -(-256 // pow2))
    nb = max(1, min(-(-HADAMARD_BLOCKS // max(rows, 1)), -(-m // min_cols)))
    cols = -(-m // nb)
    nb = -(-m // cols)
    sub = min(sub, cols)
    smem = 4 * n + 4 * max(sub * (m + 4), groups)
    return (cols, nb, sub, smem) if smem <= cuda.MAX_SMEM else None


def _rows_and_block(x: torch.Tensor, block: torch.Tensor):
    n = x.shape[-1]
    pow2 = _check_block(n, block)
    x2 = x.contiguous()
    b32 = block.to(device=x.device, dtype=torch.float32).contiguous()   # no copy for a cached float32 block
    return x2, b32, n, pow2, x2.numel() // n


def fresh_counters(rows: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 row counters for one call site of the fused kernel (which leaves them zero). Made
    eagerly: zeroed inside a CUDA-graph capture they would be zero only in that graph's replays."""
    if torch.cuda.is_current_stream_capturing():
        raise AbqcError("the fused Hadamard kernel's row counters are made on the first eager call: run the "
                        "layer (or the model) once before capturing a CUDA graph")
    return torch.zeros(max(rows, 1), dtype=torch.int32, device=device)


_COUNTERS: dict = {}


def row_counters(rows: int, device: torch.device) -> torch.Tensor:
    """The device's shared row counters (fresh_counters), grown as needed. Launches on one stream at a time
    share them; older buffers stay alive for CUDA graphs that captured them."""
    got = _COUNTERS.get(device.index)
    if got is None or got[-1].numel() < rows:
        size = max(rows, 1024, 2 * (got[-1].numel() if got else 0))
        _COUNTERS.setdefault(device.index, []).append(fresh_counters(size, device))
        got = _COUNTERS[device.index]
    return got[-1]


def hadamard_cuda(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """The kernel: a row's stage 1 in every one of its blocks, its dense factor split over them (shared memory,
    float32). Rows longer than shared memory, float64 and missing bindings take the torch path."""
    from . import cuda
    n = x.shape[-1]
    _check_block(n, block)
    rows = x.numel() // max(n, 1)
    shape = launch_shape(rows, n, block.shape[0])
    if x.dtype not in cuda._DTYPE_CODE or shape is None or not cuda.available():
        return hadamard_reference(x, block)
    x2, b32, n, pow2, rows = _rows_and_block(x, block)
    out = torch.empty_like(x2)
    if rows == 0:
        return out
    cols, nb, sub, smem = shape
    dev = x.device
    _, fn = cuda.function(HadamardKernel(cuda.arch_of(dev)), dev)
    args = _HArgs(x2.data_ptr(), out.data_ptr(), b32.data_ptr(), rows, pow2, block.shape[0],
                  cuda._DTYPE_CODE[x.dtype], 1.0 / math.sqrt(n), cols, sub)
    cuda._launch(fn, (rows, nb), 256, smem, args, dev)
    return out


def hadamard_pack(x: torch.Tensor, block: torch.Tensor, a_bits: int, group_words: int, groups: int,
                  symmetric: bool, counter: torch.Tensor | None = None, rotated: bool = False):
    """runtime.cuda.quant_pack(hadamard(x, block), ...) in one launch, bit for bit: (planes int32 [Q, M, KW],
    code sums int32 [M, G] ([M, 1] per-channel), scale f32 [M], zero int32 [M]), plus the rotated rows (x's
    dtype) when rotated=True. counter: zeroed int32 [>= M] of this call site (default: the device's shared
    ones). Rows that do not fit in shared memory go through hadamard_cuda, then quant_pack."""
    from . import cuda
    cuda.require_cuda("abqc.runtime.hadamard.hadamard_pack()", x)
    if x.dtype not in cuda._DTYPE_CODE:
        raise TypeError(f"activations must be float32, float16 or bfloat16, got {x.dtype}")
    n = x.shape[-1]
    kw = groups * group_words
    if kw * 32 < n or (kw - group_words) * 32 >= n:
        raise ValueError(f"{groups} groups of {group_words} words do not cover the {n} inputs exactly")
    x2, b32, n, pow2, rows = _rows_and_block(x, block)
    shape = launch_shape(rows, n, block.shape[0], groups)
    if shape is None:
        y = hadamard_cuda(x2, b32)
        packed = cuda.quant_pack(y.reshape(rows, n), a_bits, group_words, groups, n, symmetric)
        return (*packed, y) if rotated else packed
    dev = x.device
    out = torch.empty_like(x2)
    planes = torch.empty(a_bits, rows, kw, dtype=torch.int32, device=dev)
    sums = torch.empty(rows, groups, dtype=torch.int32, device=dev)
    scale = torch.empty(rows, dtype=torch.float32, device=dev)
    zero = torch.empty(rows, dtype=torch.int32, device=dev)
    if rows:
        counter = row_counters(rows, dev) if counter is None else counter
        if counter.numel() < rows or counter.dtype != torch.int32 or counter.device != dev:
            raise ValueError(f"counter must be int32 [>= {rows}] on {dev}")
        cols, nb, sub, smem = shape
        _, fn = cuda.function(HadamardKernel(cuda.arch_of(dev), a_bits), dev)
        args = _HArgs(x2.data_ptr(), out.data_ptr(), b32.data_ptr(), rows, pow2, block.shape[0],
                      cuda._DTYPE_CODE[x.dtype], 1.0 / math.sqrt(n), cols, sub, counter.data_ptr(),
                      planes.data_ptr(), sums.data_ptr(), scale.data_ptr(), zero.data_ptr(), kw, group_words,
                      groups, int(symmetric))
        cuda._launch(fn, (rows, nb), 256, smem, args, dev)
    packed = (planes, sums, scale, zero)
    return (*packed, out) if rotated else packed


@torch.library.custom_op("abqc::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """x H_n^T / sqrt(n) along the last dim with H_n = H_(2^k) kron block (torch reference)."""
    return hadamard_reference(x, block)


@hadamard.register_fake
def _(x, block):
    return torch.empty_like(x)


@hadamard.register_kernel("cuda")
def _(x, block):
    return hadamard_cuda(x, block)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _backward(ctx, grad):
    # y = x Hn^T / sqrt(n), so dx = dy Hn / sqrt(n); Hn^T = H_(2^k) kron block^T (Sylvester is symmetric)
    (block,) = ctx.saved_tensors
    return hadamard(grad.contiguous(), block.T.contiguous()), None


hadamard.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------------
# Modules


class OnlineHadamard(nn.Module):
    """x -> x H_n^T / sqrt(n) on the last dim. The block stays float64 under dtype casts: a random
    orthogonal fallback block must stay orthogonal to the precision the weights were rotated with."""

    def __init__(self, block: torch.Tensor, n: int, kind: str = ""):
        super().__init__()
        self.n, self.kind = n, kind
        _check_block(n, block)
        self.register_buffer("block", block.detach().to(torch.float64).clone())

    @classmethod
    def of_size(cls, n: int, seed: int = 0) -> "OnlineHadamard":
        return cls(block_matrix(n, seed), n, factorize(n)[2])

    def spec(self) -> dict:
        """JSON-able config; `from_spec` rebuilds the module with an empty block for a state dict to fill."""
        return {"n": self.n, "m": int(self.block.shape[0]), "kind": self.kind}

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "OnlineHadamard":
        if not isinstance(spec, dict) or set(spec) != {"n", "m", "kind"}:
            raise AbqcError(f"an online Hadamard spec is {{'n', 'm', 'kind'}}, got {spec!r}: re-save the model")
        m = spec["m"]
        return cls(torch.empty(m, m, dtype=torch.float64, device=device), spec["n"], spec["kind"])

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.block = self.block.to(torch.float64)
        return self

    def kernel_block(self, device: torch.device) -> torch.Tensor:
        """The block as the CUDA kernels take it (float32 on device), converted once per block version."""
        key = (device, self.block.data_ptr(), self.block._version)
        got = self.__dict__.get("_kernel_block")
        if got is None or got[0] != key:
            got = self.__dict__["_kernel_block"] = (key, self.block.to(device=device, dtype=torch.float32).contiguous())
        return got[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CUDA: the kernel computes in float32 anyway, so hand it the cached float32 block (no cast per call).
        # Under torch.compile the op takes the block as it is and casts it per call (the cache keys on
        # data_ptr, which would break the graph); the same float32 values, so the same bits.
        if x.is_cuda and not torch.compiler.is_compiling():
            return hadamard(x, self.kernel_block(x.device))
        return hadamard(x, self.block)

    def extra_repr(self) -> str:
        pow2, m, kind = factorize(self.n)
        return f"{self.n} = {pow2} x {m} ({self.kind or kind})"


class HadamardLinear(nn.Linear):
    """nn.Linear whose input first goes through `pre` (an OnlineHadamard): y = W pre(x) + b."""

    def __init__(self, in_features: int, out_features: int, pre: nn.Module, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.pre = pre

    @classmethod
    def from_linear(cls, linear: nn.Linear, pre: nn.Module) -> "HadamardLinear":
        """A HadamardLinear with linear's weight and bias (the caller rotates the weight)."""
        new = cls(linear.in_features, linear.out_features, pre, linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        return new.to(linear.weight.device)

    def spec(self) -> dict:
        """JSON-able config; `from_spec` rebuilds the module with empty tensors for a state dict to fill."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "pre": self.pre.spec()}

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "HadamardLinear":
        if not isinstance(spec, dict) or set(spec) != {"in_features", "out_features", "bias", "pre"}:
            raise AbqcError("a HadamardLinear spec is {'in_features', 'out_features', 'bias', 'pre'}, "
                            f"got {spec!r}: re-save the model")
        return cls(spec["in_features"], spec["out_features"], OnlineHadamard.from_spec(spec["pre"], device),
                   spec["bias"] is True, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pre(x))
