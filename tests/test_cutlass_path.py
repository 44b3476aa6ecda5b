"""The CUTLASS path (abqc.codegen.cutlass): one nvidia-cutlass b1 AND-popc GEMM of stacked bit-planes
plus a generated reduction.

Without a GPU: the generated source is the AND-popc operation and never XOR; every catalogue GEMM and every
(P, Q) reduction compile with NVRTC for sm_90a and sm_80 (the GEMMs to BMMA ... AND.POPC machine code); the
K padding and the stacked C layout that the reduction reads are checked against the CPU reference.
With a GPU (skipped otherwise; run on the device machine: python -m pytest -q tests/test_cutlass_path.py):
the integer C equals the CPU reference bit for bit and y matches abqc.runtime.ops within float rounding.
"""
import ctypes
import itertools
import re
import shutil
import subprocess

import pytest
import torch

from abqc import quant
from abqc.errors import AbqcError
from conftest import int64_group_matmul

cutlass_cfg = pytest.importorskip("abqc.codegen.cutlass.config")


def _missing(*checks) -> str:
    """'' if every check passes, else the first AbqcError's message (the skip reason)."""
    try:
        for check in checks:
            check()
    except AbqcError as e:
        return f"CUTLASS path unavailable: {e}"
    return ""


# cutlass_library alone emits sources and names cached cubins; compiling also needs the C++ headers
WHY = _missing(cutlass_cfg.catalogue)
WHY_COMPILE = WHY or _missing(cutlass_cfg.cutlass_include_dir, cutlass_cfg.cuda_header_dirs)
HAVE_CUTLASS = not WHY

from abqc.codegen import nvrtc  # noqa: E402
from abqc.codegen.cutlass import launch  # noqa: E402
from abqc.runtime import cuda, ops  # noqa: E402

try:
    nvrtc.compiler_version()
    HAVE_NVRTC = True
except AbqcError:
    HAVE_NVRTC = False

needs_cutlass = pytest.mark.skipif(not HAVE_CUTLASS, reason=WHY)
needs_compiler = pytest.mark.skipif(bool(WHY_COMPILE) or not HAVE_NVRTC,
                                    reason=WHY_COMPILE or "NVRTC not installed: `pip install -e \".[gpu]\"`")
# on a GPU the kernels compile on first use, or come from ABQC_CACHE/kernels compiled elsewhere
needs_gpu = pytest.mark.skipif(not (HAVE_CUTLASS and cuda.available()),
                               reason=WHY or "needs a CUDA GPU (sm_80+) and cuda-bindings")


def _planes(m, n, k, p, q, group_words, seed):
    gen = torch.Generator().manual_seed(seed)
    ua = torch.randint(0, 2 ** q, (m, k), generator=gen)
    uw = torch.randint(0, 2 ** p, (n, k), generator=gen)
    pad = group_words * 32
    return ua, uw, quant.pack_bitplanes(ua, q, pad_to=pad), quant.pack_bitplanes(uw, p, pad_to=pad)


# ---------------------------------------------------------------- CPU: sources, layout, compilation

@needs_cutlass
def test_catalogue_is_and_popc_only():
    from cutlass_library import library
    ops_ = list(cutlass_cfg.catalogue().values())
    assert len(ops_) == 16      # GenerateSM80_TensorOp_168256's tiles, the XOR half dropped
    for op in ops_:
        assert op.tile_description.math_instruction.math_operation == library.MathOperation.and_popc
        assert op.A.element == library.DataType.b1 and op.C.element == library.DataType.s32
        assert (op.A.layout, op.B.layout) == (library.LayoutType.RowMajor, library.LayoutType.ColumnMajor)


@needs_cutlass
def test_generated_gemm_source_is_and_popc_b1_never_xor():
    cfg = cutlass_cfg.GemmConfig((64, 128, 512), 6, "sm_90a")
    src = cfg.source()
    assert "cutlass::arch::OpAndPopc" in src and "cutlass::uint1b_t" in src
    assert "xor" not in src.lower()
    assert "GemmShape<16, 8, 256>" in src and "GemmIdentityThreadblockSwizzle<1>" in src
    assert 'extern "C" __global__' in src and "#define KERNEL_NAME abqc_cutlass_b1and_64x128x512_s6" in src
    red = cutlass_cfg.ReduceConfig(3, 8).source()
    assert "#define P 3" in red and "#define Q 8" in red and "xor" not in red.lower()
    # the config hash names the cubin: it changes with the tile and not with the bit pair
    assert cfg.key() != cutlass_cfg.GemmConfig((64, 128, 512), 6, "sm_80").key()
    assert cutlass_cfg.CutlassConfig(2, 8).gemm == cutlass_cfg.CutlassConfig(4, 4).gemm


