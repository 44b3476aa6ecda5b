"""Kernel plan report: every quantized linear's kernel family/tile per M, from plans.json when tuned, else the
default tile; stored in report["kernels"], rendered by abqc report, written by abqc compile --kernel-plan."""
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

import abqc
from abqc import cli
from abqc.bits import ROLES
from abqc.codegen import plan_report, planner
from abqc.codegen.layout import steps_per_group
from abqc.errors import AbqcError
from abqc.report import render
from abqc.runtime import cuda as rcuda

BITS = "w4a8,down=w4a16,0.q=w2a8g32"   # per-channel, weight-only and per-group linears
M = (1, 8, 32, 128, 2048)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ABQC_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def compiled():
    return abqc.compile(tiny_model("llama"), bits=BITS, passes=("rtn", "lower"), progress=False)


def _fresh(compiled):
    """A CompiledModel sharing the lowered modules but with its own report (tests write report["kernels"])."""
    return abqc.CompiledModel(compiled.model, dict(compiled.report))


def _expected_default(e, compiled):
    ql = compiled.model.get_submodule(e["path"])
    gw, groups = ql.group_words_and_count()
    return list(rcuda.default_tile(e["m"], ql.pair.w_planes, ql.pair.a_bits, ql.out_features,
                                   groups * steps_per_group(gw), groups))


def test_plan_lists_every_quantized_linear_with_default_tiles(compiled, cache):
    q = _fresh(compiled)
    plan = q.kernel_plan(arch="sm_90a")
    assert q.report["kernels"] is plan and json.loads(json.dumps(plan)) == plan
    assert len(plan) == 2 * len(ROLES) * len(M)
    assert {(e["layer"], e["role"]) for e in plan} == {(i, r) for i in range(2) for r in ROLES}
    assert [e["m"] for e in plan[:len(M)]] == list(M) and all(e["arch"] == "sm_90a" for e in plan)
    shapes = {(e["layer"], e["role"]): (e["n"], e["k"], e["bits"], e["group_size"]) for e in plan}
    assert shapes[(0, "q")] == (64, 64, "w2a8g32", 32) and shapes[(1, "q")] == (64, 64, "w4a8", None)
    assert shapes[(1, "k")] == (32, 64, "w4a8", None) and shapes[(0, "down")] == (64, 160, "w4a16", None)
    for e in plan:
        if e["role"] == "down":
            assert e["family"] == plan_report.WEIGHT_ONLY and e["tile"] is None and e["source"] == "weight-only"
            continue
        assert e["source"] == "default (untuned)" and e["us"] is None and e["device"] is None
        assert e["tile"] == _expected_default(e, compiled) == e["runtime_tile"] and e["family"] == e["tile"][0]
    by = {(e["layer"], e["role"], e["m"]): e["family"] for e in plan}
    # per-channel decode takes the GEMV family, per-channel prefill the INT8 family, mid-size M and grouped
    # weights the bit-plane GEMM
    assert by[(1, "q", 1)] == "gemv" and by[(1, "q", 2048)] == "int8" and by[(1, "q", 32)] == "bmma"
    assert by[(0, "q", 1)] == "bmma" and by[(0, "q", 2048)] == "bmma"
    assert not (cache / "plans.json").exists()   # listing a plan never tunes or writes


