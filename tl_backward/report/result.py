"""The report's result types: :class:`Prediction` and :class:`Report` (frozen, data only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from .text import summary_text

__all__ = ["Prediction", "Report"]


@dataclass(frozen=True)
class Prediction:
    """A vocabulary token with its id and the model's probability at the last prompt position."""

    id: int
    token: str
    prob: float


@dataclass(frozen=True, repr=False)
class Report:
    """What :func:`build_report` found for one prompt.

    ``predictions``: the model's top-5 next tokens; ``target`` the scored token (with
    ``target_rank``, 0 = the model's top choice) and ``loss`` its NLL. ``reversed_attention`` /
    ``lens`` / ``flow`` (forward, backward; empty without flow graphs) are the feature results;
    ``flow_layer`` is the most affected layer and ``layer_grad_norms[l]`` =
    ``sqrt(‖∂L/∂W_in‖² + ‖∂L/∂W_out‖²)``. ``notes`` are caveats for the reader; ``page`` the HTML.
    """

    model_name: str
    prompt: str
    str_tokens: tuple[str, ...]
    predictions: tuple[Prediction, ...]
    target: Prediction
    target_rank: int
    target_is_prediction: bool
    loss: float
    d_vocab: int
    layers: tuple[int, ...]
    reversed_attention: Any
    lens: Any
    layer_grad_norms: dict[int, float]
    flow_layer: int
    flow: tuple[Any, ...]
    notes: tuple[str, ...]
    page: Any

    def __repr__(self) -> str:
        return (f"Report({self.model_name}, prompt={self.prompt!r}, target={self.target.token!r}, "
                f"loss={self.loss:.4g}, flow_layer={self.flow_layer})")

    def top_heads(self, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the largest ‖RA‖_F: ``(layer, head, norm)``."""
        return self.reversed_attention.top_heads(k)

    def lens_rows(self, k: int = 5) -> list[dict]:
        """Per layer (last first), at the last prompt token: ``reads`` (top-k of LL(x) at W_in),
        ``writes`` (bottom-k of LL(δ) at W_out), ``delta_norm``, ``x_rank`` (the target's rank in
        LL(x) from the top) and ``delta_rank`` (from the bottom; 0 = what descent writes most)."""
        lens = self.lens
        t = lens.factors.n_tokens - 1  # one prompt: the last factor token is the last prompt token
        rows = []
        for l in reversed(lens.layers):
            li = lens.layer_index(l)
            x, d = lens["mlp_in"], lens["mlp_out"]
            rows.append(dict(
                layer=l,
                reads=lens.decode(x.top_ids[li, t][:k]),
                writes=lens.decode(d.bottom_ids[li, t][:k]),
                delta_norm=float(d.norm[li, t]),
                x_rank=int(x.target_rank[li, t]),
                delta_rank=self.d_vocab - 1 - int(d.target_rank[li, t]),
            ))
        return rows

    def summary(self, k: int = 5) -> str:
        """The short text summary the CLI prints."""
        return summary_text(self, k)

    def __str__(self) -> str:
        return self.summary()

    def save(self, path: Union[str, Path]) -> Path:
        """Write the offline HTML page and return its Path."""
        return self.page.save(path)

    def _repr_html_(self) -> str:
        return self.page._repr_html_()
