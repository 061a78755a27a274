"""Shared tiny-model fixtures: random GPT-2, GPT-NeoX and Llama-GQA bridges, fp32, offline.

``SPECS`` records how each fixture model was built, so tests can rebuild the same weights as a
plain HF model (``tests.reference.hf_activation_grads``) for independent checks.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from tl_backward.zoo.tiny import tiny_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FAMILIES = ("gpt2", "neox", "llama")
SPECS = {
    "gpt2": dict(seed=0, n_heads=4),
    "neox": dict(seed=1, n_heads=4),
    "llama": dict(seed=2, n_heads=4, n_kv_heads=2),
    # Qwen2 (Llama layout plus q/k/v biases): checked by the capture tests only, to keep the suite fast.
    "qwen2": dict(seed=3, n_heads=4, n_kv_heads=2),
}


def build(family: str):
    """A fresh bridge with the fixture's weights (for tests that must mutate a model)."""
    return tiny_model(family, **SPECS[family])


@pytest.fixture(scope="session")
def gpt2_model():
    return build("gpt2")


@pytest.fixture(scope="session")
def neox_model():
    return build("neox")


@pytest.fixture(scope="session")
def llama_model():
    return build("llama")


@pytest.fixture(scope="session", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def model(family, request):
    """Each supported family in turn (GPT-2, NeoX with parallel blocks, Llama with GQA)."""
    return request.getfixturevalue(f"{family}_model")
