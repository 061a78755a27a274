"""benchmarks/gpu_check.py runs here, on CPUs only: its skip path, its device-map builder, and its
whole comparison path with both halves of the split on the CPU (``--devices cpu,cpu``).

The CPU-vs-CPU run checks the script and tl_backward's device-map plumbing (load_model(device_map=...),
every analysis on the dispatched model); it cannot check a transfer between two devices, which is
what the script is for on a GPU machine."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_cuda_skips_with_status_0(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert capsys.readouterr().out.strip() == "skipped: no CUDA"


def test_device_choice(gpu_check, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for n, want in ((1, ["cuda:0"]), (2, ["cuda:0", "cuda:1"]), (4, ["cuda:0", "cuda:1"])):
        monkeypatch.setattr(torch.cuda, "device_count", lambda n=n: n)
        assert gpu_check.choose_devices("auto") == want
    assert gpu_check.choose_devices("cpu, cpu") == ["cpu", "cpu"]


@pytest.mark.parametrize("name, blocks, tied", [("facts-gpt2", "transformer.h", True),
                                                ("facts-llama", "model.layers", False)])
def test_split_map_puts_half_the_blocks_on_each_device(gpu_check, name, blocks, tied):
    dm = gpu_check.split_map(name, ["A", "B"])
    per_block = [v for k, v in dm.items() if k.startswith(blocks + ".")]
    assert per_block == ["A", "A", "B", "B"]  # the embedded models have 4 layers
    assert dm["lm_head"] == ("A" if tied else "B")  # a tied unembedding stays with the embedding
    embeds = [k for k in dm if k.endswith(("wte", "wpe", "embed_tokens"))]
    assert embeds and all(dm[k] == "A" for k in embeds)
    norms = [k for k in dm if k.endswith(("ln_f", "norm"))]
    assert norms and all(dm[k] == "B" for k in norms)


def test_cpu_cpu_split_runs_every_comparison(gpu_check, capsys):
    # facts-gpt2, 40 comparisons, ~13 s on 2 busy cores; on one CPU every difference is exactly 0.
    assert gpu_check.main(["--devices", "cpu,cpu", "--model", "facts-gpt2"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "FAIL" not in out and out.count("\nok  ") >= 40
    assert out.count("max|Δ| − rtol·|b| = 0.00e+00") == out.count("max|Δ|")


def test_n_devices_split_needs_two_gpus(gpu_check):
    # TransformerLens's n_devices splits over CUDA devices only: refused here, before loading anything.
    with pytest.raises(SystemExit) as info:
        gpu_check.main(["--devices", "cpu,cpu", "--split", "n_devices"])
    assert info.value.code == 2
