"""Gradient factors against autograd (spec backward_lens.md §1-2, §9).

Independent route: a *plain* Hugging Face model with the fixture's weights
(``tiny_hf_model(family, **SPECS[family])``, no TransformerLens) computes the same loss, and
``torch.autograd.grad`` gives the gradient of every HF weight. Each test maps the HF gradient to
TransformerLens layout by hand, per family: GPT-2's fused ``c_attn`` (Conv1D ``[d, 3d]``) is split
into q/k/v *columns*, GPT-NeoX's fused ``query_key_value`` (Linear ``[3d, d]``) into rows ordered
``[head, (q,k,v), d_head]``, and ``nn.Linear`` weights are transposed. A second test repeats the
check on the bridge's own parameters (``<m>.original_component.weight``), the ones an SGD step or
an edit would change.
"""

import pytest
import torch

from tests.conftest import SPECS, build
from tests.reference import assert_no_hooks, assert_untouched, last_token_nll
from tests.tolerance import MODEL_TERMS, fp32_rtol
from tl_backward.core.adapter import get_adapter
from tl_backward.lens import gradient_factors
from tl_backward.zoo.tiny import tiny_hf_model

PROMPTS = ["the capital of france is", "a big dog ran"]
TOL = fp32_rtol(MODEL_TERMS)  # norm-wise relative error of a whole-model backward, TL vs plain HF


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def hf_tl_grads(family, hf, grads, layer):
    """HF weight gradients of one layer -> {module: TL-layout gradient}, written per family."""
    n_heads = SPECS[family]["n_heads"]
    kv = SPECS[family].get("n_kv_heads", n_heads)
    g = {name: grads[p] for name, p in _hf_params(family, hf, layer).items()}
    d = g["mlp_in"].shape[0] if family == "gpt2" else g["mlp_in"].shape[1]
    dh = d // n_heads
    out = {}
    if family == "gpt2":  # Conv1D [in, out] everywhere; c_attn columns = [q | k | v], head-major
        for i, m in enumerate("qkv"):
            out[m] = g["qkv"][:, i * d:(i + 1) * d].reshape(d, n_heads, dh).permute(1, 0, 2)
        out["o"] = g["o"].reshape(n_heads, dh, d)
        out["mlp_in"], out["mlp_out"] = g["mlp_in"], g["mlp_out"]
    elif family == "neox":  # Linear [out, in]; fused rows = [head, (q, k, v), d_head]
        fused = g["qkv"].reshape(n_heads, 3, dh, d)
        for i, m in enumerate("qkv"):
            out[m] = fused[:, i].transpose(1, 2)
        out["o"] = g["o"].T.reshape(n_heads, dh, d)
        out["mlp_in"], out["mlp_out"] = g["mlp_in"].T, g["mlp_out"].T
    else:  # Llama: separate Linear q/k/v (k/v per kv head), gated MLP
        out["q"] = g["q"].reshape(n_heads, dh, d).transpose(1, 2)
        out["k"] = g["k"].reshape(kv, dh, d).transpose(1, 2)
        out["v"] = g["v"].reshape(kv, dh, d).transpose(1, 2)
        out["o"] = g["o"].T.reshape(n_heads, dh, d)
        out["mlp_in"], out["mlp_gate"], out["mlp_out"] = g["mlp_in"].T, g["mlp_gate"].T, g["mlp_out"].T
    return out


def _hf_params(family, hf, layer):
    if family == "gpt2":
        b = hf.transformer.h[layer]
        return dict(qkv=b.attn.c_attn.weight, o=b.attn.c_proj.weight, mlp_in=b.mlp.c_fc.weight,
                    mlp_out=b.mlp.c_proj.weight)
    if family == "neox":
        b = hf.gpt_neox.layers[layer]
        return dict(qkv=b.attention.query_key_value.weight, o=b.attention.dense.weight,
                    mlp_in=b.mlp.dense_h_to_4h.weight, mlp_out=b.mlp.dense_4h_to_h.weight)
    b = hf.model.layers[layer]
    return dict(q=b.self_attn.q_proj.weight, k=b.self_attn.k_proj.weight, v=b.self_attn.v_proj.weight,
                o=b.self_attn.o_proj.weight, mlp_in=b.mlp.up_proj.weight, mlp_gate=b.mlp.gate_proj.weight,
                mlp_out=b.mlp.down_proj.weight)


