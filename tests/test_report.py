"""build_report: the main job's numbers checked against plain Hugging Face models (no TransformerLens),
its consistency with the feature APIs it orchestrates, the text summary, the page, and bad input."""

import io
import math
import time

import pytest
import torch

from tests.conftest import SPECS
from tests.reference import assert_no_hooks, assert_untouched, hf_activation_grads
from tests.tolerance import MODEL_TERMS, assert_close_fp32, fp32_rtol
from tl_backward.attention import reversed_attention
from tl_backward.core.adapter import get_adapter
from tl_backward.flow import flow_graph
from tl_backward.lens import backward_lens
from tl_backward.report import Progress, Report, build_report
from tl_backward.render.page import Page
from tl_backward.zoo.tiny import tiny_hf_model

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def reports(gpt2_model, llama_model):
    """One default-target and one counterfactual report per family (built once)."""
    out = {}
    for family, model in (("gpt2", gpt2_model), ("llama", llama_model)):
        out[family, None] = build_report(model, PROMPT)
        out[family, " rome"] = build_report(model, PROMPT, target=" rome")
    return out


def hf_fresh(family):
    return tiny_hf_model(family, **SPECS[family])


def tokens_of(model, prompt=PROMPT):
    return get_adapter(model).tokenize(prompt).tokens


def model_of(family, gpt2_model, llama_model):
    return gpt2_model if family == "gpt2" else llama_model


# ------------------------------------------------------------------------- numbers vs plain HF
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("target", [None, " rome"])
def test_prediction_target_rank_and_loss_match_plain_hf(reports, family, target, gpt2_model, llama_model):
    model = model_of(family, gpt2_model, llama_model)
    r = reports[family, target]
    with torch.no_grad():
        logits = hf_fresh(family)(tokens_of(model)).logits[0, -1].float()
    probs = logits.softmax(-1)
    # TL vs plain HF forward: a probability's relative error is its logit's absolute error
    rel = fp32_rtol(MODEL_TERMS) * max(1.0, float(logits.abs().max()))
    top_p, top_i = probs.topk(5)
    assert [p.id for p in r.predictions] == top_i.tolist()
    assert [p.prob for p in r.predictions] == pytest.approx(top_p.tolist(), rel=rel)
    t = int(top_i[0]) if target is None else int(get_adapter(model).target_tokens(target)[0])
    assert r.target.id == t
    assert r.target.prob == pytest.approx(float(probs[t]), rel=rel)
    assert r.target_rank == int((probs > probs[t]).sum())
    assert r.target_is_prediction == (t == int(top_i[0]))
    assert r.loss == pytest.approx(-math.log(float(probs[t])), abs=rel)  # δ(−log p) = δp / p
    assert r.predictions[0].token == model.tokenizer.decode([int(top_i[0])])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layer_gradient_norms_and_flow_layer_match_hf_weight_gradients(reports, family, gpt2_model, llama_model):
    """‖∂L/∂W_in‖, ‖∂L/∂W_out‖ from autograd on a fresh HF model's parameters (up projection for
    the gated Llama MLP, as the Backward Lens factors of mlp_in)."""
    model = model_of(family, gpt2_model, llama_model)
    r = reports[family, " rome"]
    hf = hf_fresh(family)
    if family == "gpt2":
        mats = [(blk.mlp.c_fc.weight, blk.mlp.c_proj.weight) for blk in hf.transformer.h]
    else:
        mats = [(blk.mlp.up_proj.weight, blk.mlp.down_proj.weight) for blk in hf.model.layers]
    flat = [w for pair in mats for w in pair]
    for p in hf.parameters():
        p.requires_grad_(False)
    for w in flat:
        w.requires_grad_(True)
    logits = hf(tokens_of(model)).logits
    loss = -torch.log_softmax(logits[0, -1].float(), -1)[r.target.id]
    grads = torch.autograd.grad(loss, flat)
    expect = {l: math.hypot(float(grads[2 * l].norm()), float(grads[2 * l + 1].norm())) for l in range(len(mats))}
    assert r.layer_grad_norms == pytest.approx(expect, rel=fp32_rtol(MODEL_TERMS))  # TL vs HF backward
    assert r.flow_layer == max(expect, key=expect.get)


