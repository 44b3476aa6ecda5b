"""Declarative kernel configs: a frozen dataclass names one generated kernel; its source is the
template with the config's constants prepended, and its key (hash of source + target) names the
compiled binary in the cache."""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from importlib import resources

FAMILIES = ("bmma", "gemv", "wgmma", "wgmma8", "quant_pack", "quant_int8", "quant_u8", "int8_unpack", "int8_epilogue",
            "int8_gemm")
PACKERS = ("quant_pack", "quant_int8", "quant_u8")        # activation quantizers (act_grid.cuh + quant_pack.cu)
BIT_FREE = ("int8_unpack", "int8_epilogue", "int8_gemm")   # one build serves every bit pair (bits are launch arguments)
ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90a")
FP8_MAX_BITS = 5   # the FP8 family: centred codes of up to 5 bits (-16..15) are exact in float8_e4m3fn


def gemv_max_tokens(p: int, q: int) -> tuple[int, ...]:
    """Token counts the GEMV family is built for: P * ceil(MT*Q/8) accumulator tiles stay <= 16."""
    return tuple(mt for mt in (1, 2, 4, 8) if p * -(-mt * q // 8) <= 16)


def gemv_tokens(m: int, p: int, q: int) -> int | None:
    """The GEMV build (max tokens) serving m tokens, or None if that family cannot."""
    return next((mt for mt in gemv_max_tokens(p, q) if m <= mt), None)


def gemv_channel_tiles(p: int, q: int, mt: int) -> tuple[int, ...]:
    """16-channel tiles per warp (NTW) for a GEMV build: NTW * P * ceil(MT*Q/8) accumulator tiles <= 16."""
    cap = int(os.environ.get("ABQC_GEMV_MAX_NTW", "4"))   # debugging knob: restrict the builds used
    return tuple(u for u in (1, 2, 4) if u <= cap and u * p * -(-mt * q // 8) <= 16)


def token_tile_choices(p: int, q: int) -> tuple[int, ...]:
    """Token tiles per warp that keep the TM*(P+Q-1)*4 integer accumulators in registers (no spills)."""
    return tuple(tm for tm in (1, 2, 4) if tm == 1 or tm * (p + q - 1) <= 24)


WGMMA_WARPGROUPS = 2           # wgmma family: warpgroups per block, 64 channels each, sharing the staged activations
WGMMA_TOKENS = (32, 64, 128)   # its token tiles (the MMA's N)
WGMMA_STAGE_BUDGET = 100 * 1024  # bytes per cp.async stage (two in flight)


def _wgmma_step_bytes(p: int, q: int, tn: int) -> int:
    """Shared memory of one K step in a wgmma stage (wgmma.cu's W_STAGE + A_STAGE per step): the block's
    4*WGMMA_WARPGROUPS channel tiles x P planes x 512 bytes, and Q planes x tn token rows x 32 bytes."""
    return WGMMA_WARPGROUPS * 4 * p * 512 + q * tn * 32


def wgmma_k_steps(p: int, q: int, tn: int) -> int:
    """K steps per pipeline stage of a wgmma build: at most 4, a stage's weights and activations within
    WGMMA_STAGE_BUDGET, and a warp's weight fragments of a stage (P * steps) in at most 32 registers."""
    per_step = _wgmma_step_bytes(p, q, tn)
    return next(kc for kc in (4, 2, 1) if kc == 1 or (kc * per_step <= WGMMA_STAGE_BUDGET and p * kc <= 8))


def wgmma_smem_bytes(p: int, q: int, tn: int) -> int:
    """Dynamic shared memory of a wgmma build: two stages."""
    return 2 * wgmma_k_steps(p, q, tn) * _wgmma_step_bytes(p, q, tn)


WGMMA8_TOKENS = (32, 64, 128)    # wgmma8 family: token tiles (the MMA's N)
WGMMA8_WARPGROUPS = (1, 2)       # its consumer warpgroups per block (64 channels each)
WGMMA8_SMEM_BUDGET = 200 * 1024  # bytes of its pipeline stages together
WGMMA8_MAX_STAGES = 8


def wgmma8_stage_bytes(p: int, tn: int, warpgroups: int) -> int:
    """One wgmma8 pipeline stage (a 256-wide K step): 8 chunks x tn token rows x 32 bytes of activation codes
    and the block's 4 * warpgroups channel tiles x P planes x 512 bytes of weights (wgmma8.cu STAGE_BYTES)."""
    return tn * 256 + 4 * warpgroups * p * 512


def wgmma8_stages(p: int, tn: int, warpgroups: int) -> int:
    return max(2, min(WGMMA8_MAX_STAGES, WGMMA8_SMEM_BUDGET // wgmma8_stage_bytes(p, tn, warpgroups)))


def wgmma8_smem_bytes(p: int, tn: int, warpgroups: int) -> int:
    return wgmma8_stages(p, tn, warpgroups) * wgmma8_stage_bytes(p, tn, warpgroups)


@dataclass(frozen=True)
class KernelConfig:
    """family "bmma": bit-plane GEMM (m16n8k256 b1 AND-popc) for P weight and Q activation planes in
    blocks of 16 channels x 8*TM tokens (token_tiles = TM; the warps splitting K are a launch parameter).
    family "gemv": per-channel bit-plane GEMV for at most MT tokens (token_tiles = MT) whose MMA N
    columns are (token, activation plane) pairs; w_bulk=True (sm_90a only): its weights stream into shared
    memory through the Hopper bulk-copy engine (cp.async.bulk + mbarriers) instead of register loads.
    family "wgmma" (sm_90a only): per-channel bit-plane GEMM on the Hopper warpgroup MMA (m64nNk256 b1
    AND-popc) for blocks of WGMMA_WARPGROUPS*64 channels x 8*token_tiles tokens (N in WGMMA_TOKENS).
    family "wgmma8" (sm_90a only): per-channel W(P)A8 GEMM on the Hopper INT8 warpgroup MMA (m64nNk32 u8),
    weights unpacked from their P bit-planes in registers, activations as byte codes from "quant_u8" (any
    Q <= 8: built with a_bits=8); blocks of 64*warpgroups channels x 8*token_tiles tokens (N in WGMMA8_TOKENS).
    family "quant_pack": per-token activation quantization + packing to Q planes ("quant_u8": to byte
    codes in wgmma8's K order).
    INT8 family (a GEMM on the INT8 tensor cores, torch._int_mm, between these): "quant_int8" quantizes
    activations to centred int8 codes; "int8_unpack" turns tiled weight planes into centred int8 codes and
    "int8_epilogue" undoes the centring and applies the scales; "int8_gemm" is the GEMM itself on the INT8
    MMA (m16n8k32 s8) with the weights unpacked in shared memory, for the unpack + torch._int_mm pair
    (the planner's "int8k" family: exact on the H200, slower than the pair so far); those take their bits
    at launch and are built once (a_bits=8, w_planes=0)."""

    family: str
    a_bits: int
    w_planes: int = 0
    token_tiles: int = 1
    arch: str = "sm_90a"
    n_tiles: int = 1       # gemv: 16-channel tiles per warp
    w_bulk: bool = False   # gemv on sm_90a: weights via bulk copies into shared memory
    warpgroups: int = 1    # wgmma8: consumer warpgroups per block

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown kernel family {self.family!r}; known: {FAMILIES}")
        if not 1 <= self.a_bits <= 8:
            raise ValueError("a_bits must be 1..8")
        if self.family in BIT_FREE and (self.a_bits, self.w_planes, self.token_tiles) != (8, 0, 1):
            raise ValueError(f"{self.family} takes its bits at launch: build it as KernelConfig({self.family!r}, 8)")
        if self.family in ("bmma", "gemv", "wgmma", "wgmma8"):
            if not 1 <= self.w_planes <= 8:
                raise ValueError("w_planes must be 1..8")
        if self.family == "gemv" and self.token_tiles not in gemv_max_tokens(self.w_planes, self.a_bits):
            raise ValueError(f"gemv for P={self.w_planes}, Q={self.a_bits} is built for at most "
                             f"{gemv_max_tokens(self.w_planes, self.a_bits)} tokens, not {self.token_tiles}")
        if self.family == "gemv" and self.n_tiles not in gemv_channel_tiles(self.w_planes, self.a_bits,
                                                                             self.token_tiles):
            raise ValueError(f"n_tiles {self.n_tiles} does not fit gemv P={self.w_planes} Q={self.a_bits} "
                             f"MT={self.token_tiles} in registers")
        if self.family != "gemv" and self.n_tiles != 1:
            raise ValueError("n_tiles applies to the gemv family only")
        if self.w_bulk and (self.family != "gemv" or self.arch != "sm_90a"):
            raise ValueError("w_bulk (weights through the Hopper bulk-copy engine) needs the gemv family on sm_90a")
        if self.family == "wgmma":
            if self.arch != "sm_90a":
                raise ValueError(f"the wgmma family needs sm_90a (Hopper warpgroup MMA), not {self.arch}")
            if 8 * self.token_tiles not in WGMMA_TOKENS:
                raise ValueError(f"wgmma token_tiles {self.token_tiles}: choose from "
                                 f"{tuple(t // 8 for t in WGMMA_TOKENS)} (N = {WGMMA_TOKENS})")
        if self.family == "wgmma8":
            if self.arch != "sm_90a":
                raise ValueError(f"the wgmma8 family needs sm_90a (Hopper warpgroup MMA), not {self.arch}")
            if self.a_bits != 8:
                raise ValueError("wgmma8 reads byte codes of any activation width: build it with a_bits=8")
            if 8 * self.token_tiles not in WGMMA8_TOKENS:
                raise ValueError(f"wgmma8 token_tiles {self.token_tiles}: choose from "
                                 f"{tuple(t // 8 for t in WGMMA8_TOKENS)} (N = {WGMMA8_TOKENS})")
            if self.warpgroups not in WGMMA8_WARPGROUPS:
                raise ValueError(f"wgmma8 warpgroups {self.warpgroups}: choose from {WGMMA8_WARPGROUPS}")
        elif self.warpgroups != 1:
            raise ValueError("warpgroups applies to the wgmma8 family only")
        if self.family == "bmma":
            if self.token_tiles not in token_tile_choices(self.w_planes, self.a_bits):
                raise ValueError(f"token_tiles {self.token_tiles} not allowed for P={self.w_planes}, Q={self.a_bits}: "
                                 f"choose from {token_tile_choices(self.w_planes, self.a_bits)}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch {self.arch!r} unsupported: binary tensor-core MMA needs one of {ARCHS}")

    @property
    def name(self) -> str:
        if self.family in PACKERS:
            return f"abqc_{self.family}_q{self.a_bits}"
        if self.family in BIT_FREE:
            return f"abqc_{self.family}"
        if self.family == "gemv":
            return (f"abqc_gemv_p{self.w_planes}_q{self.a_bits}_m{self.token_tiles}_n{self.n_tiles}"
                    + ("_bulk" if self.w_bulk else ""))
        if self.family == "wgmma":
            return f"abqc_wgmma_p{self.w_planes}_q{self.a_bits}_n{8 * self.token_tiles}"
        if self.family == "wgmma8":
            return f"abqc_wgmma8_p{self.w_planes}_n{8 * self.token_tiles}_wg{self.warpgroups}"
        return f"abqc_bmma_p{self.w_planes}_q{self.a_bits}_tm{self.token_tiles}"

    def source(self) -> str:
        templates = resources.files("abqc.codegen").joinpath("templates")
        defines = [f"#define KERNEL_NAME {self.name}", f"#define Q {self.a_bits}"]
        parts = []
        if self.family == "bmma":
            defines += [f"#define P {self.w_planes}", f"#define TM {self.token_tiles}"]
        if self.family == "gemv":
            defines += [f"#define P {self.w_planes}", f"#define MT {self.token_tiles}", f"#define NTW {self.n_tiles}",
                        f"#define WBULK {int(self.w_bulk)}"]
        if self.family == "wgmma":
            tn = 8 * self.token_tiles
            defines += [f"#define P {self.w_planes}", f"#define TN {tn}",
                        f"#define KC {wgmma_k_steps(self.w_planes, self.a_bits, tn)}", f"#define WGS {WGMMA_WARPGROUPS}"]
        if self.family == "wgmma8":
            tn = 8 * self.token_tiles
            defines += [f"#define P {self.w_planes}", f"#define TN {tn}", f"#define WGS {self.warpgroups}",
                        f"#define NS {wgmma8_stages(self.w_planes, tn, self.warpgroups)}"]
        if self.family == "quant_int8":
            defines.append("#define INT8_CODES")
        if self.family == "quant_u8":
            defines.append("#define U8_TILED")
        if self.family in BIT_FREE:
            defines.append(f"#define {self.family.upper()}")
        if self.family not in PACKERS:
            parts.append(templates.joinpath("common.cuh").read_text())
        else:
            parts.append(templates.joinpath("act_grid.cuh").read_text())
        template = ("quant_pack" if self.family in PACKERS else
                    "int8" if self.family in BIT_FREE else self.family)
        parts.append(templates.joinpath(f"{template}.cu").read_text())
        head = "\n".join(["// generated by abqc.codegen from " + repr(asdict(self))] + defines)
        return head + "\n" + "\n".join(parts)

    def key(self, compiler: str = "") -> str:
        return hashlib.sha256((self.source() + self.arch + compiler).encode()).hexdigest()[:24]


def all_configs(arch: str = "sm_90a") -> list[KernelConfig]:
    """Every kernel the runtime may launch: bmma for all (P, Q) in 1..8 with each token-tile choice, the
    GEMV builds (on sm_90a also their bulk-copy twins, the wgmma GEMM for each token tile, the wgmma8 GEMM for
    each P, token tile and warpgroup count, and its byte-code quantizer), the activation packer for Q in 1..8,
    and the INT8 family's kernels."""
    out = [KernelConfig(f, q, arch=arch) for f in ("quant_pack", "quant_int8") for q in range(1, 9)]
    if arch == "sm_90a":
        out += [KernelConfig("quant_u8", q, arch=arch) for q in range(1, 9)]
    out += [KernelConfig(f, 8, arch=arch) for f in BIT_FREE]
    for p in range(1, 9):
        for q in range(1, 9):
            out += [KernelConfig("bmma", q, p, tm, arch) for tm in token_tile_choices(p, q)]
            out += [KernelConfig("gemv", q, p, mt, arch, u, bulk) for mt in gemv_max_tokens(p, q)
                    for u in gemv_channel_tiles(p, q, mt) for bulk in ((False, True) if arch == "sm_90a" else (False,))]
            if arch == "sm_90a":
                out += [KernelConfig("wgmma", q, p, tn // 8, arch) for tn in WGMMA_TOKENS]
        if arch == "sm_90a":
            out += [KernelConfig("wgmma8", 8, p, tn // 8, arch, warpgroups=wg) for tn in WGMMA8_TOKENS
                    for wg in WGMMA8_WARPGROUPS]
    return out
