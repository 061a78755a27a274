"""VISIT's colour scales (Katz & Belinkov 2023, VISIT): the 70-stop rank palette for nodes, the
entropy grey for edges, the attention scale for memory edges, and the fixed colours of bias nodes,
layer-norm steps, skips and signed neuron edges. See docs/flow_graphs.md."""

from __future__ import annotations

import math

# VISIT's node palette: 70 stops indexed by floor(rank / |V| · 70).
PALETTE = (["lime"] + ["greenyellow"] + ["yellow"] * 3 + ["dimgrey"] * 53 + ["orangered"] * 3
           + ["red"] * 4 + ["darkred"] * 5)
BIAS_COLOR = "pink"
LN_COLOR = "darkviolet"
SKIP_PRE, SKIP_MID = "rgba(102,0,204,.3)", "rgba(51,102,153,.3)"
POS_COLOR, NEG_COLOR = "blue", "red"


def rank_color(rank0: int, d_vocab: int) -> str:
    """VISIT colour of a 0-based rank: green/yellow = target in the top ~7 %, red = suppressed."""
    return PALETTE[min(len(PALETTE) - 1, max(0, int(math.floor(rank0 / d_vocab * 70))))]


def sign_color(positive: bool) -> str:
    """Blue for a positive score (forward: the neuron fires; backward: it lowers the loss), else red."""
    return POS_COLOR if positive else NEG_COLOR


def entropy_grey(bits: float) -> str:
    """greys(H/30) from darkslategrey (specific) to lightgrey (diffuse)."""
    t = min(1.0, max(0.0, bits / 30.0))
    lo, hi = (47, 79, 79), (211, 211, 211)
    return "rgb({},{},{})".format(*(round(a + (b - a) * t) for a, b in zip(lo, hi)))


def attention_color(a: float) -> str:
    """khaki (a=0) → yellow (a=.5) → green (a=1)."""
    a = min(1.0, max(0.0, a))
    stops = ((240, 230, 140), (255, 255, 0), (0, 128, 0))
    lo, hi, t = (stops[0], stops[1], a * 2) if a <= 0.5 else (stops[1], stops[2], a * 2 - 1)
    return "rgb({},{},{})".format(*(round(x + (y - x) * t) for x, y in zip(lo, hi)))
