"""ModelAdapter: attention scale, hook names, weights, readout, refusals; load_model."""

import pytest
import torch

import tl_backward
from tests.reference import assert_no_hooks
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward.core.adapter import apply_rotary, get_adapter


def test_attention_scale_reproduces_the_scores(model):
    """Unmasked hook_attn_scores == q·kᵀ / s, with RoPE'd q/k where the model rotates."""
    _check_scores(model)


def _check_scores(model):
    ad = get_adapter(model)
    tokens = ad.tokenize("the cat sat on the mat").tokens
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(
        ("hook_attn_scores", "hook_q", "hook_k", "hook_rot_q", "hook_rot_k", "hook_cos", "hook_sin")))
    for layer in range(ad.n_layers):
        q, k = cache[ad.hook_name("q", layer)], cache[ad.hook_name("k", layer)]
        if ad.rotary and "blocks.0.attn.hook_cos" not in model.hook_dict:
            # A HookedTransformer rotates with its own buffers and hooks the result (its tables are
            # checked against hook_rot_k in tests/flow/test_hooked_flow.py)
            q, k = cache[ad.hook_name("rot_q", layer)], cache[ad.hook_name("rot_k", layer)]
        elif ad.rotary:
            cos, sin = cache[ad.hook_name("cos", layer)], cache[ad.hook_name("sin", layer)]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if ad.rot_hooks:  # the bridge's own rotated tensors agree with apply_rotary
            assert_close_fp32(q, cache[ad.hook_name("rot_q", layer)], n_terms=2, what="rot_q")  # q·cos + rot(q)·sin
        k = k.repeat_interleave(ad.n_heads // ad.n_kv_heads, dim=2)
        expected = torch.einsum("bqhd,bkhd->bhqk", q, k) / ad.attn_scale(layer)
        causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).tril()
        got = cache[ad.hook_name("attn_scores", layer)]
        assert_close_fp32(got[..., causal], expected[..., causal], n_terms=ad.d_head, what=f"scores L{layer}")


def test_gpt2_inverse_layer_scaling_is_included():
    from tl_backward.zoo.tiny import tiny_model

    model = tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True)
    ad = get_adapter(model)
    assert ad.attn_scale(1) == pytest.approx(2 * ad.attn_scale(0))
    _check_scores(model)


@pytest.mark.bridge_only("compares with the bridged HF modules; a HookedTransformer's weights are its own "
                         "parameters (tests/core/test_hooked.py)")
def test_weights_are_tl_layout_copies(model):
    ad = get_adapter(model)
    assert ad.W_Q(0).shape == (ad.n_heads, ad.d_model, ad.d_head)
    assert ad.W_K(0).shape == (ad.n_kv_heads, ad.d_model, ad.d_head)
    assert ad.W_O(0).shape == (ad.n_heads, ad.d_head, ad.d_model)
    assert ad.W_in(1).shape == (ad.d_model, ad.d_mlp) and ad.W_out(1).shape == (ad.d_mlp, ad.d_model)
    assert ad.W_U.shape == (ad.d_model, ad.d_vocab) and ad.b_U.shape == (ad.d_vocab,)
    w = ad.W_out(0)
    w += 1.0  # a copy: the model must not change
    assert not torch.equal(w, ad.W_out(0))
    # HF storage layout differs per module; the TL view is x @ W.
    hf_out = ad.linear(0, "mlp_out").original_component
    expected = hf_out.weight if type(hf_out).__name__ == "Conv1D" else hf_out.weight.T
    torch.testing.assert_close(ad.W_out(0), expected.detach(), rtol=0, atol=0)  # the same parameter, viewed


def test_unembed_reproduces_logits(model):
    ad = get_adapter(model)
    tokens = ad.tokenize("the cat sat").tokens
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n == f"blocks.{ad.n_layers - 1}.hook_resid_post")
    # ln_final (mean, variance over d_model) then W_U (d_model terms)
    assert_close_fp32(ad.unembed(cache[f"blocks.{ad.n_layers - 1}.hook_resid_post"]), logits, n_terms=2 * ad.d_model)


def test_gqa_head_mapping(llama_model):
    ad = get_adapter(llama_model)
    assert (ad.n_heads, ad.n_kv_heads) == (4, 2)
    assert [ad.kv_head(h) for h in range(4)] == [0, 0, 1, 1]


def test_hook_names_and_layer_errors(model):
    ad = get_adapter(model)
    assert ad.hook_name("pattern", 1) == "blocks.1.attn.hook_pattern"
    # attn_in / mlp_in are derived points on a HookedTransformer (core/hooked.py): no hook of their own
    assert all(ad.hook_name(k, 0) in model.hook_dict or ad.hook_name(k, 0) in ad.derived_hooks
               for k in ("q", "z", "mlp_post", "mlp_in", "attn_in", "resid_pre"))
    with pytest.raises(ValueError, match="out of range"):
        ad.hook_name("pattern", ad.n_layers)
    with pytest.raises(ValueError, match="kind must be"):
        ad.hook_name("patern", 0)
    with pytest.raises(TypeError):
        ad.check_layer("0")


def test_native_bridges_are_adapted_and_non_bridges_refused():
    """boot_native: the pattern hook is on the autograd path (PatternRoute; RA and patching checked
    in tests/attention/test_ra_native.py); anything but a TransformerBridge is a TypeError."""
    from tl_backward.core.attention_kinds import PatternRoute, Unsupported
    from tl_backward.core.compat import TransformerBridge, TransformerBridgeConfig

    cfg = TransformerBridgeConfig(d_model=16, d_head=4, n_layers=1, n_ctx=8, d_vocab=20, n_heads=4, d_mlp=32, act_fn="gelu")
    native = TransformerBridge.boot_native(cfg)
    (route,) = get_adapter(native).routes
    if isinstance(route, Unsupported):  # TransformerLens 3.x: hook_pattern carries the values, no gradient
        assert "NativeAttention" in route.reason and isinstance(route.forward, PatternRoute)
    else:
        assert isinstance(route, PatternRoute)
    with pytest.raises(TypeError, match="TransformerBridge"):
        get_adapter(torch.nn.Linear(2, 2))


def test_load_model_from_a_local_directory_offline(tmp_path, monkeypatch):
    from tl_backward.zoo.tiny import tiny_hf_model, word_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = tiny_hf_model("llama", seed=3)
    hf.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    model = tl_backward.load_model(str(tmp_path))
    assert not model.training
    tokens = get_adapter(model).tokenize("the cat").tokens
    assert_close_fp32(model(tokens), hf(tokens).logits, n_terms=MODEL_TERMS, what="logits")  # a whole forward pass
    assert_no_hooks(model)


def test_load_model_rejects_bad_arguments():
    with pytest.raises(TypeError, match="name"):
        tl_backward.load_model(3)
    with pytest.raises(TypeError, match="dtype"):
        tl_backward.load_model("x", dtype="float32")


def test_load_model_unknown_name_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not load model 'no-such-model-xyz'"):
        tl_backward.load_model("no-such-model-xyz")
