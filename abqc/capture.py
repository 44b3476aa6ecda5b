"""Capture every decoder block as an FX graph (torch.export, non-strict) and annotate it.

Invariant: a CapturedModel's blocks are views of the live HF model. `Block.linears` maps each role
(q, k, v, o, gate, up, down) to the nn.Linear it names in the HF module tree, and `Block.graph` is the
exported FX graph of that block in which every aten.linear node carries meta["abqc_role"]. Passes
rewrite the HF modules (so generate() and the KV cache keep working) and may re-capture.

Relations for later passes, found on the graph (not by module names):
  norm_groups: norm module path -> roles of the linears fed by that norm (e.g. input_layernorm -> q,k,v)
  v_to_o:      the v linear whose output reaches o's input through attention
  gated_mlp:   (gate, up, down) when down's input is act(gate(x)) * up(x)
`Block.relation_graph()` returns them as a networkx DiGraph over module paths.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import nn

from .bits import ROLES
from .errors import UnsupportedModelError
from .models import check_supported

ROLE_OF = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
           "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
# ops a value passes through unchanged in meaning (layout, dtype, GQA expansion)
_TRANSPARENT = {"view", "reshape", "_unsafe_view", "transpose", "permute", "expand", "contiguous", "clone",
                "to", "_to_copy", "type_as", "unsqueeze", "squeeze", "flatten", "slice", "alias", "detach",
                "repeat_interleave", "dropout"}


def _op_name(node) -> str:
    t = node.target
    name = getattr(t, "__name__", str(t))
    return name.split(".")[0]


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path


def _module_class(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    cls = list(stack.values())[-1][1]
    return cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))


@dataclass
class Block:
    index: int
    module: nn.Module
    graph: torch.fx.GraphModule
    linears: dict[str, str]                      # role -> module path inside the block
    norm_groups: dict[str, list[str]] = field(default_factory=dict)
    v_to_o: tuple[str, str] | None = None
    gated_mlp: tuple[str, str, str] | None = None

    def linear(self, role: str) -> nn.Module:
        return self.module.get_submodule(self.linears[role])

    def set_linear(self, role: str, new: nn.Module) -> None:
        parent, _, leaf = self.linears[role].rpartition(".")
        setattr(self.module.get_submodule(parent) if parent else self.module, leaf, new)

    def node_graph(self) -> nx.DiGraph:
        """The FX graph as a DAG: one edge per (node, user)."""
        g = nx.DiGraph()
        for n in self.graph.graph.nodes:
            g.add_node(n.name, op=_op_name(n), role=n.meta.get("abqc_role"))
            for u in n.users:
                g.add_edge(n.name, u.name)
        return g

    def relation_graph(self) -> nx.DiGraph:
        """Fusion relations over module paths: norm -> linear, v -> o, gate/up -> down."""
        g = nx.DiGraph()
        for norm, roles in self.norm_groups.items():
            for r in roles:
                g.add_edge(norm, self.linears[r], kind="norm->linear")
        if self.v_to_o:
            g.add_edge(self.linears[self.v_to_o[0]], self.linears[self.v_to_o[1]], kind="v->o")
        if self.gated_mlp:
            gate, up, down = self.gated_mlp
            g.add_edge(self.linears[gate], self.linears[down], kind="act(gate)->down")
            g.add_edge(self.linears[up], self.linears[down], kind="up->down")
        return g


@dataclass
class CapturedModel:
    model: nn.Module
    blocks: list[Block]

    def linears(self):
        """(layer index, role, nn.Module) for every annotated linear."""
        for b in self.blocks:
            for role in ROLES:
                if role in b.linears:
                    yield b.index, role, b.linear(role)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__} has no model.layers ModuleList: abqc captures "
                                    "Llama-family decoders (model.model.layers)")
    return layers


def _layer_inputs(model: nn.Module, layers: nn.ModuleList, seqlen: int):
    """Run the model once on dummy ids and record each layer's (args, kwargs)."""
    seen: dict[int, tuple] = {}

    def hook(i):
        def fn(mod, args, kwargs):
            kw = {k: v for k, v in kwargs.items() if v is not None and not isinstance(v, bool)}
            kw.pop("past_key_values", None)
            kw.pop("past_key_value", None)
            seen[i] = (tuple(a.detach() if torch.is_tensor(a) else a for a in args), kw)
        return fn

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        dev = next(model.parameters()).device
        ids = torch.arange(2 * seqlen, device=dev).view(2, seqlen) % max(2, model.config.vocab_size)
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def _back(node, stop):
    """Walk back through transparent ops from node until stop(node) holds; None if it never does."""
    seen = set()
    frontier = [node]
    while frontier:
        n = frontier.pop()
        if not isinstance(n, torch.fx.Node) or n.name in seen:
            continue
        seen.add(n.name)
        if stop(n):
            return n
        if n.op == "call_function" and _op_name(n) in _TRANSPARENT:
            frontier.extend(a for a in n.args if isinstance(a, torch.fx.Node))
    return None


