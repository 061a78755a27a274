"""Backward Lens figures (Katz et al., EMNLP 2024; docs/backward_lens.md).

* :func:`lens_table` -- the paper's table: rows = layers (last on top), columns = prompt tokens,
  each cell ``top1 \\ bottom1`` of the logit lens of the factor, colour = factor norm
  (white -> purple for δ, white -> blue for x, from 0); hover lists k of each, ranks and norm.
* :func:`target_rank_plot` -- target rank per layer, one line per token, counted in the module's
  reading direction (:func:`rank_as_read`: from the top for x, from the bottom for δ; 0 = strongest,
  drawn at the top) -- the convention of the CLI summary (``report/text.py``).
* :func:`norm_tokens` -- per-layer factor norms over the prompt (circuitsvis ColoredTokensMulti).

All strings (tokens, vocabulary entries) go through the shared escaping of
:mod:`tl_backward.render.figures`; nothing is fetched.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..core import checks
from ..errors import TLBackwardError
from ..render.figures import colored_tokens_multi, heatmap_table, line_plot
from ..render.page import Figure, Page

_WEIGHT = {"mlp_in": "W_in (FF1)", "mlp_gate": "W_gate", "mlp_out": "W_out (FF2)", "q": "W_Q", "k": "W_K",
           "v": "W_V", "o": "W_O", "router": "W_router", "shared_in": "W_in (shared expert)",
           "shared_gate": "W_gate (shared expert)", "shared_out": "W_out (shared expert)",
           "shared_expert_gate": "W (shared expert's sigmoid gate)"}
_ATTN = ("q", "k", "v", "o")


def _row(lens: Any, row: int) -> torch.Tensor:
    n_rows = lens.factors.tokens.shape[0]
    row = checks.count(row, "row", maximum=n_rows - 1, hint="a batch index")
    return (lens.factors.positions[:, 0] == row).nonzero()[:, 0]


def _describe(lens: Any, module: str) -> str:
    r = lens[module]
    side = "x" if r.side == "x" else "δ"
    ext = " — extension (the paper covers MLP matrices)" if module in _ATTN else ""
    return f"{module}: ∂L/∂{_WEIGHT[module]}, LL({side}) read by its {r.read}-k{ext}"


def rank_as_read(lens: Any, module: str, which: str = "target") -> torch.Tensor:
    """Rank ``[layer, tokens]`` of the target (``which="target"``) or of the model's prediction
    (``"pred"``) in the module's reading direction: 0 = strongest. x (W_in, W_Q, ...) is read from
    the top, so this is the rank from the most probable token; δ (W_out, W_O) from the bottom --
    descent adds −δ -- so it is ``d_vocab − 1 − rank from the top``. The same convention as the
    report's summary (``Report.lens_rows``: ``x_rank`` / ``delta_rank``)."""
    if which not in ("target", "pred"):
        raise TLBackwardError(f"which must be 'target' or 'pred', got {which!r}", argument="which")
    r = lens[module]
    ranks = r.target_rank if which == "target" else r.pred_rank
    return ranks if r.read == "top" else lens.d_vocab - 1 - ranks


def _convention(lens: Any, module: str) -> str:
    r = lens[module]
    if r.read == "top":
        return "0 = strongest: counted from the top of LL(x), the most probable token first"
    return "0 = strongest: counted from the bottom of LL(δ), what a descent step writes most first"


# Cells whose factor is exactly zero show this mark (and the rank plot a gap).
ZERO_MARK = "—"
_ZERO_NOTE = (f"{ZERO_MARK} = the factor is exactly zero at this layer and token (no gradient reaches it: "
              "in the last layer only the scored position gets one), so no token is ranked")


def lens_table(lens: Any, module: str = "mlp_out", row: int = 0, *, title: str | None = None,
               also: Sequence[str] = ()) -> Figure:
    """Layers × tokens table of ``top1 \\ bottom1`` for one module, coloured by the factor norm.
    ``also``: modules with the same projected vectors (q/k/v share their input), named in the title."""
    r = lens[module]
    idx = _row(lens, row)
    toks = [lens.token_strs[i] for i in idx.tolist()]
    layers = list(lens.layers)[::-1]
    side = "x" if r.side == "x" else "δ"
    b = int(row)
    tgt, pred = lens.decode([int(lens.target_ids[b]), int(lens.pred_ids[b])])
    t_rank, p_rank = rank_as_read(lens, module, "target"), rank_as_read(lens, module, "pred")
    norms, text, hover = [], [], []
    for l in layers:
        li = lens.layer_index(l)
        n_row, t_row, h_row = [], [], []
        for j, i in enumerate(idx.tolist()):
            norm = float(r.norm[li, i])
            top, bottom = lens.decode(r.top_ids[li, i]), lens.decode(r.bottom_ids[li, i])
            n_row.append(norm)
            t_row.append(ZERO_MARK if norm == 0 else f"{top[0]} \\ {bottom[0]}")
            h_row.append(
                f"layer {l}, token {j} {toks[j]!r}\n‖{side}‖ = {norm:.4g}"
                + (" (zero vector: every token ties)" if norm == 0 else "")
                + f"\ntop-{lens.top_k}: {', '.join(map(repr, top))}\nbottom-{lens.top_k}: {', '.join(map(repr, bottom))}"
                + f"\ntarget {tgt!r} rank {int(t_rank[li, i])} of {lens.d_vocab}"
                + f"\nprediction {pred!r} rank {int(p_rank[li, i])}"
                + f"\n(rank {_convention(lens, module)})"
            )
        norms.append(n_row)
        text.append(t_row)
        hover.append(h_row)
    lens_kind = "normalised lens" if lens.normalize else "lens"
    title = title or f"Backward Lens ({lens_kind}) — {_describe(lens, module)}"
    if also:
        title += f" (same input as {', '.join(also)}: same table)"
    caption = (f"cell: top-1 \\ bottom-1 token; colour: ‖{side}‖; target {tgt!r}, "
               f"model predicts {pred!r}; hover for top/bottom-{lens.top_k} and ranks")
    if any(ZERO_MARK in row for row in text):
        caption += "; " + _ZERO_NOTE
    return heatmap_table(torch.tensor(norms), [f"L{l}" for l in layers], toks, title=title,
                         colour="purple" if r.side == "delta" else "blue", cell_text=text, hover=hover,
                         vmin=0.0, corner="layer", caption=caption)


