"""VISIT information-flow graphs, forward and backward, and the paper's findings as checks."""

from .build import flow_graph, flow_hook_names
from .findings import LNFilter, RegNeuron, RegularisationNeurons, ln_filter, regularisation_neurons
from .graph import Edge, FlowGraph, Node, merge

__all__ = ["Edge", "FlowGraph", "LNFilter", "Node", "RegNeuron", "RegularisationNeurons", "flow_graph", "flow_hook_names",
           "ln_filter", "merge", "regularisation_neurons"]
