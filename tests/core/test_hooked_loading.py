"""``load_model(..., backend="hooked")``: the embedded models as raw HookedTransformers
(tl_backward/core/hooked_loading.py), checked against the same weights as a TransformerBridge and as the
plain HF model. Skipped on TransformerLens 4.x, except the refusal there; on 2.x (no bridge) the bridge
comparison skips and ``backend="bridge"`` is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tl_backward as tlb
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward import zoo
from tl_backward.core.adapter import get_adapter
from tl_backward.core.compat import HAS_BRIDGE, TL_VERSION, HookedTransformer
from tl_backward.core.hooked import HookedAdapter

needs_hooked = pytest.mark.skipif(
    HookedTransformer is None,
    reason=f"TransformerLens {TL_VERSION} has no HookedTransformer (removed in 4.0); runs in a TransformerLens 3.9 venv")
PROMPT, TARGET = "paris is the capital of", " france"


@needs_hooked
@pytest.mark.parametrize("name", tlb.list_models())
def test_embedded_models_load_as_hooked_transformers(name):
    """Same tokens and logits as the plain HF model read from the same directory (no bridge involved, so this
    runs on TransformerLens 2.x too): the conversion holds the HF parametrisation (no fold_ln / centring)."""
    model = tlb.load_model(name, backend="hooked")
    assert isinstance(model, HookedTransformer) and isinstance(get_adapter(model), HookedAdapter)
    assert not model.training
    directory = zoo.model_dir(name)
    hf = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    # The loading promise (tl_backward/core/loading.py): BOS once in front of the tokenizer's own ids.
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(PROMPT, add_special_tokens=False).input_ids]])
    assert torch.equal(get_adapter(model).tokenize(PROMPT).tokens, ids)
    with torch.no_grad():
        assert_close_fp32(model(ids), hf(ids).logits, n_terms=MODEL_TERMS, what="logits vs HF")


@needs_hooked
@pytest.mark.parametrize("name", tlb.list_models())
def test_embedded_models_have_the_bridges_ra_and_factors(name):
    """The same RA and factors as the TransformerBridge of the same directory (skipped where TransformerLens
    has no bridge: tests/conftest.py)."""
    bridge = tlb.load_model(name)
    model = tlb.load_model(name, backend="hooked")
    ids = get_adapter(bridge).tokenize(PROMPT).tokens
    assert torch.equal(get_adapter(model).tokenize(PROMPT).tokens, ids)
    ra_b, ra_h = (tlb.reversed_attention(m, PROMPT, TARGET) for m in (bridge, model))
    assert_close_fp32(ra_h.maps, ra_b.maps, n_terms=MODEL_TERMS, what="RA vs bridge")
    gf_b, gf_h = (tlb.gradient_factors(m, PROMPT, TARGET, modules="all") for m in (bridge, model))
    for key, factor in gf_b.factors.items():
        assert_close_fp32(gf_h[key].reconstruct(), factor.reconstruct(), n_terms=MODEL_TERMS, what=str(key))


def test_hooked_backend_refusals():
    with pytest.raises(tlb.errors.TLBackwardError, match="backend must be one of"):
        tlb.load_model(backend="hooky")
    if not HAS_BRIDGE:
        with pytest.raises(tlb.errors.BridgeUnavailable, match=r"pip install 'transformer_lens>=3.9'") as info:
            tlb.load_model()
        assert info.value.argument == "backend" and "backend='hooked'" in str(info.value)
    if HookedTransformer is None:
        with pytest.raises(tlb.errors.TLBackwardError, match="needs TransformerLens < 4"):
            tlb.load_model(backend="hooked")
    else:
        with pytest.raises(tlb.errors.TLBackwardError, match="device_map") as info:
            tlb.load_model(backend="hooked", device_map="auto")
        assert info.value.argument == "device_map"
