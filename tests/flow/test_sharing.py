"""Projection sharing: nodes whose vectors are identical (or, under the normalised lens, positive
multiples of each other) are projected once. These tests check the claims each share tag makes
against the actual vectors, and that a graph built with sharing equals one built without it."""

import pytest
import torch

from tests.flow.conftest import LAYER, TARGET, TOKENS
import tl_backward.flow.build as build_mod
from tl_backward.flow import flow_graph

# Unpruned (every head, memory and neuron: all share groups are populated) and default pruning.
FULL = dict(n_heads=-1, n_memory=-1, n_top_neurons=-1)
CASES = [
    pytest.param(dict(backward=False), id="forward"),
    pytest.param(dict(backward=False, **FULL), id="forward-full"),
    pytest.param(dict(backward=True), id="backward"),
    pytest.param(dict(backward=True, **FULL), id="backward-full"),
    pytest.param(dict(backward=True, normalize=False, **FULL), id="backward-full-raw-lens"),
]


def _spy(monkeypatch, strip: bool) -> dict:
    """Wrap layer_specs (recording the specs; dropping every share tag if ``strip``) and project
    (recording how many rows were projected)."""
    seen = {"specs": [], "rows": 0}
    real_specs, real_project = build_mod.layer_specs, build_mod.project

    def specs(*args, **kwargs):
        nodes, edges = real_specs(*args, **kwargs)
        if strip:
            for s in nodes:
                s.share = None
                s.extra = [(cap, v, None) for cap, v, _ in s.extra]
        seen["specs"] += nodes
        return nodes, edges

    def project(ad, vectors, *args, **kwargs):
        seen["rows"] += len(vectors)
        return real_project(ad, vectors, *args, **kwargs)

    monkeypatch.setattr(build_mod, "layer_specs", specs)
    monkeypatch.setattr(build_mod, "project", project)
    return seen


def _build(model, monkeypatch, strip: bool, kw: dict):
    with monkeypatch.context() as m:
        seen = _spy(m, strip)
        g = flow_graph(model, TOKENS, layer=LAYER, target=TARGET, **kw)
    return g, seen


@pytest.mark.parametrize("kw", CASES)
def test_share_tags_hold_for_the_vectors(model, monkeypatch, kw):
    """"same" members are bitwise equal; "dir" members are positive multiples of each other."""
    _, seen = _build(model, monkeypatch, False, kw)
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for s in seen["specs"]:
        if s.share is not None:
            groups.setdefault(s.share[0], []).append((s.share[1], s.vector))
        for _, v, share in s.extra:
            if share is not None:
                groups.setdefault(share[0], []).append((share[1], v))
    assert groups, "no share tags at all"
    multi = 0
    for tag, members in groups.items():
        ref = members[0][1].double()
        multi += len(members) > 1
        for how, v in members[1:]:
            v = v.double()
            if how == "same" and members[0][0] == "same":
                assert torch.equal(v, ref), tag
            else:  # at least one side is a multiple: positive collinearity
                cos = float(v @ ref / (v.norm() * ref.norm()))
                assert cos > 1 - 1e-9, (tag, cos)  # an fp32-rounded multiple: 1 − cos = O(eps²) ≈ 1e-14
    assert multi > 0, "no group has two members: the test would check nothing"


@pytest.mark.parametrize("kw", CASES)
def test_sharing_gives_the_unshared_graph(model, monkeypatch, kw):
    shared, s_seen = _build(model, monkeypatch, False, kw)
    plain, p_seen = _build(model, monkeypatch, True, kw)
    # sharing saves projections (backward + raw lens: only "same" groups, possibly none)
    assert s_seen["rows"] <= p_seen["rows"]
    if kw.get("normalize", True):
        assert s_seen["rows"] < p_seen["rows"]
    assert [n.id for n in shared.nodes] == [n.id for n in plain.nodes]
    for a, b in zip(shared.nodes, plain.nodes):
        assert (a.label, a.color, a.target_rank, a.target_bottom_rank) == \
               (b.label, b.color, b.target_rank, b.target_bottom_rank), a.id
        assert [t for t, _ in a.top] == [t for t, _ in b.top], a.id
        assert [t for t, _ in a.bottom] == [t for t, _ in b.bottom], a.id
        # a shared member is its representative up to one fp32 rounding of a positive scale: logits
        # move by ~eps·|logit| (|logit| < 20 here), so probabilities by that relative; 1e-5 ≈ 84 eps
        for x, y in ((a.top, b.top), (a.bottom, b.bottom)):
            torch.testing.assert_close(torch.tensor([p for _, p in x]), torch.tensor([p for _, p in y]),
                                       rtol=1e-5, atol=1e-9)
        if a.entropy is not None:
            assert a.entropy == pytest.approx(b.entropy, rel=1e-5)
            assert a.target_prob == pytest.approx(b.target_prob, rel=1e-5, abs=1e-12)
        # hover text: same lines up to the last digit of printed probabilities
        assert a.title.count("\n") == b.title.count("\n"), a.id
    edge = lambda e: (e.source, e.target, e.kind, e.weight, e.color)  # noqa: E731
    assert [edge(e) for e in shared.edges] == [edge(e) for e in plain.edges]
