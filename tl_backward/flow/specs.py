"""The plain data a VISIT layer is built from: the gathered tensors (:class:`LayerData`), node ids
(:class:`LayerIds`) and the node and edge specifications (:class:`NodeSpec`, :class:`EdgeSpec`)
that :mod:`tl_backward.flow.topology` emits and :mod:`tl_backward.flow.build` projects and turns
into a :class:`~tl_backward.flow.graph.FlowGraph`. Definitions: docs/flow_graphs.md."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

# A projection-sharing tag: (tag, "same") = bitwise the same vector as the tag's other members;
# (tag, "dir") = a positive multiple of it (shared only under the normalised lens, where
# LL(c·u) = LL(u) for c > 0). Backward graphs are full of these (e.g. every W_O row is ±g_attn_out).
Share = tuple[str, str]


def same_vector(tag: str) -> Share:
    """Share tag of a vector bitwise equal to every other member of ``tag``."""
    return (tag, "same")


def positive_multiple(tag: str, coef: float) -> Share | None:
    """Share tag of coef·u (u named by ``tag``): sign-specific; none for a zero coefficient."""
    return None if coef == 0 else (f"{tag}{'+' if coef > 0 else '-'}", "dir")


def norm_of(x: Tensor) -> float:
    """‖x‖₂ (Frobenius for a matrix) as a Python float."""
    return float(x.norm())


@dataclass
class LayerData:
    """Tensors of one layer for one prompt (batch row 0), keyed by hook kind; ``grads`` only for
    backward graphs."""

    acts: dict[str, Tensor]
    grads: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerIds:
    """Node ids of layer ``layer``: block_in/out are ``resid{L}``/``resid{L+1}`` (so chained layers
    share them), everything else is prefixed ``L{L}.``."""

    layer: int

    @property
    def prefix(self) -> str:
        return f"L{self.layer}"

    def node(self, name: str) -> str:
        """Id of a named node: block_in, attn_in, attn_out, resid_mid, mlp_in, mlp_out, block_out, concat."""
        if name == "block_in":
            return f"resid{self.layer}"
        if name == "block_out":
            return f"resid{self.layer + 1}"
        return f"{self.prefix}.{name}"

    def head(self, j: int) -> str:
        """Prefix of head j's nodes: ``.qkv``, ``.q``, ``.k{i}``, ``.v{i}``, ``.A``."""
        return f"{self.prefix}.H{j}"


@dataclass
class NodeSpec:
    id: str
    kind: str
    layer: int
    name: str
    vector: Tensor | None
    value: float
    head: int | None = None
    neuron: int | None = None
    position: int | None = None
    negative: bool = False  # label and colour from the bottom (negative-score neuron)
    bias: bool = False
    extra: list[tuple[str, Tensor, Share | None]] = field(default_factory=list)  # more hover projections
    note: str = ""
    share: Share | None = None


@dataclass
class EdgeSpec:
    source: str
    target: str
    kind: str
    weight: float
    color: str | None = None
    entropy_of: str | None = None  # colour = entropy grey of this node's projection