def target_id(model, word=" paris"):
    return int(get_adapter(model).target_tokens(word)[0])


def test_reconstruct_matches_plain_hf_autograd(model, family):
    """Σ x⊗δ == ∂L/∂W of a plain HF model, every module and layer, batch of 2 with padding."""
    gf = gradient_factors(model, PROMPTS, " paris", modules="all", prepend_bos=True)
    assert gf.tokens.shape[0] == 2 and not bool(gf.mask.all())  # padding really present
    hf = tiny_hf_model(family, **SPECS[family])
    params = {(l, k): p for l in range(2) for k, p in _hf_params(family, hf, l).items()}
    loss = last_token_nll(target_id(model), gf.last)(hf(gf.tokens).logits)
    grads = dict(zip(params.values(), torch.autograd.grad(loss, list(params.values()))))
    assert torch.allclose(loss.detach(), gf.metric, rtol=TOL, atol=0)
    for l in range(2):
        ref = hf_tl_grads(family, hf, grads, l)
        assert set(ref) == set(gf.modules)
        for m, g in ref.items():
            got = gf[l, m].reconstruct()
            assert got.shape == g.shape, (l, m)
            assert rel_err(got, g) <= TOL, (family, l, m, rel_err(got, g))


def test_reconstruct_matches_bridge_parameter_grad(family):
    """The same check against the parameter the bridge uses (GPT-2's split q/k/v share c_attn)."""
    model = build(family)
    ad = get_adapter(model)
    gf = gradient_factors(model, "the cat sat on the", " mat", modules="all", prepend_bos=True)
    for p in model.parameters():
        p.requires_grad_(False)
    mods = {(l, m): ad.linear(l, m).original_component for l in range(2) for m in gf.modules}
    weights = [mod.weight for mod in mods.values()]
    for w in weights:
        w.requires_grad_(True)
    logits = model(gf.tokens, return_type="logits")
    loss = last_token_nll(target_id(model, " mat"), gf.last)(logits)
    grads = torch.autograd.grad(loss, weights)
    from transformers.pytorch_utils import Conv1D

    for ((l, m), mod), g in zip(mods.items(), grads):
        dense = gf[l, m].reconstruct()
        if m in ("q", "k", "v"):  # [head, d_model, d_head] -> [d_model, head*d_head] = [in, out]
            dense = dense.permute(1, 0, 2).reshape(dense.shape[1], -1)
        elif m == "o":  # [head, d_head, d_model] -> [head*d_head, d_model]
            dense = dense.reshape(-1, dense.shape[-1])
        hf_layout = dense if isinstance(mod, Conv1D) else dense.T
        assert rel_err(hf_layout, g) <= TOL, (family, l, m)


def test_ranks_and_last_layer(model, family):
    gf = gradient_factors(model, "the big dog sat on a red mat", " cat", modules="all", prepend_bos=True)
    n = gf.n_tokens
    ad = get_adapter(model)
    last = ad.n_layers - 1
    for (l, m), f in gf.items():
        r = f.rank()
        dense = torch.linalg.matrix_rank(f.reconstruct(torch.float64))
        assert torch.equal(r, dense), (l, m, r, dense)
        assert bool((r <= n).all())
    # last layer: only the last position's δ is non-zero -> the MLP gradients have rank 1
    assert bool((gf[last, "mlp_out"].delta[:-1] == 0).all())
    assert bool(gf[last, "mlp_out"].delta[-1].abs().sum() > 0)
    assert int(gf[last, "mlp_out"].rank()) == 1 and int(gf[last, "mlp_in"].rank()) == 1
    # a generic earlier layer: full rank min(n, d); distinct tokens, so distinct MLP inputs
    assert int(gf[0, "mlp_in"].rank()) == min(n, ad.d_model)
    assert int(gf[0, "mlp_out"].rank()) == min(n, ad.d_model)


