"""``pciguard audit --svg``: the topology drawn with Graphviz, each IOMMU group a box
coloured by its verdict. Built from the report alone, so a JSON report can be drawn too."""

from __future__ import annotations

from pathlib import Path

import graphviz

from pciguard.errors import InputError
from pciguard.report import BRIDGE_KINDS, AuditReport, Verdict, reason_label

COLOURS = {  # (border, fill)
    Verdict.READY: ("#2e7d32", "#e8f5e9"),
    Verdict.READY_AFTER_QUARANTINE: ("#f9a825", "#fff8e1"),
    Verdict.NOT_ASSIGNABLE: ("#c62828", "#ffebee"),
    Verdict.BRIDGES_ONLY: ("#757575", "#f5f5f5"),
}


def _node_id(bdf: str) -> str:
    return "f" + bdf.replace(":", "_").replace(".", "_")  # a colon would mean a port to Graphviz


def topology_graph(report: AuditReport) -> graphviz.Digraph:
    graph = graphviz.Digraph(
        "pciguard",
        graph_attr={"rankdir": "LR", "fontname": "sans-serif", "label": f"{report.host}: IOMMU groups"},
        node_attr={"fontname": "sans-serif", "fontsize": "10"},
    )
    present = {m.bdf for g in report.groups for m in g.members}
    for group in report.groups:
        border, fill = COLOURS[group.verdict]
        name = "none" if group.number is None else str(group.number)
        with graph.subgraph(name=f"cluster_{name}") as box:
            title = f"group {name}" if group.number is not None else "no IOMMU group"
            label = f"{title}: {group.verdict.value}" + (f" ({group.domain})" if group.domain else "")
            if group.verdict is Verdict.NOT_ASSIGNABLE and group.reasons:  # the first reason, briefly
                more = len({r.code for r in group.reasons}) - 1
                label += "\n" + reason_label(group.reasons[0]) + (f" (+{more} more)" if more else "")
            # The title is a node, not the box's label: edges are routed around nodes only.
            box.attr(label="", color=border, fillcolor=fill, style="rounded,filled", penwidth="2")
            box.node(f"title_{name}", label=label, shape="plaintext", fontsize="11")
            for m in group.members:
                box.node(
                    _node_id(m.bdf),
                    label=f"{m.bdf}\n{m.name or m.ids}\n{m.driver or 'no driver'}",
                    shape="box" if m.kind in BRIDGE_KINDS else "ellipse",
                    style="dashed" if m.external else "solid",
                )
    for group in report.groups:
        for m in group.members:
            if m.parent in present:
                graph.edge(_node_id(m.parent), _node_id(m.bdf))
            if m.physfn in present:  # which PF a virtual function belongs to; not a bus link
                graph.edge(
                    _node_id(m.physfn), _node_id(m.bdf), style="dotted", arrowhead="odot", constraint="false"
                )
    _legend(graph)
    return graph


def _legend(graph: graphviz.Digraph) -> None:
    """What the colours, shapes and lines mean, as a table in a corner of its own."""
    rows = "".join(
        f'<TR><TD BGCOLOR="{fill}" COLOR="{border}" BORDER="2">{verdict.value}</TD></TR>'
        for verdict, (border, fill) in COLOURS.items()
    )
    meanings = (
        "box: bridge or port; ellipse: endpoint",
        "dashed: behind an external port",
        "dotted arrow: PF to its virtual function",
    )
    rows += "".join(f"<TR><TD>{meaning}</TD></TR>" for meaning in meanings)
    graph.node("legend", label=f'<<TABLE BORDER="0" CELLSPACING="2">{rows}</TABLE>>', shape="plaintext")


def write_svg(report: AuditReport, path: Path) -> None:
    try:
        svg = topology_graph(report).pipe(format="svg")
    except graphviz.ExecutableNotFound:
        raise InputError(
            str(path), "drawing needs Graphviz's `dot` (Debian: apt-get install graphviz)"
        ) from None
    try:
        path.write_bytes(svg)
    except OSError as exc:
        raise InputError(str(path), f"cannot write the drawing: {exc.strerror}") from None
