"""VISIT flow graphs on the embedded model: writes demos/flow_example.html (forward + backward graph
of one layer), the README screenshots demos/flow_forward.png / flow_backward.png (headless
Chromium), and prints the paper's two findings as checks (LN as a semantic filter, regularisation
neurons). Falls back to a tiny random GPT-2 (plumbing only) when no embedded model is shipped.

    python demos/flow_demo.py [--layer L] [--no-screenshots]
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tl_backward as tlb  # noqa: E402
from tl_backward.core.adapter import get_adapter  # noqa: E402
from tl_backward.flow import flow_graph, ln_filter, regularisation_neurons  # noqa: E402
from tl_backward.render.page import Page  # noqa: E402

OUT = ROOT / "demos"
FUNCTION_WORDS = ("the", "a", "an", "of", "is", "in", "to", "and", "not", "was", "on", "as")


def load():
    if tlb.list_models():
        from tl_backward.zoo.world import World

        model = tlb.load_model()
        items = World(0).recall_prompts()
        random.Random(0).shuffle(items)  # a sample across relations
        return model, "the capital of france is", " paris", " rome", [(p, " " + t) for _, p, t in items]
    from tl_backward.zoo.tiny import tiny_model

    words = ["the cat sat on the", "paris is the capital of", "the dog ran up the", "who lives in rome ?"]
    return tiny_model("gpt2"), "the cat sat on the", " mat", " dog", [(w, " mat") for w in words]


def correct_prompts(model, items, limit=100):
    """Prompts the model answers correctly (top-1), as in the paper (up to ``limit``)."""
    ad = get_adapter(model)
    out = []
    for start in range(0, len(items), 64):
        chunk = items[start:start + 64]
        batch = ad.tokenize([p for p, _ in chunk], True)
        with torch.no_grad():
            logits = model(batch.tokens)
        pred = logits[torch.arange(len(chunk)), batch.last].argmax(-1)
        out += [p for (p, t), y in zip(chunk, pred) if int(ad.target_tokens(t)[0]) == int(y)]
        if len(out) >= limit:
            break
    return out[:limit]


def screenshot(graph, png: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from tests.browser import find_chromium, screenshot as shoot

    if find_chromium() is None:
        print("chromium not found: skipping screenshots (apt-get install -y chromium)")
        return
    with tempfile.TemporaryDirectory() as d:
        path = graph.save(Path(d) / "g.html")
        m = re.search(r'<svg class="tlb-flow" width="(\d+)" height="(\d+)"', path.read_text(encoding="utf-8"))
        w, h = int(m.group(1)), int(m.group(2))
        shoot(path, png, (w + 70, h + 280))
    print(f"wrote {png.relative_to(ROOT)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--no-screenshots", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, prompt, target, edit, items = load()
    ad = get_adapter(model)
    print(f"model {model.cfg.model_name}: {ad.n_layers} layers, d_model {ad.d_model}, vocab {ad.d_vocab}")
    layer = args.layer
    if layer is None:  # the layer whose output first ranks the target first (where the answer forms)
        for layer in range(ad.n_layers):
            fwd = flow_graph(model, prompt, layer=layer, target=target, prepend_bos=True)
            if fwd.node(f"resid{layer + 1}").target_rank == 1:
                break
    print(f"layer {layer}: where block_out first ranks {target!r} first")
    fwd = flow_graph(model, prompt, layer=layer, target=target, prepend_bos=True)
    # Backward graph of an edit-style loss (Backward Lens): −log p(edit) — which nodes a gradient
    # step would use, and what it would write, to make the model answer ``edit`` instead.
    bwd = flow_graph(model, prompt, layer=layer, target=edit, prepend_bos=True, backward=True, like=fwd)
    print(fwd, bwd, sep="\n")
    for g in (fwd, bwd):
        heads = sorted(g.nodes_of("head"), key=lambda n: -n.value)[:3]
        print(("backward" if g.backward else "forward"), "top heads:",
              ", ".join(f"H{n.head} {n.label!r} (target rank {n.target_bottom_rank if g.backward else n.target_rank})"
                        for n in heads))
    page = Page([fwd.render(), bwd.render()], title=f"VISIT flow graphs: {prompt!r} -> {target!r} (backward: "
                f"loss -log p({edit!r}))")
    out = page.save(OUT / "flow_example.html")
    print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size / 1e3:.0f} kB)")
    if not args.no_screenshots:
        screenshot(fwd, OUT / "flow_forward.png")
        screenshot(bwd, OUT / "flow_backward.png")

    prompts = correct_prompts(model, items)
    print(f"\nfindings on {len(prompts)} prompts the model answers correctly")
    if not prompts:  # the random fallback model answers nothing correctly
        prompts = [p for p, _ in items]
        print(f"(none: using all {len(prompts)} prompts)")
    answers = sorted({t for _, t in items})
    lines = findings(model, prompts, answers, layer)
    head = [f"# VISIT findings on {model.cfg.model_name} (measured by `python demos/flow_demo.py`)", "",
            f"Model {model.cfg.model_name}: {ad.n_layers} layers, d_model {ad.d_model}, d_mlp {ad.d_mlp}, "
            f"vocabulary {ad.d_vocab}. Prompts: the first {len(prompts)} recall prompts (of "
            f"{len(items)}, shuffled with seed 0, all relations) that the model answers correctly (top-1), "
            "read at the last position with BOS prepended.", "",
            f"Example graphs (`demos/flow_example.html`, screenshots `demos/flow_forward.png`, "
            f"`demos/flow_backward.png`): {prompt!r} at layer {layer}, forward target {target!r}, backward "
            f"loss −log p({edit!r}).", ""]
    for g in (fwd, bwd):
        heads = sorted(g.nodes_of("head"), key=lambda n: -n.value)[:3]
        head.append(f"- {'backward' if g.backward else 'forward'} graph: {len(g.nodes)} nodes, {len(g.edges)} "
                    "edges; top heads " + ", ".join(
                        f"H{n.head} {n.label!r} (target rank {n.target_bottom_rank if g.backward else n.target_rank}"
                        f"{' from the bottom' if g.backward else ''})" for n in heads))
    (OUT / "flow_results.md").write_text("\n".join(head + [""] + lines) + "\n", encoding="utf-8")
    print(f"wrote {(OUT / 'flow_results.md').relative_to(ROOT)}")


def findings(model, prompts, answers, layer, n_seeds=20):
    """The paper's two findings as measured checks; returns Markdown lines (also printed)."""
    ad = get_adapter(model)
    ids = lambda words: sorted({int(ad.target_tokens(w)[0]) for w in words})  # noqa: E731
    func_ids, func_words = [], []
    for w in FUNCTION_WORDS:
        try:
            t = ad.target_tokens(" " + w)
        except ValueError:  # not in this vocabulary
            continue
        if ad.to_str_tokens(t[None])[0][0].strip() == w:  # a whole-word token of this vocabulary
            func_ids.append(int(t[0]))
            func_words.append(w)
    ans_ids = [i for i in ids(answers) if i not in func_ids]
    z_func, z_ans = [], []
    out = ["## Layer norm as a semantic filter", "",
           f"Δprob = mean over prompts of LL(ln(x)) − LL(x), summed over a token group: the {len(func_ids)} function "
           f"words in the vocabulary ({', '.join(func_words)}) and the {len(ans_ids)} distinct answer tokens of the recall "
           "facts (content words). Control: x replaced by a random Gaussian vector of the same norm through "
           f"the same LN; mean ± sd over {n_seeds} control seeds. z = (real − control mean) / control sd. "
           "I_50 = top-50 overlap of LL(x) and LL(ln x).", "",
           "| layer | LN | Δprob function words | control | z | Δprob answer tokens | control | z "
           "| I_50 (random) | entropy x → ln x (bits) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for l in range(ad.n_layers):
        for which in ("ln1", "ln2"):
            runs = [ln_filter(model, prompts, layer=l, which=which, prepend_bos=True, seed=s) for s in range(n_seeds)]
            res = runs[0]
            cells = []
            for group in (func_ids, ans_ids):
                real = res.group_shift(group)[0]
                ctrl = torch.tensor([r.group_shift(group)[1] for r in runs])
                z = (real - ctrl.mean()) / ctrl.std().clamp_min(1e-12)
                cells += [f"{real:+.4f}", f"{ctrl.mean():+.4f} ± {ctrl.std():.4f}", f"{z:+.1f}"]
                (z_func if group is func_ids else z_ans).append(float(z))
            row = (f"| {l} | {which} | " + " | ".join(cells) + f" | {res.overlap:.2f} ({res.overlap_random:.2f}) "
                   f"| {res.entropy['x']:.2f} → {res.entropy['ln_x']:.2f} |")
            out.append(row)
            print(row)
    n_sites = len(z_func)
    out += ["", f"Summary: LN lowers the function words' probability beyond the control (z < −3) at "
            f"{sum(z < -3 for z in z_func)} of {n_sites} LN sites (raises it, z > 3, at {sum(z > 3 for z in z_func)}); "
            f"it raises the answer tokens' probability beyond the control at {sum(z > 3 for z in z_ans)} of "
            f"{n_sites} (lowers it at {sum(z < -3 for z in z_ans)})."]
    out += ["", f"Largest per-token shifts at layer {layer}, ln2 (the example graph's layer):", "", "```"]
    out += ln_filter(model, prompts, layer=layer, which="ln2", prepend_bos=True).summary().splitlines()
    out += ["```", ""]
    top = max(1, round(ad.d_mlp * 100 / 4096))  # the paper's top-100 of 4096, scaled to d_mlp
    reg = regularisation_neurons(model, prompts, top=top, prepend_bos=True)
    chance = top / ad.d_mlp
    out += ["## Regularisation neurons", "",
            f"A neuron counts when it is among its layer's top-{top} activations (of d_mlp = {ad.d_mlp}: the "
            f"paper's top-100 of 4096, scaled; chance {chance:.1%}) at the last position in more than "
            f"{reg.min_fraction:.0%} of the {reg.n_prompts} prompts, by signed h or by |h|. Entropy and "
            "top tokens are those of LL(W_out[i]); the layer median is over 256 random neurons of the layer.", "",
            "| layer | most frequent neuron, signed | most frequent neuron, \\|h\\| | layer median max\\|w\\|/rms |",
            "|---|---|---|---|"]
    for li, l in enumerate(reg.layers):
        fs, fa = reg.freq_signed[li], reg.freq_abs[li]
        W = ad.W_out(l).float()
        ratio = (W.abs().max(-1).values / W.pow(2).mean(-1).sqrt()).median()
        out.append(f"| {l} | n{int(fs.argmax())} {float(fs.max()):.0%} | n{int(fa.argmax())} {float(fa.max()):.0%} "
                   f"| {float(ratio):.1f} |")
    out += ["", "| neuron | signed | \\|h\\| | W_out entropy (layer median) | norm percentile | max\\|w\\|/rms "
            "| top tokens |", "|---|---|---|---|---|---|---|"]
    for c in reg.candidates:
        out.append(f"| L{c.layer} n{c.neuron} | {c.freq_signed:.0%} | {c.freq_abs:.0%} | {c.entropy:.2f} "
                   f"({c.layer_median_entropy:.2f}) | {c.norm_percentile:.0f} | {c.outlier_ratio:.1f} "
                   f"| {' '.join(repr(t) for t in c.top_tokens)} |")
    if not reg.candidates:
        out.append("| none | | | | | | |")
    fw = set(func_words)
    out += ["", f"Summary: candidates in layers {sorted({c.layer for c in reg.candidates}) or 'none'}; "
            f"{sum(c.entropy > c.layer_median_entropy for c in reg.candidates)} of {len(reg.candidates)} project "
            "with higher entropy than their layer's median; "
            f"{sum(t.strip() in fw for c in reg.candidates for t in c.top_tokens)} of "
            f"{sum(len(c.top_tokens) for c in reg.candidates)} of their top tokens are the function words above."]
    print(reg.summary())
    return out

if __name__ == "__main__":
    main()
