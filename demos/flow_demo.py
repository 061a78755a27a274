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
    bwd = flow_graph(model, prompt, layer=layer, target=edit, prepend_bos=True, backward=True)
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
    func_ids = []
    for w in FUNCTION_WORDS:
        try:
            func_ids.append(int(ad.target_tokens(" " + w)[0]))
        except ValueError:  # not in this vocabulary
            pass
    for l in range(ad.n_layers):
        for which in ("ln1", "ln2"):
            res = ln_filter(model, prompts, layer=l, which=which, prepend_bos=True)
            real, rand = res.group_shift(func_ids)
            print(f"L{l} {which}: Δprob(function words) {real:+.4f} (random control {rand:+.4f}); "
                  f"I_50 {res.overlap:.2f} (random {res.overlap_random:.2f}); "
                  f"entropy {res.entropy['x']:.2f} -> {res.entropy['ln_x']:.2f} bits")
    print(ln_filter(model, prompts, layer=layer, which="ln2", prepend_bos=True).summary())
    top = max(1, round(ad.d_mlp * 100 / 4096))  # the paper's top-100 of 4096, scaled to d_mlp
    print(regularisation_neurons(model, prompts, top=top, prepend_bos=True).summary())


if __name__ == "__main__":
    main()