@needs_cutlass
def test_config_refusals():
    with pytest.raises(AbqcError, match="no b1 AND-popc CUTLASS GEMM with tile .* cutlass_library offers"):
        cutlass_cfg.GemmConfig((96, 128, 512), 5)
    with pytest.raises(AbqcError, match="arch 'sm_75' unsupported"):
        cutlass_cfg.CutlassConfig(2, 8, arch="sm_75")
    with pytest.raises(AbqcError, match="bit-planes must be 1..8"):
        cutlass_cfg.CutlassConfig(9, 8)


def test_ctypes_mirrors_match_the_templates():
    from importlib import resources
    tdir = resources.files("abqc.codegen.cutlass").joinpath("templates")
    gemm = int(re.search(r"sizeof\(CutlassArgs\) == (\d+)", tdir.joinpath("gemm.cu").read_text()).group(1))
    red = int(re.search(r"sizeof\(ReduceArgs\) == (\d+)", tdir.joinpath("reduce.cu").read_text()).group(1))
    assert ctypes.sizeof(launch._GemmArgs) == gemm and ctypes.sizeof(launch._ReduceArgs) == red


@pytest.mark.parametrize("p,q,m,n,k,gw", [(1, 1, 1, 5, 40, 2), (3, 8, 3, 37, 300, 10), (2, 4, 5, 16, 300, 3),
                                          (4, 4, 2, 9, 256, 4)])
