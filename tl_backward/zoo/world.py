"""A small synthetic world with known ground truth, and the texts the embedded models learn.

Everything is a pure function of a seed. Country facts roughly mirror the real world (so demos
read naturally); people, object colours and all train/test splits are drawn from the seed.

Four kinds of text come out of a :class:`World`:

* **statements** of relation facts in several templates (``"the capital of france is paris ."``).
  Every relation has training templates and one *held-out* template (``HELD_OUT``) that never
  appears in training but is built only from words that do, for paraphrase tests;
* **in-context-learning lists** in the Reversed Attention paper's style
  (``"Q: x\\nA: y\\n\\n" * k + "Q: x\\nA:"``, target ``" y"``). Each task's pairs are split into
  train and test; test pairs never appear in ICL format in training (their facts do appear as
  statements), so a few-shot prompt on a test pair must *retrieve* knowledge;
* **segment-QA prompts** for MAS: a system block and a user block (context + question), each
  closed by the delimiter ``"###"``, then the causal header ``"answer :"`` and a one-word answer
  that needs both the question (which person) and the randomly generated context (their city
  or job, which differs from the world's ground truth);
* **CounterFact-style edit requests** ``{prompt, subject, relation, target_true, target_new,
  paraphrases, neighborhood}``.

All words are lower case except the ICL markers ``Q`` and ``A``; every entity is one word, so
with the word-level tokenizer every answer is exactly one token and every k-shot ICL prompt of a
task has the same token length (``1 + 6k + 5`` with BOS).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cached_property

from ..errors import TLBackwardError

# --- fixed tables -------------------------------------------------------------------------------
# (country, capital, language, currency)
COUNTRIES = (
    ("france", "paris", "french", "euro"), ("italy", "rome", "italian", "euro"),
    ("germany", "berlin", "german", "euro"), ("spain", "madrid", "spanish", "euro"),
    ("portugal", "lisbon", "portuguese", "euro"), ("austria", "vienna", "german", "euro"),
    ("greece", "athens", "greek", "euro"), ("poland", "warsaw", "polish", "zloty"),
    ("russia", "moscow", "russian", "ruble"), ("egypt", "cairo", "arabic", "pound"),
    ("japan", "tokyo", "japanese", "yen"), ("china", "beijing", "chinese", "yuan"),
    ("india", "delhi", "hindi", "rupee"), ("kenya", "nairobi", "swahili", "shilling"),
    ("peru", "lima", "spanish", "sol"), ("chile", "santiago", "spanish", "peso"),
    ("cuba", "havana", "spanish", "peso"), ("norway", "oslo", "norwegian", "krone"),
    ("sweden", "stockholm", "swedish", "krona"), ("finland", "helsinki", "finnish", "euro"),
    ("denmark", "copenhagen", "danish", "krone"), ("ireland", "dublin", "english", "euro"),
    ("hungary", "budapest", "hungarian", "forint"), ("turkey", "ankara", "turkish", "lira"),
    ("iran", "tehran", "persian", "rial"), ("thailand", "bangkok", "thai", "baht"),
    ("canada", "ottawa", "english", "dollar"), ("australia", "canberra", "english", "dollar"),
    ("brazil", "brasilia", "portuguese", "real"), ("belgium", "brussels", "dutch", "euro"),
    ("netherlands", "amsterdam", "dutch", "euro"), ("switzerland", "bern", "german", "franc"),
    ("czechia", "prague", "czech", "koruna"), ("romania", "bucharest", "romanian", "leu"),
    ("vietnam", "hanoi", "vietnamese", "dong"), ("korea", "seoul", "korean", "won"),
    ("indonesia", "jakarta", "indonesian", "rupiah"), ("morocco", "rabat", "arabic", "dirham"),
    ("colombia", "bogota", "spanish", "peso"), ("ukraine", "kyiv", "ukrainian", "hryvnia"),
    ("iraq", "baghdad", "arabic", "dinar"), ("pakistan", "islamabad", "urdu", "rupee"),
)
PEOPLE = (
    "alice bob carol dave erin frank grace henry irene jack karen leo maria nick olga peter "
    "quinn rosa sam tina umar vera walter xena yusuf zoe anna boris clara dmitri elena felix "
    "gina hugo ivan julia kofi lena marco nadia"
).split()
PROFESSIONS = "doctor teacher farmer baker lawyer pilot nurse painter singer writer driver cook".split()
COLOURS = "red blue green yellow black white brown orange pink purple grey".split()
# (singular, plural); objects with colours are these nouns
NOUNS = (
    ("cat", "cats"), ("dog", "dogs"), ("car", "cars"), ("book", "books"), ("house", "houses"),
    ("tree", "trees"), ("bird", "birds"), ("apple", "apples"), ("chair", "chairs"),
    ("table", "tables"), ("cup", "cups"), ("hat", "hats"), ("shoe", "shoes"), ("ball", "balls"),
    ("box", "boxes"), ("bus", "buses"), ("fox", "foxes"), ("glass", "glasses"),
    ("dress", "dresses"), ("baby", "babies"), ("city", "cities"), ("lady", "ladies"),
    ("knife", "knives"), ("leaf", "leaves"), ("wolf", "wolves"), ("mouse", "mice"),
    ("child", "children"), ("man", "men"), ("woman", "women"), ("foot", "feet"),
    ("tooth", "teeth"), ("goose", "geese"), ("sheep", "sheep"), ("fish", "fish"),
    ("horse", "horses"), ("boat", "boats"), ("key", "keys"), ("pen", "pens"),
    ("door", "doors"), ("lamp", "lamps"),
)
ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("good", "bad"), ("fast", "slow"), ("happy", "sad"),
    ("high", "low"), ("long", "short"), ("old", "young"), ("rich", "poor"), ("strong", "weak"),
    ("hard", "soft"), ("light", "dark"), ("open", "closed"), ("early", "late"),
    ("full", "empty"), ("wet", "dry"), ("loud", "quiet"), ("thick", "thin"), ("clean", "dirty"),
    ("deep", "shallow"), ("wide", "narrow"), ("near", "far"), ("true", "false"),
    ("safe", "dangerous"), ("easy", "difficult"), ("cheap", "expensive"), ("sweet", "sour"),
    ("brave", "cowardly"), ("kind", "cruel"), ("first", "last"), ("inside", "outside"),
    ("up", "down"), ("north", "south"), ("east", "west"), ("day", "night"), ("win", "lose"),
)
N_NUMBERS = 61  # numbers 0..60 as digit tokens

DELIMITER = "###"
RESPONSE_HEADER = "answer :"
SYSTEM_PROMPTS = (
    "system : answer the question with one word from the context . ###",
    "system : read the context and answer the question . ###",
    "system : you answer questions about people . ###",
)

# --- relations and templates --------------------------------------------------------------------
# Generic template families: every relation is trained on F0 and two of F1..F3; the remaining
# one is held out for it (assigned cyclically), so the held-out template is a phrasing the model
# has seen with other relations but never with this one.
FAMILIES = (
    "the {r} of {x} is {y} .",
    "{x} has the {r} {y} .",
    "as for {x} , its {r} is {y} .",
    "we know the {r} of {x} : it is {y} .",
)


@dataclass(frozen=True)
class Relation:
    """A functional relation subject -> object with a relation noun and one natural template."""

    name: str
    noun: str  # fills {r} in the generic families
    natural: str  # a relation-specific training template with {x} and {y}, {y} last

    def templates(self, index: int) -> tuple[tuple[str, ...], str]:
        """(training templates, held-out template) for the relation at position ``index``."""
        held = 1 + index % 3
        fam = [f.replace("{r}", self.noun) for f in FAMILIES]
        train = tuple([fam[0], self.natural] + [fam[i] for i in (1, 2, 3) if i != held])
        return train, fam[held]


RELATIONS = (
    Relation("capital", "capital", "{x} has its capital in {y} ."),
    Relation("country_of", "country", "{x} is the capital of {y} ."),
    Relation("language", "language", "people in {x} speak {y} ."),
    Relation("currency", "currency", "in {x} , people pay with the {y} ."),
    Relation("home", "home", "{x} lives in {y} ."),
    Relation("job", "job", "{x} works as a {y} ."),
    Relation("colour", "colour", "every {x} is {y} ."),
    Relation("plural", "plural", "one {x} , two {y} ."),
    Relation("antonym", "opposite", "{x} is the opposite of {y} ."),
    Relation("successor", "successor", "after {x} comes {y} ."),
    Relation("parity", "parity", "the number {x} is {y} ."),
)
RELATION_BY_NAME = {r.name: r for r in RELATIONS}

# ICL task -> relation it reads. Tasks on the same inputs (three country tasks, plural/colour on
# nouns, successor/parity on numbers) make a 0-shot prompt ambiguous, so demonstrations matter;
# sibling tasks have answers of visibly different kinds, so the demonstrations disambiguate.
ICL_TASKS = {
    "antonym": "antonym",
    "country_capital": "capital",
    "country_language": "language",
    "country_currency": "currency",
    "plural": "plural",
    "object_colour": "colour",
    "successor": "successor",
    "parity": "parity",
}
ICL_TEST_FRACTION = 0.3


def fill(template: str, x: str, y: str) -> str:
    return template.replace("{x}", x).replace("{y}", y)


def prompt_of(template: str, x: str) -> str:
    """The template's text up to (not including) ``{y}``, without a trailing space."""
    return template.split("{y}")[0].replace("{x}", x).rstrip()


