"""GradientCache read as TransformerLens's ActivationCache: key forms, mapping protocol, names=None,
names_filter, and activation_cache()/gradient_cache() with TransformerLens's utilities.

The references are TransformerLens's own: ``model.run_with_cache`` (plain, and with
``incl_bwd=True``, which hooks the same points and runs ``loss.backward()``) on the same model and
tokens, and TransformerLens's ``ActivationCache`` indexing of that cache for the key forms.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import build
from tests.reference import assert_no_hooks, assert_untouched
from tl_backward import capture
from tl_backward.core.compat import get_act_name
from tl_backward.core.metrics import target_nll
from tl_backward.errors import TLBackwardError

PROMPTS = ["the cat sat on", "a dog ran to"]  # same length: no padding, as run_with_cache sees it


def tl_loss(logits, tokens):
    """TransformerLens's ``return_type="loss"``: mean next-token cross-entropy over batch and positions."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def close(actual, expected):
    # Same graph, two backward drivers (autograd.grad from embedding leaves vs loss.backward()):
    # only the accumulation order may differ, so a few fp32 ulps of the tensor's scale.
    scale = expected.abs().max().clamp(min=1e-30)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * float(scale))


@pytest.fixture(scope="module", params=["gpt2", "neox", "llama"])
def runs(request):
    """(model, our cache with names=None, TransformerLens's incl_bwd cache, plain run_with_cache cache)."""
    model = build(request.param)  # fresh: incl_bwd writes parameter .grad
    tokens = model.to_tokens(PROMPTS)
    with warnings.catch_warnings():
        # Backward hooks on hook_scale/hook_normalized switch TL's norms to their Python path (it warns).
        warnings.simplefilter("ignore")
        ours = capture(model, tokens, tl_loss)
        loss, with_bwd = model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    model.zero_grad(set_to_none=True)
    _, plain = model.run_with_cache(tokens)
    assert float(loss.detach()) == pytest.approx(float(ours.metric), rel=1e-6)
    return model, ours, with_bwd, plain


def tl_gradients(with_bwd):
    return {k[: -len("_grad")]: v for k, v in with_bwd.items() if k.endswith("_grad")}


# ------------------------------------------------------------------------------ names=None
def test_names_none_caches_every_hook_point_run_with_cache_does(runs):
    model, ours, with_bwd, plain = runs
    grads = tl_gradients(with_bwd)
    assert set(ours) == set(grads)  # the hook points TransformerLens's own backward reaches
    for name in ours:
        assert torch.equal(ours[name], with_bwd[name]), name  # the same forward tensors
        if name.endswith("hook_resid_mid"):
            # TL's alias (ln2.hook_in) sees the LayerNorm branch only; ours is the full gradient.
            close(ours.grad(name), grads[name.replace("hook_resid_mid", "hook_attn_out")])
        else:
            close(ours.grad(name), grads[name])


def test_names_none_skips_only_hook_points_without_a_gradient(runs):
    model, ours, _, plain = runs
    skipped = sorted(set(plain) - set(ours))
    assert skipped and not set(ours) - set(plain)
    for name in skipped:  # token/position ids, rotary tables: asked for explicitly, they are refused
        with pytest.raises(ValueError, match="no gradient reached"):
            capture(model, PROMPTS, tl_loss, names=[name])
    assert_no_hooks(model)


def test_activations_match_plain_run_with_cache(runs):
    model, ours, _, plain = runs
    for name in ours:
        # Hooked hook_scale/hook_normalized make TL compute the norm on its Python path: the same
        # LayerNorm in another op order, ~1e-7 relative, carried through two layers.
        scale = plain[name].abs().max().clamp(min=1e-30)
        torch.testing.assert_close(ours[name], plain[name], rtol=0, atol=1e-5 * float(scale))
    exact = capture(model, model.to_tokens(PROMPTS), tl_loss,
                    names=lambda n: n.endswith(("hook_resid_pre", "hook_pattern", "hook_z")))
    for name in exact:  # without hooked norm internals, the forward is the unhooked one exactly
        assert torch.equal(exact[name], plain[name]), name


