"""The synthetic world: determinism, splits, held-out templates, task formats."""

import random
import re

import pytest

from tl_backward.zoo.world import (
    DELIMITER, ICL_TASKS, RELATIONS, RESPONSE_HEADER, World, icl_prompt, prompt_of,
)


def test_world_is_deterministic_in_seed():
    a, b, c = World(0), World(0), World(1)
    assert a.facts == b.facts
    assert a.facts != c.facts  # people and colours are drawn from the seed
    for task in ICL_TASKS:
        assert a.icl_pairs(task, "test") == b.icl_pairs(task, "test")
        assert a.icl_examples(task, 5) == b.icl_examples(task, 5)
    assert a.segment_examples(20) == b.segment_examples(20)
    assert a.edit_requests(20) == b.edit_requests(20)
    ra, rb = random.Random(3), random.Random(3)
    assert [a.icl_document(ra) for _ in range(20)] == [b.icl_document(rb) for _ in range(20)]
    assert a.vocabulary == b.vocabulary


def test_fixed_tables_are_ground_truth():
    w = World(0)
    assert w.facts["capital"]["france"] == "paris"
    assert w.facts["country_of"]["paris"] == "france"
    assert w.facts["antonym"]["hot"] == "cold" and w.facts["antonym"]["cold"] == "hot"
    assert w.facts["successor"]["41"] == "42"
    assert w.facts["parity"]["7"] == "odd"
    assert w.facts["plural"]["mouse"] == "mice"


def _words(template):
    return set(template.replace("{x}", " ").replace("{y}", " ").split())


def test_held_out_templates_are_unseen_but_made_of_seen_words():
    w = World(0)
    trained_words = set()
    for rel in RELATIONS:
        train, _ = w.templates(rel.name)
        for t in train:
            trained_words |= _words(t)
    for rel in RELATIONS:
        train, held = w.templates(rel.name)
        assert held not in train
        assert held.endswith("{y} .") and all(t.endswith("{y} .") for t in train)
        assert _words(held) <= trained_words, (rel.name, _words(held) - trained_words)
    with pytest.raises(ValueError, match="relation"):
        w.templates("nope")


def test_recall_prompts_cover_every_fact_and_template():
    w = World(0)
    n_facts = sum(len(v) for v in w.facts.values())
    train = w.recall_prompts()
    held = w.recall_prompts(held_out=True)
    assert len(held) == n_facts and len(train) == 4 * n_facts
    assert ("capital", "the capital of france is", "paris") in train
    assert not any(p.endswith(" ") for _, p, _ in train)


def test_icl_splits_are_disjoint_and_test_pairs_never_trained():
    w = World(0)
    all_test = set()
    for task, rel in ICL_TASKS.items():
        tr, te = w.icl_pairs(task, "train"), w.icl_pairs(task, "test")
        assert set(tr).isdisjoint(te) and len(te) >= 10 and len(tr) > len(te)
        assert sorted(tr + te) == sorted(w.facts[rel].items())
        all_test |= set(te)
    # antonym test pairs are held out in both directions
    te = w.icl_pairs("antonym", "test")
    assert all((y, x) in te for x, y in te)
    # sampled training ICL lists contain no test pair at all
    rng = random.Random(0)
    seen = set()
    for _ in range(2000):
        doc = w.icl_document(rng)
        seen |= set(re.findall(r"Q: (\S+)\nA: (\S+)", doc))
    assert seen and seen.isdisjoint(all_test)
    with pytest.raises(ValueError, match="task"):
        w.icl_pairs("nope")
    with pytest.raises(ValueError, match="split"):
        w.icl_pairs("antonym", "valid")


def test_icl_examples_format_and_equal_lengths():
    w = World(0)
    assert icl_prompt([("hot", "cold")], "big") == "Q: hot\nA: cold\n\nQ: big\nA:"
    for task in ICL_TASKS:
        train = set(w.icl_pairs(task, "train"))
        for k in (0, 1, 5, 10):
            exs = w.icl_examples(task, k)
            assert len(exs) == len(w.icl_pairs(task, "test"))
            lengths = {len(p.split()) + p.count(":") for p, _, _ in exs}
            assert lengths == {1 + 6 * k + 5 - 1}  # whitespace words + split-off colons, no BOS
            for prompt, target, x in exs:
                demos = set(re.findall(r"Q: (\S+)\nA: (\S+)", prompt))
                assert len(demos) == k and demos <= train
                assert x not in {d[0] for d in demos}
                assert prompt.endswith(f"Q: {x}\nA:") and target == " " + w.facts[ICL_TASKS[task]][x]


@pytest.mark.parametrize("mixed", [False, True])
def test_segment_examples_need_context_and_question(mixed):
    w = World(0)
    train, test = w.segment_examples(50, mixed=mixed), w.segment_examples(50, "test", mixed=mixed)
    assert train != test
    for ex in train:
        system, user = ex.blocks
        assert system.endswith(DELIMITER) and user.endswith(DELIMITER)
        assert ex.prompt == f"{system} {user} {RESPONSE_HEADER}"
        context, question = user.split(" question : ")
        subject = re.search(r"(?:does|of) (\S+) (?:live )?\?", question).group(1)
        # the answer is stated about the asked person in the context
        stmt = f"{subject} lives in {ex.answer} ." if "live" in question else f"{subject} works as a {ex.answer} ."
        assert stmt in context
        if not mixed:  # one kind per context: the question's person, not its relation, decides
            assert ("lives" in context) != ("works" in context)
        else:
            assert "lives" in context and "works" in context
    with pytest.raises(ValueError, match="split"):
        w.segment_examples(3, "dev")


def test_edit_requests_are_counterfact_style():
    w = World(0)
    reqs = w.edit_requests(40)
    assert len(reqs) == 40
    for r in reqs:
        truth = w.facts[r["relation"]]
        assert truth[r["subject"]] == r["target_true"] != r["target_new"]
        assert r["target_new"] in set(truth.values())
        assert r["subject"] in r["prompt"] and all(r["subject"] in p for p in r["paraphrases"])
        train, held = w.templates(r["relation"])
        assert r["paraphrases"][0] == prompt_of(held, r["subject"])
        assert 1 <= len(r["neighborhood"]) <= 5
        for p in r["neighborhood"]:
            subj = [s for s in truth if prompt_of(train[0], s) == p]
            assert len(subj) == 1 and subj[0] != r["subject"] and truth[subj[0]] == r["target_true"]
