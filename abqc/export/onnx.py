"""ONNX export of a compiled model (whole model or one decoder block) that onnxruntime runs on CPU.

Every QuantLinear becomes, in the ONNX graph,
    W  = DequantizeLinear(codes, scale [N, G], zero [N, G], axis=1, block_size=g)   codes: uint4 or uint8 [N, K]
         (fractional zero points, the "f" grids: zero = its integer part in [0, 255], and W -= s * (z - zero)
         per group, that offset expanded by a second blocked DequantizeLinear of a zero tensor)
    s, z per token (ReduceMin/ReduceMax over the last axis, as abqc.quant.quantize_activation)
    x' = (clip(round(x / s) + z, 0, qmax) - z) * s
    y  = MatMul(x', W^T) + bias
so the weights stay integer initialisers and activations are quantized per token, dynamically, in the graph.
Weight-only pairs (A16) skip the activation step. An online Hadamard on a linear's input (the rotate pass)
is exported as a dense float32 matrix.

Invariant: the exported graph computes the abqc CPU reference's function up to float32 rounding (abqc
accumulates exact integers and scales in float64): the parity tests hold it to 1e-4 absolute, except
where a rounding difference upstream moves one activation across a code boundary (see README).

Expressible: weights of 1..8 bit-planes (codes stored as uint4 up to 4 planes, W2* included, else uint8),
activations of 1..8 bits (asymmetric or symmetric) or FP. Opset 21 (blocked DequantizeLinear).
Whole-model export covers input_ids -> logits without a KV cache (torch.onnx cannot export the
transformers 5 cache); block export covers one decoder layer: hidden_states, cos, sin -> hidden_states.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import quant
from ..compiler import CompiledModel
from ..errors import AbqcError
from ..runtime.fuse import refuse_fused
from ..runtime.modules import FakeQuantLinear, QuantLinear

OPSET = 21
CODE_TYPES = {4: "uint4", 8: "uint8"}     # ONNX integer type holding codes of up to this many planes


def code_storage(planes: int) -> str:
    """ONNX type of the weight codes of a linear with this many bit-planes, or an AbqcError."""
    for width, name in sorted(CODE_TYPES.items()):
        if 1 <= planes <= width:
            return name
    raise AbqcError(f"weights with {planes} bit-planes are not expressible in ONNX DequantizeLinear "
                    "(uint4/uint8 codes hold 1..8 planes): re-compile with weight bits in 1..8")


def check_expressible(a_bits: int, act_symmetric: bool) -> None:
    if not (1 <= a_bits <= 8 or a_bits == 16):
        raise AbqcError(f"{a_bits}-bit activations are not expressible: the graph quantizes activations to "
                        "1..8 bits or keeps them FP (a16); re-compile with such a pair")
    if act_symmetric and a_bits == 1:
        raise AbqcError("symmetric 1-bit activations have no integer zero point; use asymmetric activations")


# ------------------------------------------------------------------ the linear as ONNX sees it

@torch.library.custom_op("abqc::onnx_qdq_linear", mutates_args=())
def onnx_qdq_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                    w_offset: Optional[torch.Tensor], bias: Optional[torch.Tensor], a_bits: int, group_size: int,
                    act_symmetric: bool) -> torch.Tensor:
    """Float model of the exported linear (used while tracing; the ONNX translation is `_translate`)."""
    n, k = w_codes.shape
    g = w_scale.shape[1]
    u = nn.functional.pad(w_codes.float(), (0, g * group_size - k)).view(n, g, group_size)
    w = (u - w_zero.float().unsqueeze(-1)) * w_scale.unsqueeze(-1)
    if w_offset is not None:
        w = w - w_offset.unsqueeze(-1)
    w = w.view(n, -1)[:, :k]
    if a_bits < 16:
        x = quant.fake_quant_activation(x, a_bits, act_symmetric)
    return nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


@onnx_qdq_linear.register_fake
def _(x, w_codes, w_scale, w_zero, w_offset, bias, a_bits, group_size, act_symmetric):
    return x.new_empty(*x.shape[:-1], w_codes.shape[0])


def _translate(x, w_codes, w_scale, w_zero, w_offset, bias, a_bits: int, group_size: int, act_symmetric: bool):
    """onnxscript translation of abqc::onnx_qdq_linear; mirrors abqc.quant._scale_zero step for step."""
    from onnx import TensorProto, helper
    from onnxscript import opset21 as op

    w = op.DequantizeLinear(w_codes, w_scale, w_zero, axis=1, block_size=group_size)
    if w_offset is not None:
        # (0 - 1) * offset of each code's group, [N, K], with no [N, K] initializer: a blocked dequantize
        # of zeros made in the graph
        zeros = op.ConstantOfShape(op.Shape(w_codes), value=helper.make_tensor("z", TensorProto.UINT8, [1], [0]))
        ones = op.ConstantOfShape(op.Shape(w_offset), value=helper.make_tensor("o", TensorProto.UINT8, [1], [1]))
        w = op.Add(w, op.DequantizeLinear(zeros, w_offset, ones, axis=1, block_size=group_size))
    if a_bits < 16:
        axis = op.Constant(value_ints=[-1])
        xmin = op.ReduceMin(x, axis, keepdims=1)
        xmax = op.ReduceMax(x, axis, keepdims=1)
        zero_f, qmax = op.Constant(value_float=0.0), op.Constant(value_float=float(2 ** a_bits - 1))
        tiny = op.Constant(value_float=quant.CLIP_MIN)
        if act_symmetric:
            half = 2 ** (a_bits - 1)
            absmax = op.Max(op.Abs(xmax), op.Abs(xmin))
            s = op.Max(op.Div(absmax, op.Constant(value_float=float(max(half - 1, 1)))), tiny)
            z = op.Constant(value_float=float(half))
        else:
            xmin, xmax = op.Min(xmin, zero_f), op.Max(xmax, zero_f)
            s = op.Max(op.Div(op.Sub(xmax, xmin), qmax), tiny)
            z = op.Clip(op.Round(op.Div(op.Neg(xmin), s)), zero_f, qmax)
        u = op.Clip(op.Add(op.Round(op.Div(x, s)), z), zero_f, qmax)
        x = op.Mul(op.Sub(u, z), s)
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


class _Dense(nn.Module):
    """x @ matrix: an input transform (online Hadamard) as one plain MatMul."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.register_buffer("matrix", matrix.float().contiguous())

    def forward(self, x):
        return x @ self.matrix.to(x.dtype)


