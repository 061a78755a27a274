"""The main job as a function: one prompt in, a text summary and one offline HTML page out.

:func:`build_report` orchestrates the feature APIs on one prompt -- no new math:

1. a forward pass: the model's top-5 next tokens at the last position and the target's probability;
2. Reversed Attention (:func:`tl_backward.attention.reversed_attention`): ‖RA‖_F per head, the top heads;
3. Backward Lens (:func:`tl_backward.lens.backward_lens`, W_in and W_out): per layer, what W_in reads
   at the last token (top of LL(x)) and what a descent step writes through W_out (bottom of LL(δ));
4. VISIT flow graphs (:func:`tl_backward.flow.flow_graph`), forward and backward, of the *most
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

from ..attention import reversed_attention
from ..core.adapter import get_adapter
from ..core.readout import logits_readout
from ..errors import TLBackwardError
from ..flow import flow_graph
from ..lens import backward_lens
from .page import report_page
from .progress import Progress, as_progress
from .result import Prediction, Report

__all__ = ["build_report", "lower_case_helps"]


def build_report(
    model: Any,
    prompt: str,
    *,
    target: Any = None,
    layers: int | Sequence[int] | None = None,
    heads: int = 10,
    flow: bool = True,
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
        progress: True announces steps longer than 1 s on stderr; a callable receives the lines.
    """
    steps = as_progress(progress)
    if not isinstance(prompt, str):
        raise TLBackwardError(f"prompt must be a string, got {type(prompt).__name__}", argument="prompt")
    if not prompt.strip():
        raise TLBackwardError("prompt is empty: pass some text, e.g. 'the capital of france is'", argument="prompt")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise TLBackwardError(f"heads must be a positive int, got {heads!r}", argument="heads")
    ad = get_adapter(model)
    layers = sorted(set(ad.layers(layers)))
    name = str(getattr(model.cfg, "model_name", "model"))
    notes: list[str] = []

    # 1. What the model predicts (one no-grad forward pass).
    batch = ad.tokenize(prompt)
    tokens = batch.tokens
    str_tokens = tuple(ad.to_str_tokens(tokens)[0])
    target_ids = None if target is None else ad.target_tokens(target)  # bad targets fail before any pass
    with steps("forward pass"), torch.no_grad():
        logits = model(tokens.to(next(model.parameters()).device), return_type="logits")
    # the model's own distribution at the last position, read by the one readout (core/readout.py)
    first = None if target_ids is None else int(target_ids[0])
    read = logits_readout(logits[0, -1:].cpu(), k=min(5, ad.d_vocab), targets=first)
    top_i = read.top_ids[0]
    preds = tuple(Prediction(int(i), s, float(p)) for i, s, p in zip(top_i, ad.decode_ids(top_i), read.top_probs[0]))
    notes += _unknown_word_note(ad, tokens, prompt)

    if first is None:  # the prediction itself: nothing is more probable
        tgt, rank = preds[0], 0
    else:
        if len(target_ids) > 1:
            notes.append(f"the target {target!r} is {len(target_ids)} tokens; the report scores its first token "
                         f"{ad.decode_ids([first])[0]!r} at the last prompt position")
        tgt = Prediction(first, ad.decode_ids([first])[0], float(read.target_probs[0, 0]))
        rank = int(read.ranks[0, 0])
    tid = tgt.id
    loss = -math.log(max(tgt.prob, 1e-45))

    # 2-3. The two backward passes.
    with steps("Reversed Attention (one backward pass)"):
        ra = reversed_attention(model, prompt, tid, layers=layers)
    with steps("Backward Lens (one backward pass + vocabulary projection)"):
        lens = backward_lens(model, prompt, tid, layers=layers, modules=("mlp_in", "mlp_out"))
    grad_norms = {l: math.hypot(float(lens.factors[l, "mlp_in"].norms().grad),
                                float(lens.factors[l, "mlp_out"].norms().grad)) for l in layers}
    flow_layer = max(layers, key=lambda l: grad_norms[l])

    if tgt.prob > 0.9:  # a confident answer: tiny gradients that project onto noise
        max_d = float(lens["mlp_out"].norm[:, -1].max())
        alt = next((p.token for p in preds if p.id != tid), None)
        notes.append(
            f"the model already gives {tgt.token!r} p = {tgt.prob:.3f}, so the loss and its gradient are "
            f"small (‖δ‖ ≤ {max_d:.2g} at the last token) and their vocabulary projections are weak; "
            "a counterfactual target shows what the gradient writes to change the answer"
            + (f" (e.g. --target {alt!r}, the runner-up)" if alt else ""))

    # 4. Flow graphs of the most affected layer.
    graphs: tuple[Any, ...] = ()
    if flow:
        graphs = _flow_graphs(model, prompt, flow_layer, tid, steps, notes)

    report = Report(
        model_name=name, prompt=prompt, str_tokens=str_tokens, predictions=preds, target=tgt,
        target_rank=rank, target_is_prediction=tid == preds[0].id, loss=loss, d_vocab=ad.d_vocab,
        layers=tuple(layers), reversed_attention=ra, lens=lens, layer_grad_norms=grad_norms,
        flow_layer=flow_layer, flow=graphs, notes=tuple(notes), page=None,
    )
    with steps("rendering the page"):
        page = report_page(report, heads)
    return dataclasses.replace(report, page=page)


def _flow_graphs(model: Any, prompt: str, layer: int, tid: int, steps: Progress, notes: list[str]) -> tuple:
    out = []
    try:
        with steps(f"flow graphs of layer {layer} (forward and backward)"):
            fwd = flow_graph(model, prompt, layer=layer, target=tid)
            # like=fwd: the backward graph keeps the forward graph's nodes, so the two line up.
            out = [fwd, flow_graph(model, prompt, layer=layer, target=tid, backward=True, like=fwd)]
    except ValueError as err:  # e.g. compatibility mode: VISIT refuses folded weights
        notes.append(f"no flow graph: {err}")
        return ()
    return tuple(out)


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
