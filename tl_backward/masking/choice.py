"""A multiple-choice task in the commonsense template, over the embedded models' world facts.

Template (the MAS paper's delimiter template: system block, instruction block, causal response)::

    system : read the question and answer with the number of the answer . ###
    user : 1 : rome 2 : paris 3 : lima 4 : oslo question : the capital of france is ? ###
    answer : 2

The options come *before* the question inside the instruction block, so under MAS the option
tokens can read the question (same block); under causal attention they cannot. The answer is the
option's label, one of :data:`LABELS` (the digit tokens ``1``-``4``: the embedded word vocabulary
has no ``b``/``c``/``d``, but has the digits 0-60 as single tokens). The question is the relation's
first training template (``"the {r} of {x} is"``), which the embedded models recall at 100 %, so
the task asks for knowledge plus the option mapping, as commonsense multiple-choice benchmarks do.

Splits: the facts of every relation with at least four distinct objects are split (seeded, per
relation) into test 30 %, dev 15 % of the rest, train the remainder; an antonym pair is split as
a pair (neither direction of a test pair is in train). Examples of a split ask only that split's
facts; distractors are three other objects of the same relation, the correct option's position is
uniform. Every word is in the embedded vocabulary (tested), so every label is one token.
"""

from __future__ import annotations

import random

from ..errors import TLBackwardError
from ..zoo.world import DELIMITER, RESPONSE_HEADER, World, prompt_of
from .experiment import QA

LABELS = ("1", "2", "3", "4")
SYSTEM = f"system : read the question and answer with the number of the answer . {DELIMITER}"
SPLITS = ("train", "dev", "test")
TEST_FRACTION, DEV_FRACTION = 0.3, 0.15


def choice_relations(world: World) -> list[str]:
    """The world's relations with at least ``len(LABELS)`` distinct objects (parity has two)."""
    return [r for r, facts in world.facts.items() if len(set(facts.values())) >= len(LABELS)]


def choice_facts(world: World, split: str) -> list[tuple[str, str, str]]:
    """(relation, subject, object) of ``split`` ("train", "dev" or "test"), in a fixed order."""
    if split not in SPLITS:
        raise TLBackwardError(f"split must be one of {SPLITS}, got {split!r}", argument="split")
    out = []
    for rel in choice_relations(world):
        pairs = sorted(world.facts[rel].items())
        keys = sorted({tuple(sorted(p)) if rel == "antonym" else p[0] for p in pairs})
        random.Random(f"{world.seed}-choice-split-{rel}").shuffle(keys)
        n_test = round(TEST_FRACTION * len(keys))
        n_dev = round(DEV_FRACTION * (len(keys) - n_test))
        part = {"test": keys[:n_test], "dev": keys[n_test:n_test + n_dev], "train": keys[n_test + n_dev:]}[split]
        chosen = set(part)
        out += [(rel, s, o) for s, o in pairs if (tuple(sorted((s, o))) if rel == "antonym" else s) in chosen]
    return out


def choice_prompt(question: str, options: list[str] | tuple[str, ...]) -> str:
    """System block, instruction block (labelled options, then the question), response header."""
    if len(options) != len(LABELS):
        raise TLBackwardError(f"options must list {len(LABELS)} answers, got {len(options)}", argument="options")
    listed = " ".join(f"{label} : {opt}" for label, opt in zip(LABELS, options))
    return f"{SYSTEM} user : {listed} question : {question} ? {DELIMITER} {RESPONSE_HEADER}"


def choice_task(n: int, *, split: str = "train", world_seed: int = 0, seed: int = 0) -> list[QA]:
    """``n`` multiple-choice examples of ``split``: a relation uniformly, then one of its facts in
    the split, three distractors and the correct option's position (all from a seeded stream of
    ``(world_seed, split, seed)``); ``answer`` is the correct option's label."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise TLBackwardError(f"n must be a positive int, got {n!r}", argument="n")
    world = World(world_seed)
    facts = choice_facts(world, split)
    by_rel: dict[str, list[tuple[str, str, str]]] = {}
    for f in facts:
        by_rel.setdefault(f[0], []).append(f)
    rels = sorted(by_rel)
    rng = random.Random(f"{world_seed}-choice-{split}-{seed}")
    out = []
    for _ in range(n):
        rel, subj, obj = rng.choice(by_rel[rng.choice(rels)])
        others = sorted(set(world.facts[rel].values()) - {obj})
        options = rng.sample(others, len(LABELS) - 1)
        at = rng.randrange(len(LABELS))
        options.insert(at, obj)
        question = prompt_of(world.templates(rel)[0][0], subj)
        out.append(QA(choice_prompt(question, options), LABELS[at]))
    return out
