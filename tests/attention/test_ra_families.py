"""Reversed Attention and attention patching on more TransformerLens 4.3 families, against plain HF.

BLOOM (ALiBi, ``inv_norm_factor``), MPT (ALiBi, ``attn_config.softmax_scale``), SmolLM3 (GQA, NoPE
layers): score hook on the autograd path. GPT-J (rotary), OPT (q pre-scaled), GPT-Neo (no scale,
local layers): the generic HF-delegating ``AttentionBridge``, read through z = P·V. Gemma-2 with
attention soft-capping: RA with respect to the logits before the cap.

The reference is a deep copy of the same HF model taken before booting the bridge (so it never runs
a TransformerLens component): ∂L/∂P by autograd on the probabilities ``output_attentions=True``
returns, the softmax-backward formula and ÷ s with s computed here from the config. For Gemma-2 the
eager attention function is replaced by an explicit recomputation (checked to reproduce HF's logits)
that exposes A = Q Kᵀ, and ∂L/∂A is read by autograd, so the tanh factor is not assumed.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    Gemma2Config,
    GPTJConfig,
    GPTNeoConfig,
    MptConfig,
    OPTConfig,
    SmolLM3Config,
)
from transformers.models.gemma2 import modeling_gemma2

from tests.reference import assert_untouched
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward.attention import patch_attention, ra_hook_names, reversed_attention, reversed_attention_from_cache
from tl_backward.core.adapter import get_adapter
from tl_backward.core.attention_kinds import ScoreRoute, ValueRoute
from tl_backward.core.capture import capture
from tl_backward.core.compat import TransformerBridge
from tl_backward.core.metrics import target_nll
from tl_backward.errors import TLBackwardError
from tl_backward.flow import flow_graph
from tl_backward.zoo.tiny import word_tokenizer

PROMPT, TARGET = "the cat sat on the mat and the dog", " ran"
D, H = 32, 4  # hidden size and heads everywhere: d_head 8
REL = 1e-4  # relative Frobenius error allowed against plain HF (fp32; measured ≤ ~1e-6)
MPT_SCALE, GEMMA_QUERY_SCALAR = 0.3, 16  # chosen to differ from 1/√d_head
SOFTCAP = 0.5  # small enough that 1 − tanh² is far from 1 on these scores


def _common(vocab):
    return dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)


# family -> (HF config, s expected from that config: S = Q Kᵀ / s, route class)
def _configs(vocab):
    c = _common(vocab)
    sqrt_d = (D // H) ** 0.5
    return {
        "bloom": (BloomConfig(hidden_size=D, n_layer=2, n_head=H, **c), sqrt_d, ScoreRoute),
        "mpt": (MptConfig(d_model=D, n_heads=H, n_layers=2, expansion_ratio=2, max_seq_len=64,
                          attn_config={"softmax_scale": MPT_SCALE}, **c), 1 / MPT_SCALE, ScoreRoute),
        "smollm3": (SmolLM3Config(hidden_size=D, num_attention_heads=H, num_key_value_heads=2, num_hidden_layers=3,
                                  intermediate_size=64, no_rope_layers=[1, 0, 1], max_position_embeddings=64,
                                  tie_word_embeddings=False, **c), sqrt_d, ScoreRoute),
        "gptj": (GPTJConfig(n_embd=D, n_head=H, n_layer=2, rotary_dim=4, n_positions=64, n_inner=64,
                            tie_word_embeddings=False, **c), sqrt_d, ValueRoute),
        "opt": (OPTConfig(hidden_size=D, num_attention_heads=H, num_hidden_layers=2, ffn_dim=64,
                          word_embed_proj_dim=D, max_position_embeddings=64, **c), sqrt_d, ValueRoute),
        "gptneo": (GPTNeoConfig(hidden_size=D, num_heads=H, num_layers=2, attention_types=[[["global", "local"], 1]],
                                window_size=4, max_position_embeddings=64, intermediate_size=64, **c), 1.0, ValueRoute),
        "gemma2": (Gemma2Config(hidden_size=D, num_attention_heads=H, num_key_value_heads=2, head_dim=D // H,
                                num_hidden_layers=2, intermediate_size=64, attn_logit_softcapping=SOFTCAP,
                                query_pre_attn_scalar=GEMMA_QUERY_SCALAR, sliding_window=4,
                                max_position_embeddings=64, **c), GEMMA_QUERY_SCALAR ** 0.5, ScoreRoute),
    }


FAMILIES = ("bloom", "mpt", "smollm3", "gptj", "opt", "gptneo", "gemma2")


class Family:
    """A booted bridge, its plain-HF twin (same weights) and what the config says s is."""

    def __init__(self, name: str, seed: int):
        tok = word_tokenizer()
        cfg, self.scale, self.route = _configs(len(tok))[name]
        cfg._attn_implementation = "eager"
        cfg.initializer_range = cfg.init_std = 0.1  # matrices N(0, 0.1): scores of order 1 (OPT reads init_std)
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # perturb norm gains and biases so that none is trivially 1 or 0
            for n, p in hf.named_parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
        self.name, self.hf = name, copy.deepcopy(hf)
        self.bridge = TransformerBridge.boot_transformers(f"tiny-{name}", hf_model=hf, tokenizer=tok).eval()
        ad = get_adapter(self.bridge)
        self.ids = ad.tokenize(PROMPT, prepend_bos=True).tokens
        self.hooks = _hooks(self.bridge)  # OPT's bridge carries permanent hooks of its own
        self.target = int(ad.target_tokens(TARGET)[0])

    def loss(self, logits):
        return -torch.log_softmax(logits[0, -1].float(), -1)[self.target]

    def reference(self):
        """(RA [layer, 1, head, q, k], P, dP, ∂L/∂resid_pre per layer, resid_pre) from plain HF."""
        logits_store = []
        with torch.enable_grad():
            if self.name == "gemma2":
                with _explicit_gemma2_attention(logits_store):
                    out = self.hf(self.ids, output_attentions=True, output_hidden_states=True)
                with torch.no_grad():
                    plain = self.hf(self.ids).logits
                assert_close_fp32(out.logits, plain, n_terms=MODEL_TERMS, what="explicit recomputation")
            else:
                out = self.hf(self.ids, output_attentions=True, output_hidden_states=True)
            n = len(out.attentions)
            hidden = out.hidden_states[:n]  # block inputs = resid_pre of each layer
            grads = torch.autograd.grad(self.loss(out.logits), [*out.attentions, *hidden, *logits_store])
        dps, dhidden, dlogits = grads[:n], grads[n:2 * n], grads[2 * n:]
        ps = [a.detach() for a in out.attentions]
        if dlogits:  # ∂L/∂A by autograd itself
            ra = torch.stack(dlogits)
        else:
            ra = torch.stack([p * (dp - (p * dp).sum(-1, keepdim=True)) / self.scale for p, dp in zip(ps, dps)])
        for p in self.hf.parameters():
            p.grad = None
        return ra, torch.stack(ps), torch.stack(dps), dhidden, [h.detach() for h in hidden]

    def nll(self, ids=None):
        with torch.no_grad():
            return float(self.loss(self.bridge(self.ids if ids is None else ids, return_type="logits")).double())


class _explicit_gemma2_attention:
    """Swap Gemma-2's eager attention for an explicit recomputation that records A = Q Kᵀ (after RoPE,
    kv heads expanded) as a graph tensor: S = c·tanh(A·scaling/c) + mask, P = softmax(S), z = P·V."""

    def __init__(self, store: list):
        self.store, self.saved = store, None

    def __enter__(self):
        self.saved = modeling_gemma2.eager_attention_forward

        def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
            k = modeling_gemma2.repeat_kv(key, module.num_key_value_groups)
            v = modeling_gemma2.repeat_kv(value, module.num_key_value_groups)
            a = query @ k.transpose(2, 3)
            self.store.append(a)
            s = a * scaling
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            if attention_mask is not None:
                s = s + attention_mask
            p = torch.softmax(s.float(), -1).to(query.dtype)
            return (p @ v).transpose(1, 2).contiguous(), p

        modeling_gemma2.eager_attention_forward = attention
        return self

    def __exit__(self, *exc):
        modeling_gemma2.eager_attention_forward = self.saved


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Family(request.param, seed=FAMILIES.index(request.param))


def _hooks(model):
    """Every hook on every hook point (tests.reference.assert_no_hooks, allowing the bridge's own)."""
    return {n: (len(hp.fwd_hooks), len(hp.bwd_hooks), len(hp._forward_hooks), len(hp._backward_hooks),
                len(hp._forward_pre_hooks)) for n, hp in model.hook_dict.items()}


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_route_and_scale_come_from_the_model(fam):
    ad = get_adapter(fam.bridge)
    assert all(isinstance(r, fam.route) for r in ad.routes), ad.routes
    for layer in range(ad.n_layers):
        assert ad.attn_scale(layer) == pytest.approx(fam.scale, rel=1e-6)
    softcaps = {getattr(r, "softcap", None) for r in ad.routes}
    assert softcaps == ({SOFTCAP} if fam.name == "gemma2" else {None})


def test_ra_matches_plain_hf(fam):
    ra = reversed_attention(fam.bridge, fam.ids, fam.target)
    ref, pat, _, _, _ = fam.reference()
    assert ra.maps.shape == ref.shape
    for layer in range(ref.shape[0]):
        assert float(ref[layer].norm()) > 1e-6  # a real map (the generic bridge used to give zeros)
        err = _rel(ra.maps[layer], ref[layer])
        assert err < REL, f"{fam.name} L{layer}: rel. Frobenius error {err:.2e}"
        assert _rel(ra.patterns[layer], pat[layer]) < REL
    if fam.name != "gemma2":  # property 1: rows of ∂L/∂S sum to 0; the tanh factor breaks it for ∂L/∂A
        assert_close_fp32(ra.maps.sum(-1), torch.zeros_like(ra.maps.sum(-1)), n_terms=MODEL_TERMS,
                          scale=float(ra.maps.abs().max()))
    masked = ra.patterns == 0
    assert bool(masked.any()) and float(ra.maps[masked].abs().max()) == 0.0  # property 2
    assert _hooks(fam.bridge) == fam.hooks
    assert_untouched(fam.bridge)


def test_softcap_factor_is_included():
    """Gemma-2: without the factor 1 − (S/c)², grad(hook_attn_scores)/s would be ∂L/∂(capped scores)/s,
    measurably different from ∂L/∂A (so the reference test above can fail)."""
    g = Family("gemma2", seed=FAMILIES.index("gemma2"))
    ad = get_adapter(g.bridge)
    names = [ad.hook_name("attn_scores", l) for l in range(ad.n_layers)]
    cache = capture(g.bridge, g.ids, target_nll(g.target), names=names)
    naive = torch.stack([cache.grad(n) / ad.attn_scale(l) for l, n in enumerate(names)])
    ref = g.reference()[0]
    assert min(_rel(naive[l], ref[l]) for l in range(ad.n_layers)) > 1e-2


def test_cache_route_equals_stream(fam):
    ra = reversed_attention(fam.bridge, fam.ids, fam.target)
    cache = capture(fam.bridge, fam.ids, target_nll(fam.target), names=ra_hook_names(fam.bridge))
    again = reversed_attention_from_cache(fam.bridge, cache)
    assert_close_fp32(again.maps, ra.maps, n_terms=MODEL_TERMS)
    assert_close_fp32(again.patterns, ra.patterns, n_terms=MODEL_TERMS)


def test_capture_of_resid_pre_is_exact(fam):
    ad = get_adapter(fam.bridge)
    names = [ad.hook_name("resid_pre", l) for l in range(ad.n_layers)]
    cache = capture(fam.bridge, fam.ids, target_nll(fam.target), names=names)
    _, _, _, dhidden, hidden = fam.reference()
    for l, n in enumerate(names):
        assert _rel(cache[n], hidden[l]) < REL, f"{fam.name} resid_pre L{l}"
        assert _rel(cache.grad(n), dhidden[l]) < REL, f"{fam.name} resid_pre grad L{l}"


def test_query_gradient_is_ra_times_keys(fam):
    """Property 3, ∂L/∂Q = RA·K, where hook_q/hook_k are the tensors whose product is A (no rotary
    inside HF: BLOOM, MPT, OPT -- whose q is pre-multiplied by `scaling` after hook_q -- and GPT-Neo)."""
    if fam.name not in ("bloom", "mpt", "opt", "gptneo"):
        pytest.skip("q/k are rotated after hook_q/hook_k in this family")
    ad = get_adapter(fam.bridge)
    ra = reversed_attention(fam.bridge, fam.ids, fam.target)
    names = [ad.hook_name(k, l) for l in range(ad.n_layers) for k in ("q", "k")]
    cache = capture(fam.bridge, fam.ids, target_nll(fam.target), names=names)
    for l in range(ad.n_layers):
        k = cache[ad.hook_name("k", l)].repeat_interleave(ad.n_heads // ad.n_kv_heads, dim=2)
        expected = torch.einsum("bhqk,bkhd->bqhd", ra.maps[l], k)
        assert _rel(cache.grad(ad.hook_name("q", l)), expected) < REL, f"{fam.name} L{l}"


def test_patching_first_order_effect(fam):
    """patch_attention changes the attention the model uses: dL/dη at η = 0 of P' = P + η·RA is
    Σ_l ⟨dP_l, RA_l⟩ with dP from plain HF (the generic bridge is patched at hook_z, z = (P + η·RA)·V)."""
    ra = reversed_attention(fam.bridge, fam.ids, fam.target)
    _, _, dp, _, _ = fam.reference()
    slope = float((dp.double() * ra.maps.double()).sum())
    assert slope > 0
    # a loss change of ~0.01: fp32 loss noise (~5e-7) is 5e-5 of it; the O(η²) truncation measured ≤ 3e-5
    eta = 0.01 / slope
    base = fam.nll()
    assert base == pytest.approx(float(ra.metric), rel=1e-5)
    with patch_attention(fam.bridge, ra, eta=eta):
        higher = fam.nll()
    with patch_attention(fam.bridge, ra, eta=-eta):
        lower = fam.nll()
    assert lower < base < higher
    assert (higher - lower) / (2 * eta) == pytest.approx(slope, rel=1e-3)
    assert _hooks(fam.bridge) == fam.hooks
    assert_untouched(fam.bridge)


def test_value_route_patch_equals_explicit_z(fam):
    """On the generic bridge the patched z is exactly (P + η·Δ)·V per head."""
    if fam.route is not ValueRoute:
        pytest.skip("score-hook bridges are patched at hook_pattern (tests/attention/test_patching.py)")
    ad = get_adapter(fam.bridge)
    ra = reversed_attention(fam.bridge, fam.ids, fam.target, layers=[0])
    seen = {}

    def rec(kind):
        def hook(t, hook):
            seen[kind] = t.detach().clone()
        return hook

    names = [(ad.hook_name(k, 0), rec(k)) for k in ("pattern", "v", "z")]
    eta = -5.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with patch_attention(fam.bridge, ra, eta=eta), torch.no_grad():
            fam.bridge.run_with_hooks(fam.ids, fwd_hooks=names)
    route = ad.ra_route(0)
    expected = route.mix(seen["pattern"] + eta * ra.maps[0], seen["v"])
    assert_close_fp32(seen["z"], expected, n_terms=fam.ids.shape[1] + 1)


def test_flow_graph_is_refused_per_feature_while_capture_works(fam):
    """VISIT is refused with the reason where its attention nodes cannot be exact (GPT-J: q/k rotated
    inside HF after hook_q/hook_k, unhooked; Gemma-2: soft-capping); RA and capture still work.
    OPT and GPT-Neo draw flow graphs through z = P·V (tests/flow/test_routes.py)."""
    if fam.name not in ("gptj", "gemma2"):
        pytest.skip("one family per refusal reason")
    why = "rotates q and k inside HF" if fam.name == "gptj" else "soft-capping"
    with pytest.raises(TLBackwardError, match=why) as err:
        flow_graph(fam.bridge, PROMPT, layer=0, target=TARGET)
    assert err.value.argument == "model" and "Capture, factors and the lens still work" in str(err.value)
    ad = get_adapter(fam.bridge)
    cache = capture(fam.bridge, fam.ids, target_nll(fam.target), names=[ad.hook_name("mlp_out", 0)])
    assert float(cache.grad(ad.hook_name("mlp_out", 0)).abs().max()) > 0
    assert _hooks(fam.bridge) == fam.hooks


def test_value_route_refuses_an_edited_z(fam):
    """The z = P·V route's assumption is checked on every run: under patch_attention (which edits
    hook_z on this bridge) RA is refused with the reason instead of being silently wrong."""
    if fam.route is not ValueRoute:
        pytest.skip("score-hook bridges read RA through any patch (tests/attention/test_reversed.py)")
    ra = reversed_attention(fam.bridge, fam.ids, fam.target)
    with patch_attention(fam.bridge, ra, eta=-1.0):
        with pytest.raises(TLBackwardError, match="hook_z is not hook_pattern · hook_v") as err:
            reversed_attention(fam.bridge, fam.ids, fam.target)
    assert err.value.argument == "model" and "patch_attention" in str(err.value)
    assert _hooks(fam.bridge) == fam.hooks
    assert_untouched(fam.bridge)


def test_padded_batch_equals_single_prompts(fam):
    """Right-padded rows give each prompt's own maps (both routes; the z route's P·V check holds with padding)."""
    prompts, targets = [PROMPT, "paris is the capital of"], [TARGET, " france"]
    batch = reversed_attention(fam.bridge, prompts, targets, prepend_bos=True)
    total = 0.0
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        single = reversed_attention(fam.bridge, prompt, target, prepend_bos=True)
        n = single.maps.shape[-1]
        assert int(batch.mask[row].sum()) == n
        assert _rel(batch.maps[:, row, :, :n, :n], single.maps[:, 0]) < REL
        if n < batch.maps.shape[-1]:  # padding rows and columns are exactly 0
            assert float(batch.maps[:, row, :, n:].abs().max()) == 0.0
            assert float(batch.maps[:, row, :, :, n:].abs().max()) == 0.0
        total += float(single.metric)
    assert float(batch.metric) == pytest.approx(total, rel=1e-5)  # batch losses are summed
