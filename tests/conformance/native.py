"""Rows for TransformerLens's own constructors: ``TransformerBridge.boot_native(cfg)`` (the
train-from-scratch path) and a legacy TransformerLens checkpoint (HookedTransformer-format state
dict, converted with ``convert_tl_checkpoint`` and loaded strictly, as ``boot_tl_legacy`` does).

The reference is a *separate* plain ``NativeModel`` (the bridge rewires the one it wraps), built
with the same seed (boot_native seeds construction and init under ``fork_rng``), or given the same
legacy tensors; ``NativeRef`` wraps it in the small HF-like interface ``hf_ref.run`` reads:
``.config.num_hidden_layers``, ``output_attentions`` (each layer's P, taken from the attention's
own return value, on the autograd path), ``get_output_embeddings()``. An additive 4-D mask turns
the causal mask off (its "< -1 = masked" entries are then the whole mask), as MAS requires.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

from tests.families import VOCAB
from tl_backward.core.compat import NativeAttention, NativeModel, TransformerBridge, TransformerBridgeConfig

try:  # TransformerLens >= 3.9; on 2.x native_config() refuses first (BridgeUnavailable: the test skips)
    from transformer_lens.model_bridge.sources.native.init import initialize_native_model
except ImportError:
    initialize_native_model = None

try:  # TransformerLens 4.x only
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint
except ImportError:
    convert_tl_checkpoint = None
from tl_backward.zoo.tiny import word_tokenizer

SEED = 7


def native_config() -> TransformerBridgeConfig:
    return TransformerBridgeConfig(d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64, n_ctx=64, d_vocab=VOCAB,
                                   act_fn="gelu", normalization_type="LN", seed=SEED)


class NativeRef(torch.nn.Module):
    """A plain NativeModel behind the HF-like calls of tests/conformance/hf_ref.py."""

    def __init__(self, native: NativeModel):
        super().__init__()
        self.model = native
        self.config = types.SimpleNamespace(num_hidden_layers=len(native.layers))

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_attentions=False, **kwargs):
        attns = [m for m in self.model.modules() if isinstance(m, NativeAttention)]
        seen: list = []
        handles = [m.register_forward_hook(lambda mod, args, out: seen.append(out[1])) for m in attns]
        causal = [m.causal for m in attns]
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.is_floating_point():
            for m in attns:
                m.causal = False  # the 4-D mask is the whole mask (MAS), as on HF models
        try:
            logits = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        finally:
            for h in handles:
                h.remove()
            for m, c in zip(attns, causal):
                m.causal = c
        return types.SimpleNamespace(logits=logits, attentions=tuple(seen))


def _plain_native(cfg: TransformerBridgeConfig) -> NativeModel:
    cfg = copy.deepcopy(cfg)
    with torch.random.fork_rng(devices=[]):
        model = NativeModel(cfg)
        initialize_native_model(model, cfg)
    return model.eval()


def _check_same(ref: NativeRef, bridge) -> None:
    tokens = torch.tensor([[1, 20, 25, 26, 24, 22, 7]])
    with torch.no_grad():
        assert torch.allclose(ref(tokens).logits, bridge(tokens), atol=1e-5), "reference weights differ"


def build_native():
    """(reference, bridge) for ``TransformerBridge.boot_native(cfg)``."""
    cfg = native_config()
    bridge = TransformerBridge.boot_native(cfg, tokenizer=word_tokenizer()).eval()
    ref = NativeRef(_plain_native(cfg))
    _check_same(ref, bridge)
    return ref, bridge


def legacy_state_dict(cfg: TransformerBridgeConfig) -> dict[str, torch.Tensor]:
    """A random HookedTransformer-format checkpoint (keys and per-head shapes of TL ≤ 3)."""
    gen = torch.Generator().manual_seed(SEED + 1)
    D, H, E, M, V, C = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab, cfg.n_ctx
    r = lambda *shape: 0.1 * torch.randn(shape, generator=gen)  # noqa: E731
    sd = {"embed.W_E": r(V, D), "pos_embed.W_pos": r(C, D), "ln_final.w": 1 + r(D), "ln_final.b": r(D),
          "unembed.W_U": r(D, V), "unembed.b_U": torch.zeros(V)}  # NativeModel's head has no bias
    for l in range(cfg.n_layers):
        b = f"blocks.{l}."
        sd.update({b + "ln1.w": 1 + r(D), b + "ln1.b": r(D), b + "ln2.w": 1 + r(D), b + "ln2.b": r(D),
                   b + "attn.W_Q": r(H, D, E), b + "attn.W_K": r(H, D, E), b + "attn.W_V": r(H, D, E),
                   b + "attn.W_O": r(H, E, D), b + "attn.b_Q": r(H, E), b + "attn.b_K": r(H, E),
                   b + "attn.b_V": r(H, E), b + "attn.b_O": r(D), b + "mlp.W_in": r(D, M), b + "mlp.b_in": r(M),
                   b + "mlp.W_out": r(M, D), b + "mlp.b_out": r(D)})
    return sd


_TOP = {"embed.weight": "tok_embed.weight", "pos_embed.weight": "pos.weight", "ln_final.weight": "ln_out.weight",
        "ln_final.bias": "ln_out.bias", "unembed.weight": "head.weight", "unembed.bias": None}


def _native_key(key: str) -> str | None:
    """The NativeModel parameter a bridge state-dict key names (``unembed.bias``: none)."""
    if key in _TOP:
        return _TOP[key]
    return key.replace("blocks.", "layers.", 1).replace("mlp.in.", "mlp.fc_in.").replace("mlp.out.", "mlp.fc_out.")


def build_legacy():
    """(reference, bridge) for a legacy TL checkpoint loaded into a boot_native bridge."""
    if convert_tl_checkpoint is None:
        pytest.skip("transformer_lens.utilities.tl_checkpoint_conversion is new in TransformerLens 4.x")
    cfg = native_config()
    bridge = TransformerBridge.boot_native(cfg, tokenizer=word_tokenizer()).eval()
    plain = _plain_native(cfg)
    converted = convert_tl_checkpoint(legacy_state_dict(cfg), cfg)
    result = bridge.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    target = plain.state_dict()
    with torch.no_grad():
        for key, value in converted.items():
            name = _native_key(key)
            if name is None:
                assert not value.any(), f"{key} has no place in NativeModel"
                continue
            target[name].copy_(value)
    ref = NativeRef(plain)
    _check_same(ref, bridge)
    return ref, bridge


ROWS = {"boot_native": build_native, "TL legacy checkpoint": build_legacy}
