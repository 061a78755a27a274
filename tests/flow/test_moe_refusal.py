"""Flow graphs and regularisation neurons on mixture-of-experts models: refused up front, with one
TLBackwardError that names the feature, why (per-expert neurons, routed per token) and what works
instead, before any forward pass (no hook is registered, no weight touched)."""

import pytest

from tests.families import build
from tests.reference import assert_no_hooks, assert_untouched
from tl_backward import flow_graph
from tl_backward.errors import TLBackwardError
from tl_backward.flow import flow_hook_names, regularisation_neurons


@pytest.fixture(scope="module")
def olmoe():
    return build("olmoe")[1]


@pytest.mark.parametrize("call", [
    lambda m: flow_graph(m, "the cat sat", layer=1, target=" dog"),
    lambda m: flow_graph(m, "the cat sat", layer=[0, 1], target=" dog", backward=True),
    lambda m: flow_hook_names(m, 0, backward=True),
    lambda m: regularisation_neurons(m, ["the cat sat", "a dog"], top=4),
], ids=["forward", "backward", "hook_names", "regularisation_neurons"])
def test_refused_naming_why_and_what_works(olmoe, call):
    with pytest.raises(TLBackwardError) as err:
        call(olmoe)
    msg = str(err.value)
    assert err.value.argument == "model"  # every layer is sparse: no layers= choice helps
    assert "mixture-of-experts" in msg and "OlmoeSparseMoeBlock" in msg
    assert "expert_lens" in msg[:160]  # what works instead survives the README matrix's 160 characters
    assert "per-expert neurons routed per token" in msg
    assert "expert_lens" in msg and "gradient_factors" in msg
    assert msg.split(" ")[0] in ("flow_graph", "regularisation_neurons")
    assert_no_hooks(olmoe)
    assert_untouched(olmoe)