def test_tuned_entries_come_from_plans_json(compiled, cache):
    # q and o of layer 1 share one planner key: N=64, 2 words of K, w4a8, M bucket 8
    key8 = planner.plan_key(64, 2, 2, 4, 8, 8, "sm_90a")
    key128 = planner.plan_key(64, 2, 2, 4, 8, 128, "sm_90a")
    key_k = planner.plan_key(32, 2, 2, 4, 8, 1, "sm_90a")
    (cache / "plans.json").write_text(json.dumps({
        key8: {"family": "bmma", "tile": ["bmma", 8, 1], "us": 3.25, "tuned": True},     # as older caches hold
        key128: {"family": "bmma", "tile": ["bmma", 2, 4], "us": 11.5, "tuned": True, "device": "NVIDIA H100",
                 "candidates": 9},
        key_k: {"family": "gemv", "tile": "broken"},                                       # unusable: ignored
    }))
    plan = _fresh(compiled).kernel_plan(arch="sm_90a", m=(5, 128, 1))
    got = {(e["layer"], e["role"], e["m"]): e for e in plan}
    small, big = got[(1, "o", 5)], got[(1, "q", 128)]
    assert (small["source"], small["tile"], small["us"], small["m_bucket"]) == ("tuned", ["bmma", 8, 1], 3.25, 8)
    # the runtime launches the tuned tile (runtime.cuda.launch_tile reads the same plans.json)
    assert small["runtime_tile"] == small["tile"] != _expected_default(small, compiled)
    assert rcuda.launch_tile(5, 4, 8, 64, 2, 2, "sm_90a") == ("bmma", 8, 1)
    assert rcuda.launch_tile(5, 4, 8, 64, 2, 2, "sm_80") == tuple(_expected_default(small, compiled))
    assert (big["tile"], big["us"], big["device"]) == (["bmma", 2, 4], 11.5, "NVIDIA H100")
    assert got[(0, "o", 128)]["source"] == "tuned" and got[(0, "q", 128)]["source"] == "default (untuned)"
    broken = got[(1, "k", 1)]
    assert broken["source"] == "default (untuned)" and broken["tile"] == _expected_default(broken, compiled)
    assert broken["runtime_tile"] == broken["tile"]
    assert sum(e["source"] == "tuned" for e in plan) == 6   # q (layer 1) and o (both layers) at M 5 and 128
    assert _fresh(compiled).kernel_plan(arch="sm_80", m=(8,))[0]["source"] == "default (untuned)"  # other arch


def test_report_renders_the_kernel_table(compiled, cache):
    planner_key = planner.plan_key(64, 2, 2, 4, 8, 8, "sm_90a")
    (cache / "plans.json").write_text(json.dumps({planner_key: {"family": "bmma", "tile": ["bmma", 8, 1],
                                                                "us": 3.25, "tuned": True, "device": "GPU-X"}}))
    q = _fresh(compiled)
    q.kernel_plan(arch="sm_90a", m=(1, 8))
    page = render(json.loads(q.write_report(cache / "out").read_text()))
    section = page.split("<h2>Kernel configs chosen</h2>")[1]
    assert "not run" not in section and "could not render" not in section
    assert section.count("<tr>") == 1 + 2 * len(ROLES) * 2
    assert "<td class=\"\">3.25</td>" in section and "GPU-X" in section and "sm_90a" in section
    assert "dequantize + matmul (no bit-plane kernel)" in section and "bmma,8,1" in section
    assert section.count(">default<") == 2 * 6 * 2 - 3 and section.count(">—<") == 2 * 2
    assert "differ from the tile QuantLinear launches" not in section   # the runtime launches the plan
    ql = q.model.model.layers[1].self_attn.q_proj
    ql.tile = ("bmma", 2, 1)     # a fixed tile wins over the plan, and the page says so
    try:
        q.kernel_plan(arch="sm_90a", m=(1, 8))
    finally:
        del ql.tile
    section = render(json.loads(q.write_report(cache / "out").read_text())).split("<h2>Kernel configs chosen</h2>")[1]
    assert "2 choices differ from the tile QuantLinear launches" in section


def test_bad_requests_raise_clear_errors(compiled, cache):
    q = _fresh(compiled)
    with pytest.raises(AbqcError, match="unknown GPU arch 'sm_70'"):
        q.kernel_plan(arch="sm_70")
    with pytest.raises(AbqcError, match="token counts >= 1"):
        q.kernel_plan(arch="sm_90a", m=(0, 8))
    with pytest.raises(AbqcError, match="tune=True"):
        q.kernel_plan(arch="sm_90a", tune=True)    # no GPU, or the model is still on the CPU
    if not torch.cuda.is_available():
        with pytest.raises(AbqcError, match="pass arch="):
            q.kernel_plan()
    assert "kernels" not in q.report