def test_lens_rows_match_dense_projection_of_hf_gradients(reports, gpt2_model):
    """reads = top-k of LL(x at W_in), writes = bottom-k of LL(δ at W_out) at the last token, with
    LL = ln_f then the unembedding of a fresh HF GPT-2; ranks counted as documented."""
    r = reports["gpt2", " rome"]
    hf = hf_fresh("gpt2")
    tokens = tokens_of(gpt2_model)
    t = r.target.id

    def loss(logits):
        return -torch.log_softmax(logits[0, -1].float(), -1)[t]

    def ll(v):
        with torch.no_grad():
            return hf.transformer.ln_f(v) @ hf.lm_head.weight.T

    decode = lambda ids: [gpt2_model.tokenizer.decode([int(i)]) for i in ids]  # noqa: E731
    rows = {row["layer"]: row for row in r.lens_rows(k=3)}
    assert list(rows) == sorted(rows, reverse=True)  # last layer first
    for layer in range(gpt2_model.cfg.n_layers):
        ref = hf_activation_grads("gpt2", SPECS["gpt2"]["seed"], tokens, loss, layer, SPECS["gpt2"]["n_heads"])
        x = ref["mlp_in"][0][0, -1]  # LN2 output = W_in's input
        delta = ref["mlp_out"][1][0, -1]  # ∂L/∂(W_out output)
        lx, ld = ll(x), ll(delta)
        row = rows[layer]
        assert row["reads"] == decode(lx.topk(3).indices)
        assert row["writes"] == decode(ld.topk(3, largest=False).indices)
        assert row["x_rank"] == int((lx > lx[t]).sum())
        assert row["delta_rank"] == int((ld < ld[t]).sum())
        assert row["delta_norm"] == pytest.approx(float(delta.norm()), rel=fp32_rtol(MODEL_TERMS))  # TL vs HF


def test_orchestrates_the_feature_apis(reports, gpt2_model):
    # The report reads everything off one shared pass; each piece must equal the feature API run alone.
    r = reports["gpt2", " rome"]
    ra = reversed_attention(gpt2_model, PROMPT, " rome")
    assert_close_fp32(r.reversed_attention.maps, ra.maps, n_terms=MODEL_TERMS)  # two runs
    assert_close_fp32(r.reversed_attention.patterns, ra.patterns, n_terms=MODEL_TERMS)
    assert [(l, h) for l, h, _ in r.top_heads(4)] == [(l, h) for l, h, _ in ra.top_heads(4)]
    assert r.lens.modules == ("mlp_in", "mlp_out")
    alone = backward_lens(gpt2_model, PROMPT, " rome", modules=("mlp_in", "mlp_out"))
    for layer in r.layers:
        for module in ("mlp_in", "mlp_out"):
            mine, ref = r.lens.factors[layer, module], alone.factors[layer, module]
            assert_close_fp32(mine.x, ref.x, n_terms=MODEL_TERMS)
            assert_close_fp32(mine.delta, ref.delta, n_terms=MODEL_TERMS)
    assert torch.equal(r.lens.pred_ids, alone.pred_ids)
    fwd, bwd = r.flow
    assert (fwd.backward, bwd.backward) == (False, True)
    assert fwd.layers == bwd.layers == (r.flow_layer,)
    assert fwd.target == bwd.target == r.target.id
    assert {n.id for n in fwd.nodes} == {n.id for n in bwd.nodes}  # like=: same components
    ref_fwd = flow_graph(gpt2_model, PROMPT, layer=r.flow_layer, target=r.target.id)
    ref_bwd = flow_graph(gpt2_model, PROMPT, layer=r.flow_layer, target=r.target.id, backward=True, like=ref_fwd)
    for mine, ref in ((fwd, ref_fwd), (bwd, ref_bwd)):
        assert [n.id for n in mine.nodes] == [n.id for n in ref.nodes]
        for a, b in zip(mine.nodes, ref.nodes):
            if b.vector is not None:
                assert_close_fp32(a.vector, b.vector, n_terms=MODEL_TERMS, what=b.id)
    assert bwd.metric == pytest.approx(ref_bwd.metric, rel=fp32_rtol(MODEL_TERMS))


