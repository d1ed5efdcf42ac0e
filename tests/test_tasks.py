"""The built-in chat tasks: seeded data, disjoint splits, right answers, the chat mix."""

import hashlib
import re
import sys
from collections import Counter

import numpy as np
import pytest

from tinyllm.data import builtin_documents
from tinyllm.tasks import (
    DEFAULT_SEED, TASKS, Task, chat_dataset, conversation, corpus_words, examples, get_task,
    mixed_examples, register_task, split_of, verifiable_tasks,
)

VERIFIABLE = ["add", "compare", "reverse", "sort", "count"]
N_TRAIN, N_HELDOUT = 3000, 500


@pytest.fixture(scope="module")
def data():
    """3000 train and 500 held-out examples of every verifiable task."""
    return {name: {"train": examples(name, "train", N_TRAIN, seed=7),
                   "heldout": examples(name, "heldout", N_HELDOUT, seed=7)}
            for name in VERIFIABLE}


@pytest.fixture(scope="module")
def qa_data():
    return {split: examples("qa", split, 10_000, seed=7, allow_fewer=True)
            for split in ("train", "heldout")}


def independent_split(text):
    """The split rule written out again: held out when the first 8 bytes of the SHA-256,
    read as a big-endian number, are divisible by 8."""
    return "heldout" if int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) % 8 == 0 \
        else "train"


# ---- registry ------------------------------------------------------------------------------

def test_registry_holds_the_built_in_tasks_in_order():
    assert verifiable_tasks() == VERIFIABLE
    assert list(TASKS)[:6] == VERIFIABLE + ["qa"]
    assert all(TASKS[name].verifiable for name in VERIFIABLE)
    assert not get_task("qa").verifiable
    assert all(get_task(name).description for name in TASKS)


def test_unknown_task_names_the_known_ones():
    for call in (lambda: get_task("multiply"), lambda: examples("multiply", "train", 3),
                 lambda: chat_dataset("train", 3, mix={"multiply": 1.0})):
        with pytest.raises(ValueError, match="multiply") as e:
            call()
        for name in VERIFIABLE + ["qa"]:
            assert name in str(e.value)


def test_register_task_refuses_duplicates_and_takes_new_tasks():
    with pytest.raises(ValueError, match="add"):
        register_task(Task("add", "another add", lambda rng: ("1 + 1", "2")))
    assert get_task("add").description == "the sum of two numbers 0..99"
    with pytest.raises(TypeError):
        register_task("echo")
    echo = Task("echo-test", "repeat a number",
                lambda rng: ((f"Say {int(rng.integers(1000))}.",) * 2))
    try:
        assert register_task(echo) is echo
        assert get_task("echo-test") is echo
        assert verifiable_tasks() == VERIFIABLE + ["echo-test"]
        pairs = examples("echo-test", "train", 20, seed=1)
        assert len({p for p, _ in pairs}) == 20
        assert all(split_of(p) == "train" for p, _ in pairs)
        # a new task stays out of the default mix
        assert "echo-test" not in {t for t, _, _ in mixed_examples("train", 200)}
    finally:
        del TASKS["echo-test"]


def test_check_strips_whitespace_and_is_otherwise_exact():
    for name in VERIFIABLE + ["qa"]:
        task = get_task(name)
        assert task.check("81", "81")
        assert task.check("  81\n", "81")
        assert task.check("\t81 ", " 81\n")
        assert not task.check("81.", "81")
        assert not task.check("081", "81")
        assert not task.check("8 1", "81")
        assert not task.check("", "81")
        assert not task.check("apple tree", "Apple tree")
        assert not task.check("apple  tree", "apple tree")


# ---- determinism ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", VERIFIABLE + ["qa"])
def test_examples_are_deterministic_in_the_seed(name):
    a = examples(name, "train", 40, seed=3)
    assert a == examples(name, "train", 40, seed=3)
    assert a != examples(name, "train", 40, seed=4)
    assert examples(name, "train", 15, seed=3) == a[:15]  # a longer list extends a shorter
    assert examples(name, "heldout", 5, seed=3) != examples(name, "heldout", 5, seed=4)
    assert examples(name, "train", 40) == examples(name, "train", 40, seed=DEFAULT_SEED)


