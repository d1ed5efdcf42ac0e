"""Preference data: the JSON-lines formats, the refusal of each kind of bad line with its
line number, and the built-in pairs (right answers against plausible wrong ones)."""

import json
import re

import pytest

from tinyllm import tasks
from tinyllm.preference import (BUILTIN_TASKS, PreferencePair, builtin_pairs, read_pairs,
                                write_pairs)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


# ---- reading files ------------------------------------------------------------------------------

def test_strings_message_lists_and_implicit_prompts_read_as_messages(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    path = write_lines(tmp_path / "pairs.jsonl", [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
        "",  # blank lines are skipped
        {"prompt": [system, user("Hi")], "chosen": [assistant("Hello.")],
         "rejected": [assistant("Go away.")]},
        {"chosen": [user("Sort: b a"), assistant("a b")],
         "rejected": [user("Sort: b a"), assistant("b a")]},
        {"prompt": "Count", "chosen": [assistant("1"), user("more"), assistant("2")],
         "rejected": "3", "id": 7},  # other keys are ignored
    ])
    assert read_pairs(path) == [
        PreferencePair([user("What is 2 + 2?")], [assistant("4")], [assistant("5")]),
        PreferencePair([system, user("Hi")], [assistant("Hello.")], [assistant("Go away.")]),
        PreferencePair([user("Sort: b a")], [assistant("a b")], [assistant("b a")]),
        PreferencePair([user("Count")], [assistant("1"), user("more"), assistant("2")],
                       [assistant("3")]),
    ]


def test_written_pairs_read_back_the_same(tmp_path):
    pairs = builtin_pairs("train", 12, seed=3)
    write_pairs(tmp_path / "out.jsonl", pairs)
    assert read_pairs(tmp_path / "out.jsonl") == pairs


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("bad, complaint", [
    ('{"prompt": "p", "chosen": "a"', "invalid JSON"),
    ('["p", "a", "b"]', "expected a JSON object"),
    ({"prompt": "p", "rejected": "b"}, "no 'chosen'"),
    ({"prompt": "p", "chosen": "a"}, "no 'rejected'"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string or a list"),
    ({"prompt": "p", "chosen": {"text": "a"}, "rejected": "b"}, "'chosen' must be a string"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "non-empty list"),
    ({"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"},
     "role must be one of"),
    ({"prompt": [{"role": "user", "content": 5}], "chosen": "a", "rejected": "b"},
     "content must be a string"),
    ({"prompt": [user("q"), assistant("a")], "chosen": "a", "rejected": "b"},
     "must end with a user message"),
    ({"prompt": "p", "chosen": [user("a")], "rejected": "b"},
     "'chosen' must begin with an assistant message"),
    ({"prompt": "p", "chosen": "a", "rejected": [assistant("b"), {"role": "system",
                                                                   "content": "s"}]},
     "a system message may only come first"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "are the same"),
    ({"chosen": "a", "rejected": "b"}, "must be a whole conversation"),
    ({"chosen": [user("x"), assistant("a")], "rejected": [user("y"), assistant("b")]},
     "begin with the same prompt messages"),
    ({"chosen": [user("x"), assistant("a")], "rejected": [user("x")]},
     "'rejected' has no reply after the prompt"),
])
def test_a_bad_line_is_refused_with_its_file_and_line_number(tmp_path, bad, complaint):
    # the bad line is the third line of the file, after a good line and a blank one
    path = write_lines(tmp_path / "pairs.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(ValueError) as e:
        read_pairs(path)
    assert str(e.value).startswith(f"{path}:3: "), str(e.value)
    assert complaint in str(e.value)


def test_the_last_line_is_checked_before_anything_is_returned(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [GOOD] * 50 + ['{"prompt": "p"}'])
    with pytest.raises(ValueError, match=r":51: no 'chosen'"):
        read_pairs(path)


def test_empty_missing_and_non_utf8_files_are_refused(tmp_path):
    write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="no preference pairs"):
        read_pairs(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="cannot read"):
        read_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_pairs(tmp_path / "latin1.jsonl")


# ---- the built-in pairs ----------------------------------------------------------------------------

def right_answer(prompt):
    """The answer to a built-in task prompt, worked out here from its text."""
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt):
        return "add", str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", prompt):
        return "compare", str(max(int(m[1]), int(m[2])))
    if m := re.fullmatch(r"Reverse the words: (.+)", prompt):
        return "reverse", " ".join(m[1].split()[::-1])
    if m := re.fullmatch(r"Sort the words: (.+)", prompt):
        return "sort", " ".join(sorted(m[1].split()))
    if m := re.fullmatch(r"How many times does the letter (\w) appear in '(\w+)'\?", prompt):
        return "count", str(m[2].count(m[1]))
    raise AssertionError(f"not a built-in task prompt: {prompt!r}")


@pytest.fixture(scope="module")
def train_pairs():
    return builtin_pairs("train", 400, seed=0)


def test_builtin_pairs_prefer_the_right_answer_to_a_wrong_or_wordy_one(train_pairs):
    kinds = {}
    for p in train_pairs:
        assert len(p.prompt_messages) == len(p.chosen_messages) == len(p.rejected_messages) == 1
        assert p.prompt_messages[0]["role"] == "user"
        task, answer = right_answer(p.prompt_messages[0]["content"])
        chosen, rejected = p.chosen_messages[0]["content"], p.rejected_messages[0]["content"]
        assert chosen == answer
        assert rejected.strip() != answer
        kind = "wordy" if answer in rejected and rejected != answer else "wrong"
        kinds.setdefault(task, set()).add(kind)
    # every task, each with both kinds of rejected reply
    assert set(kinds) == set(BUILTIN_TASKS)
    assert all(k == {"wrong", "wordy"} for k in kinds.values()), kinds


def test_builtin_pairs_mix_the_tasks_equally_and_repeat_for_a_seed(train_pairs):
    counts = {}
    for p in train_pairs:
        task, _ = right_answer(p.prompt_messages[0]["content"])
        counts[task] = counts.get(task, 0) + 1
    assert counts == {t: 80 for t in BUILTIN_TASKS}
    assert builtin_pairs("train", 400, seed=0) == train_pairs
    assert builtin_pairs("train", 400, seed=1) != train_pairs


def test_heldout_pairs_use_heldout_prompts_only(train_pairs):
    held = builtin_pairs("heldout", 200, seed=0)
    prompts = [p.prompt_messages[0]["content"] for p in held]
    assert all(tasks.split_of(q) == "heldout" for q in prompts)
    assert all(tasks.split_of(p.prompt_messages[0]["content"]) == "train" for p in train_pairs)
    assert not set(prompts) & {p.prompt_messages[0]["content"] for p in train_pairs}
