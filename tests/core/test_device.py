"""tl_backward/core/device.py: where a model's inputs go, which dtype its weights have, and how
per-layer tensors are gathered on one device.

This machine's CI has CPUs only: these tests check the helpers' rules on CPU modules and tensors
(which module decides the input device, that tensors already in place are not copied, what a
stack's device is). A model split over two GPUs is checked by ``benchmarks/gpu_check.py`` on a
GPU machine; nothing here pretends to be a second device.
"""

import torch

from tl_backward.core import device as D


class _NoEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2).to(torch.float64)


class _HFLike(torch.nn.Module):
    """An HF-style module: its input embedding is not its first parameter."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 3)
        self.wte = torch.nn.Embedding(5, 3)

    def get_input_embeddings(self):
        return self.wte


class _BufferOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", torch.ones(4))


def test_input_device_reads_the_embedding(gpt2_model):
    # A bridge's embed, an HF module's get_input_embeddings(): the tensors they hold decide.
    assert D.input_device(gpt2_model) == gpt2_model.embed.original_component.weight.device
    assert D.input_device(gpt2_model.original_model) == gpt2_model.embed.original_component.weight.device
    hf = _HFLike()
    hf.wte.to("meta")  # another device than the first parameter's (meta: no data, a real torch device)
    assert D.input_device(hf) == torch.device("meta") != hf.head.weight.device
    assert D.result_device(hf) == D.input_device(hf)


def test_module_device_and_fallbacks():
    assert D.input_device(_NoEmbedding()) == torch.device("cpu")  # no embedding: its first parameter
    assert D.module_device(_BufferOnly()) == torch.device("cpu")  # buffers count (rotary tables)
    assert D.module_device(torch.nn.Identity()) == torch.device("cpu")
    meta = torch.nn.Linear(2, 2, device="meta")
    assert D.module_device(meta) == torch.device("meta")


def test_param_dtype_and_devices(gpt2_model):
    assert D.param_dtype(gpt2_model) == torch.float32
    assert D.param_dtype(_NoEmbedding()) == torch.float64
    assert D.param_dtype(torch.nn.Identity()) == torch.float32  # no weights: fp32
    half = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert D.param_dtype(half) == torch.bfloat16
    assert D.model_devices(gpt2_model) == (torch.device("cpu"),)
    mixed = _HFLike()
    mixed.wte.to("meta")
    assert D.model_devices(mixed) == (torch.device("cpu"), torch.device("meta"))
    assert D.declared_device(gpt2_model) == torch.device(gpt2_model.cfg.device)


def test_on_moves_only_when_needed():
    x = torch.arange(3.0)
    assert D.on(x, torch.zeros(1)) is x and D.on(x, "cpu") is x  # already there: the same tensor
    moved = D.on(x, torch.empty(1, device="meta"))
    assert moved.device == torch.device("meta") and moved.shape == x.shape


def test_stack_and_cat_gather_on_one_device():
    parts = [torch.full((2,), float(i)) for i in range(3)]
    assert torch.equal(D.stack_on(parts), torch.stack(parts))
    assert torch.equal(D.stack_on(parts, "cpu", dim=1), torch.stack(parts, 1))
    assert torch.equal(D.cat_on(parts), torch.cat(parts))
    assert D.stack_on(parts, "meta").device == torch.device("meta")  # every part moved to the target

