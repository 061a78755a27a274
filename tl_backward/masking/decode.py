"""The decode loop both ``mas_generate`` backends share (``generate.py`` on a bridge, ``hooked.py`` on a
HookedTransformer): pick a token per row, pad rows that finished, stop at EOS or the step budget."""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def decode_loop(next_logits: Float[Tensor, "batch vocab"], step: Callable[[Tensor, int], Tensor],
                max_new_tokens: int, pick: Callable[[Tensor], Tensor], eos_token_id: int | None,
                pad: int) -> tuple[Int[Tensor, "batch new"], Bool[Tensor, "batch new"]]:
    """Greedy / sampled decoding from the prefill's last-real-token logits.

    ``pick(logits [batch, vocab]) -> ids [batch]`` chooses each token; ``step(new [batch], i)`` runs one
    cached decode step on the new ids and returns the next ``[batch, vocab]`` logits (on the device of
    ``next_logits``). A row that produced ``eos_token_id`` gets ``pad`` and ``valid = False`` afterwards.
    Returns ``(new_tokens, new_valid)`` on the CPU.
    """
    done = torch.zeros(next_logits.shape[0], dtype=torch.bool, device=next_logits.device)
    out, alive = [], []
    for i in range(max_new_tokens):
        new = torch.where(done, torch.full_like(done, pad, dtype=torch.long), pick(next_logits))
        out.append(new)
        alive.append(~done)
        if eos_token_id is not None:
            done = done | (new == eos_token_id)
        if i == max_new_tokens - 1 or bool(done.all()):
            break
        next_logits = step(new, i)
    return torch.stack(out, 1).cpu(), torch.stack(alive, 1).cpu()
