"""Rows of the bad-input table, part 1: loading, capture and metrics, Reversed Attention, patching,
Backward Lens and editing. Each row: (name, call(env), a word the message must contain[, type]).
Part 2 (flow graphs, MAS) is tests/bad_input_rows_more.py; the harness is tests/bad_inputs.py.
"""

from __future__ import annotations

import dataclasses

import torch

import tl_backward as tlb
from tl_backward.attention import mean_over, reversed_attention_from
from tl_backward.lens import continuation_correct
from tl_backward.core.metrics import logit_diff, target_nll
from tests.bad_inputs import NLL, PROMPT, REQUEST, TARGET, Row, nested, reenter

R = Row
nan, inf = float("nan"), float("inf")
LONG = torch.long
TWO = ["the cat sat", "a dog ran"]


def ids(*values, dtype=LONG):
    return torch.tensor([list(values)], dtype=dtype)


def cap(e, input=PROMPT, metric=NLL, **kw):
    return tlb.capture(e.gpt2, input, metric, names="blocks.0.hook_resid_pre", **kw)


def metric_of(value):
    """A metric whose value is ``value`` times a differentiable scalar of the logits."""
    return lambda logits, tokens: logits[:, -1, 5].sum() * value


def ra(e, **kw):
    kw.setdefault("target", TARGET)
    return tlb.reversed_attention(e.gpt2, kw.pop("input", PROMPT), **kw)


def patch(e, eta=0.1, model=None, **kw):
    with tlb.patch_attention(model or e.gpt2, kw.pop("delta", e.ra), eta=eta, **kw):
        pass


def patched_forward(e, text):
    with tlb.patch_attention(e.gpt2, e.ra, eta=0.1):
        cap(e, input=text)


def delta_like(e, value):
    return torch.full_like(e.ra.maps[:, 0], value)


def zero(e, heads, model=None):
    with tlb.zero_heads(model or e.gpt2, heads):
        pass


def fps(e, prompt=PROMPT, target=TARGET, **kw):
    kw.setdefault("layer", 0)
    kw.setdefault("eta", 1.0)
    return tlb.forward_pass_shift(e.gpt2, prompt, target, **kw)


def reenter_edit(e):
    edit = fps(e, target=" dog", eta=0.5)
    with edit:
        pass
    with edit:
        pass


def evaluate(e, requests=(REQUEST,), **kw):
    kw.setdefault("progress", False)
    return tlb.evaluate_edits(e.gpt2, list(requests), **kw)


def gf(e, **kw):
    kw.setdefault("target", TARGET)
    return tlb.gradient_factors(e.gpt2, kw.pop("input", PROMPT), **kw)


def lens(e, **kw):
    return tlb.backward_lens(e.gpt2, kw.pop("input", PROMPT), kw.pop("target", TARGET), **kw)


def rank(e, prompts=TWO, targets=TARGET, **kw):
    kw.setdefault("progress", False)
    return tlb.rank_heads(e.gpt2, prompts, targets, **kw)


LOADING = [
    R("load_model name=42", lambda e: tlb.load_model(42), "name"),
    R("load_model name=''", lambda e: tlb.load_model(""), "name"),
    R("load_model name='   '", lambda e: tlb.load_model("   "), "name"),
    R("load_model missing directory", lambda e: tlb.load_model("/nonexistent/tlb-model"), "name"),
    R("load_model a file", lambda e: tlb.load_model(str(e.tmp / "file.txt")), "name"),
    R("load_model empty directory", lambda e: tlb.load_model(e.tmp / "empty"), "name"),
    R("load_model device unavailable", lambda e: tlb.load_model(
        device="cuda:99" if torch.cuda.is_available() else "cuda"), "device"),
    R("load_model device='gpu'", lambda e: tlb.load_model(device="gpu"), "device"),
    R("load_model device=3.5", lambda e: tlb.load_model(device=3.5), "device"),
    R("load_model device='meta'", lambda e: tlb.load_model(device="meta"), "device"),
    R("load_model device='cuda:-1'", lambda e: tlb.load_model(device="cuda:-1"), "device"),
    R("load_model dtype='float32'", lambda e: tlb.load_model(dtype="float32"), "dtype"),
    R("load_model dtype=int64", lambda e: tlb.load_model(dtype=torch.int64), "dtype"),
    R("load_model dtype=complex64", lambda e: tlb.load_model(dtype=torch.complex64), "dtype"),
]

