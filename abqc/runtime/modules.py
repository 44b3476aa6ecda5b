"""Linear modules that replace nn.Linear after lowering.

QuantLinear holds packed bit-planes and calls the runtime ops (real integer arithmetic).
FakeQuantLinear holds dequantized float weights and fake-quantizes activations: the float model of
the same quantization, used to check the integer path and by calibration passes.

Both describe themselves with `spec()`, a JSON-able dict of everything but tensors, and `from_spec(spec)`
builds an empty module (uninitialised tensors of the right shapes and dtypes) that a state dict then
fills: that is how saved artifacts are rebuilt (abqc.artifact). Invariant: from_spec(m.spec()) has the
state-dict keys, shapes and dtypes of m.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .. import quant
from ..bits import BitPair, parse_pair
from ..errors import AbqcError
from . import ops
from .hadamard import OnlineHadamard


def _checked_spec(cls_name: str, spec, required: dict, optional: dict = None) -> dict:
    """spec with every required key of the right type and no unknown key, or an AbqcError naming the key."""
    optional = optional or {}
    if not isinstance(spec, dict):
        raise AbqcError(f"{cls_name} spec must be a dict, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(required) - set(optional))
    missing = sorted(set(required) - set(spec))
    if unknown or missing:
        raise AbqcError(f"{cls_name} spec has unknown keys {unknown} / lacks keys {missing}: it was written by "
                        "another abqc version or edited; re-save the model with this abqc")
    for key, kind in {**required, **optional}.items():
        v = spec.get(key)
        ok = isinstance(v, kind) and (kind is bool or not isinstance(v, bool))  # bool is an int subclass
        if key in spec and not ok:
            raise AbqcError(f"{cls_name} spec key {key!r} must be {kind.__name__}, got {v!r}")
    for key in ("in_features", "out_features", "group_size", "planes"):
        if key in spec and spec[key] <= 0:
            raise AbqcError(f"{cls_name} spec key {key!r} must be positive, got {spec[key]}")
    return spec


def _quantized_pair(cls_name: str, bits: str) -> BitPair:
    pair = parse_pair(bits)
    if pair.is_fp:
        raise AbqcError(f"{cls_name} spec has bits {bits!r}, which keep the layer FP: such a layer is an nn.Linear")
    return pair


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, pair: BitPair, qw: quant.QuantizedWeight,
                 bias: torch.Tensor | None = None, act_symmetric: bool = False, pre: nn.Module | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.pair, self.act_symmetric = pair, act_symmetric
        self.pre = pre      # an input transform applied before activation quantization (online Hadamard)
        self.group_size = qw.group_size
        gw, kp = ops.group_layout(in_features, qw.group_size)
        codes = qw.codes.to(torch.int64)
        padded = nn.functional.pad(codes, (0, kp - in_features))
        self.register_buffer("w_planes", quant.pack_bitplanes(codes, qw.planes, pad_to=gw * 32))
        self.register_buffer("w_scale", qw.scale.float().contiguous())
        self.register_buffer("w_zero", quant.zero_fixed(qw.zero).contiguous())   # fixed point (quant.py)
        self.register_buffer("w_sum", padded.view(out_features, -1, gw * 32).sum(-1).to(torch.int32))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._retile()

    @classmethod
    def from_linear(cls, linear: nn.Linear, pair: BitPair, qw: quant.QuantizedWeight, act_symmetric=False,
                    pre: nn.Module | None = None):
        return cls(linear.in_features, linear.out_features, pair, qw, linear.bias, act_symmetric, pre)

    def spec(self) -> dict:
        """Constructor config without tensors (JSON-able); `from_spec` rebuilds the empty module."""
        s = {"in_features": self.in_features, "out_features": self.out_features, "bits": str(self.pair),
             "group_size": self.group_size, "act_symmetric": self.act_symmetric,
             "planes": self.planes, "bias": self.bias is not None}
        if self.tile is not None:
            s["tile"] = list(self.tile)
        if self.pre is not None:
            s["pre"] = self.pre.spec()
        return s

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "QuantLinear":
        """An empty QuantLinear (uninitialised buffers) of the layout `spec` describes, checked for consistency."""
        s = _checked_spec("QuantLinear", spec, {"in_features": int, "out_features": int, "bits": str,
                                                "group_size": int, "act_symmetric": bool, "planes": int,
                                                "bias": bool}, {"tile": list, "pre": dict})
        pair = _quantized_pair("QuantLinear", s["bits"])
        k, n = s["in_features"], s["out_features"]
        if s["planes"] != pair.w_planes:
            raise AbqcError(f"QuantLinear spec: bits {pair} need {pair.w_planes} weight bit-planes, but the spec "
                            f"says {s['planes']}; the artifact is inconsistent, re-save it")
        if s["group_size"] != (pair.group_size or k):
            raise AbqcError(f"QuantLinear spec: bits {pair} with in_features {k} need group size "
                            f"{pair.group_size or k}, but the spec says {s['group_size']}")
        tile = s.get("tile")
        if tile is not None and not (tile and isinstance(tile[0], str) and
                                     all(isinstance(t, int) and not isinstance(t, bool) for t in tile[1:])):
            raise AbqcError(f"QuantLinear spec: tile must be [family, ints...], got {tile!r}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features, m.pair = k, n, pair
        m.act_symmetric, m.group_size = s["act_symmetric"], s["group_size"]
        m.pre = OnlineHadamard.from_spec(s["pre"], device) if "pre" in s else None
        if tile is not None:
            m.tile = tuple(tile)
        gw, kp = ops.group_layout(k, m.group_size)
        groups = kp // (gw * 32)
        m.register_buffer("w_planes", torch.empty(pair.w_planes, n, kp // 32, dtype=torch.int32, device=device))
        m.register_buffer("w_scale", torch.empty(n, groups, dtype=torch.float32, device=device))
        m.register_buffer("w_zero", torch.empty(n, groups, dtype=torch.int32, device=device))
        m.register_buffer("w_sum", torch.empty(n, groups, dtype=torch.int32, device=device))
        m.register_buffer("bias", torch.empty(n, dtype=torch.float32, device=device) if s["bias"] else None)
        return m

    @property
    def planes(self) -> int:
        """Weight bit-planes P (read without rebuilding the canonical planes on CUDA)."""
        b = self._buffers.get("w_planes")
        return int(b.shape[0]) if b is not None else int(self.__dict__["_w_tiled"].shape[2])

    @property
    def device(self) -> torch.device:
        return self.w_scale.device

    def group_words_and_count(self) -> tuple[int, int]:
        """(32-bit words per K group, number of groups) of the packed weights."""
        gw, kp = ops.group_layout(self.in_features, self.group_size)
        return gw, kp // (gw * 32)

    # On CUDA the kernels read only the tiled copy, so a QuantLinear there keeps the tiles alone (the
    # canonical planes would double the packed-weight memory). Reads of w_planes, state_dict() and moves
    # off the GPU rebuild the canonical planes from the tiles (an exact inverse).
    @staticmethod
    def keeps_tiles_only(device: torch.device) -> bool:
        return device.type == "cuda"

    def _tiles_only(self) -> bool:
        return self._buffers.get("w_planes") is None and self.__dict__.get("_w_tiled") is not None

    def _untiled(self) -> torch.Tensor:
        from ..codegen.layout import untile_weights
        gw, groups = self.group_words_and_count()
        return untile_weights(self.__dict__["_w_tiled"], self.out_features, gw * groups, gw)

    def _drop_tiles(self) -> None:
        self.__dict__.pop("_w_tiled", None)
        self.__dict__.pop("_launchers", None)        # prepared launches point at the tiles and buffers

    def __setattr__(self, name, value):
        if name in self.__dict__.get("_buffers", ()):
            self.__dict__.pop("_launchers", None)    # a replaced buffer: prepared launches would read the old one
        super().__setattr__(name, value)

    def __getattr__(self, name):
        if name == "w_planes" and self._tiles_only():
            return self._untiled()          # a copy: the module itself holds only the tiles
        return super().__getattr__(name)

    def tiled_weights(self) -> torch.Tensor:
        """The GPU kernels' fragment layout of w_planes, made once per device (then the only copy on CUDA)."""
        wt, planes = self.__dict__.get("_w_tiled"), self._buffers.get("w_planes")
        if planes is None and wt is not None:
            return wt
        if wt is None or wt.device != planes.device:
            from ..codegen.layout import tile_weights
            wt = self._w_tiled = tile_weights(planes, self.group_words_and_count()[0])
            if self.keeps_tiles_only(planes.device) and not self.pair.weight_only:
                self._buffers["w_planes"] = None
        return wt

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._tiles_only():
            destination[prefix + "w_planes"] = self._untiled()     # artifacts store the canonical planes
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._tiles_only():
            self._buffers["w_planes"] = self._untiled()
        self._drop_tiles()                            # tiles of the old weights
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._retile()

    def _retile(self) -> None:
        planes = self._buffers.get("w_planes")
        if planes is not None and self.keeps_tiles_only(planes.device) and not self.pair.weight_only:
            self.tiled_weights()        # tile now, so the canonical copy goes before the first forward

    def _fused_pre(self, x: torch.Tensor) -> bool:
        """Whether the CUDA kernels apply self.pre themselves (an online Hadamard fused into the quantizer)."""
        return isinstance(self.pre, OnlineHadamard) and x.is_cuda and not self.pair.weight_only

    def _runs_kernels(self, x2: torch.Tensor) -> bool:
        """Whether this input goes to abqc's GPU kernels (CUDA, activations quantized) or to the CPU ops."""
        return x2.is_cuda and not self.pair.weight_only

    def _tiled_op(self, x2: torch.Tensor) -> torch.Tensor:
        """Under torch.compile: the same launches as _cuda_linear as one abqc::tiled_linear node, so the
        model around it compiles as one graph (a graph break per linear left Inductor unfused pieces and
        eager ops between them). An online Hadamard (self.pre) runs before it as its own abqc::hadamard
        node, whatever the planner chose for eager calls (the same bits either way)."""
        gw, groups = self.group_words_and_count()
        return ops.tiled_linear(x2, self.tiled_weights(), self.w_scale, self.w_zero, self.w_sum, self.bias,
                                self.out_features, self.pair.a_bits, gw, groups, self.in_features,
                                self.act_symmetric, ops.tile_string(self.tile))

    @torch.compiler.disable   # driver launches through ctypes (eager: prepared launchers, Python state)
    def _cuda_linear(self, x2: torch.Tensor, fused_pre: bool = False) -> torch.Tensor:
        from ..codegen import planner
        from . import cuda
        x2 = x2.contiguous()
        wt = self.tiled_weights()
        hblock = self.pre.kernel_block(x2.device) if fused_pre else None
        # launchers prepared per (tokens, dtype, tiles, tile, plans, Hadamard block): eager decode pays one
        # launch's Python. They point at this module's buffers: replacing a buffer, _apply and loads drop them.
        key = (x2.shape[0], x2.dtype, x2.device, id(wt), self.tile, planner.generation(), os.environ.get("ABQC_CACHE"),
               None if hblock is None else id(hblock))
        launchers = self.__dict__.setdefault("_launchers", {})
        run = launchers.get(key)
        if run is None:
            cuda.register()
            gw, groups = self.group_words_and_count()
            if len(launchers) > 64:          # token counts vary at prefill: keep the cache small
                launchers.clear()
            run = launchers[key] = cuda.linear_launcher(x2, wt, self.w_scale, self.w_zero, self.w_sum, self.bias,
                                                        self.out_features, self.pair.a_bits, gw, groups,
                                                        self.in_features, self.act_symmetric, tile=self.tile,
                                                        hadamard_block=hblock)
        return run(x2)

    tile = None  # (family, warps splitting K, token tiles[, channel tiles]) from the planner; None: default

    def _apply(self, fn, recurse=True):
        # model.half() / .to(dtype) must not touch the epilogue's float32 scales and bias: they follow the
        # module's device but are never cast (a float32 -> half -> float32 round trip would round them)
        dev = self.w_scale.device
        probe = fn(torch.empty(0, dtype=torch.int32, device=dev))
        policy = self.keeps_tiles_only(dev) and not self.pair.weight_only
        if (probe.device == dev and probe.dtype == torch.int32 and self.__dict__.get("_w_tiled") is not None
                and self._tiles_only() == policy):
            # a float cast (.half(), .to(torch.bfloat16)): integer planes and tiles stay where they are
            if recurse:
                for child in self.children():
                    child._apply(fn)
            return self
        if self._tiles_only():
            self._buffers["w_planes"] = self._untiled()
        self._drop_tiles()
        keep = {name: getattr(self, name) for name in ("w_scale", "bias") if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        dev = self._buffers["w_planes"].device
        for name, t in keep.items():
            setattr(self, name, t.to(dev))
        self._retile()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        fused_pre = self._fused_pre(x) and not compiling   # compiled: the online Hadamard is its own op
        if self.pre is not None and not fused_pre:
            x = self.pre(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._runs_kernels(x2):
            y = self._tiled_op(x2) if compiling else self._cuda_linear(x2, fused_pre)
        elif self.pair.weight_only:
            y = ops.wq_linear(x2, self.w_planes, self.w_scale, self.w_zero, self.bias,
                              self.group_size, self.in_features)
        else:
            y = ops.wpaq_linear(x2, self.w_planes, self.w_scale, self.w_zero, self.w_sum, self.bias,
                                self.pair.a_bits, self.group_size, self.in_features, self.act_symmetric)
        return y.view(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        return ops.dequantize_planes(self.w_planes, self.w_scale, self.w_zero, self.group_size, self.in_features)

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size >= self.in_features else f"g{self.group_size}"
        return f"{self.in_features}, {self.out_features}, bits={self.pair}, {g}, planes={self.planes}"


class FakeQuantLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pair: BitPair, act_symmetric=False,
                 pre: nn.Module | None = None):
        super().__init__()
        self.pair, self.act_symmetric = pair, act_symmetric
        self.pre = pre      # an input transform applied before activation quantization (online Hadamard)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def spec(self) -> dict:
        """Constructor config without tensors (JSON-able); `from_spec` rebuilds the empty module."""
        s = {"in_features": self.in_features, "out_features": self.out_features, "bits": str(self.pair),
             "act_symmetric": self.act_symmetric, "bias": self.bias is not None}
        if self.pre is not None:
            s["pre"] = self.pre.spec()
        return s

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "FakeQuantLinear":
        """An empty FakeQuantLinear (uninitialised float32 weights) of the layout `spec` describes."""
        s = _checked_spec("FakeQuantLinear", spec, {"in_features": int, "out_features": int, "bits": str,
                                                    "act_symmetric": bool, "bias": bool}, {"pre": dict})
        n, k = s["out_features"], s["in_features"]
        bias = torch.empty(n, device=device) if s["bias"] else None
        pre = OnlineHadamard.from_spec(s["pre"], device) if "pre" in s else None
        return cls(torch.empty(n, k, device=device), bias, _quantized_pair("FakeQuantLinear", s["bits"]),
                   s["act_symmetric"], pre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre is not None:
            x = self.pre(x)
        if not self.pair.weight_only:
            x = quant.fake_quant_activation(x, self.pair.a_bits, self.act_symmetric)
        return nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.pair} (fake-quant)"