def test_cli_compile_kernel_plan_flag(cache, monkeypatch):
    info = SimpleNamespace(name="tiny-llama", source="tests/conftest.py")
    monkeypatch.setattr(cli, "_load", lambda args: (tiny_model("llama"), None, info))
    out = cache / "run"
    assert cli.main(["compile", "--bits", "w4a8", "--method", "rtn", "--no-eval", "--quiet", "--out", str(out),
                     "--kernel-plan"]) == 0
    kernels = json.loads((out / "report.json").read_text())["kernels"]
    local = rcuda.arch_of(torch.device("cuda")) if torch.cuda.is_available() else "sm_90a"
    assert len(kernels) == 2 * len(ROLES) * len(M) and {e["arch"] for e in kernels} == {local}
    assert cli.main(["report", str(out)]) == 0
    assert "not run: no kernel plan" not in (out / "report.html").read_text()
    assert cli.main(["compile", "--bits", "w4a8", "--method", "rtn", "--no-eval", "--quiet", "--out", str(out)]) == 0
    assert "kernels" not in json.loads((out / "report.json").read_text())


@pytest.mark.skipif(not rcuda.available(), reason="needs a CUDA GPU (sm_80+) with the GPU extras")
def test_gpu_tuned_plan_has_a_measured_time_for_every_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(planner, "_path", lambda: tmp_path / "plans.json")   # kernels stay in the usual cache
    q = abqc.compile(tiny_model("llama"), bits="w4a8,0.q=w2a8g32", passes=("rtn", "lower"), progress=False)
    q.to("cuda")
    q(torch.randint(0, 256, (1, 8), device="cuda"))
    assert not (tmp_path / "plans.json").exists() and "kernels" not in q.report   # .to / forward never tune
    plan = q.kernel_plan(m=(1, 8), tune=True)
    assert len(plan) == 2 * len(ROLES) * 2
    assert all(e["source"] == "tuned" and e["us"] > 0 for e in plan)
    assert {e["device"] for e in plan} == {torch.cuda.get_device_name()}
    assert {e["arch"] for e in plan} == {rcuda.arch_of(torch.device("cuda"))}
    stored = json.loads((tmp_path / "plans.json").read_text())
    assert all(v["us"] > 0 and v["candidates"] >= 1 for v in stored.values())
    again = q.kernel_plan(m=(1, 8))                     # no tuning: read back from plans.json
    assert [(e["tile"], e["us"]) for e in again] == [(e["tile"], e["us"]) for e in plan]


@pytest.mark.gpu
@pytest.mark.skipif(not rcuda.available(), reason="needs a CUDA GPU and cuda-bindings")
def test_gpu_tuned_hadamard_choice_is_stored_and_followed(tmp_path, monkeypatch):
    """kernel_plan(tune=True) on a rotated model times the down_proj's online Hadamard both ways, stores the
    choice, and the module then runs it that way with the same output as transforming first."""
    monkeypatch.setattr(planner, "_path", lambda: tmp_path / "plans.json")
    q = abqc.compile(tiny_model("llama"), bits="w4a8", passes=("rotate", "rtn", "lower"), progress=False).to("cuda")
    plan = q.kernel_plan(m=(1,), tune=True)
    downs = [e for e in plan if e["role"] == "down"]
    packed = [e for e in downs if e["runtime_tile"][0] in ("gemv", "bmma")]   # the families that could fuse it
    assert all(e["hadamard"] == "separate (the family quantizes in-kernel)" for e in downs if e not in packed)
    assert all(e["hadamard"] in ("fused", "separate") for e in packed)
    assert all(e["hadamard_us"]["fused"] > 0 and e["hadamard_us"]["separate"] > 0 for e in packed)
    stored = json.loads((tmp_path / "plans.json").read_text())
    block = q.model.model.layers[0].mlp.down_proj.pre.block.shape[0]
    assert sum(k.endswith(f"|h{block}") for k in stored) == (1 if packed else 0)   # both layers: one key
    ql = q.model.model.layers[0].mlp.down_proj
    x = torch.randn(1, ql.in_features, device="cuda", dtype=torch.float16)
    assert torch.equal(ql(x), ql._cuda_linear(ql.pre(x)))


def test_launch_tile_is_memoised_until_a_plan_is_stored(cache):
    key = planner.plan_key(64, 2, 2, 4, 8, 5, "sm_90a")
    default = rcuda.launch_tile(5, 4, 8, 64, 2, 2, "sm_90a")
    assert default == rcuda.default_tile(5, 4, 8, 64, 1, 1)
    planner._load()[key] = {"family": "bmma", "tile": ["bmma", 8, 1], "us": 1.0, "tuned": True}
    assert rcuda.launch_tile(5, 4, 8, 64, 2, 2, "sm_90a") == default     # memoised launch choice
    planner._GENERATION[0] += 1                                          # what planner.choose does on storing
    assert rcuda.launch_tile(5, 4, 8, 64, 2, 2, "sm_90a") == ("bmma", 8, 1)