CAPTURE = [
    R("capture input=None", lambda e: cap(e, input=None), "input"),
    R("capture input=42", lambda e: cap(e, input=42), "input"),
    R("capture input=''", lambda e: cap(e, input=""), "input"),
    R("capture input='  '", lambda e: cap(e, input="  "), "input"),
    R("capture input=[]", lambda e: cap(e, input=[]), "input"),
    R("capture input=[str, int]", lambda e: cap(e, input=["the cat", 3]), "input"),
    R("capture input empty batch", lambda e: cap(e, input=torch.zeros(0, 3, dtype=LONG)), "input"),
    R("capture input no positions", lambda e: cap(e, input=torch.zeros(2, 0, dtype=LONG)), "input"),
    R("capture input 1-D empty", lambda e: cap(e, input=torch.zeros(0, dtype=LONG)), "input"),
    R("capture input float ids", lambda e: cap(e, input=ids(5.0, 6.0, dtype=torch.float32)), "input"),
    R("capture input complex ids", lambda e: cap(e, input=ids(5, 6, dtype=torch.complex64)), "input"),
    R("capture input bool ids", lambda e: cap(e, input=ids(True, False, dtype=torch.bool)), "input"),
    R("capture input id >= vocab", lambda e: cap(e, input=ids(5, 10**6)), "input"),
    R("capture input id < 0", lambda e: cap(e, input=ids(5, -1)), "input"),
    R("capture input 3-D ids", lambda e: cap(e, input=torch.ones(1, 2, 3, dtype=LONG)), "input"),
    R("capture input longer than n_ctx", lambda e: cap(e, input="the " * 80), "input"),
    R("capture input list of tensors", lambda e: cap(e, input=[ids(5, 6)]), "input"),
    R("capture metric=None", lambda e: cap(e, metric=None), "metric"),
    R("capture metric='mat'", lambda e: cap(e, metric="mat"), "metric"),
    R("capture metric=42", lambda e: cap(e, metric=42), "metric"),
    R("capture metric -> nan", lambda e: cap(e, metric=metric_of(nan)), "metric"),
    R("capture metric -> inf", lambda e: cap(e, metric=metric_of(inf)), "metric"),
    R("capture metric -> float", lambda e: cap(e, metric=lambda lg, t: 1.0), "metric"),
    R("capture metric -> vector", lambda e: cap(e, metric=lambda lg, t: lg[:, -1, :3].sum(0)), "metric"),
    R("capture metric -> detached", lambda e: cap(e, metric=lambda lg, t: lg.sum().detach()), "metric"),
    R("capture names=42", lambda e: tlb.capture(e.gpt2, PROMPT, NLL, names=42), "names"),
    R("capture names=[None]", lambda e: tlb.capture(e.gpt2, PROMPT, NLL, names=[None]), "names"),
    R("capture names=[42]", lambda e: tlb.capture(e.gpt2, PROMPT, NLL, names=[42]), "names"),
    R("capture names=[]", lambda e: tlb.capture(e.gpt2, PROMPT, NLL, names=[]), "names"),
    R("capture names unknown hook", lambda e: tlb.capture(e.gpt2, PROMPT, NLL, names="blocks.0.hook_nope"),
      "names"),
    R("capture names filter matches none", lambda e: tlb.capture(e.gpt2, PROMPT, NLL, names=lambda n: False),
      "names"),
    R("capture names and names_filter", lambda e: tlb.capture(e.gpt2, PROMPT, NLL, names="hook_embed",
                                                              names_filter="hook_embed"), "names_filter"),
    R("capture names_filter=42", lambda e: tlb.capture(e.gpt2, PROMPT, NLL, names_filter=42), "names_filter"),
    R("capture resid_mid on parallel blocks", lambda e: tlb.capture(e.neox, PROMPT, NLL,
                                                                    names="blocks.0.hook_resid_mid"), "names"),
    R("capture prepend_bos='yes'", lambda e: cap(e, prepend_bos="yes"), "prepend_bos"),
    R("capture prepend_bos=1", lambda e: cap(e, prepend_bos=1), "prepend_bos"),
    R("target_nll(None)", lambda e: target_nll(None), "target"),
    R("target ''", lambda e: cap(e, metric=target_nll("")), "target"),
    R("target not in vocabulary", lambda e: cap(e, metric=target_nll(" zyzzyva")), "target"),
    R("target id >= vocab", lambda e: cap(e, metric=target_nll(10**6)), "target"),
    R("target id < 0", lambda e: cap(e, metric=target_nll(-1)), "target"),
    R("target True", lambda e: cap(e, metric=target_nll(True)), "target"),
    R("target 1.5", lambda e: cap(e, metric=target_nll(1.5)), "target"),
    R("target [1.5]", lambda e: cap(e, metric=target_nll([1.5])), "target"),
    R("target []", lambda e: cap(e, metric=target_nll([])), "target"),
    R("target float tensor", lambda e: cap(e, metric=target_nll(torch.tensor([5.0]))), "target"),
    R("target 3 strings for 2 prompts", lambda e: cap(e, input=TWO, metric=target_nll([" a", " b", " c"])),
      "target"),
    R("target 3 ids for 2 prompts", lambda e: cap(e, input=TWO, metric=target_nll([5, 6, 7])), "target"),
    R("target 2 ids for 1 prompt", lambda e: cap(e, metric=target_nll([5, 6])), "target"),
    R("target + prompt longer than n_ctx", lambda e: cap(e, input="the " * 40, metric=target_nll(" cat" * 40)),
      "target"),
    R("logit_diff b=None", lambda e: cap(e, metric=logit_diff(" cat", None)), "b"),
    R("logit_diff a multi-token", lambda e: cap(e, metric=logit_diff(" the cat", " dog")), "a"),
    R("logit_diff a >= vocab", lambda e: cap(e, metric=logit_diff(10**6, 5)), "a"),
    R("logit_diff a True", lambda e: cap(e, metric=logit_diff(True, 5)), "a"),
    R("cache unknown key", lambda e: e.cache["nope"], "captured", KeyError),
    R("cache key 42", lambda e: e.cache[42], "cache keys", KeyError),
    R("cache layer not captured", lambda e: e.cache["resid_pre", 1], "captured", KeyError),
    R("cache layer out of range", lambda e: e.cache["resid_pre", 5], "layer", KeyError),
    R("cache layer -3", lambda e: e.cache["resid_pre", -3], "layer", KeyError),
    R("cache.grad layer 7", lambda e: e.cache.grad("pattern", 7), "layer", KeyError),
    R("cache.resid_grads('side')", lambda e: e.cache.resid_grads("side"), "kind"),
    R("cache.resid_grads not all layers", lambda e: e.cache.resid_grads("pre"), "layer", KeyError),
]

