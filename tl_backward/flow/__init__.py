"""VISIT information-flow graphs, forward and backward, and the paper's findings as checks."""

from .build import flow_graph
from .graph import Edge, FlowGraph, Node, merge

__all__ = ["Edge", "FlowGraph", "Node", "flow_graph", "merge"]