def _find_relations(block: Block, nodes_by_role: dict) -> None:
    # norm -> linears: walk back from each linear's input to a node computed inside a *Norm module
    for role, node in nodes_by_role.items():
        src = _back(node.args[0], lambda n: "norm" in _module_class(n).lower() and n.op == "call_function")
        if src is not None:
            block.norm_groups.setdefault(_module_path(src), []).append(role)
    # v -> o: o's input comes from attention; its value operand traces back to the v linear
    if "o" in nodes_by_role and "v" in nodes_by_role:
        def is_attn(n):
            return n.op == "call_function" and _op_name(n) in ("scaled_dot_product_attention", "matmul", "bmm")
        attn = _back(nodes_by_role["o"].args[0], is_attn)
        if attn is not None:
            value = attn.args[2] if _op_name(attn) == "scaled_dot_product_attention" else attn.args[1]
            if _back(value, lambda n: n is nodes_by_role["v"]) is not None:
                block.v_to_o = ("v", "o")
    # up * act(gate) -> down
    if all(r in nodes_by_role for r in ("gate", "up", "down")):
        mul = _back(nodes_by_role["down"].args[0], lambda n: n.op == "call_function" and _op_name(n) == "mul")
        if mul is not None:
            ins = [a for a in mul.args if isinstance(a, torch.fx.Node)]
            hit_up = any(_back(a, lambda n: n is nodes_by_role["up"]) for a in ins)
            hit_gate = any(a is not nodes_by_role["gate"] and a.args and
                           _back(a.args[0], lambda n: n is nodes_by_role["gate"]) for a in ins)
            if hit_up and hit_gate:
                block.gated_mlp = ("gate", "up", "down")


def capture_block(index: int, layer: nn.Module, args, kwargs) -> Block:
    try:
        ep = torch.export.export(layer, args, kwargs, strict=False)
    except Exception as e:  # torch raises many types here; name the module for the user
        raise UnsupportedModelError(f"could not capture decoder layer {index} ({type(layer).__name__}) with "
                                    f"torch.export: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    gm = ep.module()
    linears, nodes_by_role = {}, {}
    for node in ep.graph_module.graph.nodes:
        if node.op == "call_function" and _op_name(node) in ("linear", "addmm", "mm"):
            path = _module_path(node)
            leaf = path.rpartition(".")[2]
            if leaf not in ROLE_OF:
                raise UnsupportedModelError(f"layer {index}: linear module {path!r} ({_module_class(node)}) has no "
                                            f"known role; abqc knows {', '.join(ROLE_OF)}")
            role = ROLE_OF[leaf]
            node.meta["abqc_role"] = role
            # module paths in nn_module_stack are relative to the exported layer
            linears[role] = path.removeprefix("L['self'].")
            nodes_by_role[role] = node
    missing = [r for r in ROLES if r not in linears]
    if missing:
        raise UnsupportedModelError(f"layer {index} ({type(layer).__name__}) lacks the linear roles {missing}: "
                                    "abqc expects Llama-style attention and gated MLP projections")
    block = Block(index, layer, ep.graph_module, linears)
    _find_relations(block, nodes_by_role)
    del gm
    return block


def capture(model: nn.Module, seqlen: int = 16) -> CapturedModel:
    """Export each decoder layer of a supported HF causal LM and annotate its linears."""
    check_supported(model)
    layers = decoder_layers(model)
    was_training = model.training
    model.eval()
    inputs = _layer_inputs(model, layers, seqlen)
    blocks = [capture_block(i, layer, *inputs[i]) for i, layer in enumerate(layers)]
    model.train(was_training)
    return CapturedModel(model, blocks)