ATTENTION = [
    R("reversed_attention layers=1.0", lambda e: ra(e, layers=1.0), "layers"),
    R("reversed_attention layers=[1, 1]", lambda e: ra(e, layers=[1, 1]), "layers"),
    R("reversed_attention layers=[0, -2]", lambda e: ra(e, layers=[0, -2]), "layers"),
    R("reversed_attention layers=5", lambda e: ra(e, layers=5), "layers"),
    R("reversed_attention layers=-3", lambda e: ra(e, layers=-3), "layers"),
    R("reversed_attention layers=[]", lambda e: ra(e, layers=[]), "layers"),
    R("reversed_attention layers='0'", lambda e: ra(e, layers="0"), "layers"),
    R("reversed_attention layers=True", lambda e: ra(e, layers=True), "layers"),
    R("reversed_attention layers=[0, None]", lambda e: ra(e, layers=[0, None]), "layers"),
    R("reversed_attention layers=float tensor", lambda e: ra(e, layers=torch.tensor([0.5])), "layers"),
    R("reversed_attention llama layers=[1, 1]", lambda e: tlb.reversed_attention(e.llama, PROMPT, TARGET,
                                                                                 layers=[1, 1]), "layers"),
    R("reversed_attention target and metric", lambda e: ra(e, metric=NLL), "metric"),
    R("reversed_attention neither", lambda e: ra(e, target=None), "target"),
    R("reversed_attention input float", lambda e: ra(e, input=ids(5.0, dtype=torch.float64)), "input"),
    R("reversed_attention input empty batch", lambda e: ra(e, input=torch.zeros(0, 2, dtype=LONG)), "input"),
    R("reversed_attention prepend_bos='yes'", lambda e: ra(e, prepend_bos="yes"), "prepend_bos"),
    R("reversed_attention metric -> nan", lambda e: ra(e, target=None, metric=metric_of(nan)), "metric"),
    R("reversed_attention target >= vocab", lambda e: ra(e, target=10**6), "target"),
    R("reversed_attention 3 ids for 2 prompts", lambda e: ra(e, input=TWO, target=[5, 6, 7]), "target"),
    R("RA.layer_index(5)", lambda e: e.ra.layer_index(5), "layer"),
    R("RA.layer_index(-3)", lambda e: e.ra.layer_index(-3), "layer"),
    R("RA.layer_index(1.0)", lambda e: e.ra.layer_index(1.0), "layer"),
    R("RA.layer_index(True)", lambda e: e.ra.layer_index(True), "layer"),
    R("RA.layer_index not computed", lambda e: e.ra0.layer_index(1), "layer"),
    R("RA.map head 99", lambda e: e.ra.map(0, 99), "head"),
    R("RA.map head 1.5", lambda e: e.ra.map(0, 1.5), "head"),
    R("RA.map row 3", lambda e: e.ra.map(0, 0, row=3), "row"),
    R("RA.map row True", lambda e: e.ra.map(0, 0, row=True), "row"),
    R("RA.map which='side'", lambda e: e.ra.map(0, 0, which="side"), "which"),
    R("RA.top_heads k=0", lambda e: e.ra.top_heads(k=0), "k"),
    R("RA.top_heads k=True", lambda e: e.ra.top_heads(k=True), "k"),
    R("RA.top_heads k=2.5", lambda e: e.ra.top_heads(k=2.5), "k"),
    R("RA.head_norms which='side'", lambda e: e.ra.head_norms("side"), "which"),
    R("RA.mean align='middle'", lambda e: e.ra.mean(align="middle"), "align"),
    R("RA.mean of a mean", lambda e: e.ra.mean().mean(), "averaged"),
    R("reversed_attention_from grad_of='x'", lambda e: reversed_attention_from(
        torch.ones(2, 2), torch.ones(2, 2), 1.0, grad_of="x"), "grad_of"),
    R("reversed_attention_from shapes", lambda e: reversed_attention_from(
        torch.ones(2, 2), torch.ones(3, 3), 1.0), "grad"),
    R("reversed_attention_from scale=0", lambda e: reversed_attention_from(
        torch.ones(2, 2), torch.ones(2, 2), 0.0), "scale"),
    R("reversed_attention_from scale=nan", lambda e: reversed_attention_from(
        torch.ones(2, 2), torch.ones(2, 2), nan), "scale"),
    R("reversed_attention_from scale=True", lambda e: reversed_attention_from(
        torch.ones(2, 2), torch.ones(2, 2), True), "scale"),
    R("reversed_attention_from pattern=list", lambda e: reversed_attention_from(
        [[1.0]], torch.ones(1, 1), 1.0), "pattern"),
    R("rank_heads prompts='str'", lambda e: rank(e, prompts="the cat"), "prompts"),
    R("rank_heads prompts=[]", lambda e: rank(e, prompts=[]), "prompts"),
    R("rank_heads prompts=[1, 2]", lambda e: rank(e, prompts=[1, 2]), "prompts"),
    R("rank_heads prompts 1-D ids", lambda e: rank(e, prompts=torch.tensor([5, 6])), "prompts"),
    R("rank_heads batch_size=0", lambda e: rank(e, batch_size=0), "batch_size"),
    R("rank_heads batch_size=True", lambda e: rank(e, batch_size=True), "batch_size"),
    R("rank_heads batch_size=2.0", lambda e: rank(e, batch_size=2.0), "batch_size"),
    R("rank_heads no target", lambda e: rank(e, targets=None), "target"),
    R("rank_heads per-prompt target None", lambda e: rank(e, targets=[" cat", None]), "target"),
    R("rank_heads target id >= vocab", lambda e: rank(e, targets=[5, 10**6]), "target"),
    R("rank_heads 3 targets for 2 prompts", lambda e: rank(e, targets=[" a", " b", " c"]), "target"),
    R("rank_heads progress='yes'", lambda e: rank(e, progress="yes"), "progress"),
    R("rank_heads layers=[1, 1]", lambda e: rank(e, layers=[1, 1]), "layers"),
    R("mean_over align='x'", lambda e: mean_over(e.gpt2, TWO, TARGET, align="x"), "align"),
    R("mean_over exact, lengths differ", lambda e: mean_over(e.gpt2, ["the cat", "a dog ran"], TARGET),
      "align"),
    R("HeadRanking.top k=0", lambda e: e.ranking.top(k=0), "k"),
    R("HeadRanking.top k=True", lambda e: e.ranking.top(k=True), "k"),
    R("HeadRanking.scores('random')", lambda e: e.ranking.scores("random"), "which"),
    R("HeadRanking.order('side')", lambda e: e.ranking.order("side"), "which"),
    R("HeadRanking.order descending='no'", lambda e: e.ranking.order(descending="no"), "descending"),
    R("HeadRanking.table('side')", lambda e: e.ranking.table("side"), "which"),
]

