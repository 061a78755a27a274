"""The conformance cells: one function per feature, each comparing tl_backward's public API on a
bridge with an independent computation on the plain-HF copy of the same weights (hf_ref.py).

A cell returns normally when every comparison passes ("exact"); a TLBackwardError from tl_backward
is a refusal (allowed: the message says why); anything else (an AssertionError from a comparison,
another exception type) is a FAIL. ``run_cell`` turns that into an :class:`Outcome`.
"""

from __future__ import annotations

import functools
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tests.conformance import hf_ref as R
from tests.conformance import moe_ref as M
from tests.conformance.native import ROWS as NATIVE_ROWS
from tests.families import FAMILIES, build
from tests.masking.helpers import no_cache_generate, pairwise_mask
from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward import flow_graph, forward_pass_shift, gradient_factors, mas_generate, reversed_attention, segment_mask
from tl_backward.core.adapter import get_adapter
from tl_backward.core.capture import capture
from tl_backward.core.metrics import target_nll
from tl_backward.errors import BridgeUnavailable, TLBackwardError
from tl_backward.lens import expert_lens
from tl_backward.lens.factors import ATTENTION
from tl_backward.masking import segments as S

PROMPTS = ["the cat sat on the mat .", "where is the big dog"]  # padded batch (8 and 6 tokens with BOS)
TARGET = 30
MULTI = torch.tensor([25, 26])  # a two-token target, teacher-forced
ONE = "the cat sat on the mat"
MAS_PROMPTS = [["the cat sat on", "where is the cat ?"], ["big dog", "red", "what is it"]]
MAS_ANSWERS = ["A :", "A"]


@dataclass(frozen=True)
class Outcome:
    status: str  # "exact" | "refused" | "FAIL"
    detail: str = ""
    seconds: float = 0.0

    def __repr__(self) -> str:
        return f"Outcome({self.status}: {self.detail[:60]!r})"


def close(got, expected, what: str, *, n_terms: int = MODEL_TERMS) -> None:
    expected = torch.as_tensor(expected).detach()
    assert float(expected.abs().max()) > 0, f"{what}: the reference is all zero (the check cannot fail)"
    assert_close_fp32(got, expected, n_terms=n_terms, what=what)


def _batch(model):
    return get_adapter(model).tokenize(PROMPTS, prepend_bos=True)


