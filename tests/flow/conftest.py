"""Shared inputs for the flow-graph tests: a fixed prompt, loss and plain-HF weight gradients."""

import pytest
import torch

from tests.conftest import SPECS
from tl_backward.zoo.tiny import tiny_hf_model

# <bos> + words; position -1 is the graph position, TARGET an arbitrary non-argmax token.
TOKENS = torch.tensor([[1, 20, 25, 26, 24, 22, 7]])
LAYER = 1
TARGET = 30
P = TOKENS.shape[1] - 1


def nll_at(p: int, target: int):
    """−log p(target) at position p of row 0 (logits -> scalar)."""
    return lambda logits: -torch.log_softmax(logits[0, p].float(), -1)[target]


def metric_at(p: int, target: int):
    """The same loss as a capture/flow_graph metric (logits, tokens) -> scalar."""
    f = nll_at(p, target)
    return lambda logits, tokens: f(logits)


def hf_modules(hf, family: str, layer: int) -> dict:
    if family == "gpt2":
        b = hf.transformer.h[layer]
        return dict(o=(b.attn.c_proj, "conv"), fc_in=(b.mlp.c_fc, "conv"), fc_out=(b.mlp.c_proj, "conv"),
                    ln_f=hf.transformer.ln_f, lm_head=hf.lm_head)
    if family == "neox":
        b = hf.gpt_neox.layers[layer]
        return dict(o=(b.attention.dense, "linear"), fc_in=(b.mlp.dense_h_to_4h, "linear"),
                    fc_out=(b.mlp.dense_4h_to_h, "linear"), ln_f=hf.gpt_neox.final_layer_norm,
                    lm_head=hf.get_output_embeddings())  # transformers 4.x names it embed_out
    b = hf.model.layers[layer]
    return dict(o=(b.self_attn.o_proj, "linear"), fc_in=(b.mlp.up_proj, "linear"),
                fc_out=(b.mlp.down_proj, "linear"), ln_f=hf.model.norm, lm_head=hf.lm_head)


def _tl(weight_grad, kind):
    return weight_grad if kind == "conv" else weight_grad.T


def hf_weight_grads(family: str, tokens, loss, layer: int = LAYER) -> dict:
    """∂loss/∂W in TL layout from a fresh plain-HF model with the fixture weights (autograd)."""
    kw = dict(SPECS[family])
    hf = tiny_hf_model(family, **kw)
    mods = hf_modules(hf, family, layer)
    for p in hf.parameters():
        p.requires_grad_(False)
    ws = {k: mods[k][0].weight for k in ("o", "fc_in", "fc_out")}
    for w in ws.values():
        w.requires_grad_(True)
    with torch.enable_grad():
        grads = torch.autograd.grad(loss(hf(tokens).logits), list(ws.values()))
    out = {k: _tl(g, mods[k][1]) for k, g in zip(ws, grads)}
    return {"W_O": out["o"], "W_in": out["fc_in"], "W_out": out["fc_out"]}


@pytest.fixture(scope="session")
def fresh_hf():
    """A fresh plain-HF model per family (not the bridge's, whose submodules are wrapped)."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_hf_model(family, **SPECS[family])
        return cache[family]

    return get
