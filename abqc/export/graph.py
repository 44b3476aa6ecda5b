"""The optimised FX graph of one compiled decoder block: a tabular dump, graph code, and a drawing.

`lowered_block_graph` re-exports a block of the compiled model with torch.export, so quantized linears
appear as the runtime's ops (abqc::wpaq_linear / abqc::wq_linear); each such node is annotated with
meta["abqc_role"] and meta["abqc_bits"]. `condense` keeps what the quantization is about (inputs,
norms, quantized linears, attention, activation, gating, residual adds, output), contracts everything
else, and marks where smoothing scales fuse (norm -> linears, v -> o, up -> down, from the compile
report's relations). Invariant: the condensed graph is a DAG whose edges follow data flow of the FX graph.
"""
from __future__ import annotations

import html
from pathlib import Path

import networkx as nx
import torch
from torch import nn

from ..capture import ROLE_OF, _module_class, _module_path, _op_name
from ..errors import AbqcError
from .onnx import _decoder_layers, block_inputs, hf_model

QUANT_OPS = ("wpaq_linear", "wq_linear")
_KEEP_OPS = {"scaled_dot_product_attention": "attention", "silu": "act", "gelu": "act", "mul": "mul",
             "add": "add", "softmax": "attention"}


def lowered_block_graph(model: nn.Module, layer: int = 0, ids: torch.Tensor | None = None) -> torch.fx.GraphModule:
    """torch.export graph of compiled decoder layer `layer`, quantized nodes annotated with role and bits."""
    inner = hf_model(model)
    if ids is None:
        ids = torch.arange(16).view(2, 8) % int(getattr(inner.config, "vocab_size", 2))
    inp = block_inputs(inner, layer, ids)
    block = _decoder_layers(inner)[layer]
    ep = torch.export.export(block, (inp["hidden_states"],), {"position_embeddings": (inp["cos"], inp["sin"])},
                             strict=False)
    gm = ep.graph_module
    n_quant = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and _op_name(node) in QUANT_OPS:
            path = _module_path(node).removeprefix("L['self'].")
            mod = block.get_submodule(path)
            node.meta["abqc_role"] = ROLE_OF.get(path.rpartition(".")[2], path)
            node.meta["abqc_bits"] = str(mod.pair)
            node.meta["abqc_group"] = "per-channel" if mod.group_size >= mod.in_features else "per-group"
            n_quant += 1
    if not n_quant:
        raise AbqcError(f"decoder layer {layer} has no quantized linears: pass a model compiled by abqc.compile")
    return gm


def _fmt_arg(a) -> str:
    if isinstance(a, torch.fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_fmt_arg(x) for x in a) + "]"
    return repr(a)


def dump_table(gm: torch.fx.GraphModule) -> str:
    """One line per FX node: name, op, module path, role, bit pair, inputs. Quantized nodes are starred."""
    rows = [("", "node", "op", "module", "role", "bits", "inputs")]
    weights = 0
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.name.startswith(("p_", "b_", "c_")):
            weights += 1      # parameters and buffers: counted, not listed
            continue
        if n.op == "call_function" and _op_name(n) == "_assert_tensor_metadata":
            continue
        op = _op_name(n) if n.op == "call_function" else n.op
        bits = n.meta.get("abqc_bits", "")
        if bits:
            bits = f"{bits} {n.meta.get('abqc_group', '')}"
        args = ", ".join(_fmt_arg(a) for a in n.args if isinstance(a, (torch.fx.Node, list, tuple)))
        rows.append(("*" if bits else "", n.name, op, _module_path(n).removeprefix("L['self']."),
                     n.meta.get("abqc_role", ""), bits, args[:70]))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:6], widths)) + "  " + r[6] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    head = f"# {len(rows) - 1} nodes ({weights} parameter/buffer inputs not listed); * = quantized linear\n"
    return head + "\n".join(lines) + "\n"


