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

import math
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

__all__ = ["Report", "Prediction", "Progress", "build_report"]


# ---------------------------------------------------------------------------------------- progress
class Progress:
    """Announces steps that take longer than ``after`` seconds (default 1 s) on ``stream``.

    ``with progress("loading facts-gpt2"):`` prints ``"loading facts-gpt2 ..."`` only once the step
    has run for ``after`` seconds, then ``" done (3.2 s)"`` when it ends; quick steps print nothing.
    ``after <= 0`` announces every step. ``enabled=False`` is silent. ``sink`` (a callable taking
    one line) replaces the stream: it receives ``"step ..."`` and ``"step: done (3.2 s)"``.
    """

    def __init__(self, enabled: bool = True, *, stream: Any = None, after: float = 1.0,
                 sink: Callable[[str], None] | None = None):
        self.enabled = bool(enabled)
        self.stream = stream
        self.after = float(after)
        self.sink = sink

    def _write(self, text: str, end: str) -> None:
        if self.sink is not None:
            self.sink(text)
            return
        stream = self.stream or sys.stderr
        stream.write(text + end)
        stream.flush()

    @contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        shown = threading.Event()
        lock = threading.Lock()

        def announce() -> None:
            with lock:
                if not finished:
                    shown.set()
                    self._write(f"{step} ...", "" if self.sink is None else "\n")

        finished = False
        start = time.perf_counter()
        timer = threading.Timer(self.after, announce)
        timer.daemon = True
        if self.after <= 0:
            announce()  # announce every step, synchronously
        else:
            timer.start()
        try:
            yield
        finally:
            with lock:
                finished = True
                timer.cancel()
            if shown.is_set():
                self._write(f" done ({time.perf_counter() - start:.1f} s)" if self.sink is None
                            else f"{step}: done ({time.perf_counter() - start:.1f} s)", "\n")


def _as_progress(progress: Any) -> Progress:
    if isinstance(progress, Progress):
        return progress
    if progress is None or progress is False:
        return Progress(False)
    if progress is True:
        return Progress(True)
    if callable(progress):
        return Progress(True, sink=progress)
    raise TypeError(f"progress must be True/False, a Progress, or a callable taking a line, got {type(progress).__name__}")


# ------------------------------------------------------------------------------------------ result
@dataclass(frozen=True)
class Prediction:
    """A vocabulary token with its id and the model's probability at the last prompt position."""

    id: int
    token: str
    prob: float