def test_lens_tokens_projects_the_last_tokens_only(reports, gpt2_model):
    """lens_tokens=2: the lens equals the standalone lens restricted to the last two tokens, while
    the layer gradient norms (and so the flow layer) still use every token."""
    full = reports["gpt2", " rome"]
    r = build_report(gpt2_model, PROMPT, target=" rome", lens_tokens=2, flow=False)
    alone = backward_lens(gpt2_model, PROMPT, " rome", modules=("mlp_in", "mlp_out"))
    n = alone.factors.n_tokens
    assert r.lens.factors.n_tokens == 2 and r.lens.token_strs == alone.token_strs[-2:]
    assert any(f"last 2 of {n}" in note for note in r.notes)
    for module in ("mlp_in", "mlp_out"):
        mine, ref = r.lens[module], alone[module]
        assert torch.equal(mine.top_ids, ref.top_ids[:, -2:]) and torch.equal(mine.bottom_ids, ref.bottom_ids[:, -2:])
        assert torch.equal(mine.target_rank, ref.target_rank[:, -2:])
    assert r.layer_grad_norms == pytest.approx(full.layer_grad_norms, rel=fp32_rtol(MODEL_TERMS))
    assert r.flow_layer == full.flow_layer
    for mine, ref in zip(r.lens_rows(), full.lens_rows(), strict=True):  # the last token's rows
        assert mine.pop("delta_norm") == pytest.approx(ref.pop("delta_norm"), rel=fp32_rtol(MODEL_TERMS))
        assert mine == ref


def test_one_forward_and_one_backward(gpt2_model, monkeypatch):
    """RA, Backward Lens and both flow graphs come from a single forward + backward pass."""
    counts = {"forward": 0, "backward": 0}
    grad, backward = torch.autograd.grad, torch.Tensor.backward

    def counting_grad(*args, **kwargs):
        counts["backward"] += 1
        return grad(*args, **kwargs)

    def counting_backward(self, *args, **kwargs):
        counts["backward"] += 1
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(torch.Tensor, "backward", counting_backward)
    handle = gpt2_model.embed.register_forward_pre_hook(lambda *_: counts.__setitem__("forward", counts["forward"] + 1))
    try:
        r = build_report(gpt2_model, PROMPT, target=" rome")
    finally:
        handle.remove()
    assert len(r.flow) == 2
    assert counts == {"forward": 1, "backward": 1}


# ------------------------------------------------------------------------- text and page
def test_summary_lists_prediction_heads_and_every_layer(reports):
    r = reports["gpt2", " rome"]
    text = r.summary()
    assert str(r) == text
    assert f"predicts {r.predictions[0].token}" in text
    assert "target   rome (rank" in text
    for l, h, _ in r.top_heads(5):
        assert f"L{l}H{h} " in text
    lines = text.splitlines()
    layer_lines = [i for i, line in enumerate(lines) if line.startswith("  L") and " / " in line]
    assert [lines[i].split()[0] for i in layer_lines] == [f"L{l}" for l in reversed(r.layers)]
    for i, row in zip(layer_lines, r.lens_rows()):
        assert " ".join(row["writes"]) in lines[i]
        assert lines[i].rstrip().endswith(f"{row['x_rank']} / {row['delta_rank']}")
    assert f"Most affected layer (largest MLP weight gradient): L{r.flow_layer}" in text


def test_page_has_every_section_and_escapes_the_prompt(gpt2_model):
    nasty = "<img src=x onerror=alert(1)> the cat"
    r = build_report(gpt2_model, nasty, target=" dog")
    assert isinstance(r.page, Page)
    html = r.page.to_html()
    for title in ("What the model predicts", "Reversed Attention", "Backward Lens", "flow graphs of layer"):
        assert title in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert len([f for f in r.page.figures if f.component == "AttentionHeads"]) == 2
    assert any("unknown" in n or "<unk>" in n for n in r.notes)  # '<img', 'src=x', ... are not words
    assert r._repr_html_().startswith("<div")


def test_without_flow_graphs(gpt2_model):
    r = build_report(gpt2_model, PROMPT, flow=False, heads=2)
    assert r.flow == ()
    assert "flow graphs of layer" not in r.page.to_html()
    assert "flow graphs are on the page" not in r.summary()


def test_save_writes_a_standalone_page(reports, tmp_path):
    path = reports["gpt2", None].save(tmp_path / "sub" / "r.html")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in text
    assert "window.CircuitsVis" in text and "unpkg" not in text


def test_layers_restrict_every_analysis(gpt2_model):
    r = build_report(gpt2_model, PROMPT, target=" rome", layers=[1])
    assert r.layers == (1,) and r.reversed_attention.layers == (1,) and r.lens.layers == (1,)
    assert r.flow_layer == 1 and all(g.layers == (1,) for g in r.flow)
    assert set(r.layer_grad_norms) == {1}
    assert build_report(gpt2_model, PROMPT, layers=[1, 0, 1], flow=False).layers == (0, 1)