def _kept(n: torch.fx.Node) -> str | None:
    """Kind of a node the condensed graph keeps, or None to contract it."""
    if n.op == "placeholder":
        return "input" if not n.name.startswith(("p_", "b_", "c_")) else None
    if n.op == "output":
        return "output"
    if n.op != "call_function":
        return None
    op = _op_name(n)
    if op in QUANT_OPS:
        return "quant"
    if "norm" in _module_class(n).lower():
        # the norm's input cast is shared with the residual add: keep it transparent
        return None if op in ("to", "_to_copy", "_assert_tensor_metadata") else "norm"
    if op in _KEEP_OPS and _module_class(n).endswith(("Attention", "MLP", "DecoderLayer", "Activation")) \
            and not (op in ("mul", "add") and "Attention" in _module_class(n)):   # rotary arithmetic
        return _KEEP_OPS[op]
    return None


def _key(n: torch.fx.Node, kind: str) -> str:
    # every node of one norm module collapses into one vertex
    return _module_path(n).removeprefix("L['self'].") if kind == "norm" else n.name


def condense(gm: torch.fx.GraphModule, relations: dict | None = None, scales: dict | None = None) -> nx.DiGraph:
    """Quantization-level view of a block graph.

    relations: the compile report's {"norm_groups": {norm: [roles]}, "v_to_o": [v, o], "gated_mlp": [g, u, d]};
    scales: {(pair name) -> (min, max)} of smoothing scales (smoothquant details), shown on fused edges.
    Vertex attributes: kind, label, bits; edge attribute fused (text) where a smoothing scale folds in.
    """
    g = nx.DiGraph()
    rep: dict[str, set[str]] = {}        # FX node -> nearest kept vertices at or above it
    role_vertex = {}
    for n in gm.graph.nodes:
        kind = _kept(n)
        srcs = set()
        for a in n.all_input_nodes:
            srcs |= rep.get(a.name, set())
        if kind is None:
            rep[n.name] = srcs
            continue
        v = _key(n, kind)
        if v not in g:
            path = _module_path(n).removeprefix("L['self'].")
            label = {"norm": f"{v}\n{_module_class(n).rpartition('.')[2]}", "input": n.name, "output": "output",
                     "quant": f"{path}\n{n.meta.get('abqc_bits', '').upper()} {n.meta.get('abqc_group', '')}"}
            if kind == "quant":
                role_vertex[n.meta["abqc_role"]] = v
            g.add_node(v, kind=kind, label=label.get(kind, _op_name(n)), bits=n.meta.get("abqc_bits", ""))
        for s in srcs - {v}:
            g.add_edge(s, v)
        rep[n.name] = {v}
    _mark_fused(g, role_vertex, relations or {}, scales or {})
    return g


def _mark_fused(g: nx.DiGraph, role_vertex: dict, relations: dict, scales: dict) -> None:
    def mark(src: str, dst_roles, name: str):
        rng = scales.get(name)
        text = "smooth scale" + (f" [{rng[0]:.3g}, {rng[1]:.3g}]" if rng else "")
        for r in dst_roles:
            dst = role_vertex.get(r)
            if dst is None:
                continue
            if src in g and g.has_edge(src, dst):
                g.edges[src, dst]["fused"] = text
            elif src in role_vertex:
                g.add_edge(role_vertex[src], dst, fused=text, dataflow=False)
    for norm, roles in (relations.get("norm_groups") or {}).items():
        mark(norm, roles, f"{norm}->{','.join(roles)}")
    v_o = relations.get("v_to_o") or []
    if len(v_o) == 2:
        mark(v_o[0], [v_o[1]], "v->o")
    gated = relations.get("gated_mlp") or []
    if len(gated) == 3:
        mark(gated[1], [gated[2]], "up->down")


_COLORS = {"quant": "#f4a261", "norm": "#8ecae6", "input": "#d9d9d9", "output": "#d9d9d9",
           "attention": "#b5e48c", "act": "#cdb4db", "mul": "#ffffff", "add": "#ffffff"}