PATCHING = [
    R("patch_attention delta=None", lambda e: patch(e, delta=None), "delta"),
    R("patch_attention delta=int tensor", lambda e: patch(e, delta=torch.zeros(2, 4, 5, 5, dtype=LONG)), "delta"),
    R("patch_attention delta NaN", lambda e: patch(e, delta=delta_like(e, nan)), "delta"),
    R("patch_attention delta inf", lambda e: patch(e, delta=delta_like(e, inf)), "delta"),
    R("patch_attention RA with NaN", lambda e: patch(e, delta=dataclasses.replace(e.ra, maps=e.ra.maps * nan)),
      "delta"),
    R("patch_attention llama delta NaN", lambda e: patch(e, model=e.llama, delta=delta_like(e, nan)), "delta"),
    R("patch_attention delta 3-D", lambda e: patch(e, delta=torch.zeros(2, 5, 5)), "delta"),
    R("patch_attention delta wrong heads", lambda e: patch(e, delta=torch.zeros(2, 3, 5, 5)), "delta"),
    R("patch_attention delta not square", lambda e: patch(e, delta=torch.zeros(2, 4, 5, 4)), "delta"),
    R("patch_attention delta wrong layer count", lambda e: patch(e, delta=torch.zeros(3, 4, 5, 5)), "layers"),
    R("patch_attention eta=nan", lambda e: patch(e, eta=nan), "eta"),
    R("patch_attention eta=inf", lambda e: patch(e, eta=inf), "eta"),
    R("patch_attention eta='1'", lambda e: patch(e, eta="1"), "eta"),
    R("patch_attention eta=True", lambda e: patch(e, eta=True), "eta"),
    R("patch_attention eta overflows the pattern", lambda e: patch(e, delta=delta_like(e, 1e10), eta=1e30), "eta"),
    R("patch_attention layers=[5]", lambda e: patch(e, layers=[5]), "layers"),
    R("patch_attention layers=1.0", lambda e: patch(e, layers=1.0), "layers"),
    R("patch_attention layers=[0, 0]", lambda e: patch(e, layers=[0, 0]), "layers"),
    R("patch_attention layer not in delta", lambda e: patch(e, delta=e.ra0, layers=[1]), "layers"),
    R("patch_attention heads=[1.5]", lambda e: patch(e, heads=[1.5]), "heads"),
    R("patch_attention heads=[(0, 1.5)]", lambda e: patch(e, heads=[(0, 1.5)]), "heads"),
    R("patch_attention heads=[(0.5, 1)]", lambda e: patch(e, heads=[(0.5, 1)]), "heads"),
    R("patch_attention heads=[99]", lambda e: patch(e, heads=[99]), "heads"),
    R("patch_attention heads=[(5, 0)]", lambda e: patch(e, heads=[(5, 0)]), "heads"),
    R("patch_attention heads=[]", lambda e: patch(e, heads=[]), "heads"),
    R("patch_attention heads='0'", lambda e: patch(e, heads="0"), "heads"),
    R("patch_attention heads=[True]", lambda e: patch(e, heads=[True]), "heads"),
    R("patch_attention align='middle'", lambda e: patch(e, align="middle"), "align"),
    R("patch_attention input of another length", lambda e: patched_forward(e, "the cat"), "delta"),
    R("patch_attention re-entered", lambda e: reenter(tlb.patch_attention(e.gpt2, e.ra, eta=0.1)),
      "patch_attention"),
    R("patch_attention entered inside itself", lambda e: nested(tlb.patch_attention(e.gpt2, e.ra, eta=0.1)),
      "patch_attention"),
    R("zero_heads heads=None", lambda e: zero(e, None), "heads"),
    R("zero_heads heads=[('a', 'b')]", lambda e: zero(e, [("a", "b")]), "heads"),
    R("zero_heads heads=[(0, 1.5)]", lambda e: zero(e, [(0, 1.5)]), "heads"),
    R("zero_heads heads=[(0.0, 1)]", lambda e: zero(e, [(0.0, 1)]), "heads"),
    R("zero_heads heads=[(5, 0)]", lambda e: zero(e, [(5, 0)]), "heads"),
    R("zero_heads heads=[(0, 99)]", lambda e: zero(e, [(0, 99)]), "heads"),
    R("zero_heads heads=[0]", lambda e: zero(e, [0]), "heads"),
    R("zero_heads heads=5", lambda e: zero(e, 5), "heads"),
    R("zero_heads heads=[(0, 1, 2)]", lambda e: zero(e, [(0, 1, 2)]), "heads"),
    R("zero_heads heads=[(True, 0)]", lambda e: zero(e, [(True, 0)]), "heads"),
    R("zero_heads heads=[(0, None)]", lambda e: zero(e, [(0, None)]), "heads"),
    R("zero_heads llama heads=[(0, 4)]", lambda e: zero(e, [(0, 4)], model=e.llama), "heads"),
    R("zero_heads re-entered", lambda e: reenter(tlb.zero_heads(e.gpt2, [(0, 1)])), "zero_heads"),
]