def test_sample_follows_the_generator():
    for name in VERIFIABLE + ["qa"]:
        task = get_task(name)
        one = [task.sample(np.random.default_rng(5)) for _ in range(3)]
        assert one[0] == one[1] == one[2]
        rng = np.random.default_rng(5)
        draws = {task.sample(rng) for _ in range(30)}
        assert len(draws) > 5


def test_chat_dataset_is_deterministic_in_the_seed():
    a = chat_dataset("train", 300, seed=11)
    assert a == chat_dataset("train", 300, seed=11)
    assert a != chat_dataset("train", 300, seed=12)
    assert chat_dataset("heldout", 100, seed=11) == chat_dataset("heldout", 100, seed=11)


# ---- splits --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VERIFIABLE)
def test_train_and_heldout_never_overlap(data, name):
    train, heldout = data[name]["train"], data[name]["heldout"]
    assert len(train) == N_TRAIN and len(heldout) == N_HELDOUT
    train_prompts, heldout_prompts = {p for p, _ in train}, {p for p, _ in heldout}
    assert len(train_prompts) == N_TRAIN and len(heldout_prompts) == N_HELDOUT  # distinct
    assert train_prompts.isdisjoint(heldout_prompts)
    assert all(independent_split(p) == "train" for p in train_prompts)
    assert all(independent_split(p) == "heldout" for p in heldout_prompts)
    task = get_task(name)
    assert all(task.split_of(p) == split_of(p) for p in list(heldout_prompts)[:50])
    # Other seeds draw other examples from the same split.
    other = {p for p, _ in examples(name, "train", 500, seed=8)}
    assert other.isdisjoint(heldout_prompts) and other != set(list(train_prompts)[:500])


def test_about_one_prompt_in_eight_is_held_out():
    rng = np.random.default_rng(0)
    prompts = {get_task("compare").sample(rng)[0] for _ in range(8000)}
    frac = sum(split_of(p) == "heldout" for p in prompts) / len(prompts)
    assert 0.10 < frac < 0.15


def test_qa_splits_by_topic(qa_data):
    qa = get_task("qa")
    train, heldout = qa_data["train"], qa_data["heldout"]
    assert len(train) > 200 and len(heldout) > 10
    topics = {split: {qa.topic_of(p) for p, _ in qa_data[split]} for split in qa_data}
    assert topics["train"].isdisjoint(topics["heldout"])
    assert all(independent_split(t) == "train" for t in topics["train"])
    assert all(independent_split(t) == "heldout" for t in topics["heldout"])
    assert {p for p, _ in train}.isdisjoint(p for p, _ in heldout)
    assert {a for _, a in train}.isdisjoint(a for _, a in heldout)
    assert len({p for p, _ in train}) == len(train)
    # The whole pool, split in two.
    assert len(train) + len(heldout) == len(qa.pool())
    assert topics["train"] | topics["heldout"] <= {name for name, _ in builtin_documents()}


def test_qa_texts_shared_by_topics_belong_to_one():
    """The "compound" help text holds the "while" text as a section, and "if" and "else"
    are one text: each answer still counts under one topic, the text's own."""
    qa = get_task("qa")
    topics_of = {}
    for prompt, answer in qa.pool():
        topics_of.setdefault(answer, set()).add(qa.topic_of(prompt))
    assert all(len(t) == 1 for t in topics_of.values())
    assert qa.topic_of("What is the Python topic 'while' about?") == "while"
    assert qa.topic_of("What does the Python help section 'The \"while\" statement' say?") \
        == "while"
    assert qa.topic_of("What is the Python topic 'if' about?") == \
        qa.topic_of("What is the Python topic 'else' about?")