def test_int8_family_is_a_candidate_for_per_channel_prefill_only():
    from abqc.codegen import planner
    assert ("int8", 0, 0) in planner.candidates(2, 8, 16) and ("int8", 0, 0) in planner.candidates(4, 4, 2048)
    assert ("int8", 0, 0) not in planner.candidates(2, 8, 8)              # decode: the GEMV family's ground
    assert ("int8", 0, 0) not in planner.candidates(2, 8, 512, groups=4)  # grouped weights need per-group sums
    for m, groups, want in ((16, 1, True), (2048, 1, True), (8, 1, False), (512, 4, False)):   # in-kernel unpack
        assert (("int8k", 0, 0) in planner.candidates(2, 8, m, groups=groups)) == want


def test_gemvq_is_a_tuning_candidate_not_the_default():
    # measured on the H200 (benchmarks/results/kernels.md): packer + gemv beat gemvq at every decode shape
    assert rcuda.default_tile(1, 2, 8, 11008, 16, 1) == ("gemv", 8, 1, 4)
    assert rcuda.default_tile(1, 2, 8, 4096, 43, 1)[0] == "gemv"
    assert rcuda.default_tile(128, 2, 8, 4096, 16, 1) == ("int8", 0, 0)      # per-channel prefill
    assert rcuda.default_tile(128, 2, 8, 4096, 16, 4)[0] == "bmma"           # grouped weights: bit-planes
    cands = planner.candidates(2, 8, 1)
    assert {c[0] for c in cands} == {"bmma", "gemv", "gemvq"}
    assert sorted(c[1:] for c in cands if c[0] == "gemv") == sorted(c[1:] for c in cands if c[0] == "gemvq")


def test_bulk_gemv_candidates_only_on_hopper(monkeypatch):
    """gemvt / gemvqt (bulk copies, sm_90a only) are timed only for sm_90a, and only once enabled (benchmarks
    time them anyway); they take the same (wk, tokens, channel tiles) as their register-load twins."""
    assert not any(c[0] in ("gemvt", "gemvqt") for c in planner.candidates(2, 8, 1, arch="sm_80", include_disabled=True))
    hopper = planner.candidates(2, 8, 1, arch="sm_90a", include_disabled=True)
    assert sorted(c[1:] for c in hopper if c[0] == "gemvt") == sorted(c[1:] for c in hopper if c[0] == "gemv")
    assert sorted(c[1:] for c in hopper if c[0] == "gemvqt") == sorted(c[1:] for c in hopper if c[0] == "gemvq")
    monkeypatch.setattr(planner, "BULK_GEMV_ENABLED", False)
    assert not any(c[0] == "gemvt" for c in planner.candidates(2, 8, 1, arch="sm_90a"))
    monkeypatch.setattr(planner, "BULK_GEMV_ENABLED", True)
    assert any(c[0] == "gemvt" for c in planner.candidates(2, 8, 1, arch="sm_90a"))
    assert not any(c[0] == "gemvt" for c in planner.candidates(2, 8, 1, arch="sm_90a", groups=4))   # per channel only
    assert rcuda.parse_tile("gemvqt,8,1,2") == ("gemvqt", 8, 1, 2)


def test_wgmma_candidates_only_on_hopper_per_channel_prefill():
    """The Hopper warpgroup-MMA family is timed on sm_90a for per-channel weights from M = 16, a token tile
    only where M fills at least half of it; its tiles parse back from the op's tile string."""
    from abqc.codegen.config import WGMMA_WARPGROUPS as wg
    assert not any(c[0] == "wgmma" for c in planner.candidates(2, 8, 2048, arch="sm_80"))
    assert not any(c[0] == "wgmma" for c in planner.candidates(2, 8, 2048))           # arch unknown
    assert not any(c[0] == "wgmma" for c in planner.candidates(2, 8, 8, arch="sm_90a"))
    assert not any(c[0] == "wgmma" for c in planner.candidates(2, 8, 2048, groups=4, arch="sm_90a"))
    assert [c for c in planner.candidates(2, 4, 16, arch="sm_90a") if c[0] == "wgmma"] == [("wgmma", wg, 4)]
    assert [c for c in planner.candidates(4, 4, 32, arch="sm_90a") if c[0] == "wgmma"] == [("wgmma", wg, 4),
                                                                                        ("wgmma", wg, 8)]
    assert [c[2] for c in planner.candidates(4, 4, 512, arch="sm_90a") if c[0] == "wgmma"] == [4, 8, 16]
    assert rcuda.parse_tile(f"wgmma,{wg},8") == ("wgmma", wg, 8)


