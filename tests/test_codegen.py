"""Kernel generation without a GPU: every generated kernel compiles with NVRTC for sm_80 and sm_90a,
uses binary tensor-core MMA (BMMA ... AND.POPC; the wgmma family BGMMA on sm_90a; the wgmma8 family the INT8
warpgroup MMA IGMMA ... U8.U8), never XOR.POPC, and keeps its accumulators in registers (no local-memory
spills)."""
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from abqc.codegen import layout
from abqc.codegen.config import (WGMMA8_TOKENS, WGMMA8_WARPGROUPS, WGMMA_TOKENS, KernelConfig, all_configs,
                                 gemv_channel_tiles, gemv_max_tokens, token_tile_choices, wgmma8_smem_bytes,
                                 wgmma8_stage_bytes, wgmma8_stages, wgmma_k_steps, wgmma_smem_bytes)

nvrtc = pytest.importorskip("abqc.codegen.nvrtc")
try:
    nvrtc.compiler_version()
    HAVE_NVRTC = True
except Exception:  # AbqcError when cuda-bindings / NVRTC are missing
    HAVE_NVRTC = False


SAMPLE = [(1, 1), (2, 8), (3, 8), (4, 4), (6, 6), (7, 8), (8, 8)]


def _ci_configs(arch):
    """What the test compiles: every generated kernel of abqc.codegen.config (all_configs: 618 for sm_80,
    1266 for sm_90a; about 20 minutes on CI's 2 cores; the CUTLASS path has its own test).
    ABQC_QUICK_KERNEL_SWEEP=1 compiles a subset instead, for local iteration: every activation packer and
    INT8 kernel; for every (P, Q) on sm_90a the GEMV build for most tokens (and its bulk-copy twin), the
    single-token-tile GEMM build and the wgmma build for 128 tokens (all token tiles for the sample); for a
    fixed sample of (P, Q) on both archs the most register-hungry builds of both families."""
    if os.environ.get("ABQC_QUICK_KERNEL_SWEEP") != "1":
        return all_configs(arch)
    out = [c for c in all_configs(arch) if c.family not in ("bmma", "gemv", "wgmma")]   # packers, the INT8 family
    every = [(p, q) for p in range(1, 9) for q in range(1, 9)] if arch == "sm_90a" else []
    for p, q in sorted(set(every) | set(SAMPLE)):
        mt = max(gemv_max_tokens(p, q))
        heavy = (p, q) in SAMPLE
        ntw = max(gemv_channel_tiles(p, q, mt)) if heavy else 1
        out += [KernelConfig("gemv", q, p, mt, arch, ntw, bulk) for bulk in ((False, True) if arch == "sm_90a"
                                                                            else (False,))]
        out.append(KernelConfig("bmma", q, p, max(token_tile_choices(p, q)) if heavy else 1, arch))
        if arch == "sm_90a":
            out += [KernelConfig("wgmma", q, p, tn // 8, arch) for tn in WGMMA_TOKENS if tn == 128 or heavy]
    return out


@pytest.mark.skipif(not HAVE_NVRTC, reason="NVRTC not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_every_kernel_compiles_to_binary_mma(arch, tmp_path):
    configs = _ci_configs(arch)

    def check(cfg):
        s = nvrtc.sass(nvrtc.compile_cubin(cfg, use_cache=False), tmp_path / cfg.name)
        return cfg, s

    (tmp_path).mkdir(exist_ok=True)
    for cfg in configs:
        (tmp_path / cfg.name).mkdir()
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(check, configs))
    for cfg, s in results:
        assert "XOR.POPC" not in s, cfg.name
        assert not re.search(r"\b(LDL|STL)\b", s), f"{cfg.name} spills to local memory"
        if cfg.family == "int8_unpack":
            assert "STG.E.128" in s, f"{cfg.name}: codes not stored 16 bytes wide"
        if cfg.family == "int8_gemm":     # the INT8 tensor cores, all 8 k32 chunks x 4 token tiles of a step
            assert len(re.findall(r"IMMA\.16832\.S8\.S8", s)) >= 32, cfg.name
            assert "STS.128" in s and "LDG.E.128" in s, f"{cfg.name}: planes or unpacked codes not 16 bytes wide"
        if cfg.family == "wgmma":   # one warpgroup MMA per (weight plane, activation plane, K step of a stage)
            tn = 8 * cfg.token_tiles
            n = len(re.findall(rf"BGMMA\.64x{tn}x256\.AND\.POPC", s))
            assert n >= cfg.w_planes * cfg.a_bits * wgmma_k_steps(cfg.w_planes, cfg.a_bits, tn), (cfg.name, n)
            assert "LDS.128" in s and "LDGSTS" in s, f"{cfg.name}: weights/activations not staged by cp.async"
            assert "BMMA" not in s.replace("BGMMA", ""), cfg.name
        if cfg.family == "wgmma8":   # 8 INT8 warpgroup MMAs a step (3 steps in the code), bulk-copy fed
            n = len(re.findall(rf"IGMMA\.64x{8 * cfg.token_tiles}x32\.U8\.U8", s))
            assert n >= 24, (cfg.name, n)
            # ptxas serializing the MMAs (C7513) puts a wait after every one of them
            assert 4 * s.count("WARPGROUP.DEPBAR") < n, f"{cfg.name}: MMAs serialized"
            assert "UBLKCP" in s and "SYNCS" in s and "LDS.128" in s, f"{cfg.name}: no bulk-copied stages"
        if cfg.family == "quant_u8":
            assert "SHFL" in s and "STG.E" in s, cfg.name
        if cfg.family in ("bmma", "gemv"):
            n = len(re.findall(r"BMMA\.168256\.AND\.POPC", s))
            # at least one MMA per (weight plane, activation plane, token tile) or (weight plane, n8 tile)
            need = (cfg.w_planes * cfg.a_bits * cfg.token_tiles if cfg.family == "bmma"
                    else cfg.w_planes * cfg.n_tiles * -(-cfg.token_tiles * cfg.a_bits // 8))
            assert n >= need, (cfg.name, n)
            if cfg.w_bulk:    # weights by the bulk-copy engine into shared memory, read back 16 bytes wide
                assert "UBLKCP" in s and "SYNCS" in s and "LDS.128" in s, f"{cfg.name}: no bulk weight copies"
            else:
                assert "LDG.E.128" in s, f"{cfg.name}: weights not loaded 16 bytes wide"


def test_wgmma_configs():
    """The wgmma family: sm_90a only, N = 32 or 64 tokens, stages that fit the shared-memory budget."""
    with pytest.raises(ValueError, match="needs sm_90a"):
        KernelConfig("wgmma", 8, 2, 8, "sm_80")
    with pytest.raises(ValueError, match="token_tiles 2"):
        KernelConfig("wgmma", 8, 2, 2, "sm_90a")
    assert KernelConfig("wgmma", 8, 2, 8).name == "abqc_wgmma_p2_q8_n64"
    assert "#define KC 4" in KernelConfig("wgmma", 8, 2, 8).source()
    assert wgmma_k_steps(8, 8, 64) == 1 and wgmma_k_steps(4, 4, 64) == 2 and wgmma_k_steps(1, 2, 32) == 4
    for p in range(1, 9):
        for q in range(1, 9):
            for tn in WGMMA_TOKENS:
                assert wgmma_smem_bytes(p, q, tn) <= 200 * 1024, (p, q, tn)
    assert sum(c.family == "wgmma" for c in all_configs("sm_90a")) == 64 * len(WGMMA_TOKENS)
    assert not any(c.family == "wgmma" for c in all_configs("sm_80"))


def test_wgmma8_configs():
    """The wgmma8 family: sm_90a only, built once per weight width (a_bits=8 serves every activation width),
    N in WGMMA8_TOKENS, 1 or 2 warpgroups, stages within the shared-memory budget."""
    with pytest.raises(ValueError, match="needs sm_90a"):
        KernelConfig("wgmma8", 8, 2, 8, "sm_80")
    with pytest.raises(ValueError, match="a_bits=8"):
        KernelConfig("wgmma8", 4, 2, 8, "sm_90a")
    with pytest.raises(ValueError, match="token_tiles 2"):
        KernelConfig("wgmma8", 8, 2, 2, "sm_90a")
    with pytest.raises(ValueError, match="warpgroups 3"):
        KernelConfig("wgmma8", 8, 2, 8, "sm_90a", warpgroups=3)
    with pytest.raises(ValueError, match="wgmma8 family only"):
        KernelConfig("bmma", 8, 2, 1, "sm_90a", warpgroups=2)
    cfg = KernelConfig("wgmma8", 8, 3, 16, "sm_90a", warpgroups=2)
    assert cfg.name == "abqc_wgmma8_p3_n128_wg2"
    assert f"#define NS {wgmma8_stages(3, 128, 2)}" in cfg.source() and "#define WGS 2" in cfg.source()
    for p in range(1, 9):
        for tn in WGMMA8_TOKENS:
            for wg in WGMMA8_WARPGROUPS:
                assert 2 * wgmma8_stage_bytes(p, tn, wg) <= wgmma8_smem_bytes(p, tn, wg) <= 200 * 1024
    assert sum(c.family == "wgmma8" for c in all_configs("sm_90a")) == 8 * len(WGMMA8_TOKENS) * len(WGMMA8_WARPGROUPS)
    assert not any(c.family in ("wgmma8", "quant_u8") for c in all_configs("sm_80"))
    assert "#define U8_TILED" in KernelConfig("quant_u8", 4).source()


def test_byte_codes_layout():
    """layout.byte_codes puts the code of k = 256s + 128h + 32t + 8e + c at chunk 8s + c, byte 16h + 4t + e of
    its row, rows in 8-row core-matrix groups [half][row][16 bytes]; zero past K and in padding rows."""
    m, k = 11, 300
    u = torch.randint(0, 256, (m, k))
    b = layout.byte_codes(u, 2).view(16, 2, 2, 8, 16)        # [chunk][row group][half][row][16 bytes]
    for row, kk in [(0, 0), (3, 9), (10, 33), (7, 128 + 64 + 8 * 3 + 5), (9, 256 + 7), (10, 299)]:
        s, r = divmod(kk, 256)
        h, t, e, c = r // 128, r % 128 // 32, r % 32 // 8, r % 8
        assert b[8 * s + c, row // 8, h, row % 8, 4 * t + e] == u[row, kk], (row, kk)
    assert int(b.sum()) == int(u.sum())                       # every code once, zeros elsewhere
    with pytest.raises(ValueError, match="do not fit"):
        layout.byte_codes(u, 1)


def test_wgmma8_k_order_contract():
    """wgmma8's two sides agree on K: the weights as wgmma8.cu unpacks them (lane (g, t), word j of the tiled
    fragment: bit 8e + c of plane i -> byte e of chunk c's register j, row g + 8*(j&1), half j>>1) and the
    activations where layout.byte_codes puts them (the B tile's core-matrix rows) multiply to u_a @ u_w^T."""
    from abqc import quant
    gen = torch.Generator().manual_seed(3)
    m, n, k, p = 13, 37, 600, 3
    kw = -(-k // 32)
    steps = layout.steps_per_group(kw)
    ua, uw = torch.randint(0, 256, (m, k), generator=gen), torch.randint(0, 2 ** p, (n, k), generator=gen)
    tiles = layout.tile_weights(quant.pack_bitplanes(uw, p, pad_to=kw * 32), kw).long() & 0xFFFFFFFF
    nt = tiles.shape[0]
    lane, j, c, e = torch.meshgrid(torch.arange(32), torch.arange(4), torch.arange(8), torch.arange(4), indexing="ij")
    g, t = lane // 4, lane % 4
    row, klog = g + 8 * (j & 1), 32 * c + 16 * (j >> 1) + 4 * t + e            # within a tile and a step
    bits = (tiles[:, :, :, lane, j] >> (8 * e + c)) & 1                          # [NT, S, P, 32, 4, 8, 4]
    codes = (bits << torch.arange(p).view(1, 1, p, 1, 1, 1, 1)).sum(2)          # [NT, S, 32, 4, 8, 4]
    a_log = torch.zeros(nt * 16, steps * 256, dtype=torch.long)
    for tile in range(nt):
        for s in range(steps):
            a_log[tile * 16 + row, s * 256 + klog] = codes[tile, s]
    bc = layout.byte_codes(ua, steps).view(steps * 8, -1, 2, 8, 16)           # [chunk][row group][half][row][byte]
    mm = torch.arange(m)
    b_log = bc[:, mm // 8, :, mm % 8, :].reshape(m, steps * 256).long()       # [M, chunk, half, byte]
    assert torch.equal(b_log @ a_log[:n].T, ua.long() @ uw.long().T)


def test_config_validation():
    with pytest.raises(ValueError, match="token_tiles 4 not allowed"):
        KernelConfig("bmma", 8, 8, 4)
    with pytest.raises(ValueError, match="gemv for P=8, Q=8 is built for at most"):
        KernelConfig("gemv", 8, 8, 4)
    with pytest.raises(ValueError, match="needs one of"):
        KernelConfig("bmma", 8, 2, 1, "sm_75")
    with pytest.raises(ValueError, match="needs the gemv family on sm_90a"):
        KernelConfig("gemv", 8, 2, 1, "sm_80", 1, True)
    with pytest.raises(ValueError, match="needs the gemv family on sm_90a"):
        KernelConfig("bmma", 8, 2, 1, "sm_90a", 1, True)
    bulk = KernelConfig("gemv", 8, 2, 1, "sm_90a", 1, True)
    assert bulk.name.endswith("_bulk") and "#define WBULK 1" in bulk.source()
    assert bulk.key() != KernelConfig("gemv", 8, 2, 1, "sm_90a", 1).key()
    with pytest.raises(ValueError, match="unknown kernel family"):
        KernelConfig("gemm", 8, 2)
    with pytest.raises(ValueError, match="takes its bits at launch"):
        KernelConfig("int8_unpack", 4)
    assert KernelConfig("int8_epilogue", 8).name == "abqc_int8_epilogue"
    assert "#define INT8_CODES" in KernelConfig("quant_int8", 3).source()
    a, b = KernelConfig("bmma", 8, 2, 1), KernelConfig("bmma", 8, 2, 2)
    assert a.key() != b.key() and a.key() == KernelConfig("bmma", 8, 2, 1).key()
    assert "#define P 2" in a.source() and "mma.sync.aligned.m16n8k256" in a.source()


@pytest.mark.parametrize("n,kw,gw", [(37, 3, 3), (16, 16, 16), (40, 18, 6), (5, 9, 9)])
def test_tile_layout_matches_fragment_map(n, kw, gw):
    gen = torch.Generator().manual_seed(n)
    planes = torch.randint(-2 ** 31, 2 ** 31 - 1, (3, n, kw), generator=gen, dtype=torch.int64).to(torch.int32)
    t = layout.tile_weights(planes, gw)
    sg = layout.steps_per_group(gw)
    assert t.shape == (-(-n // 16), (kw // gw) * sg, 3, 32, 4)
    for nt in range(t.shape[0]):
        for s in range(t.shape[1]):
            grp, base = s // sg, (s % sg) * 8
            for lane in (0, 5, 31):
                g, tt = lane // 4, lane % 4
                for r, (row, slot) in enumerate([(g, tt), (g + 8, tt), (g, tt + 4), (g + 8, tt + 4)]):
                    nn, within = nt * 16 + row, base + slot
                    want = planes[1, nn, grp * gw + within] if nn < n and within < gw else 0
                    assert t[nt, s, 1, lane, r].item() == int(want)


@pytest.mark.parametrize("p,n,kw,gw", [(3, 71, 10, 10), (1, 33, 12, 4), (8, 5, 3, 1), (2, 100, 40, 20), (4, 16, 8, 8)])
def test_untile_inverts_tile(p, n, kw, gw):
    gen = torch.Generator().manual_seed(n * kw)
    planes = torch.randint(-2 ** 31, 2 ** 31 - 1, (p, n, kw), generator=gen, dtype=torch.int64).to(torch.int32)
    assert torch.equal(layout.untile_weights(layout.tile_weights(planes, gw), n, kw, gw), planes)
    with pytest.raises(ValueError, match="do not hold"):
        layout.untile_weights(layout.tile_weights(planes, gw), n + 16, kw, gw)
