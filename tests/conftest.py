"""Shared tiny-model fixtures: random GPT-2, GPT-NeoX and Llama-GQA bridges, fp32, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from tl_backward.zoo.tiny import tiny_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FAMILIES = ("gpt2", "neox", "llama")


@pytest.fixture(scope="session")
def gpt2_model():
    return tiny_model("gpt2", seed=0)


@pytest.fixture(scope="session")
def neox_model():
    return tiny_model("neox", seed=1)


@pytest.fixture(scope="session")
def llama_model():
    return tiny_model("llama", seed=2, n_heads=4, n_kv_heads=2)


@pytest.fixture(scope="session", params=FAMILIES)
def model(request):
    """Each supported family in turn (GPT-2, NeoX with parallel blocks, Llama with GQA)."""
    return request.getfixturevalue(f"{request.param}_model")