def target_rank_plot(lens: Any, module: str = "mlp_out", row: int = 0, *, max_tokens: int = 10,
                     title: str | None = None) -> Figure:
    """Target rank vs layer in the module's reading direction (:func:`rank_as_read`, 0 = strongest,
    drawn at the top), one line per token (the last ``max_tokens`` tokens of the row), plus the
    model's current prediction at the last token. Cells whose factor is exactly zero (every token
    ties) are left as gaps."""
    r = lens[module]
    idx = _row(lens, row).tolist()[-max_tokens:]
    t_rank, p_rank = rank_as_read(lens, module, "target"), rank_as_read(lens, module, "pred")
    series = {}
    for i in idx:
        pos = int(lens.factors.positions[i, 1])
        series[f"{pos}: {lens.token_strs[i]!r}"] = _gaps(t_rank[:, i], r.norm[:, i])
    pred = lens.decode([int(lens.pred_ids[row])])[0]
    series[f"prediction {pred!r} (last token)"] = _gaps(p_rank[:, idx[-1]], r.norm[:, idx[-1]])
    tgt = lens.decode([int(lens.target_ids[row])])[0]
    side = "x" if r.side == "x" else "δ"
    title = title or (f"Rank of target {tgt!r} in LL({side}) of {module} per layer "
                      f"({_convention(lens, module)})")
    gaps = any(bool((r.norm[:, i] == 0).any()) for i in idx)
    return line_plot(series, x_labels=[f"L{l}" for l in lens.layers], title=title,
                     y_label=f"rank from the {r.read} (0 = strongest, top)", x_label="layer",
                     y_range=(0, lens.d_vocab - 1), invert_y=True,
                     note="gaps: the factor is exactly zero there, so no token is ranked" if gaps else None)


def _gaps(ranks: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Ranks as floats with gaps where the factor is exactly zero (every token ties there)."""
    out = ranks.double()
    out[norms == 0] = float("nan")
    return out


def norm_tokens(lens: Any, module: str = "mlp_out", row: int = 0, *, title: str | None = None) -> Figure:
    """The prompt coloured by the factor norm of one layer at a time (circuitsvis ColoredTokensMulti)."""
    r = lens[module]
    idx = _row(lens, row)
    toks = [lens.token_strs[i] for i in idx.tolist()]
    side = "x" if r.side == "x" else "δ"
    if len(toks) > 1 and not any(t[:1].isspace() for t in toks[1:]):
        toks = toks[:1] + [" " + t for t in toks[1:]]  # word-level vocabularies: keep words apart
    values = r.norm[:, idx].T  # [pos, layer]
    return colored_tokens_multi(toks, values, [f"L{l} ‖{side}‖" for l in lens.layers],
                                title=title or f"‖{side}‖ of {module} per token (pick a layer)")


def render_backward_lens(lens: Any, modules: str | Sequence[str] | None = None, row: int = 0) -> Page:
    """A page: the table of every module (or ``modules``), then the target-rank plot and the norm
    view of the main module (``mlp_out`` when present)."""
    if modules is None:
        mods = list(lens.modules)
    else:
        mods = [modules] if isinstance(modules, str) else list(modules)
        for m in mods:
            lens[m]  # KeyError naming the available modules
    main = "mlp_out" if "mlp_out" in mods else mods[0]
    groups: list[list[str]] = []  # modules with identical projections share one table
    for m in mods:
        for g in groups:
            a, b = lens[g[0]], lens[m]
            if a.side == b.side and torch.equal(a.top_ids, b.top_ids) and torch.equal(a.norm, b.norm):
                g.append(m)
                break
        else:
            groups.append([m])
    figs = [lens_table(lens, g[0], row, also=g[1:]) for g in groups]
    figs += [target_rank_plot(lens, main, row), norm_tokens(lens, main, row)]
    return Page(figs, title="Backward Lens")


__all__ = ["lens_table", "target_rank_plot", "rank_as_read", "norm_tokens", "render_backward_lens"]
