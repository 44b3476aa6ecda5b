import torch
from abqc.runtime import cuda as rcuda
from cuda.bindings import nvrtc as nv
def load(cfg, src):
    err, prog = nv.nvrtcCreateProgram(src.encode(), b"k.cu", 0, [], [])
    opts = [f"--gpu-architecture={cfg.arch}".encode(), b"-std=c++17", b"--extra-device-vectorization"]
    err, = nv.nvrtcCompileProgram(prog, len(opts), opts)
    assert err == nv.nvrtcResult.NVRTC_SUCCESS, err
    _, n = nv.nvrtcGetCUBINSize(prog); buf = b" " * n; nv.nvrtcGetCUBIN(prog, buf)
    drv = rcuda._drv(); torch.cuda.current_stream().synchronize()
    err, mod = drv.cuModuleLoadData(buf); assert err == drv.CUresult.CUDA_SUCCESS, err
    err, fn = drv.cuModuleGetFunction(mod, cfg.name.encode())
    drv.cuFuncSetAttribute(fn, drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, rcuda.MAX_SMEM)
    return mod, fn