def test_multi_token_target_is_teacher_forced(gpt2_model):
    """Two target tokens -> two loss positions -> the last MLP gradient has rank 2."""
    gf = gradient_factors(gpt2_model, "the capital of", " france is", prepend_bos=True)
    assert gf.tokens.shape[1] == 1 + 3 + 1  # BOS + prompt + target[:-1]
    assert int(gf[-1, "mlp_out"].rank()) == 2


def test_svd_and_norms(llama_model):
    gf = gradient_factors(llama_model, "the cat sat on the mat", " dog", modules=("mlp_in", "k", "o"),
                          prepend_bos=True)
    for m in ("mlp_in", "k", "o"):
        f = gf[0, m]
        dense = f.reconstruct(torch.float64)
        svd = f.svd()
        # float64 (eps 2.2e-16) and backward-stable SVDs: errors ~ n·eps·‖A‖ ≈ 1e-14·max|A|
        assert torch.allclose(svd.reconstruct(), dense, atol=1e-12 * float(dense.abs().max()) + 1e-14)
        ref = torch.linalg.svdvals(dense)
        assert torch.allclose(svd.S, ref[..., : svd.S.shape[-1]], rtol=1e-9, atol=1e-14)
        top2 = f.svd(2)
        assert top2.U.shape[-1] == 2 and top2.V.shape[-2:] == (dense.shape[-1], 2)
        nrm = f.norms()
        assert torch.allclose(nrm.grad, dense.flatten(-2).norm(dim=-1), rtol=1e-9)  # float64, Gram route
        assert torch.equal(nrm.term, nrm.x * nrm.delta)  # the same float64 product
        assert torch.equal(nrm.x, f.x.double().norm(dim=-1))  # the same float64 norm
    with pytest.raises(ValueError, match="k must be a positive int"):
        gf[0, "k"].svd(0)


def test_layout_heads_and_storage(llama_model):
    ad = get_adapter(llama_model)
    gf = gradient_factors(llama_model, "the cat sat", " on", modules="all", prepend_bos=True)
    n = gf.n_tokens
    assert gf[1, "q"].x.shape == (ad.n_heads, n, ad.d_model)
    assert gf[1, "k"].delta.shape == (ad.n_kv_heads, n, ad.d_head)  # GQA: kv heads
    assert gf[1, "o"].x.shape == (ad.n_heads, n, ad.d_head)
    assert gf[1, "q"].reconstruct().shape == ad.W_Q(1).shape
    assert gf[1, "o"].reconstruct().shape == ad.W_O(1).shape
    assert gf[1, "mlp_in"].reconstruct().shape == ad.W_in(1).shape
    assert gf[1, "mlp_out"].reconstruct().shape == ad.W_out(1).shape
    h1 = gf[1, "q", 1]
    assert h1.x.shape == (n, ad.d_model) and torch.equal(h1.reconstruct(), gf[1, "q"].reconstruct()[1])
    # q/k/v (and in/gate) read the same input: stored once
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert ptr(gf[1, "q"].x) == ptr(gf[1, "k"].x) == ptr(gf[1, "v"].x)
    assert ptr(gf[1, "mlp_in"].x) == ptr(gf[1, "mlp_gate"].x)
    assert gf.nbytes() < sum(f.x.numel() * 4 + f.delta.numel() * 4 for _, f in gf.items())
    assert gf.token_strs[0] == "<bos>" and len(gf.token_strs) == n


