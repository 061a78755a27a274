"""A right-padded batch of token ids: the one shape every analysis feeds the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

__all__ = ["Batch"]


@dataclass(frozen=True)
class Batch:
    """Token ids ready for the model, right-padded.

    ``mask`` marks real (non-padding) tokens; ``last`` is each row's last real position.
    """

    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    last: Int[Tensor, " batch"]

    def __repr__(self) -> str:
        B, T = self.tokens.shape
        return f"Batch({B} × {T} tokens, {int(self.mask.sum())} real)"

    @classmethod
    def from_rows(cls, rows: Sequence[Tensor], pad_id: int) -> "Batch":
        """Right-pad a list of 1-D token rows into one batch."""
        lengths = torch.tensor([len(r) for r in rows])
        tokens = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = row
        mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
        return cls(tokens=tokens, mask=mask, last=lengths - 1)

    def rows(self) -> list[Tensor]:
        """The unpadded token rows."""
        return [self.tokens[i, : int(n) + 1] for i, n in enumerate(self.last)]
