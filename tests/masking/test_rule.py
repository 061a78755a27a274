"""The staircase mask equals the pairwise rule; row_end, q_len slicing and positions."""

import pytest
import torch

from tl_backward.masking.rule import position_ids, row_end, staircase_mask

from .helpers import pairwise_mask, random_layout


def test_staircase_equals_pairwise_on_200_random_layouts():
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        length = int(torch.randint(1, 24, (1,), generator=gen))
        side = ("left", "right", None)[trial % 3]
        n_pad = int(torch.randint(0, max(1, length // 2), (1,), generator=gen)) if side else 0
        rows = [random_layout(gen, length, pad_side=side, n_pad=n_pad) for _ in range(2)]
        seg = torch.stack([r[0] for r in rows])
        valid = torch.stack([r[1] for r in rows])
        got = staircase_mask(row_end(seg), valid)
        assert torch.equal(got, pairwise_mask(seg, valid)), (trial, seg, valid)


def test_row_end_values():
    seg = torch.tensor([[0, 0, 0, -1, 1, 1, -1, -1]])
    assert row_end(seg).tolist() == [[2, 2, 2, 3, 5, 5, 6, 7]]


def test_all_causal_is_lower_triangular():
    seg = torch.full((2, 7), -1)
    keep = staircase_mask(row_end(seg), torch.ones(2, 7, dtype=torch.bool))
    assert torch.equal(keep[0, 0], torch.ones(7, 7, dtype=torch.bool).tril())


def test_q_len_uses_absolute_positions():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1, -1, -1]])
    valid = torch.ones(1, 8, dtype=torch.bool)
    full = staircase_mask(row_end(seg), valid)
    for q in (1, 3, 8):
        assert torch.equal(staircase_mask(row_end(seg), valid, q_len=q), full[:, :, -q:])
    with pytest.raises(ValueError, match="q_len"):
        staircase_mask(row_end(seg), valid, q_len=9)


def test_position_ids_skip_padding():
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, False, False]])
    assert position_ids(valid).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_shape_errors():
    with pytest.raises(ValueError, match="batch, pos"):
        row_end(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="row_end and key_valid"):
        staircase_mask(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool))


def test_mask_construction_is_vectorised():
    """No Python loop over positions or batch rows: the number of tensor ops is the same for a
    [1, 8] and a [16, 512] layout (counted at the aten dispatch level)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    def ops(batch, length):
        gen = torch.Generator().manual_seed(batch)
        rows = [random_layout(gen, length, pad_side="left", n_pad=length // 4) for _ in range(batch)]
        seg, valid = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        with Count() as count:
            keep = staircase_mask(row_end(seg), valid)
            position_ids(valid)
        if length <= 16:
            assert torch.equal(keep, pairwise_mask(seg, valid))
        return count.n

    assert ops(1, 8) == ops(16, 512)