LENS = [
    R("gradient_factors modules='nope'", lambda e: gf(e, modules="nope"), "modules"),
    R("gradient_factors modules=[]", lambda e: gf(e, modules=[]), "modules"),
    R("gradient_factors modules=42", lambda e: gf(e, modules=42), "modules"),
    R("gradient_factors mlp_gate on GPT-2", lambda e: gf(e, modules="mlp_gate"), "modules"),
    R("gradient_factors modules=['q', 1]", lambda e: gf(e, modules=["q", 1]), "modules"),
    R("gradient_factors layers=1.5", lambda e: gf(e, layers=1.5), "layers"),
    R("gradient_factors layers=[0, 0]", lambda e: gf(e, layers=[0, 0]), "layers"),
    R("gradient_factors target and metric", lambda e: gf(e, metric=NLL), "metric"),
    R("gradient_factors input float", lambda e: gf(e, input=ids(5.0, dtype=torch.float32)), "input"),
    R("gradient_factors prepend_bos='no'", lambda e: gf(e, prepend_bos="no"), "prepend_bos"),
    R("GradientFactors[0]", lambda e: e.gf[0], "gf[layer, module]", KeyError),
    R("GradientFactors[5, 'mlp_in']", lambda e: e.gf[5, "mlp_in"], "layer", KeyError),
    R("GradientFactors[0, 'q'] not computed", lambda e: e.gf[0, "q"], "module", KeyError),
    R("GradientFactors[0, 'mlp_in', 0]", lambda e: e.gf[0, "mlp_in", 0], "head"),
    R("Factor.svd k=0", lambda e: e.gf[0, "mlp_in"].svd(k=0), "k"),
    R("Factor.svd k=True", lambda e: e.gf[0, "mlp_in"].svd(k=True), "k"),
    R("Factor.svd k=1.5", lambda e: e.gf[0, "mlp_in"].svd(k=1.5), "k"),
    R("Factor.head(99)", lambda e: e.gf_q[0, "q"].head(99), "head"),
    R("Factor.head(1.0)", lambda e: e.gf_q[0, "q"].head(1.0), "head"),
    R("Factor.sgd_output_change token 99", lambda e: e.gf[0, "mlp_in"].sgd_output_change(99, 0.1), "token"),
    R("Factor.sgd_output_change token True", lambda e: e.gf[0, "mlp_in"].sgd_output_change(True, 0.1), "token"),
    R("Factor.sgd_output_change lr=inf", lambda e: e.gf[0, "mlp_in"].sgd_output_change(0, inf), "lr"),
    R("Factor.sgd_output_change lr=nan", lambda e: e.gf[0, "mlp_in"].sgd_output_change(0, nan), "lr"),
    R("Factor.sgd_output_change lr='0.1'", lambda e: e.gf[0, "mlp_in"].sgd_output_change(0, "0.1"), "lr"),
    R("Factor.reconstruct dtype='float'", lambda e: e.gf[0, "mlp_in"].reconstruct(dtype="float"), "dtype"),
    R("Factor.rank rtol=nan", lambda e: e.gf[0, "mlp_in"].rank(rtol=nan), "rtol"),
    R("Factor.rank rtol='x'", lambda e: e.gf[0, "mlp_in"].rank(rtol="x"), "rtol"),
    R("backward_lens target=None", lambda e: lens(e, target=None), "target"),
    R("backward_lens top_k=0", lambda e: lens(e, top_k=0), "top_k"),
    R("backward_lens top_k > vocab", lambda e: lens(e, top_k=10**6), "top_k"),
    R("backward_lens top_k=True", lambda e: lens(e, top_k=True), "top_k"),
    R("backward_lens top_k=2.0", lambda e: lens(e, top_k=2.0), "top_k"),
    R("backward_lens normalize='yes'", lambda e: lens(e, normalize="yes"), "normalize"),
    R("backward_lens normalize=None", lambda e: lens(e, normalize=None), "normalize"),
    R("backward_lens modules='nope'", lambda e: lens(e, modules="nope"), "modules"),
    R("backward_lens layers=[1, 1]", lambda e: lens(e, layers=[1, 1]), "layers"),
    R("backward_lens 3 ids for 2 prompts", lambda e: lens(e, input=TWO, target=[5, 6, 7]), "target"),
    R("backward_lens target >= vocab", lambda e: lens(e, target=10**6), "target"),
    R("backward_lens input complex", lambda e: lens(e, input=ids(5, dtype=torch.complex64)), "input"),
    R("BackwardLens['q']", lambda e: e.lens["q"], "not projected", KeyError),
    R("BackwardLens.layer_index(5)", lambda e: e.lens.layer_index(5), "layer"),
    R("BackwardLens.layer_index(-3)", lambda e: e.lens.layer_index(-3), "layer"),
    R("BackwardLens.layer_index(0.0)", lambda e: e.lens.layer_index(0.0), "layer"),
    R("BackwardLens.token_index(99)", lambda e: e.lens.token_index(99), "token"),
    R("BackwardLens.token_index((0, 99))", lambda e: e.lens.token_index((0, 99)), "token"),
    R("BackwardLens.token_index(1.5)", lambda e: e.lens.token_index(1.5), "token"),
    R("BackwardLens.tokens which='side'", lambda e: e.lens.tokens("mlp_in", 0, 0, which="side"), "which"),
    R("BackwardLens.imprint_shift lr=nan", lambda e: e.lens.imprint_shift(0, lr=nan), "lr"),
    R("BackwardLens.imprint_shift lr=inf", lambda e: e.lens.imprint_shift(0, lr=inf), "lr"),
    R("BackwardLens.imprint_shift lr='x'", lambda e: e.lens.imprint_shift(0, lr="x"), "lr"),
    R("BackwardLens.decode id >= vocab", lambda e: e.lens.decode([10**6]), "ids"),
]

