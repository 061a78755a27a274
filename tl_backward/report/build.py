"""The main job as a function: one prompt in, a text summary and one offline HTML page out.

:func:`build_report` orchestrates the feature APIs on one prompt -- no new math -- from **one**
forward + backward (:func:`tl_backward.capture` of the union of the hook points every analysis
reads; each analysis then reads its tensors off that cache):

1. the model's top-5 next tokens at the last position and the target's probability (the cache's
   ``last_logits``);
2. Reversed Attention (:func:`tl_backward.attention.reversed_attention_from_cache`): ‖RA‖_F per
   head, the top heads;
3. Backward Lens (:func:`tl_backward.lens.factors_from_cache`, W_in and W_out): per layer, what W_in reads
   at the last token (top of LL(x)) and what a descent step writes through W_out (bottom of LL(δ)),
   projected for the last ``lens_tokens`` tokens only (:meth:`GradientFactors.select_tokens`);
4. VISIT flow graphs (:func:`tl_backward.flow.flow_graph` with ``cache=``), forward and backward, of the *most
   affected layer*: the layer whose MLP weights get the largest gradient,
   ``sqrt(‖∂L/∂W_in‖_F² + ‖∂L/∂W_out‖_F²)`` (from the Backward Lens factors).

The loss everywhere is the target's NLL at the last prompt position; the target defaults to the
model's own top prediction (a multi-token target is scored on its first token, so every analysis
reads the same position). ``Report.summary()`` is the text the CLI prints, ``Report.page`` the page.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
from torch import Tensor

from ..attention import ra_hook_names, reversed_attention_from_cache
from ..core import checks
from ..core.adapter import get_adapter
from ..core.capture import capture
from ..core.readout import logits_readout
from ..errors import TLBackwardError
from ..flow import flow_graph, flow_hook_names
from ..lens import factor_hook_names, factors_from_cache, lens_from_factors
from .page import report_page
from .progress import Progress, as_progress
from .result import Prediction, Report

__all__ = ["build_report", "lower_case_helps"]

# The Backward Lens matrices the report reads: what W_in reads (x) and what W_out writes (δ).
LENS_MODULES = ("mlp_in", "mlp_out")


def build_report(
    model: Any,
    prompt: str,
    *,
    target: Any = None,
    layers: int | Sequence[int] | None = None,
    heads: int = 10,
    flow: bool = True,
    lens_tokens: int | None = 16,
    progress: Any = False,
) -> Report:
    """Run the analyses on ``prompt`` and assemble a :class:`Report`.

    Args:
        model: a reconstructing ``TransformerBridge`` (e.g. ``tl_backward.load_model()``).
        prompt: one prompt (str). Words outside a word-level vocabulary read as the unknown token
            (noted in the report).
        target: the token to explain (a word such as ``" Paris"`` -- mind the leading space for BPE
            models -- or a token id); default the model's own top prediction. Scored on its first
            token.
        layers: restrict every analysis to these layers (None = all).
        heads: number of top heads whose maps the page shows.
        flow: add the forward and backward VISIT flow graphs of the most affected layer.
        lens_tokens: project the Backward Lens factors of the last ``lens_tokens`` prompt tokens
            only (None = all): the projection costs one vocabulary readout per layer, module and
            token, and the page's tables show these tokens. Layer gradient norms use every token.
        progress: True announces steps longer than 1 s on stderr; a callable receives the lines.
    """
    steps = as_progress(progress)
    if not isinstance(prompt, str):
        raise TLBackwardError(f"prompt must be a string, got {type(prompt).__name__}", argument="prompt")
    if not prompt.strip():
        raise TLBackwardError("prompt is empty: pass some text, e.g. 'the capital of france is'", argument="prompt")
    checks.count(heads, "heads", minimum=1)
    if lens_tokens is not None:
        checks.count(lens_tokens, "lens_tokens", minimum=1, hint="prompt tokens to project, or None for all")
    ad = get_adapter(model)
    layers = sorted(set(ad.layers(layers, distinct=False)))
    name = str(getattr(model.cfg, "model_name", "model"))
    batch = ad.tokenize(prompt)
    target_ids = None if target is None else ad.target_tokens(target)  # bad targets fail before any pass
    first = None if target_ids is None else int(target_ids[0])
    notes = _unknown_word_note(ad, batch.tokens, prompt)
    with_flow = flow and not getattr(model, "compatibility_mode", False)

    # 1. The one forward + backward: every analysis reads its tensors off this cache.
    chosen: dict[str, int] = {}

    def loss(logits: Tensor, tokens: Tensor) -> Tensor:
        row = logits[0, -1].float()
        chosen["id"] = int(row.argmax()) if first is None else first
        return -torch.log_softmax(row, -1)[chosen["id"]]

    names = ra_hook_names(model, layers) + factor_hook_names(model, LENS_MODULES, layers)
    if with_flow:
        names += flow_hook_names(model, layers, backward=True)
    with steps("one forward + backward pass"):
        cache = capture(model, batch.tokens, loss, names=list(dict.fromkeys(names)))
    tid = chosen["id"]
    preds, tgt, rank = _predictions(ad, cache.last_logits[0], tid)
    if target_ids is not None and len(target_ids) > 1:
        notes.append(f"the target {target!r} is {len(target_ids)} tokens; the report scores its first token "
                     f"{tgt.token!r} at the last prompt position")

    # 2-3. Reversed Attention and Backward Lens from the cache.
    ra = reversed_attention_from_cache(model, cache, layers=layers)
    factors = factors_from_cache(model, cache, modules=LENS_MODULES, layers=layers)
    grad_norms = {l: math.hypot(float(factors[l, "mlp_in"].norms().grad),
                                float(factors[l, "mlp_out"].norms().grad)) for l in layers}
    if lens_tokens is not None and lens_tokens < factors.n_tokens:
        notes.append(f"the Backward Lens tables show the last {lens_tokens} of {factors.n_tokens} prompt tokens "
                     "(lens_tokens / --lens-tokens)")
        factors = factors.select_tokens(slice(-lens_tokens, None))
    with steps("Backward Lens (vocabulary projection)"):
        lens = lens_from_factors(model, factors, tid)
    flow_layer = max(layers, key=lambda l: grad_norms[l])
    notes += _confidence_note(lens, preds, tgt)

    # 4. Flow graphs of the most affected layer, from the same cache.
    graphs: tuple[Any, ...] = ()
    if flow:
        graphs = _flow_graphs(model, prompt, flow_layer, tid, cache if with_flow else None, steps, notes)
    del cache
    report = Report(
        model_name=name, prompt=prompt, str_tokens=tuple(ad.to_str_tokens(batch.tokens)[0]), predictions=preds,
        target=tgt, target_rank=rank, target_is_prediction=tid == preds[0].id, loss=-math.log(max(tgt.prob, 1e-45)),
        d_vocab=ad.d_vocab, layers=tuple(layers), reversed_attention=ra, lens=lens, layer_grad_norms=grad_norms,
        flow_layer=flow_layer, flow=graphs, notes=tuple(notes), page=None,
    )
    with steps("rendering the page"):
        page = report_page(report, heads)
    return dataclasses.replace(report, page=page)


def _predictions(ad: Any, logits: Tensor, tid: int) -> tuple[tuple[Prediction, ...], Prediction, int]:
    """The model's top-5 at the last position, the scored target and its rank, read by the one
    readout (core/readout.py)."""
    read = logits_readout(logits[None].cpu(), k=min(5, ad.d_vocab), targets=tid)
    top_i = read.top_ids[0]
    preds = tuple(Prediction(int(i), s, float(p)) for i, s, p in zip(top_i, ad.decode_ids(top_i), read.top_probs[0]))
    tgt = Prediction(tid, ad.decode_ids([tid])[0], float(read.target_probs[0, 0]))
    return preds, tgt, int(read.ranks[0, 0])


def _confidence_note(lens: Any, preds: Sequence[Prediction], tgt: Prediction) -> list[str]:
    if tgt.prob <= 0.9:
        return []
    # A confident answer: tiny gradients that project onto noise.
    max_d = float(lens["mlp_out"].norm[:, -1].max())
    alt = next((p.token for p in preds if p.id != tgt.id), None)
    return [f"the model already gives {tgt.token!r} p = {tgt.prob:.3f}, so the loss and its gradient are "
            f"small (‖δ‖ ≤ {max_d:.2g} at the last token) and their vocabulary projections are weak; "
            "a counterfactual target shows what the gradient writes to change the answer"
            + (f" (e.g. --target {alt!r}, the runner-up)" if alt else "")]


def _flow_graphs(model: Any, prompt: str, layer: int, tid: int, cache: Any, steps: Progress,
                 notes: list[str]) -> tuple:
    try:
        with steps(f"flow graphs of layer {layer} (forward and backward)"):
            fwd = flow_graph(model, prompt, layer=layer, target=tid, cache=cache)
            # like=fwd: the backward graph keeps the forward graph's nodes, so the two line up.
            bwd = flow_graph(model, prompt, layer=layer, target=tid, backward=True, like=fwd, cache=cache)
    except ValueError as err:  # e.g. compatibility mode: VISIT refuses folded weights
        notes.append(f"no flow graph: {err}")
        return ()
    return fwd, bwd


def _unknown_word_note(ad: Any, tokens: Any, prompt: str) -> list[str]:
    tok = getattr(ad.model, "tokenizer", None)
    unk = getattr(tok, "unk_token_id", None)
    if unk is None:
        return []
    n = int((tokens == unk).sum())
    if not n:
        return []
    hint = "; its vocabulary is lower-case: try the prompt in lower case" if lower_case_helps(ad, prompt) else ""
    return [f"{n} word(s) of the prompt are not in the model's vocabulary and read as {tok.unk_token!r}{hint}"]


def lower_case_helps(ad: Any, text: str) -> bool:
    """Whether ``text`` reads fewer unknown tokens in lower case (the embedded models' vocabularies
    are lower-case); the CLI gives the same hint for ``--target``."""
    unk = getattr(getattr(ad.model, "tokenizer", None), "unk_token_id", None)
    if unk is None or text == text.lower():
        return False
    return int((ad.tokenize(text.lower()).tokens == unk).sum()) < int((ad.tokenize(text).tokens == unk).sum())