def test_select_tokens_splits_the_gradient(llama_model):
    """Selected tokens and their complement add up to the full gradient (∂L/∂W = Σ_i x_i ⊗ δ_i is
    a sum over tokens); each part equals the sum over its own rows of the full factors."""
    gf = gradient_factors(llama_model, ["the cat sat", "a dog"], [" on", " ran"], modules="all", prepend_bos=True)
    n = gf.n_tokens
    part, rest = gf.select_tokens([-1, 0, 2]), gf.select_tokens([i for i in range(n) if i not in (0, 2, n - 1)])
    assert part.positions.tolist() == [gf.positions[i].tolist() for i in (n - 1, 0, 2)]
    assert int(part.mask.sum()) == 3 and bool(part.mask[tuple(gf.positions[0].tolist())])
    assert part.token_strs == [gf.token_strs[i] for i in (n - 1, 0, 2)]
    for key, full in gf.items():
        whole = full.reconstruct(torch.float64)
        a, b = part.factors[key].reconstruct(torch.float64), rest.factors[key].reconstruct(torch.float64)
        assert float((a + b - whole).norm() / whole.norm()) < 1e-12  # fp64 sums of the same fp32 terms
        rows = torch.tensor([n - 1, 0, 2])
        ref = torch.einsum("...ti,...to->...io", full.x[..., rows, :].double(), full.delta[..., rows, :].double())
        assert torch.allclose(a, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert ptr(part[1, "q"].x) == ptr(part[1, "k"].x) == ptr(part[1, "v"].x)  # sharing survives
    assert part[1, "q"].x.stride(0) == 0  # the head axis stays an expand view
    assert gf.select_tokens(slice(-2, None)).positions.tolist() == gf.positions[-2:].tolist()
    for bad, match in (([], "at least one"), ([1, 1], "each once"), ([n], "out of range"), ("0", "slice or")):
        with pytest.raises(ValueError, match=match):
            gf.select_tokens(bad)


def test_leaves_no_trace(gpt2_model):
    before = [p.detach().clone() for p in gpt2_model.parameters()]
    gradient_factors(gpt2_model, "the cat", " sat", modules="all")
    assert_no_hooks(gpt2_model)
    assert_untouched(gpt2_model)
    with pytest.raises(ValueError):
        gradient_factors(gpt2_model, "the cat", " sat", modules="all", layers=9)
    assert_no_hooks(gpt2_model)
    assert all(torch.equal(a, b) for a, b in zip(before, gpt2_model.parameters()))
    assert all(p.requires_grad for p in gpt2_model.parameters())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(modules=("mlp_in", "attn")), ValueError, "unknown module 'attn'"),
        (dict(modules="mlp_gate"), ValueError, "only for gated MLPs"),
        (dict(modules=()), ValueError, "modules is empty"),
        (dict(modules=3), TypeError, "modules must be"),
        (dict(layers=2), ValueError, "out of range"),
        (dict(layers=[0, -5]), ValueError, "out of range"),
        (dict(metric=lambda logits, toks: logits.sum()), ValueError, "exactly one of target"),
    ],
)
def test_bad_input(gpt2_model, kwargs, error, match):
    with pytest.raises(error, match=match):
        gradient_factors(gpt2_model, "the cat", " sat", **kwargs)


def test_bad_target_and_indexing(gpt2_model):
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        gradient_factors(gpt2_model, "the cat", " zebra")
    gf = gradient_factors(gpt2_model, "the cat", " sat", layers=1)
    with pytest.raises(KeyError, match="available layers"):
        gf[0, "mlp_in"]
    with pytest.raises(KeyError, match="not computed"):
        gf[1, "q"]
    with pytest.raises(ValueError, match="no heads"):
        gf[1, "mlp_in", 0]
    assert gf[-1, "mlp_in"] is gf[1, "mlp_in"]


def test_metric_callable(neox_model):
    """A custom metric (logit difference) works and matches the HF gradient as well."""
    ad = get_adapter(neox_model)
    a, b = (int(ad.target_tokens(w)[0]) for w in (" paris", " rome"))
    metric = lambda logits, toks: (logits[:, -1, a] - logits[:, -1, b]).sum()  # noqa: E731
    gf = gradient_factors(neox_model, "the capital of italy is", metric=metric, modules="mlp_out", prepend_bos=True)
    hf = tiny_hf_model("neox", **SPECS["neox"])
    w = hf.gpt_neox.layers[0].mlp.dense_4h_to_h.weight
    (g,) = torch.autograd.grad(metric(hf(gf.tokens).logits, gf.tokens), [w])
    assert rel_err(gf[0, "mlp_out"].reconstruct(), g.T) <= TOL
