"""Threads sharing one model: analyses are serialised by the model's lock (tl_backward/core/lock.py),
with-blocks keep other threads out until they exit, and the model is always left as found.

Every join has a timeout, so a deadlock fails the test instead of hanging the suite.
"""

import contextlib
import threading

import pytest
import torch

from tl_backward import capture
from tl_backward.attention.patching import patch_attention, zero_heads
from tl_backward.core.lock import ModelLock, lock_of, model_lock
from tl_backward.core.stream import stream
from tl_backward.errors import TLBackwardError
from tl_backward.masking import mas_generate, preserving_weights, segment_mask
from tl_backward.masking import segments as S
from tests.conftest import build

TIMEOUT = 60  # seconds; a tiny-model capture takes well under one, so only a deadlock reaches it
N_THREADS = 8
PROMPTS = ["the cat sat", "a dog ran", "the big mat", "where is the cat", "red dog", "the cat",
           "a mat sat on the dog", "big red cat"]
NAMES = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern", "blocks.1.hook_resid_post"]


def last_logit(token: int):
    """Metric: logit of ``token`` at the last position, summed over rows (keeps the tokens as given,
    which segment_mask requires)."""
    return lambda logits, tokens: logits[:, -1, token].sum()


@pytest.fixture(scope="module")
def model():
    """A private GPT-2 bridge with a mixed flag state, so "restored" means more than "all True"."""
    m = build("gpt2")
    for i, p in enumerate(m.parameters()):
        p.requires_grad_(i % 3 != 0)
    m.blocks[1].train()  # one submodule in train mode; stream() runs in eval and must restore it
    return m


def snapshot(model) -> dict:
    """Everything a pass could leave behind: weights (bit for bit), .grad, requires_grad, modes,
    every torch hook dict of every module and every TransformerLens hook list."""
    hooks = {}
    for name, mod in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            hooks[name, kind] = len(getattr(mod, kind))
        for kind in ("fwd_hooks", "bwd_hooks"):
            if hasattr(mod, kind):
                hooks[name, kind] = len(getattr(mod, kind))
    return dict(
        weights={k: v.detach().clone() for k, v in model.state_dict().items()},
        grads=[p.grad is None for p in model.parameters()],
        flags=[p.requires_grad for p in model.parameters()],
        modes=[m.training for m in model.modules()],
        hooks=hooks,
    )


def assert_as_before(model, before: dict) -> None:
    after = snapshot(model)
    assert after["flags"] == before["flags"], "requires_grad flags changed"
    assert after["modes"] == before["modes"], "train/eval modes changed"
    assert after["grads"] == before["grads"], "a .grad was written"
    assert after["hooks"] == before["hooks"], "a hook was left"
    assert after["weights"].keys() == before["weights"].keys()
    for k, w in before["weights"].items():
        assert torch.equal(after["weights"][k], w), f"weight {k} changed"
    lock = lock_of(model)
    assert (lock.depth, lock.holder) == (0, None), "the model's lock is still held"


def run_threads(targets) -> list:
    """Run each zero-argument callable in its own thread; return their results (re-raising the
    first exception); fail if any thread is still running after TIMEOUT."""
    results, errors = [None] * len(targets), []

    def wrap(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i, fn), daemon=True) for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    join_all(threads)
    if errors:
        raise errors[0]
    return results


def join_all(threads) -> None:
    for t in threads:
        t.join(timeout=TIMEOUT)
        assert not t.is_alive(), "a thread is still running: deadlock"