def test_too_many_examples_raise_unless_allowed(qa_data):
    with pytest.raises(ValueError, match="qa"):
        examples("qa", "heldout", 10_000)
    assert examples("qa", "heldout", len(qa_data["heldout"]), seed=7) == qa_data["heldout"]
    tiny = Task("three-prompts", "only three prompts", lambda rng: (f"q{rng.integers(3)}", "a"))
    register_task(tiny)
    try:
        with pytest.raises(ValueError, match="three-prompts"):
            examples("three-prompts", "train", 10)
        found = examples("three-prompts", "train", 10, allow_fewer=True)
        assert sorted(found) == sorted((p, "a") for p in ("q0", "q1", "q2")
                                       if independent_split(p) == "train")
    finally:
        del TASKS["three-prompts"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="split"):
        examples("add", "test", 3)
    with pytest.raises(ValueError, match="n must"):
        examples("add", "train", -1)
    with pytest.raises(ValueError, match="seed"):
        examples("add", "train", 3, seed=-2)
    with pytest.raises(ValueError, match="add"):
        chat_dataset("train", 10, mix={"add": -1.0})
    with pytest.raises(ValueError, match="0"):
        chat_dataset("train", 10, mix={"add": 0, "sort": 0})
    with pytest.raises(ValueError, match="split"):
        chat_dataset("validation", 10)
    with pytest.raises(ValueError, match="not a qa prompt"):
        get_task("qa").topic_of("What is 1 + 2?")


# ---- the answers ---------------------------------------------------------------------------

def words_of(text):
    return text.split(" ")


def expected_answer(name, prompt):
    """The answer recomputed from the prompt alone."""
    if name == "add":
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt).groups())
        assert 0 <= a <= 99 and 0 <= b <= 99
        return str(a + b)
    if name == "compare":
        a, b = map(int, re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", prompt).groups())
        assert 0 <= a <= 999 and 0 <= b <= 999 and a != b
        return str(a if a > b else b)
    if name in ("reverse", "sort"):
        lead = "Reverse the words: " if name == "reverse" else "Sort the words: "
        words = re.fullmatch(re.escape(lead) + r"([a-z]+(?: [a-z]+){2,3})", prompt).group(1)
        words = words_of(words)
        assert len(set(words)) == len(words)
        return " ".join(words[::-1] if name == "reverse" else sorted(words))
    if name == "count":
        letter, word = re.fullmatch(
            r"How many times does the letter ([a-z]) appear in '([a-z]+)'\?", prompt).groups()
        return str(sum(c == letter for c in word))
    raise AssertionError(name)


@pytest.mark.parametrize("name", VERIFIABLE)
def test_every_answer_is_right(data, name):
    task = get_task(name)
    for split in ("train", "heldout"):
        for prompt, answer in data[name][split]:
            assert answer == expected_answer(name, prompt), (prompt, answer)
            assert task.check(answer, answer)


def test_hand_checked_answers():
    assert expected_answer("add", "What is 23 + 58?") == "81"
    assert expected_answer("compare", "Which is larger, 347 or 82?") == "347"
    assert expected_answer("reverse", "Reverse the words: apple tree house") == "house tree apple"
    assert expected_answer("sort", "Sort the words: pear apple fig") == "apple fig pear"
    assert expected_answer(
        "count", "How many times does the letter e appear in 'element'?") == "3"


def test_the_tasks_cover_their_ranges(data):
    answers = {name: Counter(a for _, a in data[name]["train"]) for name in VERIFIABLE}
    assert {"0", "1", "2"} <= set(answers["count"])
    assert answers["count"]["0"] < 0.7 * N_TRAIN  # letters come from the word half the time
    assert max(map(int, answers["add"])) > 180 and min(map(int, answers["add"])) < 10
    n_words = Counter(len(p.split(": ")[1].split()) for p, _ in data["reverse"]["train"])
    assert set(n_words) == {3, 4} and min(n_words.values()) > 0.4 * N_TRAIN


def test_words_come_from_the_corpus(data):
    words = corpus_words()
    assert corpus_words() is words  # cached
    assert len(words) == 500 == len(set(words))
    assert all(re.fullmatch(r"[a-z]{3,8}", w) for w in words)
    assert words[0] == "the"
    text = " ".join(t for _, t in builtin_documents())
    counts = Counter(re.findall(r"[a-z]+", text))
    # Frequent words, in (roughly) falling frequency; the list's own rule differs at
    # identifiers and contractions, so compare whole ranges of ranks, not single words.
    first, last = [counts[w] for w in words[:100]], [counts[w] for w in words[-100:]]
    assert sorted(first)[50] > sorted(last)[50]
    assert min(counts[w] for w in words) >= 10
    used = {w for name in ("reverse", "sort") for p, _ in data[name]["train"]
            for w in p.split(": ")[1].split()}
    assert used <= set(words) and len(used) > 400


def test_missing_pydoc_data_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # import now fails
    corpus_words.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="pydoc_data"):
            corpus_words()
    finally:
        corpus_words.cache_clear()