def _dense_of(pre: nn.Module, n: int) -> _Dense:
    with torch.no_grad():
        return _Dense(pre(torch.eye(n, dtype=torch.float64)).to(torch.float32))


class ExportLinear(nn.Module):
    """A QuantLinear re-laid for export: codes [N, K] uint8, scale/zero [N, G], optional dense input transform."""

    def __init__(self, ql: QuantLinear):
        super().__init__()
        planes = ql.planes
        self.storage = code_storage(planes)
        check_expressible(ql.pair.a_bits, ql.act_symmetric)
        self.pair, self.in_features, self.out_features = ql.pair, ql.in_features, ql.out_features
        self.a_bits, self.act_symmetric = ql.pair.a_bits, ql.act_symmetric
        self.group_size = min(ql.group_size, ql.in_features)
        pre = getattr(ql, "pre", None)
        self.pre = None if pre is None else _dense_of(pre.cpu(), ql.in_features)
        codes = quant.unpack_bitplanes(ql.w_planes.cpu(), ql.in_features)
        self.register_buffer("w_codes", codes.to(torch.uint8))
        self.register_buffer("w_scale", ql.w_scale.float().cpu().contiguous())
        zero = quant.zero_of_fixed(ql.w_zero.cpu())                # float64, exact (abqc.quant.zero_fixed)
        whole = zero.floor().clamp(0, 255)                          # what DequantizeLinear's uint8 zero can hold
        self.register_buffer("w_zero", whole.to(torch.uint8))
        # fractional zero points ("f" grids): the rest, scale * (zero - whole) per group, subtracted in the graph
        rest = zero - whole
        self.register_buffer("w_offset", (ql.w_scale.double().cpu() * rest).float() if bool(rest.any()) else None)
        self.register_buffer("bias", None if ql.bias is None else ql.bias.float().cpu())

    def forward(self, x):
        if self.pre is not None:
            x = self.pre(x)
        return torch.ops.abqc.onnx_qdq_linear(x, self.w_codes, self.w_scale, self.w_zero, self.w_offset, self.bias,
                                              self.a_bits, self.group_size, self.act_symmetric)


