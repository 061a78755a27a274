"""Bad inputs to every public function are refused with a TLBackwardError naming the argument,
and leave no trace (issue 12, item 10).

The table lives in tests/bad_input_rows.py and tests/bad_input_rows_more.py, the harness in
tests/bad_inputs.py. After every row the snapshot of the three tiny models (weights bit for bit,
dtypes, ``.grad``, ``requires_grad``, train/eval modes, every torch hook dict, TransformerLens hook
lists, the model lock, ``cfg.device``, the tokenizer's padding side) and of torch's global state
(grad mode, global hooks, the global RNG) must be unchanged.

``python -m tests.test_bad_inputs`` prints tried / clear / unclear / crash / silent counts and the
rows that are not clear, without pytest (used for the before/after counts of the issue note).
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest

from tests.bad_input_rows import ROWS as ROWS_1
from tests.bad_input_rows_more import ROWS as ROWS_2
from tests.bad_inputs import Env, Row, build_env, outcome, snapshot, trace_left

ROWS: list[Row] = ROWS_1 + ROWS_2
OUTCOMES: dict[str, str] = {}
KINDS = ("clear", "unclear", "crash", "silent")


def test_row_names_are_unique():
    counts = Counter(r.name for r in ROWS)
    assert [n for n, c in counts.items() if c > 1] == []
    assert len(ROWS) >= 250


@pytest.fixture(scope="module")
def env(request) -> Env:
    built = build_env()
    built.last = snapshot(built)  # the state before the next row (nothing runs between rows)
    yield built
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if OUTCOMES and capture is not None:
        with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
            print("\nbad inputs: " + summary(Counter(OUTCOMES.values()), len(OUTCOMES)))


def summary(counts: Counter, tried: int) -> str:
    return f"tried {tried} / " + " / ".join(f"{k} {counts.get(k, 0)}" for k in KINDS)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input_is_refused_clearly_and_leaves_no_trace(env, row):
    kind, detail = outcome(row, env)
    OUTCOMES[row.name] = kind
    before, env.last = env.last, snapshot(env)
    assert trace_left(before, env.last) == [], f"{row.name} left a trace"
    assert kind == "clear", f"{row.name}: {kind}: expected {row.exc.__name__} mentioning {row.word!r}, got {detail}"


def main() -> int:
    env = build_env()
    counts: Counter = Counter()
    traces = 0
    before = snapshot(env)
    for row in ROWS:
        kind, detail = outcome(row, env)
        after = snapshot(env)
        left = trace_left(before, after)
        before = after
        counts[kind] += 1
        if left:
            traces += 1
            env = build_env()  # a trace would spoil the rows after it
            before = snapshot(env)
        if kind != "clear" or left:
            print(f"{kind:8} {row.name}: {detail[:150]!r}" + (f"  TRACE {left}" if left else ""))
    print(summary(counts, len(ROWS)) + f"; rows leaving a trace: {traces}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
