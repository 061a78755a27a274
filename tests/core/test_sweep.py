"""Dataset sweeps (core/sweep.py): streaming, resume after a crash or a kill, and torchrun sharding.

Independent references: the same sweep run uninterrupted in one process (resume and torchrun must
reproduce it), and the list-based call (streamed examples must give the same ranking).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import build
from tests.core.sweep_worker import EDIT_REQUESTS, PROMPTS
from tl_backward import rank_heads
from tl_backward.core.sweep import batched, run_sweep
from tl_backward.lens import evaluate_edits

ROOT = Path(__file__).resolve().parents[2]


def ranking_tensors(r):
    return r.reversed_mean, r.reversed_std, r.forward_mean, r.forward_std


def test_streamed_examples_equal_the_list_call(gpt2_model):
    prompts, targets = [p for p, _ in PROMPTS[:7]], [t for _, t in PROMPTS[:7]]
    ref = rank_heads(gpt2_model, prompts, targets, batch_size=3, progress=False)
    pairs = rank_heads(gpt2_model, iter(PROMPTS[:7]), batch_size=3, progress=False)
    dicts = rank_heads(gpt2_model, ({"prompt": p, "target": t} for p, t in PROMPTS[:7]), batch_size=3,
                       progress=False)
    shared = rank_heads(gpt2_model, (p for p in prompts), " cat", batch_size=3, progress=False)
    assert pairs.n_examples == dicts.n_examples == 7
    for mine in (pairs, dicts):
        for a, b in zip(ranking_tensors(mine), ranking_tensors(ref)):
            assert torch.equal(a, b)  # same batches, same float64 sums
    for a, b in zip(ranking_tensors(shared), ranking_tensors(rank_heads(gpt2_model, prompts, " cat", batch_size=3,
                                                                        progress=False))):
        assert torch.equal(a, b)


def test_draws_one_batch_at_a_time():
    drawn = []

    def items():
        for i in range(10):
            drawn.append(i)
            yield i

    seen = []

    def step(batch):
        seen.append(len(drawn))  # items drawn from the dataset when this batch is computed
        return {"s": torch.tensor([float(sum(batch))])}, len(batch)

    swept = run_sweep(batched(items(), 3), step, fingerprint="t")
    sums, n = swept.sums, swept.count
    assert n == 10 and float(sums["s"]) == 45.0
    assert seen == [3, 6, 9, 10]  # never more than the batch being computed


def _values(k):
    return {"a": torch.arange(4, dtype=torch.float64) * (k + 1) / 7, "b": torch.tensor(1.0 / (k + 3))}


def test_resume_after_a_crash_returns_the_uninterrupted_result(tmp_path):
    ref = run_sweep(range(9), lambda k: (_values(k), 1, [f"record {k}"]), fingerprint="t")
    path = tmp_path / "ck.pt"
    calls = []

    def crashing(k):
        calls.append(k)
        if k == 5:
            raise RuntimeError("power cut")
        return _values(k), 1, [f"record {k}"]

    with pytest.raises(RuntimeError, match="power cut"):
        run_sweep(range(9), crashing, fingerprint="t", checkpoint=path)
    calls.clear()

    def recording(k):
        calls.append(k)
        return _values(k), 1, [f"record {k}"]

    swept = run_sweep(range(9), recording, fingerprint="t", checkpoint=path)
    assert calls == [5, 6, 7, 8]  # nothing summed before the crash is computed again
    assert swept.count == ref.count == 9 and all(torch.equal(swept.sums[k], ref.sums[k]) for k in ref.sums)
    assert swept.records == ref.records == tuple(f"record {k}" for k in range(9))


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    path = tmp_path / "ck.pt"
    run_sweep(range(3), lambda k: (_values(k), 1), fingerprint="run A", checkpoint=path)
    with pytest.raises(ValueError, match="belongs to another run"):
        run_sweep(range(3), lambda k: (_values(k), 1), fingerprint="run B", checkpoint=path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        run_sweep(range(3), lambda k: (_values(k), 1), fingerprint="run A", checkpoint=path)
    with pytest.raises(ValueError, match="folder"):
        run_sweep(range(3), lambda k: (_values(k), 1), fingerprint="run A", checkpoint=tmp_path / "no" / "ck.pt")


def _worker(out, *args, torchrun=False):
    cmd = [sys.executable, "-m", "tests.core.sweep_worker", str(out), *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tests.core.sweep_worker", str(out), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return cmd, env


def _run(out, *args, torchrun=False):
    cmd, env = _worker(out, *args, torchrun=torchrun)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    return [torch.load(f"{out}.rank{r}") for r in range(2 if torchrun else 1)]


@pytest.mark.processes
def test_torchrun_two_ranks_equal_one_process(tmp_path):
    (single,) = _run(tmp_path / "single")
    ranks = _run(tmp_path / "dist", torchrun=True)
    for r in ranks:
        assert r["n"] == single["n"] == len(PROMPTS)  # counts exactly
        for key in ("reversed_mean", "reversed_std", "forward_mean"):
            err = float((r[key] - single[key]).norm() / single[key].norm())
            assert err <= 1e-6, (key, err)  # float64 sums added in another order, stored as fp32
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ("reversed_mean", "forward_mean"))


@pytest.mark.processes
def test_killed_and_restarted_run_returns_the_uninterrupted_result(tmp_path):
    (ref,) = _run(tmp_path / "ref", "--slow", "0.05")
    ck = tmp_path / "ck.pt"
    cmd, env = _worker(tmp_path / "killed", "--slow", "0.3", "--checkpoint", str(ck))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if ck.exists() and torch.load(ck, weights_only=True)["drawn"] >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    drawn = torch.load(ck, weights_only=True)["drawn"]
    assert 2 <= drawn < len(PROMPTS) // 2
    (resumed,) = _run(tmp_path / "resumed", "--slow", "0.05", "--checkpoint", str(ck))
    assert resumed["n"] == ref["n"]
    for key in ("reversed_mean", "reversed_std", "forward_mean"):
        assert torch.equal(resumed[key], ref[key])


@pytest.mark.processes
def test_mas_finetune_under_torchrun_equals_one_process(tmp_path):
    """Same global batches and seed: the weights after 2 epochs match one process to fp32 accuracy
    (the tiny model has no dropout), and both ranks hold identical weights."""
    (single,) = _run(tmp_path / "single", "--job", "finetune")
    ranks = _run(tmp_path / "dist", "--job", "finetune", torchrun=True)
    start = build("gpt2").state_dict()
    for r in ranks:
        assert torch.allclose(r["losses"], single["losses"], rtol=1e-5, atol=0)
        moved = sum(float((single["weights"][k] - start[k]).norm()) for k in start)
        assert moved > 1e-2  # training changed the weights, so the comparison below means something
        for k, w in single["weights"].items():
            if k.endswith("attn.k.bias"):
                # ∂L/∂b_K = 0 exactly (softmax ignores the per-query shift q·b_K); AdamW turns its fp32
                # rounding noise into full-size steps, different for any summation order.
                continue
            err = float((r["weights"][k] - w).norm() / (w - start[k]).norm().clamp_min(1e-12))
            assert err < 1e-4, (k, err)  # relative to the update: AdamW steps of fp32 gradients summed in another order
    assert all(torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]) for k in ranks[0]["weights"])


def test_evaluate_edits_streams_and_resumes(gpt2_model, tmp_path):
    ref = evaluate_edits(gpt2_model, EDIT_REQUESTS, layer=-1, eta=3.0, progress=False)
    streamed = evaluate_edits(gpt2_model, iter(EDIT_REQUESTS), layer=-1, eta=3.0, progress=False)
    assert str(streamed) == str(ref) and torch.equal(streamed.efficacy, ref.efficacy)
    assert torch.equal(streamed.applied, ref.applied) and torch.equal(streamed.neighborhood, ref.neighborhood)

    def failing():
        yield from EDIT_REQUESTS[:3]
        raise OSError("the dataset's disk went away")

    ck = tmp_path / "edits.pt"
    with pytest.raises(OSError):
        evaluate_edits(gpt2_model, failing(), layer=-1, eta=3.0, progress=False, checkpoint=ck)
    assert torch.load(ck, weights_only=True)["drawn"] == 3  # three edits scored and kept
    resumed = evaluate_edits(gpt2_model, iter(EDIT_REQUESTS), layer=-1, eta=3.0, progress=False, checkpoint=ck)
    for a, b in ((resumed.efficacy, ref.efficacy), (resumed.paraphrase, ref.paraphrase),
                 (resumed.neighborhood, ref.neighborhood), (resumed.applied, ref.applied)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="another run"):
        evaluate_edits(gpt2_model, EDIT_REQUESTS, layer=-1, eta=2.0, progress=False, checkpoint=ck)


@pytest.mark.processes
def test_evaluate_edits_under_torchrun_equals_one_process(tmp_path):
    (single,) = _run(tmp_path / "single", "--job", "edits")
    for r in _run(tmp_path / "dist", "--job", "edits", torchrun=True):
        assert all(torch.equal(r[k], single[k]) for k in single)  # per-request scores, in request order


def _tail_sum(a, b):
    """Sums of vectors of varying length, aligned at their ends: crop both to the shorter, add."""
    k = min(len(a["v"]), len(b["v"]))
    return {"v": a["v"][-k:] + b["v"][-k:]}


def test_combine_merges_sums_that_change_shape_and_resumes(tmp_path):
    sizes = [5, 3, 6, 2, 4]
    vec = lambda k: torch.arange(sizes[k], dtype=torch.float64) + k / 3  # noqa: E731
    ref = sum(vec(k)[-2:] for k in range(5))  # explicit: every vector's last 2 entries, added
    swept = run_sweep(range(5), lambda k: ({"v": vec(k)}, 1), fingerprint="t", combine=_tail_sum)
    assert swept.count == 5 and torch.allclose(swept.sums["v"], ref, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="step returned sums"):  # without combine, shapes must not change
        run_sweep(range(5), lambda k: ({"v": vec(k)}, 1), fingerprint="t")
    path = tmp_path / "ck.pt"

    def crashing(k):
        if k == 3:
            raise RuntimeError("power cut")
        return {"v": vec(k)}, 1

    with pytest.raises(RuntimeError):
        run_sweep(range(5), crashing, fingerprint="t", checkpoint=path, combine=_tail_sum)
    assert torch.load(path, weights_only=True)["sums"]["v"].shape == (3,)  # cropped to the shortest so far
    resumed = run_sweep(range(5), lambda k: ({"v": vec(k)}, 1), fingerprint="t", checkpoint=path, combine=_tail_sum)
    assert resumed.count == 5 and torch.equal(resumed.sums["v"], swept.sums["v"])