def test_wgmma8_candidates_only_on_hopper_per_channel():
    """The INT8 warpgroup-MMA family is timed on sm_90a for per-channel weights from M = 16, both warpgroup
    counts, a token tile only where M fills at least half of it; its tiles parse back."""
    assert not any(c[0] == "wgmma8" for c in planner.candidates(2, 8, 2048, arch="sm_80"))
    assert not any(c[0] == "wgmma8" for c in planner.candidates(2, 8, 8, arch="sm_90a"))
    assert not any(c[0] == "wgmma8" for c in planner.candidates(2, 8, 2048, groups=4, arch="sm_90a"))
    assert [c for c in planner.candidates(4, 4, 16, arch="sm_90a") if c[0] == "wgmma8"] == [("wgmma8", 1, 4),
                                                                                         ("wgmma8", 2, 4)]
    assert {c for c in planner.candidates(2, 8, 2048, arch="sm_90a") if c[0] == "wgmma8"} == {
        ("wgmma8", wg, tm) for wg in (1, 2) for tm in (4, 8, 16)}
    assert rcuda.parse_tile("wgmma8,2,16") == ("wgmma8", 2, 16)


def test_programmatic_dependent_launch_config():
    """The GEMV's launch config asks for programmatic stream serialization (it may start while its packer
    runs; the kernel waits with griddepcontrol.wait before reading the packer's outputs), and PDL can be
    turned off and on (benchmarks time both in one run)."""
    pytest.importorskip("cuda.bindings.driver")
    from cuda.bindings import driver as drv
    cfg = rcuda._pdl_config((7, 3), 256, 4096)
    assert (cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ, cfg.blockDimX, cfg.sharedMemBytes) == (7, 3, 1, 256, 4096)
    assert cfg.numAttrs == 1
    attr = cfg.attrs[0]
    assert attr.id == drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    assert attr.value.programmaticStreamSerializationAllowed == 1
    before = dict(rcuda._PDL)
    try:
        rcuda.set_pdl(False)
        assert rcuda.pdl_status() == "off (turned off)"
        rcuda.set_pdl(True)
        assert rcuda.pdl_status().startswith("on")
    finally:
        rcuda._PDL.update(before)


def test_pdl_instructions_only_where_they_belong(tmp_path):
    """griddepcontrol.wait (SASS ACQBULK) in the sm_90a GEMV, the early release (PREEXIT) in the packers that
    precede it; sm_80 builds carry neither (griddepcontrol needs sm_90)."""
    nvrtc = pytest.importorskip("abqc.codegen.nvrtc")
    try:
        nvrtc.compiler_version()
    except Exception:
        pytest.skip("NVRTC not installed")
    from abqc.codegen.config import KernelConfig
    from abqc.runtime.hadamard import HadamardKernel
    for arch in ("sm_90a", "sm_80"):
        for cfg, op in ((KernelConfig("gemv", 8, 2, 1, arch, 1), "ACQBULK"), (KernelConfig("quant_pack", 8, arch=arch),
                        "PREEXIT"), (HadamardKernel(arch, 8), "PREEXIT")):
            d = tmp_path / f"{cfg.name}-{arch}"
            d.mkdir()
            s = nvrtc.sass(nvrtc.compile_cubin(cfg, use_cache=False), d)
            assert (op in s) == (arch == "sm_90a"), (cfg.name, arch, op)


