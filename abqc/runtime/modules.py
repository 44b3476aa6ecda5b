"""Linear modules that replace nn.Linear after lowering.

QuantLinear holds packed bit-planes and calls the runtime ops (real integer arithmetic).
FakeQuantLinear holds dequantized float weights and fake-quantizes activations: the float model of
the same quantization, used to check the integer path and by calibration passes.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import quant
from ..bits import BitPair
from . import ops


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, pair: BitPair, qw: quant.QuantizedWeight,
                 bias: torch.Tensor | None = None, act_symmetric: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.pair, self.act_symmetric = pair, act_symmetric
        self.group_size = qw.group_size
        gw, kp = ops.group_layout(in_features, qw.group_size)
        codes = qw.codes.to(torch.int64)
        padded = nn.functional.pad(codes, (0, kp - in_features))
        self.register_buffer("w_planes", quant.pack_bitplanes(codes, qw.planes, pad_to=gw * 32))
        self.register_buffer("w_scale", qw.scale.float().contiguous())
        self.register_buffer("w_zero", qw.zero.to(torch.int32).contiguous())
        self.register_buffer("w_sum", padded.view(out_features, -1, gw * 32).sum(-1).to(torch.int32))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, pair: BitPair, qw: quant.QuantizedWeight, act_symmetric=False):
        return cls(linear.in_features, linear.out_features, pair, qw, linear.bias, act_symmetric)

    def group_words_and_count(self) -> tuple[int, int]:
        """(32-bit words per K group, number of groups) of the packed weights."""
        gw, kp = ops.group_layout(self.in_features, self.group_size)
        return gw, kp // (gw * 32)

    def tiled_weights(self) -> torch.Tensor:
        """The GPU kernels' fragment layout of w_planes, made once per device."""
        wt = getattr(self, "_w_tiled", None)
        if wt is None or wt.device != self.w_planes.device:
            from ..codegen.layout import tile_weights
            wt = self._w_tiled = tile_weights(self.w_planes, self.group_words_and_count()[0])
        return wt

    def _cuda_linear(self, x2: torch.Tensor) -> torch.Tensor:
        from . import cuda
        cuda.register()
        gw, groups = self.group_words_and_count()
        return cuda.bmma_linear(x2, self.tiled_weights(), self.w_scale, self.w_zero, self.w_sum, self.bias,
                                self.out_features, self.pair.a_bits, gw, groups, self.in_features,
                                self.act_symmetric, tile=self.tile)

    tile = None  # (family, warps splitting K, token tiles[, channel tiles]) from the planner; None: default

    def _apply(self, fn, recurse=True):
        # model.half() / .to(dtype) must not touch the epilogue's float32 scales and bias
        super()._apply(fn, recurse)
        self.w_scale = self.w_scale.float()
        if self.bias is not None:
            self.bias = self.bias.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.is_cuda and not self.pair.weight_only:
            y = self._cuda_linear(x2)
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
        return f"{self.in_features}, {self.out_features}, bits={self.pair}, {g}, planes={self.w_planes.shape[0]}"


class FakeQuantLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pair: BitPair, act_symmetric=False):
        super().__init__()
        self.pair, self.act_symmetric = pair, act_symmetric
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pair.weight_only:
            x = quant.fake_quant_activation(x, self.pair.a_bits, self.act_symmetric)
        return nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.pair} (fake-quant)"