@dataclass(frozen=True, repr=False)
class Report:
    """What :func:`build_report` found for one prompt.

    ``predictions``: the model's top-5 next tokens; ``target`` the scored token (with
    ``target_rank``, 0 = the model's top choice) and ``loss`` its NLL. ``reversed_attention`` /
    ``lens`` / ``flow`` (forward, backward; empty without flow graphs) are the feature results;
    ``flow_layer`` is the most affected layer and ``layer_grad_norms[l]`` =
    ``sqrt(‖∂L/∂W_in‖² + ‖∂L/∂W_out‖²)``. ``notes`` are caveats for the reader; ``page`` the HTML.
    """

    model_name: str
    prompt: str
    str_tokens: tuple[str, ...]
    predictions: tuple[Prediction, ...]
    target: Prediction
    target_rank: int
    target_is_prediction: bool
    loss: float
    d_vocab: int
    layers: tuple[int, ...]
    reversed_attention: Any
    lens: Any
    layer_grad_norms: dict[int, float]
    flow_layer: int
    flow: tuple[Any, ...]
    notes: tuple[str, ...]
    page: Any

    def __repr__(self) -> str:
        return (f"Report({self.model_name}, prompt={self.prompt!r}, target={self.target.token!r}, "
                f"loss={self.loss:.4g}, flow_layer={self.flow_layer})")

    def top_heads(self, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the largest ‖RA‖_F: ``(layer, head, norm)``."""
        return self.reversed_attention.top_heads(k)

    def lens_rows(self, k: int = 5) -> list[dict]:
        """Per layer (last first), at the last prompt token: ``reads`` (top-k of LL(x) at W_in),
        ``writes`` (bottom-k of LL(δ) at W_out), ``delta_norm``, ``x_rank`` (the target's rank in
        LL(x) from the top) and ``delta_rank`` (from the bottom; 0 = what descent writes most)."""
        lens = self.lens
        t = lens.factors.n_tokens - 1  # one prompt: the last factor token is the last prompt token
        rows = []
        for l in reversed(lens.layers):
            li = lens.layer_index(l)
            x, d = lens["mlp_in"], lens["mlp_out"]
            rows.append(dict(
                layer=l,
                reads=lens.decode(x.top_ids[li, t][:k]),
                writes=lens.decode(d.bottom_ids[li, t][:k]),
                delta_norm=float(d.norm[li, t]),
                x_rank=int(x.target_rank[li, t]),
                delta_rank=self.d_vocab - 1 - int(d.target_rank[li, t]),
            ))
        return rows

    def summary(self, k: int = 5) -> str:
        """The short text summary the CLI prints."""
        return _summary(self, k)

    def __str__(self) -> str:
        return self.summary()

    def save(self, path: Union[str, Path]) -> Path:
        """Write the offline HTML page and return its Path."""
        return self.page.save(path)

    def _repr_html_(self) -> str:
        return self.page._repr_html_()


# ------------------------------------------------------------------------------------------ build
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
    import torch

    from ..attention import reversed_attention
    from ..core.adapter import get_adapter
    from ..lens import backward_lens

    steps = _as_progress(progress)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt is empty: pass some text, e.g. 'the capital of france is'")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    ad = get_adapter(model)
    layers = sorted(set(ad.layers(layers, distinct=False)))
    name = str(getattr(model.cfg, "model_name", "model"))
    notes: list[str] = []

    # 1. What the model predicts (one no-grad forward pass).
    batch = ad.tokenize(prompt)
    tokens = batch.tokens
    str_tokens = tuple(ad.to_str_tokens(tokens)[0])
    target_ids = None if target is None else ad.target_tokens(target)  # bad targets fail before any pass
    with steps("forward pass"), torch.no_grad():
        logits = model(tokens.to(next(model.parameters()).device), return_type="logits")
    probs = logits[0, -1].float().softmax(-1).cpu()
    top_p, top_i = probs.topk(min(5, probs.numel()))
    decode = lambda ids: ad.to_str_tokens(torch.tensor([list(ids)]))[0]  # noqa: E731
    preds = tuple(Prediction(int(i), s, float(p)) for i, s, p in zip(top_i, decode(top_i.tolist()), top_p))
    notes += _unknown_word_note(ad, tokens, prompt)

    if target_ids is None:
        tid = preds[0].id
    else:
        tid = int(target_ids[0])
        if len(target_ids) > 1:
            notes.append(f"the target {target!r} is {len(target_ids)} tokens; the report scores its first token "
                         f"{decode([tid])[0]!r} at the last prompt position")
    tgt = Prediction(tid, decode([tid])[0], float(probs[tid]))
    rank = int((probs > probs[tid]).sum())
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
        page = _page(report, heads)
    object.__setattr__(report, "page", page)
    return report


def _flow_graphs(model: Any, prompt: str, layer: int, tid: int, steps: Progress, notes: list[str]) -> tuple:
    try:
        from ..flow import flow_graph
    except ImportError:  # flow graphs are an optional feature of the package
        return ()
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


# ------------------------------------------------------------------------------------------ text
def _tok(s: str) -> str:
    """A token for plain text: bare when unambiguous, quoted when it has edge spaces or odd chars."""
    return s if s and s.strip() == s and s.isprintable() and "'" not in s else repr(s)


def _pct(p: float) -> str:
    return f"{100 * p:.3g} %"


def _summary(r: Report, k: int) -> str:
    lines = [f"model    {r.model_name}",
             f"prompt   {r.prompt!r} ({len(r.str_tokens)} tokens: {' | '.join(_tok(t) for t in r.str_tokens)})"]
    p0, rest = r.predictions[0], r.predictions[1:]
    lines.append(f"predicts {_tok(p0.token)} {_pct(p0.prob)}"
                 + (f"   (then {', '.join(f'{_tok(p.token)} {_pct(p.prob)}' for p in rest)})" if rest else ""))
    which = "the model's top prediction" if r.target_is_prediction else f"rank {r.target_rank} in the model's output"
    lines.append(f"target   {_tok(r.target.token)} ({which}): p = {_pct(r.target.prob)}, loss = -log p = {r.loss:.4g}")
    lines.append("")
    lines.append("Reversed Attention: heads the gradient points at (largest ‖RA‖_F first)")
    heads = r.top_heads(k)
    lines.append("  " + "   ".join(f"L{l}H{h} {v:.3g}" for l, h, v in heads))
    lines.append("")
    lines.append(f"Backward Lens at the last token {r.str_tokens[-1]!r}: per layer, what W_in reads (top of LL(x))")
    lines.append("and what a descent step writes through W_out (bottom of LL(δ)); the target's rank among")
    lines.append(f"{r.d_vocab} tokens, 0 = strongest (x counted from the top, δ from the bottom)")
    rows = r.lens_rows(k)
    reads = [" ".join(_tok(t) for t in row["reads"]) for row in rows]
    writes = [" ".join(_tok(t) for t in row["writes"]) for row in rows]
    wr, ww = max(12, *map(len, reads)), max(14, *map(len, writes))
    lines.append(f"  {'layer':<6}{'W_in reads':<{wr + 2}}{'W_out writes':<{ww + 2}}{'‖δ‖':>9}  target rank x / δ")
    for row, rd, wt in zip(rows, reads, writes):
        lines.append(f"  L{row['layer']:<5}{rd:<{wr + 2}}{wt:<{ww + 2}}{row['delta_norm']:>9.2e}  "
                     f"{row['x_rank']:>5} / {row['delta_rank']}")
    lines.append("")
    lines.append(f"Most affected layer (largest MLP weight gradient): L{r.flow_layer}"
                 + (" -- its forward and backward flow graphs are on the page" if r.flow else ""))
    for note in r.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ page
_PAGE_CSS = """<style>
.tlb-fig:has(> .tlb-section){border:none;background:none;padding:0;margin:26px 0 4px 0}
.tlb-section h2{font-size:17px;margin:0 0 4px 0}
.tlb-section p{margin:0;color:#444;max-width:900px}
.tlb-head .tlb-prompt span{display:inline-block;border:1px solid #ccc;border-radius:3px;padding:0 4px;
  margin:0 2px 2px 0;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;background:#f7f7f7}
.tlb-head table.tlb-preds{border-collapse:collapse;margin:6px 0}
.tlb-head table.tlb-preds td{padding:1px 8px 1px 0;font-size:13px}
.tlb-head .tlb-bar{display:inline-block;height:11px;background:#6a51a3;border-radius:2px;vertical-align:middle}
.tlb-head .tlb-target td{font-weight:600}
.tlb-head .tlb-caveat{background:#fff8e1;border-left:3px solid #f0b400;padding:4px 8px;margin:6px 0;color:#333}
.tlb-head dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:6px 0}
.tlb-head dt{color:#555}.tlb-head dd{margin:0}
</style>"""


def _section(title: str, text: str) -> Any:
    from ..render.page import escape, html_figure

    return html_figure(f'<div class="tlb-section"><h2>{escape(title)}</h2><p>{text}</p></div>')


def _header(r: Report, heads: int) -> Any:
    from ..render.page import escape, html_figure

    chips = "".join(f"<span>{escape(t)}</span>" for t in r.str_tokens)
    rows = []
    shown = list(r.predictions)
    if r.target.id not in [p.id for p in shown]:
        shown.append(r.target)
    for p in shown:
        cls = ' class="tlb-target"' if p.id == r.target.id else ""
        width = max(1, round(240 * p.prob))
        rows.append(f"<tr{cls}><td><code>{escape(repr(p.token))}</code></td>"
                    f'<td><span class="tlb-bar" style="width:{width}px"></span></td><td>{p.prob:.4f}</td>'
                    f"<td>{'&larr; target' if p.id == r.target.id else ''}</td></tr>")
    top = ", ".join(f"L{l}H{h}" for l, h, _ in r.top_heads(3))
    which = "the model's top prediction" if r.target_is_prediction else f"rank {r.target_rank} in the model's output"
    facts = (f"<dl><dt>model</dt><dd>{escape(r.model_name)}</dd>"
             f"<dt>target</dt><dd><code>{escape(repr(r.target.token))}</code> ({escape(which)}); "
             f"loss = &minus;log p = {r.loss:.4g}</dd>"
             f"<dt>top heads (‖RA‖_F)</dt><dd>{escape(top)}</dd>"
             f"<dt>most affected layer</dt><dd>L{r.flow_layer} (largest MLP weight gradient "
             f"{r.layer_grad_norms[r.flow_layer]:.3g})</dd></dl>")
    notes = "".join(f'<div class="tlb-caveat">{escape(n)}</div>' for n in r.notes)
    html = (_PAGE_CSS + '<div class="tlb-head">'
            f'<div class="tlb-prompt">{chips}</div>'
            f'<div class="tlb-note">The model\'s next-token probabilities at the last position:</div>'
            f'<table class="tlb-preds">{"".join(rows)}</table>{facts}{notes}</div>')
    return html_figure(html, title="What the model predicts")


def _page(r: Report, heads: int) -> Any:
    from ..render.attention import norms_figure, top_heads_figures
    from ..render.lens import lens_table, norm_tokens, target_rank_plot
    from ..render.page import Page, escape

    ra, lens = r.reversed_attention, r.lens
    tgt = escape(repr(r.target.token))
    figs = [_header(r, heads)]
    figs.append(_section(
        "Which heads the gradient points at: Reversed Attention",
        f"RA = &part;L/&part;(q&middot;k) of the loss L = &minus;log p({tgt}), one map per head. "
        "Heads with a large ‖RA‖_F are where changing attention would change the answer most; "
        "compare with the forward patterns' ‖P‖_F."))
    figs.append(norms_figure(ra.head_norms(per_example=True)[:, 0], ra.layers, title="‖RA‖_F per head",
                             colour="purple"))
    figs.append(norms_figure(ra.head_norms("forward", per_example=True)[:, 0], ra.layers,
                             title="‖P‖_F per head (forward attention, for comparison)", colour="green"))
    figs += top_heads_figures(ra, k=heads)
    figs.append(_section(
        "What the gradient writes into each layer: Backward Lens",
        "The gradient of each MLP matrix is a sum over tokens of x &otimes; &delta;. Projected to "
        "the vocabulary with the logit lens: W_in's input x (top tokens: what the layer reads) and "
        "W_out's output gradient &delta; (bottom tokens: what a descent step writes, since it adds "
        "&minus;&delta;). Hover a cell for the top/bottom-5 and the target's rank."))
    figs.append(lens_table(lens, "mlp_out"))
    figs.append(lens_table(lens, "mlp_in"))
    figs.append(target_rank_plot(lens, "mlp_out"))
    figs.append(norm_tokens(lens, "mlp_out"))
    if r.flow:
        figs.append(_section(
            f"How information flows: VISIT flow graphs of layer {r.flow_layer}",
            f"Layer {r.flow_layer} gets the largest MLP weight gradient. Forward graph: what each "
            "component contributes at the last token, labelled by its logit-lens token. Backward graph: "
            "the same components carrying the gradient. Click a node to highlight its paths."))
        figs += [g.render() for g in r.flow]
    return Page(figs, title=f"tl-backward report: {r.prompt}")