def test_online_hadamard_choice_default_and_from_plans_json(cache):
    """A rotated model's down_proj (online Hadamard input) lists how the Hadamard runs: the default (its own
    launch) until plans.json holds a tuned choice for that shape, M bucket and block; other linears: None."""
    from abqc.runtime.hadamard import OnlineHadamard
    q = abqc.compile(tiny_model("llama"), bits="w4a8", passes=("rotate", "rtn", "lower"), progress=False)
    plan = q.kernel_plan(arch="sm_90a", m=(1, 128))
    downs = [e for e in plan if e["role"] == "down"]
    assert len(downs) == 4
    for e in downs:      # decode: the GEMV family packs x, so the Hadamard could fuse; prefill: INT8 quantizes x
        assert e["hadamard"] == ("separate (default (untuned))" if e["m"] == 1 else
                                 "separate (the family quantizes in-kernel)"), e
        assert e["runtime_tile"][0] == ("gemv" if e["m"] == 1 else "int8")
    assert all(e["hadamard"] is None and e["hadamard_us"] is None for e in plan if e["role"] != "down")
    ql = q.model.get_submodule(downs[0]["path"])
    assert isinstance(ql.pre, OnlineHadamard)
    gw, groups = ql.group_words_and_count()
    block = ql.pre.block.shape[0]
    args = (ql.out_features, gw * groups, gw, ql.pair.w_planes, ql.pair.a_bits, 1, "sm_90a", block)
    assert planner.hadamard_fused(*args) is planner.HADAMARD_FUSED_DEFAULT is False
    assert planner.choose_hadamard(None, *args, tune=False)["tuned"] is False
    (cache / "plans.json").write_text(json.dumps({planner.hadamard_key(*args): {
        "fused": True, "us_fused": 4.5, "us_separate": 6.25, "tuned": True, "device": "GPU-X"}}))
    planner._PLANS.clear()
    assert planner.hadamard_fused(*args) is True
    assert planner.hadamard_fused(*args[:-1], block + 1) is False          # another block size: no plan
    got = {(e["path"], e["m"]): e for e in q.kernel_plan(arch="sm_90a", m=(1, 128))}
    d1, d128 = got[(downs[0]["path"], 1)], got[(downs[0]["path"], 128)]
    assert d1["hadamard"] == "fused" and d1["hadamard_us"] == {"fused": 4.5, "separate": 6.25}
    assert d128["hadamard"] == "separate (the family quantizes in-kernel)"
    page = render(json.loads(q.write_report(cache / "out").read_text())).split("<h2>Kernel configs chosen</h2>")[1]
    assert "online Hadamard" in page and "fused (fused 4.50 / separate 6.25 µs)" in page


def test_fp8_gemm_is_exact_for_centred_codes_on_the_cpu():
    # the FP8 family's arithmetic (torch._scaled_mm's CPU kernel here; the GPU's is checked in test_int8_family)
    from abqc.runtime import cuda
    gen = torch.Generator().manual_seed(8)
    for bits in range(1, cuda.FP8_MAX_BITS + 1):
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
        a8 = torch.randint(lo, hi, (32, 96), generator=gen, dtype=torch.int8)
        w8 = torch.randint(lo, hi, (16, 96), generator=gen, dtype=torch.int8)
        assert torch.equal(cuda.fp8_gemm(a8, w8).long(), a8.long() @ w8.long().T), bits
    big = torch.full((16, 11008), -16, dtype=torch.int8)        # the largest sum a LLaMA-7B K can reach
    assert cuda.fp8_gemm(big, big)[0, 0].item() == 256 * 11008
    with pytest.raises(ValueError, match="multiples of 16"):
        cuda.fp8_gemm(torch.zeros(17, 32, dtype=torch.int8), torch.zeros(16, 32, dtype=torch.int8))


def test_fp8_family_is_a_candidate_only_when_enabled_and_exact(monkeypatch):
    from abqc.codegen import planner
    monkeypatch.setattr(planner, "FP8_FAMILY_ENABLED", True)
    assert ("fp8", 0, 0) in planner.candidates(4, 4, 2048) and ("fp8", 0, 0) in planner.candidates(2, 5, 16)
    assert ("fp8", 0, 0) not in planner.candidates(2, 8, 2048)          # 8-bit codes are not exact in e4m3
    assert ("fp8", 0, 0) not in planner.candidates(4, 4, 8)             # decode: the GEMV family's ground
    assert ("fp8", 0, 0) not in planner.candidates(4, 4, 512, groups=4)
    monkeypatch.setattr(planner, "FP8_FAMILY_ENABLED", False)
    assert not any(c[0] == "fp8" for c in planner.candidates(4, 4, 2048))
    assert ("fp8", 0, 0) in planner.candidates(4, 4, 2048, include_disabled=True)    # benchmarks time it anyway