def test_names_none_leaves_no_trace(gpt2_model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = capture(gpt2_model, "the cat sat", target_nll(" big"))
    assert len(cache) > 50
    assert_no_hooks(gpt2_model)
    assert_untouched(gpt2_model)


# ------------------------------------------------------------------------------ key forms
KEYS = [("pattern", 0), ("resid_pre", 1), ("resid_pre", -1), ("attn_scores", 0), ("q", 1, "attn"),
        ("scale", 0, "ln1"), ("normalized", 1, "ln2"), ("mlp_out", 0), ("z", 1), "k1", "pattern0",
        "hook_embed", "blocks.0.attn.hook_pattern", "blocks.1.hook_in", ("resid_post", 1)]


@pytest.mark.parametrize("key", KEYS, ids=str)
def test_key_forms_resolve_as_transformer_lens_does(runs, key):
    model, ours, with_bwd, _ = runs
    assert torch.equal(ours[key], with_bwd[key])  # TL's ActivationCache indexing is the oracle
    assert key in ours
    name, rest = (key, ()) if isinstance(key, str) else (key[0], key[1:])
    gkey = name + "_grad" if not rest else (name + "_grad", *rest)
    grad = with_bwd[_full_name(model, key) + "_grad"]
    close(ours[gkey], grad)
    close(ours.grad(*((key,) if isinstance(key, str) else key)), grad)


def _full_name(model, key):
    if isinstance(key, str):
        return get_act_name(key)
    layer = key[1] + model.cfg.n_layers if key[1] < 0 else key[1]
    return get_act_name(key[0], layer, *key[2:])


def test_legacy_and_canonical_names_serve_each_other(gpt2_model):
    cache = capture(gpt2_model, "the cat sat", target_nll(" big"),
                    names=["blocks.0.attn.hook_pattern", "blocks.0.hook_in", "blocks.1.ln2.hook_in"])
    assert list(cache) == ["blocks.0.attn.hook_pattern", "blocks.0.hook_in", "blocks.1.ln2.hook_in"]
    assert cache["resid_pre", 0] is cache["blocks.0.hook_in"]
    assert cache["blocks.0.hook_resid_pre_grad"] is cache.grad("blocks.0.hook_in")
    assert cache["resid_mid", 1] is cache["blocks.1.ln2.hook_in"]  # same activation
    with pytest.raises(KeyError, match="not captured"):
        cache.grad("resid_mid", 1)  # ln2.hook_in's gradient is the LN branch only, not resid_mid's
    tl = cache.activation_cache()
    assert tl["resid_pre", 0] is cache["blocks.0.hook_in"] and tl["blocks.0.hook_in"] is tl["blocks.0.hook_resid_pre"]
    assert "blocks.1.hook_resid_mid" in tl.cache_dict and "blocks.1.hook_resid_mid" not in cache.gradient_cache().cache_dict


def test_resid_mid_gradient_is_the_full_one_under_every_key_form(gpt2_model):
    cache = capture(gpt2_model, "the cat sat", target_nll(" big"), names=["blocks.0.hook_resid_mid", "blocks.0.hook_attn_out"])
    full = cache.grad("attn_out", 0)  # resid_mid = resid_pre + attn_out: the same gradient
    for got in (cache.grad("resid_mid", 0), cache["resid_mid_grad", 0], cache.gradient_cache()["resid_mid", 0]):
        torch.testing.assert_close(got, full, rtol=0, atol=0)


def test_mapping_protocol(gpt2_model):
    names = ["blocks.0.attn.hook_pattern", "blocks.1.hook_resid_pre"]
    cache = capture(gpt2_model, PROMPTS, target_nll(" big"), names=names)
    assert len(cache) == 2 and list(cache) == names and list(cache.keys()) == names
    assert [k for k, _ in cache.items()] == names
    assert all(v is cache[k] for k, v in zip(names, cache.values()))
    as_dict = dict(cache)
    assert list(as_dict) == names and all(as_dict[k] is cache[k] for k in names)
    assert "pattern0" in cache and ("resid_pre", 1) in cache and "mlp_out0" not in cache
    assert cache.get(("mlp_out", 0)) is None


@pytest.mark.parametrize("key, match", [(("pattern", 1), "names=None"), (("pattern", 5), "out of range"),
                                        (("pattern", -3), "out of range"), (3, "tuple"), (("pattern", "x", 1, 2), "cache keys"),
                                        ("blocks.0.mlp.hook_post", "not captured")])
def test_missing_keys_are_key_errors_that_say_what_to_do(gpt2_model, key, match):
    cache = capture(gpt2_model, "the cat", target_nll(" big"), names=["blocks.0.attn.hook_pattern"])
    with pytest.raises(KeyError, match=match):
        cache[key]


# ------------------------------------------------------------------------------ names / names_filter
def test_names_filter_is_names(gpt2_model):
    pick = lambda n: n.endswith("hook_pattern")  # noqa: E731
    a = capture(gpt2_model, "the cat", target_nll(" big"), names=pick)
    b = capture(gpt2_model, "the cat", target_nll(" big"), names_filter=pick)
    assert list(a) == list(b) == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    assert torch.equal(a.grad("pattern", 1), b.grad("pattern", 1))
    c = capture(gpt2_model, "the cat", target_nll(" big"), names_filter="blocks.0.hook_resid_pre")
    assert list(c) == ["blocks.0.hook_resid_pre"]


@pytest.mark.parametrize("kwargs, argument", [
    (dict(names=42), "names"), (dict(names=[42]), "names"), (dict(names={"hook_embed"}), "names"),
    (dict(names_filter=42), "names_filter"), (dict(names=["hook_embed"], names_filter=["hook_embed"]), "names_filter"),
    (dict(names=[]), "names"), (dict(names=lambda n: False), "names"), (dict(names_filter=lambda n: "qkv" in n), "names_filter"),
])
def test_bad_names_name_the_argument(gpt2_model, kwargs, argument):
    with pytest.raises(TLBackwardError, match=argument) as err:
        capture(gpt2_model, "the cat", target_nll(" big"), **kwargs)
    assert err.value.argument == argument
    assert_no_hooks(gpt2_model)


# ------------------------------------------------------------------------------ TL utilities
def test_activation_cache_utilities_equal_run_with_cache(runs):
    model, ours, with_bwd, _ = runs
    tl = ours.activation_cache()
    assert type(tl) is type(with_bwd) and tl.model is model
    mid = model.cfg.parallel_attn_mlp is not True and "blocks.0.hook_resid_mid" in with_bwd.cache_dict
    assert torch.equal(tl.stack_activation("pattern"), with_bwd.stack_activation("pattern"))
    for kw in (dict(apply_ln=True), dict(incl_mid=mid)):
        a, la = tl.accumulated_resid(return_labels=True, **kw)
        b, lb = with_bwd.accumulated_resid(return_labels=True, **kw)
        assert la == lb and torch.equal(a, b)
    stack, labels = tl.decompose_resid(return_labels=True)
    ref_stack, ref_labels = with_bwd.decompose_resid(return_labels=True)
    assert labels == ref_labels and torch.equal(stack, ref_stack)
    assert torch.equal(tl.apply_ln_to_stack(stack, layer=1), with_bwd.apply_ln_to_stack(stack, layer=1))
    assert torch.equal(tl.logit_attrs(stack, " big", incorrect_tokens=" small"),
                       with_bwd.logit_attrs(stack, " big", incorrect_tokens=" small"))


def _ln(model, stack, scale, final):
    """LN with a fixed (cached) scale: centre for LayerNorm, not for RMSNorm; then divide."""
    centre = model.cfg.normalization_type == "LN" and not (final and getattr(model.cfg, "final_rms", False))
    return (stack - stack.mean(-1, keepdim=True) if centre else stack) / scale


def test_gradient_cache_utilities_work_on_gradients(runs):
    model, ours, with_bwd, plain = runs
    grads, L = tl_gradients(with_bwd), model.cfg.n_layers
    tl = ours.gradient_cache()
    close(tl.stack_activation("pattern"), torch.stack([grads[f"blocks.{l}.attn.hook_pattern"] for l in range(L)]))
    acc, labels = tl.accumulated_resid(return_labels=True)
    assert labels == [*(f"{l}_pre" for l in range(L)), "final_post"]
    close(acc, torch.stack([*(grads[f"blocks.{l}.hook_resid_pre"] for l in range(L)), grads[f"blocks.{L - 1}.hook_resid_post"]]))
    # decompose_resid: the gradient reaching each component's output. Residual identities: an
    # embedding and the MLP output see the gradient of the residual they are added to; a parallel
    # block's attention output too; a sequential block's attn_out is TL's own hook gradient.
    stack, labels = tl.decompose_resid(return_labels=True)
    parallel = bool(model.cfg.parallel_attn_mlp)
    for got, label in zip(stack, labels):
        if label in ("embed", "pos_embed"):
            close(got, grads["blocks.0.hook_resid_pre"])
        else:
            l, kind = label.split("_", 1)
            if kind == "mlp_out" or parallel:
                close(got, grads[f"blocks.{l}.hook_resid_post"])
            else:
                close(got, grads[f"blocks.{l}.hook_attn_out"])
    # LN helpers divide by the *forward* scale (see GradientCache.gradient_cache).
    close(tl.apply_ln_to_stack(stack, layer=1), _ln(model, stack, plain["blocks.1.ln1.hook_scale"], False))
    normed = _ln(model, stack, plain["ln_final.hook_scale"], True)
    direction = model.W_U[:, model.to_single_token(" big")] - model.W_U[:, model.to_single_token(" small")]
    close(tl.logit_attrs(stack, " big", incorrect_tokens=" small"), normed @ direction.detach())
    assert torch.equal(tl["scale", 0, "ln1"], ours["scale", 0, "ln1"])  # forward scale, documented
    assert torch.equal(tl["pattern", 1], ours.grad("pattern", 1))