def test_notes_for_multi_token_targets(gpt2_model):
    r = build_report(gpt2_model, PROMPT, target=" rome paris", flow=False)
    assert r.target.id == int(get_adapter(gpt2_model).target_tokens(" rome")[0])
    assert any("2 tokens" in n for n in r.notes)


def test_leaves_no_trace(gpt2_model):
    build_report(gpt2_model, PROMPT, flow=True)
    assert_no_hooks(gpt2_model)
    assert_untouched(gpt2_model)
    with pytest.raises(ValueError):
        build_report(gpt2_model, PROMPT, layers=[7])
    assert_no_hooks(gpt2_model)
    assert_untouched(gpt2_model)
    assert not gpt2_model.training


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prompt=""), ValueError, "prompt is empty"),
    (dict(prompt="  \n"), ValueError, "prompt is empty"),
    (dict(prompt=["a", "b"]), TypeError, "prompt must be a string"),
    (dict(layers=[7]), ValueError, "out of range"),
    (dict(layers=[]), ValueError, "layers is empty"),
    (dict(target="zzz"), ValueError, "not in the model's vocabulary"),
    (dict(target=""), ValueError, "target is empty"),
    (dict(heads=0), ValueError, "heads"),
    (dict(lens_tokens=0), ValueError, "lens_tokens"),
    (dict(progress="yes"), TypeError, "progress"),
])
def test_bad_input(gpt2_model, kwargs, error, match):
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(error, match=match):
        build_report(gpt2_model, kwargs.pop("prompt"), **kwargs)


# ------------------------------------------------------------------------- progress
def test_progress_announces_only_slow_steps():
    lines = []
    p = Progress(True, after=0.05, sink=lines.append)
    with p("quick"):
        pass
    with p("slow"):
        time.sleep(0.3)
    assert lines[0] == "slow ..." and lines[1].startswith("slow: done (") and len(lines) == 2
    stream = io.StringIO()
    with Progress(True, stream=stream, after=0.05)("loading"):
        time.sleep(0.3)
    assert stream.getvalue().startswith("loading ... done (") and stream.getvalue().endswith(" s)\n")
    silent = io.StringIO()
    with Progress(False, stream=silent, after=0.0)("x"):
        time.sleep(0.1)
    assert silent.getvalue() == ""


def test_progress_from_build_report(gpt2_model):
    lines = []
    build_report(gpt2_model, PROMPT, progress=Progress(True, after=0.0, sink=lines.append))
    steps = [line[:-4] for line in lines if line.endswith(" ...")]
    assert steps[:2] == ["one forward + backward pass", "Backward Lens (vocabulary projection)"]
    assert any(s.startswith("flow graphs of layer") for s in steps) and steps[-1] == "rendering the page"
    assert len([line for line in lines if ": done (" in line]) == len(steps)


# ------------------------------------------------------------------------- the embedded model
@pytest.fixture(scope="module")
def facts():
    from tl_backward import list_models, load_model

    if "facts-gpt2" not in list_models():
        pytest.skip("the embedded facts-gpt2 is not shipped in this install")
    return load_model("facts-gpt2")


def test_embedded_model_default_report(facts):
    r = build_report(facts, PROMPT, flow=False)
    assert r.predictions[0].token == "paris" and r.target_is_prediction and r.target.prob > 0.9
    # A confident answer gets the note suggesting a counterfactual target (the runner-up).
    assert any("counterfactual" in n and repr(r.predictions[1].token) in n for n in r.notes)


def test_embedded_model_counterfactual_writes_the_target(facts):
    """The paper's reading on a trained model: descent writes the new target through W_out."""
    r = build_report(facts, PROMPT, target="rome", flow=False)
    assert r.target.token == "rome" and not r.target_is_prediction
    rows = r.lens_rows()
    assert rows[0]["writes"][0] == "rome" and rows[0]["delta_rank"] == 0
    assert not any("counterfactual" in n for n in r.notes)


def test_embedded_model_unknown_words_note(facts):
    r = build_report(facts, "The capital of France is", flow=False)
    assert any("lower case" in n for n in r.notes)
    assert isinstance(r, Report)