def to_dot(g: nx.DiGraph, title: str = "abqc block") -> str:
    """GraphViz DOT text: quantized linears orange with their bit pair, fused-scale edges dashed red."""
    lines = [f'digraph "{title}" {{', "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];',
             f'  labelloc="t"; label="{title}";']
    for v, d in g.nodes(data=True):
        label = html.escape(d["label"]).replace("\n", "\\n")
        lines.append(f'  "{v}" [label="{label}", fillcolor="{_COLORS.get(d["kind"], "#ffffff")}"];')
    for s, t, d in g.edges(data=True):
        attrs = []
        if "fused" in d:
            attrs += [f'label="{d["fused"]}"', 'color="#d62828"', 'fontcolor="#d62828"']
            if d.get("dataflow") is False:
                attrs.append("style=dashed")
        lines.append(f'  "{s}" -> "{t}"' + (f" [{', '.join(attrs)}]" if attrs else "") + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_png(g: nx.DiGraph, path: str | Path, title: str = "abqc block") -> Path:
    """A matplotlib drawing of the condensed graph, layered top to bottom in data-flow order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flow = nx.DiGraph((s, t) for s, t, d in g.edges(data=True) if d.get("dataflow", True))
    flow.add_nodes_from(g)
    for depth, layer in enumerate(nx.topological_generations(flow)):
        for v in layer:
            g.nodes[v]["depth"] = depth
    pos = nx.multipartite_layout(g, subset_key="depth", align="horizontal", scale=1.0)
    pos = {v: (x, -y) for v, (x, y) in pos.items()}
    depth = max(d["depth"] for _, d in g.nodes(data=True)) + 1
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.85 * depth))
    plain = [(s, t) for s, t, d in g.edges(data=True) if "fused" not in d]
    fused = [(s, t) for s, t, d in g.edges(data=True) if "fused" in d]
    nx.draw_networkx_edges(g, pos, edgelist=plain, ax=ax, edge_color="#555555", arrows=True, node_size=2600)
    nx.draw_networkx_edges(g, pos, edgelist=fused, ax=ax, edge_color="#d62828", style="dashed", arrows=True,
                           node_size=2600, connectionstyle="arc3,rad=0.15")
    for v, (x, y) in pos.items():
        d = g.nodes[v]
        ax.text(x, y, d["label"], ha="center", va="center", fontsize=7.5,
                bbox={"boxstyle": "round,pad=0.35", "fc": _COLORS.get(d["kind"], "#ffffff"), "ec": "#333333"})
    labels = {(s, t): d["fused"] for s, t, d in g.edges(data=True) if "fused" in d}
    nx.draw_networkx_edge_labels(g, pos, edge_labels=labels, ax=ax, font_size=6, font_color="#d62828")
    ax.set_title(title + "  (orange: quantized linears with bits; red dashed: where smoothing scales fuse)",
                 fontsize=9)
    ax.axis("off")
    ax.margins(0.08, 0.08)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def smooth_ranges(report: dict, layer: int) -> dict:
    """{pair: (scale_min, scale_max)} of the smoothquant pass's details for one layer (empty if not run)."""
    out = {}
    for p in (report or {}).get("passes", []):
        if p.get("name") != "smoothquant":
            continue
        for row in p.get("details") or []:
            if row.get("layer") == layer and {"pair", "scale_min", "scale_max"} <= set(row):
                out[str(row["pair"])] = (float(row["scale_min"]), float(row["scale_max"]))
    return out


def write_block_graph(model: nn.Module, out_dir: str | Path, layer: int = 0, png: bool = True) -> dict[str, Path]:
    """Write graph_code.py, graph_table.txt, graph.dot (and graph.png) of one compiled block into out_dir."""
    gm = lowered_block_graph(model, layer)
    report = getattr(model, "report", None) or {}
    g = condense(gm, report.get("relations"), smooth_ranges(report, layer))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"decoder layer {layer} ({report.get('bits', 'compiled')})"
    files = {"code": out / f"block{layer}_graph_code.py", "table": out / f"block{layer}_graph_table.txt",
             "dot": out / f"block{layer}_graph.dot"}
    files["code"].write_text(gm.code)
    files["table"].write_text(dump_table(gm))
    files["dot"].write_text(to_dot(g, title))
    if png:
        files["png"] = draw_png(g, out / f"block{layer}_graph.png", title)
    return files