def _last_nll(ref: R.Pass, last: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(len(last))
    return R.nll(ref.logits, rows, last, torch.full_like(last, TARGET))


def _clean(model) -> None:
    assert_no_hooks(model)
    assert_untouched(model)


def cell_capture(name: str, hf, model) -> None:
    """resid_pre/mid/post activations and full gradients, and hook_pattern, on a padded batch."""
    ad = get_adapter(model)
    kinds = ["resid_pre", "resid_post"] + ([] if ad.parallel_blocks else ["resid_mid"])
    names = [ad.hook_name(k, l) for k in kinds for l in range(ad.n_layers)]
    names += [ad.hook_name("pattern", l) for l in range(ad.n_layers)]
    cache = capture(model, PROMPTS, target_nll(TARGET), names=names, prepend_bos=True)
    ref = R.run(hf, cache.tokens, cache.mask.long())
    wanted = {(k, l): getattr(ref, k)[l] for k in kinds for l in range(ad.n_layers)}
    missing = [key for key, t in wanted.items() if t is None]
    assert not missing, f"TL reports {missing} but the HF block has no such tensor (parallel block?)"
    grads = torch.autograd.grad(_last_nll(ref, cache.last), list(wanted.values()))
    m = cache.mask
    for ((k, l), act), g in zip(wanted.items(), grads):
        # OPT's resid_mid comes [batch·pos, d] (hf_ref.Pass): autograd took it there, compare as [batch, pos, d]
        act, g = (t.reshape(ref.resid_pre[l].shape) for t in (act, g))
        close(cache[ad.hook_name(k, l)][m], act[m], f"{k}[{l}] activation")
        close(cache.grad(ad.hook_name(k, l))[m], g[m], f"{k}[{l}] gradient")
    for l in range(ad.n_layers):
        p = cache[ad.hook_name("pattern", l)]
        rows = m[:, None, :, None] & m[:, None, None, :]
        close(p.masked_fill(~rows, 0), ref.attentions[l].masked_fill(~rows, 0), f"pattern[{l}]")
    _clean(model)


def cell_scores(name: str, hf, model) -> None:
    """hook_attn_scores: softmax(scores) = P and ∂L/∂scores = P ⊙ (dP − rowsum(P ⊙ dP)). Refused on
    the generic AttentionBridge (GPT-J, OPT, GPT-Neo), whose hook_attn_scores fires on HF's returned P."""
    ad = get_adapter(model)
    names = [ad.hook_name("attn_scores", l) for l in range(ad.n_layers)]
    cache = capture(model, PROMPTS, target_nll(TARGET), names=names, prepend_bos=True)
    ref = R.run(hf, cache.tokens, cache.mask.long())
    dps = torch.autograd.grad(_last_nll(ref, cache.last), list(ref.attentions))
    rows = cache.mask[:, None, :, None] & cache.mask[:, None, None, :]
    for l, (p, dp) in enumerate(zip(ref.attentions, dps)):
        s = cache[names[l]]
        # P / rowsum(P): attention sinks (GPT-OSS) take part of each row's mass outside the scores
        p_keys = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        close(s.double().softmax(-1).masked_fill(~rows, 0), p_keys.masked_fill(~rows, 0), f"softmax(scores[{l}])")
        ds = R.reversed_attention(p, dp, 1.0, None, None)
        close(cache.grad(names[l]).masked_fill(~rows, 0), ds.masked_fill(~rows, 0), f"grad scores[{l}]")
    _clean(model)


def _ra_reference(name: str, hf, tokens, mask, loss_of) -> list[torch.Tensor]:
    ref = R.run(hf, tokens, mask)
    dps = torch.autograd.grad(loss_of(ref), list(ref.attentions))
    cap = getattr(hf.config, "attn_logit_softcapping", None)
    unscaled = FAMILIES[name].unscaled if name in FAMILIES else False
    return [R.reversed_attention(p, dp, R.attention_scale(hf, l, unscaled), ref.qk[l], cap)
            for l, (p, dp) in enumerate(zip(ref.attentions, dps))]


def cell_ra(name: str, hf, model) -> None:
    """RA maps = ∂L/∂(q·kᵀ) from the softmax Jacobian on HF's P (padded batch; two-token target)."""
    ra = reversed_attention(model, PROMPTS, TARGET, prepend_bos=True)
    m = ra.mask
    rows = m[:, None, :, None] & m[:, None, None, :]
    expected = _ra_reference(name, hf, ra.tokens, m.long(), lambda ref: _last_nll(ref, ra.last))
    for l, e in enumerate(expected):
        close(ra.maps[l], e.masked_fill(~rows, 0), f"RA[{l}] padded batch")
    ra2 = reversed_attention(model, ONE, MULTI, prepend_bos=True)
    prompt = get_adapter(model).tokenize(ONE, prepend_bos=True).tokens[0]
    assert torch.equal(ra2.tokens[0], torch.cat([prompt, MULTI[:-1]])), "teacher-forced input"
    n = len(prompt)
    pos = torch.tensor([n - 1, n])
    expected = _ra_reference(name, hf, ra2.tokens, None, lambda ref: R.nll(ref.logits, torch.zeros(2, dtype=torch.long),
                                                                            pos, MULTI))
    for l, e in enumerate(expected):
        close(ra2.maps[l], e, f"RA[{l}] two-token target")
    _clean(model)


def _tl_layout(weight: torch.Tensor, module: torch.nn.Module, shape: tuple, kind: str) -> torch.Tensor:
    """An HF weight (gradient) in TransformerLens layout: [in, out], attention split by head."""
    g = weight.T if isinstance(module, torch.nn.Linear) else weight
    if len(shape) == 3:
        if kind == "o":
            return g.reshape(shape)
        return g.reshape(shape[1], shape[0], shape[2]).permute(1, 0, 2)
    return g.reshape(shape)


def cell_factors(name: str, hf, model) -> None:
    """Every factor module (modules="all"): reconstruct() = autograd's ∂L/∂W of the HF parameter
    the bridged linear module holds (original_component.weight), mapped to TL layout; on
    mixture-of-experts layers the sparse block's modules against the plain-HF copy (:func:`_moe_factors`)."""
    ad = get_adapter(model)
    gf = gradient_factors(model, PROMPTS, TARGET, modules="all", prepend_bos=True)
    sparse = [k for k in gf.factors if k[1] not in ATTENTION and ad.moe(k[0]) is not None]
    if sparse:
        _moe_factors(hf, gf, sparse)
    keys = [k for k in gf.factors if k not in sparse]
    modules = [ad.linear(l, m).original_component for l, m in keys]
    with torch.enable_grad():
        logits = model(gf.tokens, attention_mask=gf.mask.long())
        loss = R.nll(logits, torch.arange(len(gf.last)), gf.last, torch.full_like(gf.last, TARGET))
        grads = torch.autograd.grad(loss, [mod.weight for mod in modules])
    for key, mod, g in zip(keys, modules, grads):
        recon = gf[key].reconstruct()
        close(recon, _tl_layout(g, mod, tuple(recon.shape), key[1]), f"factor {key}")
    _clean(model)


def _hf_loss(hf, gf) -> torch.Tensor:
    """The target NLL at each row's last real token, on the plain-HF copy, with grad."""
    with torch.enable_grad():
        logits = hf(gf.tokens, attention_mask=gf.mask.long()).logits
    return R.nll(logits, torch.arange(len(gf.last)), gf.last, torch.full_like(gf.last, TARGET))


def _moe_factors(hf, gf, keys: list) -> None:
    """Each MoE factor (experts' up / gate / down, router, Qwen2-MoE's shared expert and its gate)
    = ``torch.autograd.grad`` of the HF parameter it represents on the plain-HF copy, mapped to TL
    layout by hand (moe_ref.py); per expert e for the experts' modules: the slice e of the batched
    parameter's gradient (exactly zero where no routed token carries gradient)."""
    blocks = {l: R.layers_of(hf)[l].mlp for l, _ in keys}
    expected = M.expected_factors(blocks, _hf_loss(hf, gf))
    assert set(expected) == set(keys), f"modules='all' returns {sorted(keys)}, the HF blocks hold {sorted(expected)}"
    for key in keys:
        f, want = gf[key], expected[key]
        close(f.reconstruct(), want, f"factor {key}")
        for e in range(want.shape[0]) if f.per_expert else ():
            got = f.expert(e).reconstruct()
            if not bool(want[e].any()):
                assert not bool(got.any()), f"factor {key} expert {e}: autograd gives 0, the factor does not"
            else:
                close(got, want[e], f"factor {key} expert {e}")


def _head_scale(hf) -> float:
    cfg = hf.config
    return float(getattr(cfg, "logit_scale", None) or 1.0) / float(getattr(cfg, "logits_scaling", None) or 1.0)


def cell_lens(name: str, hf, model) -> None:
    """ad.unembed(v) = lm_head(final_norm(v)) (× Cohere logit_scale, ÷ Granite logits_scaling) for the
    HF final-norm input and a layer-0 residual; the reference reproduces HF's own logits."""
    ad = get_adapter(model)
    tokens = ad.tokenize(ONE, prepend_bos=True).tokens
    with torch.no_grad():
        ref = R.run(hf, tokens)
        head = lambda v: hf.get_output_embeddings()(R.final_norm_of(hf)(v)) * _head_scale(hf)  # noqa: E731
        close(head(ref.final_in), ref.logits, "reference head vs HF logits")
        for what, v in (("final", ref.final_in), ("layer 0", ref.resid_post[0])):
            close(ad.unembed(v[0]), head(v[0]), f"lens of the {what} residual")
    if any(ad.moe(l) is not None for l in range(ad.n_layers)):
        _expert_lens(hf, model, head)
    _clean(model)


def _expert_lens(hf, model, head) -> None:
    """expert_lens: ‖∂L/∂W_down^e‖ per layer and expert = the norm of expert e's slice of the HF
    down_proj gradient (plain-HF autograd); each routed δ_i^e's target rank and least-likely token
    = those of the HF final norm + lm_head applied to it."""
    el = expert_lens(model, PROMPTS, TARGET, prepend_bos=True, top_k=3)
    gf = gradient_factors(model, PROMPTS, TARGET, modules=("mlp_out",), layers=list(el.layers), prepend_bos=True)
    blocks = {l: R.layers_of(hf)[l].mlp for l in el.layers}
    expected = M.expected_factors(blocks, _hf_loss(hf, gf))
    for i, l in enumerate(el.layers):
        close(el.grad_norm[i], expected[(l, "mlp_out")].flatten(1).norm(dim=-1), f"expert_lens grad_norm[{l}]")
        f = gf[l, "mlp_out"]
        for e, tok in f.routed.nonzero().tolist():
            d = f.delta[e, tok]
            if bool(d.any()):  # a zero δ (no gradient at that token) ties every token
                with torch.no_grad():
                    logits = head(d).float()
                assert int(el.target_rank[i, e, tok]) == int((logits > logits[TARGET]).sum()), f"rank {l, e, tok}"
                assert int(el.bottom_ids[i, e, tok, 0]) == int(logits.argmin()), f"bottom token {l, e, tok}"


def cell_fps(name: str, hf, model) -> None:
    """Forward Pass Shift: the out-projection's output at the last token moves by η‖x‖²·e_t, with x
    its input and e_t the HF lm_head row (the paper's unembedding); undo restores the weights bitwise."""
    ad = get_adapter(model)
    tokens = ad.tokenize(ONE, prepend_bos=True).tokens
    layer = ad.n_layers - 1
    if ad.moe(layer) is not None:
        _moe_fps(hf, model, tokens, layer)
        return
    out_mod = ad.linear(layer, "mlp_out").original_component
    seen: dict = {}

    def last_token(t: torch.Tensor) -> torch.Tensor:  # OPT runs its MLP on [batch·pos, d]: view as [batch, pos, d]
        return t.reshape(*tokens.shape, t.shape[-1])[0, -1]

    handle = out_mod.register_forward_hook(lambda mod, args, out: seen.update(x=last_token(args[0]),
                                                                              out=last_token(out)))
    try:
        with torch.no_grad():
            logits = model(tokens)
        x, before = seen["x"].clone(), seen["out"].clone()
        t = int(logits[0, -1].argsort()[-3])  # not the argmax, so the edit is applied
        e_t = hf.get_output_embeddings().weight[t].detach()
        eta = float(before.norm() / (x.pow(2).sum() * e_t.norm()))
        weight = out_mod.weight.detach().clone()
        with forward_pass_shift(model, ONE, t, layer=layer, eta=eta, prepend_bos=True) as edit:
            assert edit.applied
            with torch.no_grad():
                model(tokens)
            predicted = eta * x.pow(2).sum() * e_t
            scale = float(before.norm() + predicted.norm())
            err = float((seen["out"] - before - predicted).norm())
            assert err <= 1e-5 * scale, f"out-projection change off by {err:.3g} (scale {scale:.3g})"
        assert torch.equal(out_mod.weight, weight), "undo did not restore W_out"
    finally:
        handle.remove()
    _clean(model)


def _output(out):
    return out[0] if isinstance(out, tuple) else out  # GPT-OSS's block also returns its router scores


def _routed_shift(hf, tokens, layer: int, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On the plain-HF copy: (e_t, routed experts, Σ_e w_e‖h^e‖² over them) at the last position,
    with w_e from the HF router and w_e·h^e = G_e e_t / ‖e_t‖² read off G = ∂⟨e_t, y_last⟩/∂W_down
    (TL layout: G_e = w_e h^e ⊗ e_t, y the sparse block's output)."""
    block = R.layers_of(hf)[layer].mlp
    seen: dict = {}
    handle = block.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=_output(out)))
    try:
        with torch.enable_grad():
            hf(tokens)
    finally:
        handle.remove()
    e_t = hf.get_output_embeddings().weight[t].detach()
    (G,) = torch.autograd.grad((seen["y"][0, -1] * e_t).sum(), block.experts.down_proj)
    with torch.no_grad():
        _, w, idx = M.router_of(block)(seen["x"][0, -1:].detach())
    wh = M.down_tl(block, G)[idx[0]] @ e_t / e_t.pow(2).sum()  # [top_k, d_expert]
    return e_t, idx[0], (wh.pow(2).sum(-1) / w[0]).sum()


def _moe_fps(hf, model, tokens, layer: int) -> None:
    """FPS on a sparse layer: the bridged block's output at the last token moves by
    η Σ_e w_e‖h^e‖²·e_t over the routed experts (reference: :func:`_routed_shift`), only the
    routed experts' slices of one parameter (down_proj) change, and undo restores every bit."""
    block = model.blocks[layer].mlp.original_component
    seen: dict = {}
    handle = block.register_forward_hook(lambda mod, args, out: seen.update(y=_output(out)[0, -1].detach().clone()))
    params = list({id(p): p for p in model.parameters()}.values())
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            logits = model(tokens)
        before = seen["y"]
        t = int(logits[0, -1].argsort()[-3])  # not the argmax, so the edit is applied
        e_t, routed, sq = _routed_shift(hf, tokens, layer, t)
        eta = float(before.norm() / (sq * e_t.norm()))
        with forward_pass_shift(model, ONE, t, layer=layer, eta=eta, prepend_bos=True) as edit:
            assert edit.applied
            changed = [(p, s) for p, s in zip(params, saved) if not torch.equal(p, s)]
            assert len(changed) == 1, f"the edit changed {len(changed)} parameters, not one down_proj"
            p, s = changed[0]
            assert p.shape == R.layers_of(hf)[layer].mlp.experts.down_proj.shape, "not the experts' down_proj"
            hit = (p != s).flatten(1).any(-1).nonzero()[:, 0]
            assert sorted(hit.tolist()) == sorted(routed.tolist()), f"edited experts {hit.tolist()}, routed {routed}"
            with torch.no_grad():
                model(tokens)
            predicted = eta * sq * e_t
            scale = float(before.norm() + predicted.norm())
            err = float((seen["y"] - before - predicted).norm())
            assert err <= 1e-5 * scale, f"MoE output change off by {err:.3g} (scale {scale:.3g})"
        assert all(torch.equal(p, s) for p, s in zip(params, saved)), "undo did not restore the weights"
    finally:
        handle.remove()
    _clean(model)


def _flow_setup(model, hf):
    ad = get_adapter(model)
    tokens = ad.tokenize(ONE, prepend_bos=True).tokens
    return tokens, ad.n_layers - 1, tokens.shape[1] - 1, R.run(hf, tokens)


def cell_flow(name: str, hf, model) -> None:
    """Forward VISIT graph of the last layer: its resid nodes are the HF activations at the last position."""
    tokens, L, p, ref = _flow_setup(model, hf)
    fwd = flow_graph(model, tokens[0], layer=L, target=TARGET)
    close(fwd.node(f"resid{L}").vector, ref.resid_pre[L][0, p], "forward resid_pre node")
    close(fwd.node(f"resid{L + 1}").vector, ref.resid_post[L][0, p], "forward resid_post node")
    _clean(model)


def cell_flow_backward(name: str, hf, model) -> None:
    """Backward VISIT graph of the last layer: its resid nodes are HF autograd gradients of
    −log p(target) at the last position."""
    tokens, L, p, ref = _flow_setup(model, hf)
    bwd = flow_graph(model, tokens[0], layer=L, target=TARGET, backward=True, n_heads=-1, n_memory=-1,
                     n_top_neurons=-1)
    g_pre, g_post = torch.autograd.grad(_last_nll(ref, torch.tensor([p])), [ref.resid_pre[L], ref.resid_post[L]])
    close(bwd.node(f"resid{L}").vector, g_pre[0, p], "backward resid_pre node")
    close(bwd.node(f"resid{L + 1}").vector, g_post[0, p], "backward resid_post node")
    _clean(model)


def cell_mas(name: str, hf, model) -> None:
    """segment_mask logits (left padding) = HF logits under the explicit additive 4-D pairwise mask,
    ANDed with each sliding-window layer's window (tl_backward/masking/families.py's definition)."""
    seg = S.from_blocks(model, MAS_PROMPTS, MAS_ANSWERS, padding_side="left")
    additive = _additive(hf, seg)
    with torch.no_grad():
        with segment_mask(model, seg):
            got = model(seg.tokens)
        ref = hf(seg.tokens, attention_mask=additive, position_ids=seg.position_ids).logits
    close(got[seg.valid], ref[seg.valid], "MAS logits")
    _clean(model)


def _additive(hf, seg):
    """``0 / finfo.min`` from the looped pairwise rule; on a layer with sliding window W (HF's
    ``layer_types`` / ``sliding_window``) also key j masked unless j > i − W. A ``{layer_type: mask}``
    dict when the layers differ (the ``causal_mask_mapping`` transformers 5 accepts)."""
    keep = pairwise_mask(seg.segment_ids, seg.valid)
    cfg, n = hf.config, seg.tokens.shape[1]
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or ["sliding_attention" if window else "full_attention"]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    masks = {}
    for t in set(types):
        k = keep & (j > i - window) if (t == "sliding_attention" and window) else keep
        masks[t] = torch.zeros(k.shape).masked_fill(~k, torch.finfo(torch.float32).min)
    return next(iter(masks.values())) if len(masks) == 1 else masks


def _no_cache_reference(hf, seg, n: int) -> torch.Tensor:
    """Greedy decoding on the HF copy, recomputing everything with the explicit (windowed) pairwise
    mask each step (tests/masking/helpers.py's loop)."""
    return no_cache_generate(hf, seg, n, run=lambda cur: hf(cur.tokens, attention_mask=_additive(hf, cur),
                                                             position_ids=cur.position_ids).logits)


def cell_mas_generate(name: str, hf, model) -> None:
    """mas_generate (KV cache) = a greedy no-cache recomputation with the full mask each step."""
    seg = S.from_blocks(model, MAS_PROMPTS, MAS_ANSWERS, padding_side="left")
    out = mas_generate(model, seg, max_new_tokens=6, eos_token_id=None)
    ref = _no_cache_reference(hf, seg, 6)
    differ = (out.new_tokens != ref).any(0).nonzero()
    assert not len(differ), (f"cached decoding leaves the no-cache MAS recomputation at new token "
                             f"{int(differ[0]) + 1} of 6 (cached {out.new_tokens[:, int(differ[0])].tolist()}, "
                             f"no-cache {ref[:, int(differ[0])].tolist()})")
    _clean(model)


FEATURES: dict[str, Callable[[str, Any, Any], None]] = {
    "capture": cell_capture, "scores": cell_scores, "RA": cell_ra, "factors": cell_factors, "lens": cell_lens,
    "FPS": cell_fps, "flow": cell_flow,
    "flow backward": cell_flow_backward, "MAS": cell_mas, "MAS generate": cell_mas_generate,
}


def outcome_of(fn: Callable[[], None]) -> Outcome:
    """exact / refused (TLBackwardError: its message) / FAIL (anything else, with where it happened).
    A missing TransformerBridge (TransformerLens 2.x) is no cell's outcome: BridgeUnavailable propagates."""
    t0 = time.perf_counter()
    try:
        fn()
    except BridgeUnavailable:
        raise
    except TLBackwardError as e:
        return Outcome("refused", str(e).split("\n")[0], time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - every other failure is a FAIL, recorded with its place
        where = traceback.extract_tb(e.__traceback__)[-1]
        msg = str(e).strip().split("\n")[0]
        return Outcome("FAIL", f"{type(e).__name__}: {msg[:300]} ({where.filename.split('/')[-1]}:{where.lineno})",
                       time.perf_counter() - t0)
    return Outcome("exact", "", time.perf_counter() - t0)


BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    **{name: functools.partial(build, name) for name in FAMILIES}, **NATIVE_ROWS}


@functools.lru_cache(maxsize=None)
def built(row: str):
    """(reference, bridge) of a row, built once per process (a crash while booting is re-raised)."""
    return BUILDERS[row]()


def run_cell(row: str, feature: str) -> Outcome:
    def go():
        hf, model = built(row)
        FEATURES[feature](row, hf, model)
    return outcome_of(go)