# ---- lengths and the qa text ---------------------------------------------------------------

@pytest.mark.parametrize("name", VERIFIABLE)
def test_length_budget(data, name):
    for split in ("train", "heldout"):
        for prompt, answer in data[name][split]:
            assert len(prompt) < 80 and 0 < len(answer) < 40, (prompt, answer)


def test_qa_answers_are_clean_english_from_their_topic(qa_data):
    qa = get_task("qa")
    docs = dict(builtin_documents())
    for prompt, answer in qa_data["train"] + qa_data["heldout"]:
        assert 20 <= len(answer) <= 200, answer
        assert answer[0].isupper() or answer[0] == '"'
        assert answer.endswith((".", "...", "?", "!", ")")), answer
        assert "\n" not in answer and "  " not in answer
        assert not re.search(r"\*\*?[A-Za-z][\w ]*\*", answer), answer  # no *emphasis*
        assert len(prompt) <= 110
        # The first words are the topic's own words (whitespace and line breaks aside).
        doc = " ".join(docs[qa.topic_of(prompt)].replace("*", "").replace("-\n", "-").split())
        assert " ".join(answer.replace("*", "").split()[:6]) in doc, (prompt, answer)


def test_qa_hand_checked_example():
    pool = get_task("qa").pool()
    assert ("What is the Python topic 'while' about?",
            'The "while" statement is used for repeated execution as long as an expression is '
            'true.') in pool
    assert ("Tell me about 'assert' in Python.",
            "Assert statements are a convenient way to insert debugging assertions into a "
            "program.") in pool  # the help text's "program:" before a code block ends in '.'


# ---- the chat mix ----------------------------------------------------------------------------

def test_conversation_shape():
    assert conversation("What is 1 + 2?", "3") == [
        {"role": "user", "content": "What is 1 + 2?"},
        {"role": "assistant", "content": "3"}]


def test_default_mix_proportions_and_messages():
    n = 2000
    mixed = mixed_examples("train", n, seed=5)
    assert len(mixed) == n
    counts = Counter(name for name, _, _ in mixed)
    assert set(counts) == set(VERIFIABLE) | {"qa"}
    assert abs(counts["qa"] / n - 0.2) < 0.01
    for name in VERIFIABLE:
        assert abs(counts[name] / n - 0.16) < 0.01
    # Interleaved, not in blocks: the first 30 already hold most tasks.
    assert len({name for name, _, _ in mixed[:30]}) >= 4
    chats = chat_dataset("train", n, seed=5)
    assert chats == [conversation(p, a) for _, p, a in mixed]
    for chat in chats:
        assert [m["role"] for m in chat] == ["user", "assistant"]
        assert all(set(m) == {"role", "content"} for m in chat)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in chat)
    for name, prompt, answer in mixed:
        if name != "qa":
            assert answer == expected_answer(name, prompt)
    verifiable_prompts = [p for name, p, _ in mixed if name != "qa"]
    assert len(set(verifiable_prompts)) == len(verifiable_prompts)


def test_heldout_chat_comes_from_the_heldout_split():
    for name, prompt, _ in mixed_examples("heldout", 400, seed=2):
        assert get_task(name).split_of(prompt) == "heldout"
        if name != "qa":
            assert independent_split(prompt) == "heldout"


def test_custom_mix_and_qa_repeats_when_n_is_large(qa_data):
    mixed = mixed_examples("train", 400, mix={"add": 3, "sort": 1})
    counts = Counter(name for name, _, _ in mixed)
    assert counts == {"add": 300, "sort": 100}
    n_qa = len(qa_data["train"])
    mixed = mixed_examples("train", 3000, seed=1, mix={"qa": 1.0, "add": 1.0})
    qa_prompts = [p for name, p, _ in mixed if name == "qa"]
    assert len(qa_prompts) == 1500 > n_qa
    assert set(qa_prompts) == {p for p, _ in qa_data["train"]}  # every distinct one, repeated
