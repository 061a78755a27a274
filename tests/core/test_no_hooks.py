"""tests/reference.py::assert_no_hooks on a bridge TransformerLens boots with permanent hooks of its own
(OPT's fc1/fc2 MLP, component_setup.py ``_wire_symbolic_hooks``): TL's hooks pass, any hook left
behind by someone else still fails."""

import pathlib

import pytest
import torch

import tl_backward
from tests.families import build
from tests.reference import assert_no_hooks
from tl_backward.core.adapter import get_adapter
from tl_backward.core.compat import TL_MAJOR


@pytest.fixture(scope="module")
def opt():
    return build("opt")[1]


def test_transformerlens_wires_permanent_hooks_at_boot(opt):
    hooked = {n for n, hp in opt.hook_dict.items() if hp.fwd_hooks}
    if TL_MAJOR < 4:  # TransformerLens 3.x wires none: its nameless OPT MLP container never fires mlp.hook_in
        assert not hooked
        assert get_adapter(opt).hook_name("mlp_in", 0) == "blocks.0.mlp.in.hook_in"
        return
    assert "blocks.0.mlp.in.hook_in" in hooked and "blocks.1.mlp.out.hook_out" in hooked
    assert all(lh.is_permanent for n in hooked for lh in opt.hook_dict[n].fwd_hooks)
    assert_no_hooks(opt)  # fresh from boot: only TL's own hooks


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_a_transformerlens_hook_left_behind_fails(opt, direction):
    hp = opt.hook_dict["blocks.0.mlp.in.hook_in"]  # already holds TL's permanent hook
    hp.add_hook(lambda t, hook: t, dir=direction)
    try:
        with pytest.raises(AssertionError, match="TL hook left on blocks.0.mlp.in.hook_in"):
            assert_no_hooks(opt)
    finally:
        hp.remove_hooks(direction)  # keeps permanent hooks
    assert_no_hooks(opt)


@pytest.mark.parametrize("kind", ["forward", "backward", "pre"])
def test_a_raw_torch_hook_left_behind_fails(opt, kind):
    hp = opt.hook_dict["blocks.1.mlp.out.hook_out"]
    register = {"forward": hp.register_forward_hook, "backward": hp.register_full_backward_hook,
                "pre": hp.register_forward_pre_hook}[kind]
    handle = register(lambda *a: None)
    try:
        with pytest.raises(AssertionError, match="torch (pre-)?hook left on"):
            assert_no_hooks(opt)
    finally:
        handle.remove()
    assert_no_hooks(opt)


def test_tl_backward_never_adds_a_permanent_hook():
    """So every permanent hook assert_no_hooks lets through is TransformerLens's own."""
    root = pathlib.Path(tl_backward.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if "is_permanent" in p.read_text()]
    assert not offenders, f"tl_backward adds permanent hooks in {offenders}"


def test_tl_backward_calls_leave_only_transformerlens_hooks(opt):
    tokens = torch.tensor([[1, 5, 6, 7]])
    tl_backward.reversed_attention(opt, tokens, 3)
    assert_no_hooks(opt)