class _PreLinear(nn.Module):
    """An FP linear with an input transform (HadamardLinear), in plain ops."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.pre = _dense_of(lin.pre.cpu(), lin.in_features)
        self.weight, self.bias = lin.weight, lin.bias

    def forward(self, x):
        return nn.functional.linear(self.pre(x), self.weight, self.bias)


def hf_model(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, CompiledModel) else model


def export_ready(model: nn.Module) -> tuple[nn.Module, dict]:
    """A float32 CPU copy of the compiled HF model with every QuantLinear swapped for an ExportLinear.

    Returns (copy, {module path: {"bits", "planes", "storage", "group_size"}}).
    """
    inner = hf_model(model)
    refuse_fused(inner, "ONNX export")
    for name, mod in inner.named_modules():
        if isinstance(mod, FakeQuantLinear):
            raise AbqcError(f"{name} is a fake-quant linear (lower_fake): export needs integer weights; "
                            "compile with the 'lower' pass (the default pipelines do)")
    target = copy.deepcopy(inner).cpu().eval()   # cast to float32 after the swap: input transforms stay float64
    table = {}
    for name, mod in list(target.named_modules()):
        for child_name, child in list(mod.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            if isinstance(child, QuantLinear):
                new = ExportLinear(child)
                setattr(mod, child_name, new)
                table[path] = {"bits": str(child.pair), "planes": child.planes,
                               "storage": new.storage, "group_size": new.group_size}
            elif isinstance(child, nn.Linear) and isinstance(getattr(child, "pre", None), nn.Module):
                setattr(mod, child_name, _PreLinear(child))
    if not table:
        raise AbqcError("the model has no quantized linears (QuantLinear): pass a model compiled by abqc.compile")
    return target.float(), table


# ------------------------------------------------------------------ graph inputs

class _LogitsOnly(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids, use_cache=False).logits


class _Block(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, cos, sin):
        out = self.layer(hidden_states, position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    from ..capture import decoder_layers
    return decoder_layers(model)


def block_inputs(model: nn.Module, layer: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{hidden_states, cos, sin} that decoder layer `layer` receives when the model runs on ids."""
    layers = _decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise AbqcError(f"layer {layer} does not exist: the model has decoder layers 0..{len(layers) - 1}")
    seen = {}

    def hook(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        pe = kwargs.get("position_embeddings")
        if pe is None:
            raise AbqcError(f"{type(mod).__name__} gets no position_embeddings (cos, sin): block export "
                            "supports rotary decoders of transformers 5 (Llama, Qwen2, Mistral)")
        seen.update(hidden_states=hidden.detach(), cos=pe[0].detach(), sin=pe[1].detach())
        raise _Stop

    h = layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    return seen


class _Stop(Exception):
    """Ends a forward pass once the wanted layer's inputs are seen."""


# ------------------------------------------------------------------ export

@dataclass
class OnnxExport:
    path: Path
    scope: str                          # "model" or "block"
    layer: int | None
    inputs: dict[str, np.ndarray]       # the example the graph was traced with (feed for a parity check)
    linears: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> dict:
        by = {}
        for v in self.linears.values():
            key = f"{v['bits']} ({v['storage']})"
            by[key] = by.get(key, 0) + 1
        return {"path": str(self.path), "scope": self.scope, "layer": self.layer, "opset": OPSET,
                "inputs": list(self.inputs), "quantized_linears_by_bits": by}


def _narrow_codes(path: Path) -> None:
    """Store DequantizeLinear codes (and their zero points) as uint4 where every value fits in 4 bits."""
    import ml_dtypes
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        codes, zero = inits.get(node.input[0]), inits.get(node.input[2])
        if codes is None or zero is None or codes.data_type != onnx.TensorProto.UINT8:
            continue
        arrays = [numpy_helper.to_array(t) for t in (codes, zero)]
        if max(int(a.max(initial=0)) for a in arrays) > 15:
            continue
        for t, a in zip((codes, zero), arrays):
            t.CopyFrom(numpy_helper.from_array(a.astype(ml_dtypes.uint4), t.name))
    onnx.save(m, str(path))


def export_onnx(model: nn.Module, path: str | Path, scope: str = "model", layer: int = 0,
                ids: torch.Tensor | None = None, verbose: bool = False) -> OnnxExport:
    """Export a compiled model (CompiledModel or its HF model) to ONNX at `path`.

    scope "model": input_ids [batch, seq] -> logits (no KV cache); "block": decoder layer `layer`,
    (hidden_states [batch, seq, hidden], cos, sin [1, seq, head_dim]) -> hidden_states.
    ids: example token ids [batch >= 2, seq >= 2] to trace with (default: 2 x 16 fixed ids).
    """
    if scope not in ("model", "block"):
        raise AbqcError(f"unknown export scope {scope!r}: use 'model' (input_ids -> logits) or 'block'")
    target, table = export_ready(model)
    vocab = int(getattr(target.config, "vocab_size", 2))
    if ids is None:
        ids = torch.arange(32).view(2, 16) * 7 % vocab
    if ids.dim() != 2 or ids.shape[0] < 2 or ids.shape[1] < 2:
        raise AbqcError(f"example ids must be [batch >= 2, seq >= 2] (dynamic shapes need it), got {tuple(ids.shape)}")
    max_pos = int(getattr(target.config, "max_position_embeddings", 4096))
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=1, max=max_pos)
    if scope == "model":
        wrapper, inputs = _LogitsOnly(target), {"input_ids": ids}
        dyn, outputs = {"input_ids": {0: batch, 1: seq}}, ["logits"]
    else:
        inputs = block_inputs(target, layer, ids)
        wrapper = _Block(_decoder_layers(target)[layer])
        prefix = f"model.layers.{layer}."
        table = {k.removeprefix(prefix): v for k, v in table.items() if k.startswith(prefix)}
        dyn = {"hidden_states": {0: batch, 1: seq}, "cos": {1: seq}, "sin": {1: seq}}
        outputs = ["hidden_states_out"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        prog = torch.onnx.export(wrapper.eval(), tuple(inputs.values()), dynamo=True, opset_version=OPSET,
                                 input_names=list(inputs), output_names=outputs, dynamic_shapes=dyn,
                                 custom_translation_table={torch.ops.abqc.onnx_qdq_linear.default: _translate},
                                 verbose=verbose, report=False)
    except ImportError as e:
        raise AbqcError(f"ONNX export needs onnx and onnxscript: pip install -e '.[export]' ({e})") from e
    prog.save(str(path))
    _narrow_codes(path)
    return OnnxExport(path, scope, layer if scope == "block" else None,
                      {k: v.numpy() for k, v in inputs.items()}, table)


def session(path: str | Path):
    """An onnxruntime CPU session that keeps DequantizeLinear+MatMul exact (no int8 activation shortcut)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    # ORT may fuse DQ+MatMul into MatMulNBits with int8-quantized activations (accuracy level 4)
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def reference(model: nn.Module, exp: OnnxExport, feed: dict[str, np.ndarray]) -> np.ndarray:
    """abqc's CPU reference output for the exported graph's inputs."""
    inner = hf_model(model)
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()}
    with torch.no_grad():
        if exp.scope == "model":
            return inner(t["input_ids"], use_cache=False).logits.float().numpy()
        return _Block(_decoder_layers(inner)[exp.layer])(t["hidden_states"], t["cos"], t["sin"]).float().numpy()


def parity(model: nn.Module, exp: OnnxExport, feed: dict[str, np.ndarray] | None = None) -> dict:
    """Run the ONNX graph with onnxruntime and abqc's CPU reference on the same inputs; compare."""
    feed = feed or exp.inputs
    got = session(exp.path).run(None, feed)[0]
    ref = reference(model, exp, feed)
    if got.shape != ref.shape:
        raise AbqcError(f"onnxruntime output shape {got.shape} differs from abqc's {ref.shape}")
    diff = np.abs(got - ref)
    return {"max_abs_diff": float(diff.max()), "frac_within_1e-4": float((diff <= 1e-4).mean()),
            "ref_max_abs": float(np.abs(ref).max()), "shape": list(ref.shape)}