def test_padding_and_stacked_layout_match_reference(p, q, m, n, k, gw):
    """Zero-padding groups to 128 bits and reading C at (i*N + n, j*M + m) with shifts 2^(i+j), as
    reduce.cu does, gives the reference accumulators."""
    ua, uw, a, w = _planes(m, n, k, p, q, gw, 7 * p + q)
    gwp = launch.padded_group_words(gw, 128)
    assert gwp % 4 == 0 and gwp - gw < 4
    a_rows, w_rows = launch.pad_groups(a, gw, gwp, 8), launch.pad_groups(w, gw, gwp)
    assert a_rows.shape == (-(-q * m // 8) * 8, a.shape[2] // gw * gwp) and w_rows.shape == (p * n, a_rows.shape[1])
    assert not a_rows[q * m:].any()
    c_pad = launch.stacked_reference(a_rows[:q * m].view(q, m, -1), w_rows.view(p, n, -1), gwp)
    c = launch.stacked_reference(a, w, gw)
    assert torch.equal(c_pad, c)          # the zero bits added nothing
    assert c.shape[2] % 8 == 0 and not c[:, :, q * m:].any()
    expect = int64_group_matmul(ua, uw, gw * 32)
    assert torch.equal(launch.recombine(c, q, m, p, n), expect)
    assert torch.equal(expect, ops.bitplane_mm(a, w, gw).to(torch.int64))


@needs_compiler
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_gemm_and_reduction_compile_to_binary_mma(arch, tmp_path):
    """NVRTC builds the CUTLASS instance (its static_asserts check the tile, threads, shared memory and K
    alignment the launcher assumes) and the reduction; the GEMM's SASS is BMMA AND.POPC, no XOR.POPC."""
    cfg = cutlass_cfg.CutlassConfig(3, 8, (64, 128, 512), 6, arch)
    g = nvrtc.sass(nvrtc.compile_cubin(cfg.gemm, use_cache=False), tmp_path)
    assert "Function : abqc_cutlass_b1and_64x128x512_s6" in g
    # a 64x128 tile of 2x2 warps, each 32x64 per 512-bit stage: 2 x 8 m16n8 tiles x 2 k256 steps
    assert len(re.findall(r"BMMA\.168256\.AND\.POPC", g)) >= 32
    assert "XOR.POPC" not in g and not re.search(r"\b(LDL|STL)\b", g)
    r = nvrtc.sass(nvrtc.compile_cubin(cfg.reduce, use_cache=False), tmp_path)
    assert "Function : abqc_cutlass_reduce_p3_q8" in r and "XOR.POPC" not in r


@needs_compiler
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_every_cutlass_kernel_compiles_to_binary_mma(arch, tmp_path):
    """The whole CUTLASS catalogue CI promises: each of its 16 b1 AND-popc GEMM tiles and all 64 (P, Q)
    reductions build for arch; every GEMM's SASS is BMMA AND.POPC without XOR.POPC or local-memory spills
    (about 5 minutes for both archs on CI's 2 cores). ABQC_QUICK_KERNEL_SWEEP=1 builds the default tile and
    one reduction instead."""
    import os
    from concurrent.futures import ThreadPoolExecutor
    quick = os.environ.get("ABQC_QUICK_KERNEL_SWEEP") == "1"
    gemms = [cutlass_cfg.GemmConfig(cutlass_cfg.DEFAULT_TILE, cutlass_cfg.DEFAULT_STAGES, arch)] if quick else \
        [cutlass_cfg.GemmConfig(t, st, arch) for t, st in sorted(cutlass_cfg.catalogue())]
    reductions = [cutlass_cfg.ReduceConfig(2, 8, arch)] if quick else \
        [cutlass_cfg.ReduceConfig(p, q, arch) for p, q in itertools.product(range(1, 9), range(1, 9))]
    configs = gemms + reductions

    def build(i_cfg):
        i, cfg = i_cfg
        (tmp_path / str(i)).mkdir()
        return cfg, nvrtc.sass(nvrtc.compile_cubin(cfg, use_cache=False), tmp_path / str(i))

    with ThreadPoolExecutor(2) as ex:
        built = list(ex.map(build, enumerate(configs)))
    assert len(built) == len(configs) and (quick or len(gemms) == 16)
    for cfg, s in built:
        assert f"Function : {cfg.name}" in s, cfg.name
        assert "XOR.POPC" not in s and not re.search(r"\b(LDL|STL)\b", s), cfg.name
        if isinstance(cfg, cutlass_cfg.GemmConfig):
            assert "BMMA.168256.AND.POPC" in s, cfg.name


HOST_CHECK = r"""
#include <cstdio>
#include <cstring>
#include "cutlass/gemm/device/gemm_universal_adapter.h"

// CUTLASS's own host path for the operation as cutlass_library describes it (A row-major activations,
// B column-major weights, C column-major), split-K-parallel over the K groups, against abqc_params.
static int check(int act_rows, int wt_rows, int k_group, int groups, long long lda, long long ldb, long long ldc) {
  using Adapter = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  void *act = (void *)0x1000, *wt = (void *)0x2000;
  int *c = (int *)0x3000;
  typename Adapter::Arguments args(cutlass::gemm::GemmUniversalMode::kGemmSplitKParallel,
      {act_rows, wt_rows, k_group * groups}, groups, {1, 0}, act, wt, c, c, 0, 0, 0, ldc * wt_rows,
      lda, ldb, ldc, ldc);
  auto under = Adapter::to_underlying_arguments(args);
  if (GemmKernel::can_implement(under) != cutlass::Status::kSuccess) { printf("cannot implement\n"); return 1; }
  typename GemmKernel::Params ref(under, 132, 1);
  CutlassArgs a{act, wt, c, act_rows, wt_rows, k_group, groups, lda, ldb, ldc};
  typename GemmKernel::Params got = abqc_params(a);
  int bad = 0;
#define SAME(f) if (memcmp(&ref.f, &got.f, sizeof(ref.f))) { printf("field " #f " differs\n"); ++bad; }
  SAME(problem_size) SAME(grid_tiled_shape) SAME(swizzle_log_tile) SAME(mode) SAME(batch_count)
  SAME(gemm_k_size) SAME(batch_stride_D) SAME(semaphore) SAME(params_A) SAME(params_B) SAME(params_C)
  SAME(params_D) SAME(output_op) SAME(ptr_A) SAME(ptr_B) SAME(ptr_C) SAME(ptr_D) SAME(batch_stride_A)
  SAME(batch_stride_B) SAME(batch_stride_C) SAME(ptr_gather_A_indices) SAME(ptr_gather_B_indices)
  SAME(ptr_scatter_D_indices)
  dim3 grid = ref.get_grid_dims();
  if ((int)grid.x != got.grid_tiled_shape.m() || (int)grid.y != got.grid_tiled_shape.n() || (int)grid.z != groups) {
    printf("grid differs\n"); ++bad;
  }
  return bad;
}

int main() {
  // activation rows as stacked_gemm passes them: Q*M rounded up to the C alignment (8)
  int bad = check(24, 74, 384, 3, 1152, 1152, 24) + check(8, 5, 128, 1, 128, 128, 8) +
            check(320, 384, 1024, 2, 2048, 2048, 320) + check(64, 130, 256, 4, 1024, 1024, 64);
  printf(bad ? "MISMATCH\n" : "OK\n");
  return bad != 0;
}
"""


@needs_compiler
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH (a CUDA toolkit): the host-side check "
                                                         "builds CUTLASS's own Params on the CPU")
def test_device_params_equal_cutlass_host_params(tmp_path):
    """The Params the kernel entry builds on the device equal those of CUTLASS's host-only constructor
    (through GemmUniversalAdapter's transposition, split-K-parallel over groups) field by field, the
    problems pass GemmKernel::can_implement (alignment of K, lda/ldb, ldc), and the grid matches."""
    cfg = cutlass_cfg.GemmConfig((64, 128, 512), 6, "sm_80")
    src = tmp_path / "check.cu"
    src.write_text(cfg.source() + HOST_CHECK)
    # nvcc brings its own toolkit's CCCL and runtime headers, which match it; the pip wheels' headers
    # (cuda_header_dirs, for NVRTC) may be of a newer CUDA than this nvcc and are refused by CCCL's check
    inc = [f"-I{cutlass_cfg.cutlass_include_dir()}"]
    build = subprocess.run(["nvcc", "-std=c++17", "-arch=compute_80", "-code=compute_80", *inc, "-o",
                            str(tmp_path / "check"), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(tmp_path / "check")], capture_output=True, text=True)
    assert run.stdout.strip().endswith("OK") and run.returncode == 0, run.stdout


# ---------------------------------------------------------------- GPU: bit-exact against the reference

PAIRS = [(1, 1), (2, 8), (3, 8), (4, 4), (2, 4), (8, 8)]
SHAPES = [(1, 37, 77), (5, 130, 300), (19, 64, 1000), (40, 48, 513)]   # odd N, K tails, M off the tile


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("p,q", PAIRS)
def test_gpu_stacked_c_and_accumulators_exact(p, q):
    dev = torch.device("cuda")
    cfg = cutlass_cfg.CutlassConfig(p, q, arch=cuda.arch_of(dev))
    for (m, n, k), gw in itertools.product(SHAPES, (None, 2, 4, 9)):
        group_words = gw or -(-k // 32)
        ua, uw, a, w = _planes(m, n, k, p, q, group_words, 100 * p + q)
        gwp = launch.padded_group_words(group_words, cfg.gemm.k_align_bits)
        groups = a.shape[2] // group_words
        c, ldc = launch.stacked_gemm(launch.pad_groups(a.cuda(), group_words, gwp, cfg.gemm.c_align),
                                     launch.prepare_weights(w.cuda(), group_words, cfg), groups, cfg.gemm)
        expect_c = launch.stacked_reference(a, w, group_words, cfg.gemm.c_align)
        assert ldc == expect_c.shape[2]
        assert torch.equal(c.cpu()[:, :, :q * m].to(torch.int64), expect_c[:, :, :q * m]), (m, n, k, gw)
        got = launch.bitplane_mm(a.cuda(), w.cuda(), group_words, cfg).cpu()
        assert torch.equal(got.to(torch.int64), int64_group_matmul(ua, uw, group_words * 32)), (m, n, k, gw)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("bits", ["w2a8", "w4a4", "w2*a8", "w3a8g64", "w8a8", "w1a2g128", "w4a8g32", "w4a8g32f"])
@pytest.mark.parametrize("m", [1, 3, 40])
def test_gpu_linear_matches_reference(bits, m):
    from abqc.bits import parse_pair
    from abqc.runtime import QuantLinear
    torch.manual_seed(m)
    pair = parse_pair(bits)
    lin = torch.nn.Linear(300, 71, bias=True)
    qw = quant.quantize_weight(lin.weight, **quant.weight_grid_of(pair))
    ql = QuantLinear.from_linear(lin, pair, qw)
    p = ql.w_planes.shape[0]
    gw, groups = ql.group_words_and_count()
    cfg = cutlass_cfg.CutlassConfig(p, pair.a_bits, arch=cuda.arch_of(torch.device("cuda")))
    w_rows = launch.prepare_weights(ql.w_planes.cuda(), gw, cfg)
    epi = [t.cuda() for t in (ql.w_scale, ql.w_zero, ql.w_sum, ql.bias)]

    def run(x):
        return launch.linear(x.cuda(), w_rows, *epi, 71, p, pair.a_bits, gw, groups, 300, False, cfg).float().cpu()

    x = torch.randn(m, 300)
    torch.testing.assert_close(run(x), ql(x), rtol=2e-5, atol=2e-5)          # ql(x): CPU, float64 epilogue
    xh = x.half()
    torch.testing.assert_close(run(xh), ql(xh.float()), rtol=2e-3, atol=2e-3)   # same fp16 inputs, fp16 output
    xb = x.bfloat16()
    torch.testing.assert_close(run(xb), ql(xb.float()), rtol=1e-2, atol=1e-2)   # bf16: 8 mantissa bits
