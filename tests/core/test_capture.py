"""capture(): exact gradients, batching, leave-no-trace, and clear errors."""

import pytest
import torch

from tl_backward import capture
from tl_backward.core.adapter import get_adapter
from tl_backward.core.metrics import logit_diff, target_nll
from tests.conftest import SPECS
from tests.reference import assert_no_hooks, assert_untouched, hf_activation_grads, last_token_nll
from tests.tolerance import MODEL_TERMS, assert_close_fp32

PROMPTS = ["the cat sat on the mat", "a dog ran to paris"]
KINDS = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_in", "mlp_pre", "mlp_pre_linear",
         "mlp_post", "mlp_out", "q", "k", "v", "z"]


def _kinds(ad):
    return [k for k in KINDS if not (k == "resid_mid" and ad.parallel_blocks)
            and not (k == "mlp_pre_linear" and not ad.gated_mlp)]


@pytest.mark.parametrize("layer", [0, 1])
def test_every_gradient_matches_plain_hf_autograd(model, family, layer):
    ad = get_adapter(model)
    target = int(ad.target_tokens(" big")[0])
    kinds = _kinds(ad)
    names = [ad.hook_name(k, layer) for k in kinds]
    cache = capture(model, PROMPTS, target_nll(" big"), names=names)
    ref = hf_activation_grads(family, tokens=cache.tokens, loss_fn=last_token_nll(target, cache.last),
                              layer=layer, **SPECS[family])
    for kind, name in zip(kinds, names):
        act, grad = ref[kind]
        mask = cache.mask[..., None] if cache[name].ndim == 3 else cache.mask[..., None, None]
        # Right padding: compare real positions only (pad positions never reach the loss anyway).
        assert_close_fp32(cache[name] * mask, act * mask, n_terms=MODEL_TERMS, what=f"{kind} act")
        assert_close_fp32(cache.grad(name), grad, n_terms=MODEL_TERMS, what=f"{kind} grad")  # TL vs HF order


def test_qwen2_gradients_match_plain_hf_autograd():
    """Qwen2 = Llama layout with q/k/v biases and GQA: every kind at layer 1 against plain HF."""
    from tests.conftest import build

    model = build("qwen2")
    ad = get_adapter(model)
    target = int(ad.target_tokens(" big")[0])
    kinds = _kinds(ad)
    names = [ad.hook_name(k, 1) for k in kinds]
    cache = capture(model, PROMPTS, target_nll(" big"), names=names)
    ref = hf_activation_grads("qwen2", tokens=cache.tokens, loss_fn=last_token_nll(target, cache.last), layer=1,
                              **SPECS["qwen2"])
    for kind, name in zip(kinds, names):
        act, grad = ref[kind]
        mask = cache.mask[..., None] if cache[name].ndim == 3 else cache.mask[..., None, None]
        assert_close_fp32(cache[name] * mask, act * mask, n_terms=MODEL_TERMS, what=f"{kind} act")
        assert_close_fp32(cache.grad(name), grad, n_terms=MODEL_TERMS, what=f"{kind} grad")  # TL vs HF order


def test_resid_mid_is_the_full_residual_gradient_not_the_ln2_branch(gpt2_model):
    cache = capture(gpt2_model, "the cat sat", target_nll(" big"),
                    names=["blocks.0.hook_resid_mid", "blocks.0.ln2.hook_in", "blocks.0.hook_resid_post"])
    mid, branch, post = (cache.grad(n) for n in ("blocks.0.hook_resid_mid", "blocks.0.ln2.hook_in", "blocks.0.hook_resid_post"))
    # resid_post = resid_mid + mlp(ln2(resid_mid)): the full gradient is the skip plus the LN2 branch.
    assert_close_fp32(mid, post + branch, n_terms=2)  # autograd adds the two branch gradients
    assert (mid - branch).abs().max() > 1e-4