def wait_until(condition, what: str) -> None:
    """Poll ``condition`` (no timing assert: only a deadlock makes it give up)."""
    done = threading.Event()
    for _ in range(TIMEOUT * 100):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def assert_same_cache(got, ref) -> None:
    # Same model, input and ops: only fp32 accumulation order in a parallel reduction could differ
    # (eps 1.2e-7 per term over <= a few hundred terms), far below 1e-5 of the tensor's scale; a
    # mix-up between threads (other prompt, other hooks, other flags) changes values at O(1).
    for name in NAMES:
        for a, b in ((got[name], ref[name]), (got.grad(name), ref.grad(name))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    torch.testing.assert_close(got.metric, ref.metric, rtol=1e-5, atol=0)


def test_eight_threads_capturing_equal_single_threaded_captures(model):
    metric = last_logit(5)
    refs = [capture(model, p, metric, names=NAMES) for p in PROMPTS]
    before = snapshot(model)
    got = run_threads([lambda p=p: capture(model, p, metric, names=NAMES) for p in PROMPTS])
    for g, r in zip(got, refs):
        assert_same_cache(g, r)
    assert_as_before(model, before)


def test_passes_never_overlap(model):
    """Each stream() logs when its pass starts (on_batch) and ends (the last gradient callback);
    under the lock the log is start, end, start, end, ..."""
    log, guard = [], threading.Lock()

    def note(event):
        with guard:
            log.append(event)

    def one(i):
        stream(model, PROMPTS[i], last_logit(5), on_batch=lambda b: note(("start", i)),
               on_gradient={"blocks.0.hook_resid_pre": lambda g: note(("end", i))})

    before = snapshot(model)
    run_threads([lambda i=i: one(i) for i in range(N_THREADS)])
    assert [e for e, _ in log] == ["start", "end"] * N_THREADS
    assert all(log[k][1] == log[k + 1][1] for k in range(0, len(log), 2))
    assert_as_before(model, before)


def seg_of(model):
    return S.from_blocks(model, ["the cat sat", "where is the cat ?"], "A : mat")


def delta_for(model, n: int):
    g = torch.Generator().manual_seed(0)
    return 0.5 * torch.randn(model.cfg.n_layers, model.cfg.n_heads, n, n, generator=g)


@contextlib.contextmanager
def bumped_weights(model):
    """preserving_weights around an in-place weight change (what a fine-tune inside it does)."""
    with preserving_weights(model) as saved:
        with torch.no_grad():
            model.blocks[0].attn.o.original_component.weight.mul_(3.0)
        yield saved


def contexts(model, tokens):
    """Every with-block that changes the model's forward, keyed by name."""
    n = tokens.shape[1]
    return {
        "patch_attention": lambda: patch_attention(model, delta_for(model, n), eta=1.0),
        "zero_heads": lambda: zero_heads(model, [(0, 1), (1, 0), (1, 3)]),
        "segment_mask": lambda: segment_mask(model, seg_of(model)),
        "preserving_weights": lambda: bumped_weights(model),
    }


@pytest.mark.parametrize("kind", ["patch_attention", "zero_heads", "segment_mask", "preserving_weights"])
def test_a_capture_waits_for_another_threads_with_block(model, kind):
    tokens = seg_of(model).tokens
    metric = last_logit(7)
    plain = capture(model, tokens, metric, names=NAMES)
    before = snapshot(model)
    entered, leave = threading.Event(), threading.Event()
    order, inside = [], {}
    lock = lock_of(model)

    def holder():
        with contexts(model, tokens)[kind]():
            inside["cache"] = capture(model, tokens, metric, names=NAMES)  # same thread: re-entrant
            entered.set()
            assert leave.wait(TIMEOUT)
            order.append("block left")

    def other():
        cache = capture(model, tokens, lambda logits, toks: order.append("capture ran") or metric(logits, toks),
                        names=NAMES)
        inside["other"] = cache

    a = threading.Thread(target=holder, daemon=True)
    a.start()
    assert entered.wait(TIMEOUT)
    b = threading.Thread(target=other, daemon=True)
    b.start()
    wait_until(lambda: lock.waiting == 1, "the capture to wait for the lock")
    assert "capture ran" not in order
    leave.set()
    join_all([a, b])
    assert order == ["block left", "capture ran"]
    # Inside the block the capture saw the change; the waiting one ran on the restored model.
    scale = float(plain.metric.abs())
    assert abs(float(inside["cache"].metric - plain.metric)) > 1e-3 * scale, f"{kind} changed nothing"
    assert_same_cache(inside["other"], plain)
    assert_as_before(model, before)


def test_generation_and_capture_threads_mixed_equal_single_threaded_runs(model):
    """mas_generate (its decode hooks) and capture in 8 interleaved threads: each result equals
    the same call made alone; greedy decoding is deterministic, so token ids must match exactly."""
    seg = seg_of(model)
    metric = last_logit(5)
    gen_ref = mas_generate(model, seg, max_new_tokens=4, eos_token_id=None)
    cap_ref = {p: capture(model, p, metric, names=NAMES) for p in PROMPTS[:4]}
    before = snapshot(model)
    jobs = []
    for p in PROMPTS[:4]:
        jobs += [lambda: mas_generate(model, seg, max_new_tokens=4, eos_token_id=None),
                 lambda p=p: capture(model, p, metric, names=NAMES)]
    got = run_threads(jobs)
    for gen, (p, cap) in zip(got[::2], zip(PROMPTS[:4], got[1::2])):
        assert torch.equal(gen.new_tokens, gen_ref.new_tokens)
        assert_same_cache(cap, cap_ref[p])
    assert_as_before(model, before)


def test_other_models_do_not_wait(model, gpt2_model):
    tokens = seg_of(model).tokens
    entered, leave = threading.Event(), threading.Event()

    def holder():
        with patch_attention(model, delta_for(model, tokens.shape[1]), eta=1.0):
            entered.set()
            assert leave.wait(TIMEOUT)

    a = threading.Thread(target=holder, daemon=True)
    a.start()
    assert entered.wait(TIMEOUT)
    try:
        # Would hang (and fail at the timeout) if the lock were global rather than per model.
        run_threads([lambda: capture(gpt2_model, tokens, last_logit(7), names=NAMES)])
    finally:
        leave.set()
        join_all([a])


@pytest.mark.parametrize("kind", ["patch_attention", "zero_heads", "segment_mask", "preserving_weights"])
def test_exceptions_inside_with_blocks_under_threads_release_everything(model, kind):
    tokens = seg_of(model).tokens
    metric = last_logit(7)
    plain = capture(model, tokens, metric, names=NAMES)
    before = snapshot(model)

    def failing(i):
        try:
            with contexts(model, tokens)[kind]():
                capture(model, tokens, metric, names=NAMES)
                raise RuntimeError(f"boom {i}")
        except RuntimeError as e:
            return str(e)

    assert run_threads([lambda i=i: failing(i) for i in range(N_THREADS)]) == [f"boom {i}" for i in range(N_THREADS)]
    assert_as_before(model, before)
    assert_same_cache(run_threads([lambda: capture(model, tokens, metric, names=NAMES)])[0], plain)


def test_nested_blocks_with_an_exception_at_each_level(model):
    """patch_attention inside segment_mask inside zero_heads; raising at each level leaves the outer
    blocks active and unchanged, and everything restored at the end."""
    tokens = seg_of(model).tokens
    metric = last_logit(7)
    heads = [(0, 1), (1, 0)]
    delta = delta_for(model, tokens.shape[1])
    before = snapshot(model)
    with zero_heads(model, heads):
        z_only = capture(model, tokens, metric, names=NAMES)
        with segment_mask(model, seg_of(model)):
            z_seg = capture(model, tokens, metric, names=NAMES)
    plain = capture(model, tokens, metric, names=NAMES)

    for level in ("patch", "segment", "zero"):
        with pytest.raises(RuntimeError, match=level):
            with zero_heads(model, heads):
                try:
                    with segment_mask(model, seg_of(model)):
                        try:
                            with patch_attention(model, delta, eta=1.0):
                                capture(model, tokens, metric, names=NAMES)
                                if level == "patch":
                                    raise RuntimeError("patch")
                        except RuntimeError:
                            # The patch is gone; segment_mask and zero_heads still act.
                            assert_same_cache(capture(model, tokens, metric, names=NAMES), z_seg)
                            if level == "patch":
                                raise
                        if level == "segment":
                            raise RuntimeError("segment")
                except RuntimeError:
                    assert_same_cache(capture(model, tokens, metric, names=NAMES), z_only)
                    raise
                raise RuntimeError("zero")
        assert_as_before(model, before)
        assert_same_cache(capture(model, tokens, metric, names=NAMES), plain)


def test_blocks_left_out_of_order_remove_only_their_own_changes(model):
    tokens = seg_of(model).tokens
    metric = last_logit(7)
    heads = [(0, 1), (1, 0)]
    before = snapshot(model)
    plain = capture(model, tokens, metric, names=NAMES)
    with zero_heads(model, heads):
        z_only = capture(model, tokens, metric, names=NAMES)
    with segment_mask(model, seg_of(model)):
        seg_only = capture(model, tokens, metric, names=NAMES)

    for first, second, remaining in (("patch", "zero", z_only), ("seg", "zero", z_only), ("zero", "seg", seg_only)):
        make = {"patch": lambda: patch_attention(model, delta_for(model, tokens.shape[1]), eta=1.0),
                "zero": lambda: zero_heads(model, heads), "seg": lambda: segment_mask(model, seg_of(model))}
        a, b = make[first](), make[second]()
        a.__enter__()
        b.__enter__()
        a.__exit__(None, None, None)  # not LIFO: the outer block leaves first
        assert_same_cache(capture(model, tokens, metric, names=NAMES), remaining)
        assert lock_of(model).depth == 1
        b.__exit__(None, None, None)
        assert_as_before(model, before)
        assert_same_cache(capture(model, tokens, metric, names=NAMES), plain)


def test_a_block_left_in_another_thread_frees_the_model(model):
    tokens = seg_of(model).tokens
    metric = last_logit(7)
    plain = capture(model, tokens, metric, names=NAMES)
    before = snapshot(model)
    block = patch_attention(model, delta_for(model, tokens.shape[1]), eta=1.0)
    run_threads([block.__enter__])
    assert lock_of(model).depth == 1 and lock_of(model).holder != threading.get_ident()
    block.__exit__(None, None, None)  # here, not in the thread that entered it
    assert_as_before(model, before)
    assert_same_cache(run_threads([lambda: capture(model, tokens, metric, names=NAMES)])[0], plain)


def test_model_lock_is_reentrant_and_refuses_non_models(model):
    lock = lock_of(model)
    with model_lock(model), model_lock(model):
        assert (lock.depth, lock.holder) == (2, threading.get_ident())
        capture(model, "the cat sat", last_logit(5), names=NAMES)  # re-entrant inside a held lock
    assert (lock.depth, lock.holder) == (0, None)
    assert lock_of(model) is lock
    with pytest.raises(TLBackwardError, match="model must be") as info:
        with model_lock([1, 2]):
            pass
    assert info.value.argument == "model"
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        ModelLock().release()
