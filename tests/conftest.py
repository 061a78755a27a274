"""Shared tiny-model fixtures: random GPT-2, GPT-NeoX and Llama-GQA bridges, fp32, offline.

``SPECS`` records how each fixture model was built, so tests can rebuild the same weights as a
plain HF model (``tests.reference.hf_activation_grads``) for independent checks.

On TransformerLens 2.x (no ``TransformerBridge``) every test that reaches a bridge is skipped with
tl_backward's own refusal as the reason (:func:`_skip_without_bridge`).

Threads: torch uses ``min(2, cpus)`` intra-op threads; set ``TLB_TEST_THREADS=N`` (a positive
integer) to run with N instead, e.g. ``TLB_TEST_THREADS=1`` to check that results and tolerances do
not depend on how reductions are split across threads.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from tl_backward.core.compat import HAS_BRIDGE, TL_VERSION, HookedTransformer
from tl_backward.core.hooked_loading import hooked_from_hf
from tl_backward.errors import BridgeUnavailable
from tl_backward.zoo.tiny import tiny_hf_model, tiny_model, word_tokenizer


def _test_threads() -> int:
    """``TLB_TEST_THREADS`` if set, else min(2, cpus)."""
    raw = os.environ.get("TLB_TEST_THREADS", "").strip()
    if not raw:
        return max(1, min(2, os.cpu_count() or 1))
    if not raw.isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"TLB_TEST_THREADS must be a positive integer, got {raw!r}")
    return int(raw)


torch.set_num_threads(_test_threads())


# TransformerLens 2.x has no TransformerBridge. The one mechanism for the whole suite, active only where the
# bridge really is missing (with TransformerLens >= 3.9 nothing is skipped or swallowed): a test (or fixture)
# that reaches a bridge gets tl_backward's own refusal, BridgeUnavailable (also as the cause of another error,
# e.g. a README block's AssertionError), and is skipped with it as the reason; a test that needs a bridge in a
# process of its own (CLI, installed wheel), where that error is only text, is marked @pytest.mark.bridge.
NO_BRIDGE = f"needs a TransformerBridge (TransformerLens {TL_VERSION} has none)"


def pytest_collection_modifyitems(config, items):
    if not HAS_BRIDGE:
        for item in items:
            if item.get_closest_marker("bridge"):
                item.add_marker(pytest.mark.skip(reason=f"{NO_BRIDGE}: marked bridge"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _skip_without_bridge())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _skip_without_bridge())


def _skip_without_bridge():
    try:
        return (yield)
    except Exception as err:
        missing = _bridge_unavailable(err)
        if HAS_BRIDGE or missing is None:
            raise
        pytest.skip(f"{NO_BRIDGE}: {missing.what}")


def _bridge_unavailable(err: BaseException | None) -> BridgeUnavailable | None:
    """The BridgeUnavailable in ``err``'s chain of causes / contexts, if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, BridgeUnavailable):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None

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


def build_hooked(family: str):
    """A ``HookedTransformer`` holding the fixture's weights (TransformerLens's own conversion of the same
    tiny HF model, no weight processing: tl_backward/core/hooked_loading.py)."""
    hf = tiny_hf_model(family, **SPECS[family])
    return hooked_from_hf(hf, word_tokenizer(), f"tiny-{family}", torch.device("cpu"), torch.float32)


# The backend axis of ``model``: where TransformerLens still has HookedTransformer (3.x, make test-tl39)
# every test on ``model`` also runs on a HookedTransformer of the same weights.
BACKENDS = ("bridge", "hooked") if HookedTransformer is not None else ("bridge",)


@pytest.fixture(scope="session", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="session")
def model(family, backend, request):
    """Each supported family in turn (GPT-2, NeoX with parallel blocks, Llama with GQA), as a bridge and,
    on TransformerLens 3.x, as a HookedTransformer of the same weights."""
    if backend == "hooked":
        return request.getfixturevalue(f"{family}_hooked")
    return request.getfixturevalue(f"{family}_model")


@pytest.fixture(scope="session")
def gpt2_hooked():
    return build_hooked("gpt2")


@pytest.fixture(scope="session")
def neox_hooked():
    return build_hooked("neox")


@pytest.fixture(scope="session")
def llama_hooked():
    return build_hooked("llama")


@pytest.fixture(autouse=True)
def _bridge_only(request):
    """``@pytest.mark.bridge_only(reason)``: a test of the bridge path itself (its HF module, HF-level masks)
    is skipped on the hooked half of ``model``, naming where the HookedTransformer counterpart is tested."""
    marker = request.node.get_closest_marker("bridge_only")
    callspec = getattr(request.node, "callspec", None)
    if marker is not None and callspec is not None and callspec.params.get("backend") == "hooked":
        pytest.skip(marker.args[0])