def test_attention_gradient_identities(model):
    """grad(pattern) = grad(z)·vᵀ (GQA-expanded); grad(scores) = softmax backward of it."""
    ad = get_adapter(model)
    names = [ad.hook_name(k, 1) for k in ("pattern", "attn_scores", "z", "v")]
    cache = capture(model, PROMPTS, target_nll(" big"), names=names)
    pattern, d_pattern, d_scores = cache[names[0]], cache.grad(names[0]), cache.grad(names[1])
    v = cache[names[3]].repeat_interleave(ad.n_heads // ad.n_kv_heads, dim=2)
    expected = torch.einsum("bqhd,bkhd->bhqk", cache.grad(names[2]), v)
    assert_close_fp32(d_pattern, expected, n_terms=ad.d_head, what="grad pattern")
    row = (pattern * d_pattern).sum(-1, keepdim=True)
    # terms p·dP and p·row can cancel; scale by the larger of them, summed over key positions
    assert_close_fp32(d_scores, pattern * (d_pattern - row), n_terms=pattern.shape[-1], what="grad scores",
                      scale=float((pattern * d_pattern).abs().max()))


def test_batch_equals_sum_of_single_runs(model):
    names = lambda n: n.endswith(("hook_pattern", "hook_resid_pre"))  # noqa: E731
    batch = capture(model, PROMPTS, target_nll(" big"), names=names)
    singles = [capture(model, p, target_nll(" big"), names=names) for p in PROMPTS]
    assert_close_fp32(batch.metric, sum(s.metric for s in singles), n_terms=MODEL_TERMS, what="metric")
    for i, single in enumerate(singles):
        n = single.tokens.shape[1]
        for key in single.keys():
            g = batch.grad(key)[i]
            g = g[:, :n, :n] if g.ndim == 3 else g[:n]
            # batched matmuls accumulate in another order than single rows: fp32 spread, not bitwise
            assert_close_fp32(g, single.grad(key)[0], n_terms=MODEL_TERMS, what=f"row {i} {key}")


def test_multi_token_target_is_teacher_forced_sum(gpt2_model):
    whole = capture(gpt2_model, "the cat sat", target_nll(" on the mat"), names=["hook_embed"])
    parts = [capture(gpt2_model, prompt, target_nll(word), names=["hook_embed"])
             for prompt, word in [("the cat sat", " on"), ("the cat sat on", " the"), ("the cat sat on the", " mat")]]
    assert_close_fp32(whole.metric, sum(p.metric for p in parts), n_terms=MODEL_TERMS, what="metric")
    assert whole.tokens.shape[1] == 6  # BOS + 3 prompt tokens + 2 of the 3 target tokens


def test_logit_diff_and_callable_metrics_agree(gpt2_model):
    ad = get_adapter(gpt2_model)
    a, b = int(ad.target_tokens(" big")[0]), int(ad.target_tokens(" small")[0])
    c1 = capture(gpt2_model, "the cat sat", logit_diff(" big", " small"), names=["blocks.0.hook_resid_pre"])
    c2 = capture(gpt2_model, "the cat sat", lambda logits, tokens: logits[0, -1, a] - logits[0, -1, b],
                 names=["blocks.0.hook_resid_pre"])
    assert_close_fp32(c1.metric, c2.metric, n_terms=2)  # both are one difference of two logits
    assert_close_fp32(c1.grad("blocks.0.hook_resid_pre"), c2.grad("blocks.0.hook_resid_pre"), n_terms=MODEL_TERMS)


def test_leaves_no_trace(model):
    tokens = get_adapter(model).tokenize(PROMPTS).tokens
    before = model(tokens).detach().clone()
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    try:
        capture(model, PROMPTS, target_nll(" big"), names=lambda n: "hook_pattern" in n)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    assert [p.requires_grad for p in model.parameters()] == flags
    assert_untouched(model)
    assert_no_hooks(model)
    assert torch.equal(model(tokens), before)


def test_leaves_no_trace_when_the_metric_raises(gpt2_model):
    def broken(logits, tokens):
        raise RuntimeError("metric exploded")

    with pytest.raises(RuntimeError, match="metric exploded"):
        capture(gpt2_model, "the cat sat", broken, names=["blocks.0.attn.hook_pattern"])
    assert_no_hooks(gpt2_model)
    assert_untouched(gpt2_model)
    assert all(p.requires_grad for p in gpt2_model.parameters())


def test_cache_interface(gpt2_model):
    cache = capture(gpt2_model, PROMPTS, target_nll(" big"),
                    names=lambda n: n.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post")))
    assert cache.resid_grads("mid").shape == (2, 2, cache.tokens.shape[1], 32)
    assert cache["blocks.1.hook_resid_pre_grad"] is cache.gradients["blocks.1.hook_resid_pre"]
    assert "blocks.0.hook_resid_post" in cache and set(cache.keys()) == set(cache.activations)
    assert cache.str_tokens[1] == ["<bos>", "a", "dog", "ran", "to", "paris"]
    assert cache.last.tolist() == [6, 5] and cache.mask.sum().item() == 13
    assert cache.to("cpu").metric == cache.metric
    logits = gpt2_model(cache.tokens)
    assert_close_fp32(cache.last_logits, logits[[0, 1], [6, 5]], n_terms=MODEL_TERMS)  # a second forward pass
    with pytest.raises(KeyError, match="hook_resid_pre"):
        capture(gpt2_model, "the cat", target_nll(" big"), names=["hook_embed"]).resid_grads("pre")


def test_names_are_kept_as_asked_and_canonical_names_work(gpt2_model):
    cache = capture(gpt2_model, "the cat", target_nll(" big"), names=["blocks.0.hook_resid_pre", "blocks.0.hook_in"])
    assert set(cache.keys()) == {"blocks.0.hook_resid_pre", "blocks.0.hook_in"}
    # two names of one hook point: the same tensor
    torch.testing.assert_close(cache.grad("blocks.0.hook_resid_pre"), cache.grad("blocks.0.hook_in"), rtol=0, atol=0)


def test_half_precision_model_caches_fp32():
    from tests.conftest import build

    model = build("gpt2").to(torch.bfloat16)
    cache = capture(model, "the cat sat", target_nll(" big"), names=["blocks.0.attn.hook_pattern"])
    assert cache["blocks.0.attn.hook_pattern"].dtype == torch.float32
    assert cache.grad("blocks.0.attn.hook_pattern").dtype == torch.float32
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(input="the cat", metric=target_nll(" big"), names=["blocks.0.attn.hook_patern"]), ValueError, "hook_pattern"),
        (dict(input="   ", metric=target_nll(" big"), names=["hook_embed"]), ValueError, "empty"),
        (dict(input=[], metric=target_nll(" big"), names=["hook_embed"]), ValueError, "empty"),
        (dict(input="the cat", metric=target_nll(""), names=["hook_embed"]), ValueError, "target is empty"),
        (dict(input="the cat", metric=target_nll(" zebra"), names=["hook_embed"]), ValueError, "not in the model's vocabulary"),
        (dict(input=" ".join(["cat"] * 80), metric=target_nll(" big"), names=["hook_embed"]), ValueError, "n_ctx"),
        (dict(input="the cat", metric=lambda l, t: l[0, -1], names=["hook_embed"]), ValueError, "scalar"),
        (dict(input="the cat", metric=lambda l, t: l[0, -1, 0].detach(), names=["hook_embed"]), ValueError, "no autograd graph"),
        (dict(input="the cat", metric=lambda l, t: 1.0, names=["hook_embed"]), TypeError, "scalar tensor"),
        (dict(input="the cat", metric=" big", names=["hook_embed"]), TypeError, "target_nll"),
        (dict(input=3.5, metric=target_nll(" big"), names=["hook_embed"]), TypeError, "input must be"),
        (dict(input=torch.tensor([[1.0, 2.0]]), metric=target_nll(" big"), names=["hook_embed"]), TypeError, "integer"),
        (dict(input=torch.tensor([[1, 999]]), metric=target_nll(" big"), names=["hook_embed"]), ValueError, "vocabulary"),
        (dict(input="the cat", metric=target_nll(" big"), names=[]), ValueError, "names is empty"),
        (dict(input="the cat", metric=target_nll(" big"), names=lambda n: False), ValueError, "matched no hook"),
        (dict(input=["a cat", "a dog"], metric=target_nll([" big"]), names=["hook_embed"]), ValueError, "one target per prompt"),
    ],
)
def test_bad_input_gets_a_clear_error(gpt2_model, kwargs, error, match):
    with pytest.raises(error, match=match):
        capture(gpt2_model, kwargs.pop("input"), kwargs.pop("metric"), **kwargs)
    assert_no_hooks(gpt2_model)


def test_resid_mid_on_parallel_blocks_explains_itself(neox_model):
    with pytest.raises(ValueError, match="parallel"):
        capture(neox_model, "the cat", target_nll(" big"), names=["blocks.0.hook_resid_mid"])
