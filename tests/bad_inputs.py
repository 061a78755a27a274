"""Harness of the bad-input table (tests/test_bad_inputs.py): the shared objects the rows call,
the leave-no-trace snapshot, and the outcome of one row.

A row is ``(name, call, word, exc)``: ``call(env)`` must raise ``exc`` (default
:class:`~tl_backward.errors.TLBackwardError`) with ``word`` in its message (case-insensitive,
usually the argument's name). Outcomes:

* ``clear``   -- ``exc`` raised and the message contains ``word``;
* ``unclear`` -- ``exc`` raised, but the message lacks ``word``;
* ``crash``   -- any other exception (a plain ``ValueError`` from deep inside, torch's
  ``RuntimeError``, ``IndexError``, ...);
* ``silent``  -- no exception: the bad input was accepted.

Run ``python -m tests.test_bad_inputs`` to print the counts without pytest.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.modules import module as nn_module

import tl_backward as tlb
from tl_backward.core.lock import lock_of
from tl_backward.errors import TLBackwardError
from tl_backward.masking import segments as S
from tests.conftest import build

PROMPT = "the cat sat on the"
TARGET = " mat"
NLL = tlb.metrics.target_nll(TARGET)
REQUEST = {"prompt": "the capital of france is", "target_new": "rome", "target_true": "paris",
           "paraphrases": ["france capital is"], "neighborhood": ["the capital of italy is"]}
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")


@dataclass(frozen=True)
class Row:
    name: str
    call: Callable[["Env"], Any]
    word: str
    exc: type = TLBackwardError


@dataclass
class Env:
    """One model per family and results of valid calls on them, shared by every row."""

    gpt2: Any
    neox: Any
    llama: Any
    ra: Any = None          # reversed_attention(gpt2, PROMPT, TARGET), all layers
    ra0: Any = None         # the same, layer 0 only
    cache: Any = None       # capture of two hook points
    gf: Any = None          # gradient_factors, MLP modules
    gf_q: Any = None        # gradient_factors, module q
    lens: Any = None        # backward_lens
    ranking: Any = None     # rank_heads over two prompts
    graph: Any = None       # forward flow graph of PROMPT, layer 0, last position
    graph_other: Any = None  # the same of another prompt
    graph_pos: Any = None   # PROMPT, layer 0, position 1
    graph_l1: Any = None    # PROMPT, layer 1
    seg: Any = None         # two prompts with answers (from_blocks)
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tlb-bad-")))
    last: dict | None = None  # the snapshot taken after the previous row

    @property
    def models(self) -> tuple:
        return self.gpt2, self.neox, self.llama


def build_env() -> Env:
    """The shared objects; GPT-2 gets a mixed requires_grad state and one block in train mode, so
    "restored" means more than "all True, all eval"."""
    env = Env(build("gpt2"), build("neox"), build("llama"))
    g = env.gpt2
    for model in (env.neox, env.llama):  # bridges register some norm pre-hooks on their first forward
        tlb.capture(model, PROMPT, NLL, names="hook_embed")
    env.ra = tlb.reversed_attention(g, PROMPT, TARGET)
    env.ra0 = tlb.reversed_attention(g, PROMPT, TARGET, layers=0)
    env.cache = tlb.capture(g, PROMPT, NLL, names=["blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern"])
    env.gf = tlb.gradient_factors(g, PROMPT, TARGET)
    env.gf_q = tlb.gradient_factors(g, PROMPT, TARGET, modules="q")
    env.lens = tlb.backward_lens(g, PROMPT, TARGET)
    env.ranking = tlb.rank_heads(g, ["the cat sat", "a dog ran"], TARGET, progress=False)
    env.graph = tlb.flow_graph(g, PROMPT, layer=0)
    env.graph_other = tlb.flow_graph(g, "a big dog ran to the", layer=0)
    env.graph_pos = tlb.flow_graph(g, PROMPT, layer=0, position=1)
    env.graph_l1 = tlb.flow_graph(g, PROMPT, layer=1)
    env.seg = S.from_blocks(g, [["the cat sat"], ["where is the dog"]], ["on the mat", "in the city"])
    (env.tmp / "empty").mkdir()
    (env.tmp / "file.txt").write_text("not a model")
    for i, p in enumerate(g.parameters()):
        p.requires_grad_(i % 3 != 0)
    g.blocks[1].train()
    return env


# ------------------------------------------------------------------------------------------ snapshot
def snapshot(env: Env) -> dict:
    """Everything a call could leave behind on the models and on torch's global state."""
    out: dict[str, Any] = {"grad_mode": torch.is_grad_enabled(), "rng": torch.random.get_rng_state(),
                           "global_hooks": _global_hooks()}
    for i, model in enumerate(env.models):
        hooks = {}
        for name, mod in model.named_modules():
            own = vars(mod)  # not getattr: a bridge component's __getattr__ walks its submodules
            for kind in _HOOK_DICTS:
                hooks[name, kind] = tuple(own.get(kind, {}).keys())
            for kind in ("fwd_hooks", "bwd_hooks"):  # TransformerLens hook points
                if kind in own:
                    hooks[name, kind] = len(own[kind])
        tok = getattr(model, "tokenizer", None)
        params = list(model.named_parameters())
        out[i] = dict(
            # Parameters and buffers, cloned (a bridge's state_dict() is ten times slower to build).
            weights={k: v.detach().clone() for k, v in [*params, *model.named_buffers()]},
            dtypes=[p.dtype for _, p in params],
            grads=[p.grad is None for _, p in params],
            flags=[p.requires_grad for _, p in params],
            modes=[m.training for m in model.modules()],
            hooks=hooks, device=str(model.cfg.device), padding=getattr(tok, "padding_side", None),
            lock=(lock_of(model).depth, lock_of(model).holder),
        )
    return out


def _global_hooks() -> tuple:
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks")
    return tuple(tuple(getattr(nn_module, n, {}).keys()) for n in names)


def trace_left(before: dict, after: dict) -> list[str]:
    """What differs between two snapshots (empty: no trace)."""
    found = []
    for key in ("grad_mode", "global_hooks"):
        if before[key] != after[key]:
            found.append(key)
    if not torch.equal(before["rng"], after["rng"]):
        found.append("global RNG state")
    for i, family in enumerate(("gpt2", "neox", "llama")):
        b, a = before[i], after[i]
        for key in ("dtypes", "grads", "flags", "modes", "hooks", "device", "padding", "lock"):
            if b[key] != a[key]:
                found.append(f"{family}: {key}")
        if a["weights"].keys() != b["weights"].keys():
            found.append(f"{family}: weight names")
            continue
        changed = [k for k, w in b["weights"].items() if not torch.equal(a["weights"][k], w)]
        if changed:
            found.append(f"{family}: weights {changed[:3]}")
    return found


# ------------------------------------------------------------------------------------------ outcome
def outcome(row: Row, env: Env) -> tuple[str, str]:
    """(kind, detail): kind is clear / unclear / crash / silent (see the module docstring)."""
    try:
        row.call(env)
    except row.exc as err:
        text = str(err)
        if row.word.lower() in text.lower():
            return "clear", text
        return "unclear", f"{type(err).__name__}: {text}"
    except Exception as err:  # noqa: BLE001 - classifying every failure is the point
        return "crash", f"{type(err).__name__}: {err}"
    return "silent", "no exception"


def reenter(cm: Any) -> None:
    """Enter the same context-manager object twice, one after the other."""
    with cm:
        pass
    with cm:
        pass


def nested(cm: Any) -> None:
    """Enter the same context-manager object inside its own block."""
    with cm:
        with cm:
            pass