EDITING = [
    R("forward_pass_shift prompt=42", lambda e: fps(e, prompt=42), "prompt"),
    R("forward_pass_shift prompt=''", lambda e: fps(e, prompt=""), "prompt"),
    R("forward_pass_shift target=None", lambda e: fps(e, target=None), "target"),
    R("forward_pass_shift target >= vocab", lambda e: fps(e, target=10**6), "target"),
    R("forward_pass_shift target=1.5", lambda e: fps(e, target=1.5), "target"),
    R("forward_pass_shift layer=1.5", lambda e: fps(e, layer=1.5), "layer"),
    R("forward_pass_shift layer=5", lambda e: fps(e, layer=5), "layer"),
    R("forward_pass_shift layer=True", lambda e: fps(e, layer=True), "layer"),
    R("forward_pass_shift eta=0", lambda e: fps(e, eta=0), "eta"),
    R("forward_pass_shift eta=-1", lambda e: fps(e, eta=-1), "eta"),
    R("forward_pass_shift eta=nan", lambda e: fps(e, eta=nan), "eta"),
    R("forward_pass_shift eta=inf", lambda e: fps(e, eta=inf), "eta"),
    R("forward_pass_shift eta='1'", lambda e: fps(e, eta="1"), "eta"),
    R("forward_pass_shift eta overflows W_out", lambda e: fps(e, target=" dog", eta=1e300), "eta"),
    R("forward_pass_shift prepend_bos='yes'", lambda e: fps(e, prepend_bos="yes"), "prepend_bos"),
    R("Edit re-entered after its block", reenter_edit, "edit"),
    R("evaluate_edits layer without eta", lambda e: evaluate(e, layer=1), "eta"),
    R("evaluate_edits eta without layer", lambda e: evaluate(e, eta=1.0), "layer"),
    R("evaluate_edits layer=9", lambda e: evaluate(e, layer=9, eta=1.0), "layer"),
    R("evaluate_edits requests='x'", lambda e: tlb.evaluate_edits(e.gpt2, "x", progress=False), "requests"),
    R("evaluate_edits requests=[]", lambda e: evaluate(e, requests=[]), "requests"),
    R("evaluate_edits request lacks keys", lambda e: evaluate(e, requests=[{"prompt": "the cat"}]), "requests"),
    R("evaluate_edits paraphrases='str'", lambda e: evaluate(e, requests=[{**REQUEST, "paraphrases": "x"}]),
      "requests"),
    R("evaluate_edits target_new >= vocab", lambda e: evaluate(e, requests=[{**REQUEST, "target_new": 10**6}]),
      "requests"),
    R("evaluate_edits progress='yes'", lambda e: evaluate(e, progress="yes"), "progress"),
    R("continuation_correct prompts='x'", lambda e: continuation_correct(e.gpt2, "x", ["cat"]), "prompts"),
    R("continuation_correct 2 targets for 1", lambda e: continuation_correct(e.gpt2, ["a"], ["b", "c"]),
      "targets"),
    R("continuation_correct prompts=[1]", lambda e: continuation_correct(e.gpt2, [1], ["cat"]), "prompts"),
    R("continuation_correct targets=[None]", lambda e: continuation_correct(e.gpt2, ["a"], [None]), "targets"),
]

ROWS = LOADING + CAPTURE + ATTENTION + PATCHING + LENS + EDITING
