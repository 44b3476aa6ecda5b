"""Runtime specialisation: linears that read the same activations run as one.

In a decoder layer q_proj, k_proj and v_proj read the same normed hidden states, and so do gate_proj
and up_proj. As separate QuantLinears each quantizes that input again and launches its own kernel;
fused, one activation quantization and one kernel cover the concatenated output channels, and the
projections become views of that output. Per-token activation codes depend only on the input and every
output channel's epilogue only on its own row, so the fused layer's outputs equal the separate ones bit
for bit (tested).

`fuse_projections(model)` replaces each fusable group with a SharedInputLinear registered on the parent
(`qkv_fused`, `gate_up_fused`) and the members with ProjectionSlice modules that hold no tensors;
`unfuse_projections(model)` restores the separate QuantLinears exactly. A group fuses when its members
are QuantLinears with the same bits, group size, input size and activation symmetry and no input
transform. Artifacts are saved from unfused models (abqc.artifact refuses fused ones).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import AbqcError
from .modules import QuantLinear

GROUPS = (("qkv_fused", ("q_proj", "k_proj", "v_proj")), ("gate_up_fused", ("gate_proj", "up_proj")))
BUFFERS = ("w_scale", "w_zero", "w_sum")


class SharedInputLinear(nn.Module):
    """One QuantLinear over the concatenated output channels of `names`; `take(x, i)` returns member i's
    output, computing the fused product once per input tensor. The output is dropped once every member
    has taken its part, so no activations outlive the layer's forward."""

    def __init__(self, linear: QuantLinear, names: tuple[str, ...], widths: tuple[int, ...]):
        super().__init__()
        self.linear, self.names, self.widths = linear, names, widths
        self.offsets = tuple(sum(widths[:i]) for i in range(len(widths)))
        self._x = self._y = None
        self._version, self._taken = -1, set()

    @torch.compiler.disable   # a per-input cache (identity, version): Python state, not a traceable graph
    def take(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self._x is not x or self._version != x._version:     # a new input (or one changed in place)
            self._x, self._version, self._taken = x, x._version, set()
            self._y = self.linear(x)
        y = self._y[..., self.offsets[i]:self.offsets[i] + self.widths[i]]
        self._taken.add(i)
        if len(self._taken) == len(self.widths):
            self._x = self._y = None
        return y

    def take_traced(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """take() as torch.compile traces it: member 0 computes the fused output and leaves it on the module,
        the later members (called after it on the same input, as a decoder layer does) slice it, and the
        last one clears it. Dynamo records the attribute writes as side effects of the traced frame, so the
        fused kernel runs once per layer in the compiled graph too."""
        if i == 0 or self._y is None:
            self._y = self.linear(x)
        y = self._y[..., self.offsets[i]:self.offsets[i] + self.widths[i]]
        if i == len(self.widths) - 1:
            self._y = None
        return y

    def extra_repr(self) -> str:
        return f"fuses {', '.join(self.names)}"


class ProjectionSlice(nn.Module):
    """Stands where a fused QuantLinear was: its output is a view of the shared layer's output."""

    def __init__(self, shared: SharedInputLinear, index: int):
        super().__init__()
        object.__setattr__(self, "shared", shared)    # not a submodule: the parent registers it once
        self.index = index
        self.in_features, self.out_features = shared.linear.in_features, shared.widths[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.shared.take_traced(x, self.index)
        return self.shared.take(x, self.index)

    def extra_repr(self) -> str:
        return f"{self.shared.names[self.index]} of the fused {self.shared.linear.extra_repr()}"


def _fusable(members: list) -> bool:
    if not all(isinstance(m, QuantLinear) for m in members):
        return False
    first = members[0]
    return all(m.pair == first.pair and m.group_size == first.group_size and m.in_features == first.in_features
               and m.act_symmetric == first.act_symmetric and m.pre is None for m in members)


def _concat(members: list[QuantLinear]) -> QuantLinear:
    first = members[0]
    spec = {**first.spec(), "out_features": sum(m.out_features for m in members),
            "bias": any(m.bias is not None for m in members)}
    spec.pop("tile", None)          # tiles were tuned for the members' shapes
    fused = QuantLinear.from_spec(spec, device=first.device)
    fused.w_planes = torch.cat([m.w_planes for m in members], dim=1)     # canonical planes [P, N, KW]
    for name in BUFFERS:
        setattr(fused, name, torch.cat([getattr(m, name) for m in members], dim=0))
    if spec["bias"]:
        fused.bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, device=first.device)
                                for m in members])
    fused._retile()                 # on CUDA the tiles become its only copy
    return fused


def _split(shared: SharedInputLinear) -> list[QuantLinear]:
    fused, out = shared.linear, []
    planes = fused.w_planes
    for off, width in zip(shared.offsets, shared.widths):
        spec = {**fused.spec(), "out_features": width, "bias": fused.bias is not None}
        spec.pop("tile", None)
        m = QuantLinear.from_spec(spec, device=fused.device)
        m.w_planes = planes[:, off:off + width].contiguous()
        for name in BUFFERS:
            setattr(m, name, getattr(fused, name)[off:off + width].clone())
        if fused.bias is not None:
            m.bias = fused.bias[off:off + width].clone()
        m._retile()
        out.append(m)
    return out


def fuse_projections(model: nn.Module) -> list[str]:
    """Fuse every q/k/v and gate/up group of QuantLinears that share their layout; returns the fused paths.
    Members with a bias and members without fuse too (zero bias); a member that is not a QuantLinear or
    differs in bits, group size or input transform keeps its group separate."""
    fused = []
    for path, module in list(model.named_modules()):
        for attr, names in GROUPS:
            members = [getattr(module, n, None) for n in names]
            if hasattr(module, attr) or not _fusable(members):
                continue
            shared = SharedInputLinear(_concat(members), names, tuple(m.out_features for m in members))
            setattr(module, attr, shared)
            for i, n in enumerate(names):
                setattr(module, n, ProjectionSlice(shared, i))
            fused.append(f"{path}.{attr}" if path else attr)
    return fused


def unfuse_projections(model: nn.Module) -> int:
    """Undo fuse_projections: the separate QuantLinears back, bit for bit; returns how many groups."""
    count = 0
    for module in list(model.modules()):
        for attr, names in GROUPS:
            shared = module._modules.get(attr)
            if not isinstance(shared, SharedInputLinear):
                continue
            for n, linear in zip(names, _split(shared)):
                setattr(module, n, linear)
            delattr(module, attr)
            count += 1
    return count


def refuse_fused(model: nn.Module, what: str) -> None:
    if any(isinstance(m, SharedInputLinear) for m in model.modules()):
        raise AbqcError(f"{what} needs the separate projections: call unfuse_projections() first "
                        "(fuse_projections() again afterwards)")