def icl_prompt(demos: list[tuple[str, str]] | tuple, query: str) -> str:
    """Reversed-Attention-style prompt: ``"Q: x\\nA: y\\n\\n"`` per demo, then ``"Q: query\\nA:"``.

    The target to score is ``" " + y`` (one word-level token).
    """
    return "".join(f"Q: {x}\nA: {y}\n\n" for x, y in demos) + f"Q: {query}\nA:"


@dataclass(frozen=True)
class SegmentExample:
    """A MAS segment-QA example.

    ``blocks[0]`` is the system block, ``blocks[1]`` the user block (context + question); each
    ends with :data:`DELIMITER`. The causal part is :data:`RESPONSE_HEADER` then ``answer``.
    """

    blocks: tuple[str, ...]
    answer: str
    header: str = RESPONSE_HEADER

    @property
    def prompt(self) -> str:
        """The full prompt text (no BOS): blocks then the response header."""
        return " ".join(self.blocks) + " " + self.header

    @property
    def text(self) -> str:
        """Prompt plus answer, as in training."""
        return self.prompt + " " + self.answer + " ."


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    object: str


@dataclass
class World:
    """Ground truth of the synthetic world, deterministic in ``seed``.

    ``world.facts[relation]`` maps subject -> object for every relation in :data:`RELATIONS`.
    """

    seed: int = 0
    facts: dict[str, dict[str, str]] = field(init=False)

    def __post_init__(self):
        rng = random.Random(self.seed)
        countries = [c[0] for c in COUNTRIES]
        capitals = [c[1] for c in COUNTRIES]
        f: dict[str, dict[str, str]] = {}
        f["capital"] = {c[0]: c[1] for c in COUNTRIES}
        f["country_of"] = {c[1]: c[0] for c in COUNTRIES}
        f["language"] = {c[0]: c[2] for c in COUNTRIES}
        f["currency"] = {c[0]: c[3] for c in COUNTRIES}
        f["home"] = {p: rng.choice(capitals) for p in PEOPLE}
        f["job"] = {p: rng.choice(PROFESSIONS) for p in PEOPLE}
        f["colour"] = {n: rng.choice(COLOURS) for n, _ in NOUNS}
        f["plural"] = dict(NOUNS)
        f["antonym"] = {**{a: b for a, b in ANTONYMS}, **{b: a for a, b in ANTONYMS}}
        f["successor"] = {str(i): str(i + 1) for i in range(N_NUMBERS - 1)}
        f["parity"] = {str(i): ("even" if i % 2 == 0 else "odd") for i in range(N_NUMBERS)}
        self.facts = f
        self._countries = countries
        self._icl_splits = {task: self._split(task, random.Random(f"{self.seed}-icl-{task}"))
                            for task in ICL_TASKS}

    # --- statements ----------------------------------------------------------------------------
    def templates(self, relation: str) -> tuple[tuple[str, ...], str]:
        """(training templates, held-out template) of ``relation``; ``{y}`` is always last."""
        if relation not in RELATION_BY_NAME:
            raise TLBackwardError(f"relation must be one of {sorted(RELATION_BY_NAME)}, got {relation!r}",
                                  argument="relation")
        index = [r.name for r in RELATIONS].index(relation)
        return RELATION_BY_NAME[relation].templates(index)

    def all_facts(self) -> list[Fact]:
        return [Fact(r, s, o) for r in self.facts for s, o in self.facts[r].items()]

    def recall_prompts(self, held_out: bool = False) -> list[tuple[str, str, str]]:
        """(relation, prompt, target) for every fact and every training (or held-out) template."""
        out = []
        for fact in self.all_facts():
            train, held = self.templates(fact.relation)
            for t in ([held] if held_out else train):
                out.append((fact.relation, prompt_of(t, fact.subject), fact.object))
        return out

    def statement(self, rng: random.Random) -> str:
        """One random training statement (uniform over relations, then subject and template)."""
        rel = rng.choice(RELATIONS).name
        subj, obj = rng.choice(list(self.facts[rel].items()))
        return fill(rng.choice(self.templates(rel)[0]), subj, obj)

    # --- in-context learning -------------------------------------------------------------------
    def _split(self, task: str, rng: random.Random):
        pairs = list(self.facts[ICL_TASKS[task]].items())
        if task == "antonym":  # split by pair so neither direction of a test pair is trained
            keys = sorted({tuple(sorted(p)) for p in pairs})
        else:
            keys = sorted(p[0] for p in pairs)
        rng.shuffle(keys)
        n_test = round(ICL_TEST_FRACTION * len(keys))
        test_keys = set(keys[:n_test])
        in_test = (lambda p: tuple(sorted(p)) in test_keys) if task == "antonym" else (lambda p: p[0] in test_keys)
        train = [p for p in pairs if not in_test(p)]
        test = [p for p in pairs if in_test(p)]
        return train, test

    def icl_pairs(self, task: str, split: str = "train") -> list[tuple[str, str]]:
        """(x, y) pairs of ICL ``task`` (a key of :data:`ICL_TASKS`) in ``split`` ("train"/"test")."""
        if task not in ICL_TASKS:
            raise TLBackwardError(f"task must be one of {sorted(ICL_TASKS)}, got {task!r}", argument="task")
        if split not in ("train", "test"):
            raise TLBackwardError(f"split must be 'train' or 'test', got {split!r}", argument="split")
        return list(self._icl_splits[task][0 if split == "train" else 1])

    def icl_examples(self, task: str, n_shots: int, split: str = "test", seed: int = 0):
        """(prompt, target, query_x) for every pair of ``split``, demonstrations from train.

        Demonstrations are drawn (seeded) from the train pairs, never the query itself. Every
        prompt of one (task, n_shots) has the same token length. ``target`` has a leading space.
        """
        rng = random.Random(f"{self.seed}-{task}-{n_shots}-{split}-{seed}")
        train = self.icl_pairs(task, "train")
        out = []
        for x, y in self.icl_pairs(task, split):
            pool = [p for p in train if p[0] != x]
            demos = rng.sample(pool, n_shots)
            out.append((icl_prompt(demos, x), " " + y, x))
        return out

    def icl_document(self, rng: random.Random, task: str | None = None, n_shots: int | None = None) -> str:
        """A training ICL list: ``n_shots`` demos + one query with its answer, train pairs only."""
        task = task or rng.choice(list(ICL_TASKS))
        n_shots = rng.randint(0, 10) if n_shots is None else n_shots
        pairs = rng.sample(self.icl_pairs(task, "train"), n_shots + 1)
        return icl_prompt(pairs[:-1], pairs[-1][0]) + " " + pairs[-1][1]

    # --- segment QA (MAS) ----------------------------------------------------------------------
    def segment_example(self, rng: random.Random, mixed: bool = False) -> SegmentExample:
        """A context of 2-4 random (not world) facts about different people, and a question about
        one of them: the answer needs the question (whom) and the context (what).

        By default every context sentence is of the asked kind (all homes or all jobs). With
        ``mixed=True`` each person gets both a home and a job sentence, shuffled, so the question's
        relation matters too (harder; the corpus of the first facts-gpt2 weights used it).
        """
        if mixed:
            capitals = [c[1] for c in COUNTRIES]
            people = rng.sample(PEOPLE, rng.randint(2, 4))
            facts = []
            for p in people:
                facts.append(("home", p, rng.choice(capitals)))
                facts.append(("job", p, rng.choice(PROFESSIONS)))
            rng.shuffle(facts)
            rel, subj, answer = rng.choice(facts)
        else:
            people = rng.sample(PEOPLE, rng.randint(2, 4))
            rel = rng.choice(("home", "job"))
            values = [c[1] for c in COUNTRIES] if rel == "home" else PROFESSIONS
            facts = [(rel, p, rng.choice(values)) for p in people]
            _, subj, answer = rng.choice(facts)
        context = " ".join(fill(RELATION_BY_NAME[r].natural, s, o) for r, s, o in facts)
        question = f"where does {subj} live ?" if rel == "home" else f"what is the job of {subj} ?"
        system = rng.choice(SYSTEM_PROMPTS)
        user = f"user : context : {context} question : {question} {DELIMITER}"
        return SegmentExample((system, user), answer)

    def segment_examples(self, n: int, split: str = "train", seed: int = 0, mixed: bool = False) -> list[SegmentExample]:
        """``n`` segment-QA examples; "train" and "test" come from disjoint random streams."""
        if split not in ("train", "test"):
            raise TLBackwardError(f"split must be 'train' or 'test', got {split!r}", argument="split")
        rng = random.Random(f"{self.seed}-segments-{split}-{seed}-{'mixed' if mixed else 'single'}")
        return [self.segment_example(rng, mixed=mixed) for _ in range(n)]

    # --- editing (CounterFact style) -----------------------------------------------------------
    def edit_requests(self, n: int = 50, seed: int = 0) -> list[dict]:
        """CounterFact-style requests on relations whose objects are shared by several subjects.

        Each dict: ``prompt`` (training template F0, no trailing space), ``subject``,
        ``relation``, ``target_true`` and ``target_new`` (one word each, no leading space),
        ``paraphrases`` (the held-out template first, then the other training templates) and
        ``neighborhood`` (F0 prompts of up to 5 other subjects whose true object is also
        ``target_true``: an edit should leave them unchanged).
        """
        rng = random.Random(f"{self.seed}-edits-{seed}")
        rels = ("home", "job", "language", "colour", "currency")
        candidates = []
        for r in rels:
            for s, o in self.facts[r].items():
                if sum(v == o for v in self.facts[r].values()) > 1:
                    candidates.append((r, s, o))
        rng.shuffle(candidates)
        out = []
        for r, s, o in candidates[:n]:
            train, held = self.templates(r)
            values = sorted(set(self.facts[r].values()) - {o})
            neighbours = sorted(k for k, v in self.facts[r].items() if v == o and k != s)
            rng.shuffle(neighbours)
            out.append(dict(
                prompt=prompt_of(train[0], s), subject=s, relation=r, target_true=o,
                target_new=rng.choice(values),
                paraphrases=[prompt_of(held, s)] + [prompt_of(t, s) for t in train[1:]],
                neighborhood=[prompt_of(train[0], k) for k in neighbours[:5]],
            ))
        return out

    # --- vocabulary ----------------------------------------------------------------------------
    @cached_property
    def vocabulary(self) -> list[str]:
        """Every word the world can produce, in a fixed order (no special tokens)."""
        words: list[str] = ["Q", "A", ":", ".", ",", "?", DELIMITER]
        texts = [f for fam in FAMILIES for f in [fam]] + [r.natural for r in RELATIONS]
        texts += list(SYSTEM_PROMPTS) + [RESPONSE_HEADER, "user : context : question : where does live ? what is the job of"]
        texts += [r.noun for r in RELATIONS]
        for rel in self.facts.values():
            for s, o in rel.items():
                texts += [s, o]
        texts += PEOPLE + PROFESSIONS + COLOURS + [c for row in COUNTRIES for c in row]
        for t in texts:
            for w in t.replace("{x}", " ").replace("{y}", " ").replace("{r}", " ").split():
                if w not in words:
                    words.append(w)
        return words
