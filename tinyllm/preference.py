"""Preference data: a prompt, a preferred (chosen) reply and a dispreferred (rejected) one.

A JSON-lines file holds one pair per line, in the habit of TRL and Anthropic-HH:

    {"prompt": P, "chosen": C, "rejected": R}

P is a string (one user message) or a list of `{"role", "content"}` messages ending with a
user message. C and R are strings (one assistant reply) or lists of messages that begin with
an assistant message. Without "prompt", C and R may be whole conversations (message lists)
that share their first messages; the shared messages are the prompt (TRL's implicit prompt).

`builtin_pairs` makes pairs from the built-in verifiable chat tasks (`tinyllm.tasks`), so no
download is needed: the chosen reply is the right answer, the rejected one a plausible wrong
answer or the right answer wrapped in extra words (the format is part of what is preferred).
"""

import json
import re
from dataclasses import dataclass

import numpy as np

from tinyllm import tasks
from tinyllm.atomic import atomic_write
from tinyllm.chat import check_messages

FORMAT = '{"prompt": ..., "chosen": ..., "rejected": ...}'
# The tasks builtin_pairs draws from: each has a rule for plausible wrong answers below.
BUILTIN_TASKS = ("add", "compare", "reverse", "sort", "count")
FORMAT_BREAK_SHARE = 0.25   # share of rejected replies that are right but badly formatted


@dataclass(frozen=True)
class PreferencePair:
    """Messages of the prompt and of the two replies; the replies start with an assistant turn."""
    prompt_messages: list
    chosen_messages: list
    rejected_messages: list


# ---- reading ------------------------------------------------------------------------------

def _as_messages(value, role, key, where):
    """A string as one message of `role`; a list as checked messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return check_messages(value, f"{where}: {key!r}")
    raise ValueError(f"{where}: {key!r} must be a string or a list of messages, got "
                     f"{type(value).__name__}")


def _split_implicit_prompt(chosen, rejected, where):
    """(prompt, chosen reply, rejected reply) of two whole conversations: the prompt is the
    messages both begin with, and it must end where both replies' assistant turns begin."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and chosen[k - 1]["role"] == "assistant":  # a shared start of the reply
        k -= 1
    if k == 0:
        raise ValueError(f"{where}: without 'prompt', 'chosen' and 'rejected' must be "
                         f"conversations that begin with the same prompt messages")
    return chosen[:k], chosen[k:], rejected[k:]


def _check_reply(messages, key, where):
    if not messages:
        raise ValueError(f"{where}: {key!r} has no reply after the prompt")
    if messages[0]["role"] != "assistant":
        raise ValueError(f"{where}: {key!r} must begin with an assistant message, got role "
                         f"{messages[0]['role']!r}")


def pair_from_record(obj, where="record"):
    """The PreferencePair of one JSON object; ValueError naming `where` and what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object {FORMAT}, got {type(obj).__name__}")
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise ValueError(f"{where}: no {key!r} (expected {FORMAT})")
    if "prompt" in obj:
        prompt = _as_messages(obj["prompt"], "user", "prompt", where)
        chosen = _as_messages(obj["chosen"], "assistant", "chosen", where)
        rejected = _as_messages(obj["rejected"], "assistant", "rejected", where)
    else:
        for key in ("chosen", "rejected"):
            if not isinstance(obj[key], list):
                raise ValueError(f"{where}: no 'prompt', so {key!r} must be a whole conversation "
                                 f"(a list of messages), got {type(obj[key]).__name__}")
        prompt, chosen, rejected = _split_implicit_prompt(
            _as_messages(obj["chosen"], "assistant", "chosen", where),
            _as_messages(obj["rejected"], "assistant", "rejected", where), where)
    if prompt[-1]["role"] != "user":
        raise ValueError(f"{where}: the prompt must end with a user message, got role "
                         f"{prompt[-1]['role']!r}")
    _check_reply(chosen, "chosen", where)
    _check_reply(rejected, "rejected", where)
    if chosen == rejected:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are the same, so there is no "
                         f"preference to learn")
    return PreferencePair(prompt, chosen, rejected)


def read_pairs(path):
    """Every PreferencePair of a JSON-lines file (blank lines skipped). The whole file is
    checked before anything is returned: a bad line raises ValueError `file:LINE: what`."""
    from tinyllm.data import json_lines

    pairs = [pair_from_record(obj, where) for _, where, obj in json_lines(path)]
    if not pairs:
        raise ValueError(f"{path}: no preference pairs (the file is empty); expected lines {FORMAT}")
    return pairs


def pair_record(pair):
    """A PreferencePair as a JSON-able dict that `pair_from_record` reads back."""
    return {"prompt": pair.prompt_messages, "chosen": pair.chosen_messages,
            "rejected": pair.rejected_messages}


def write_pairs(path, pairs):
    """Write pairs as JSON lines, all at once or not at all."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair_record(pair), ensure_ascii=False) + "\n")


# ---- the built-in set: right answers against plausible wrong ones ------------------------

def _numbers(prompt):
    return [int(x) for x in re.findall(r"\d+", prompt)]


def _words_after_colon(prompt):
    return prompt.split(": ", 1)[1].split()


def _swap_one(words, rng):
    """Words with one random neighbouring pair swapped."""
    words = list(words)
    i = int(rng.integers(len(words) - 1))
    words[i], words[i + 1] = words[i + 1], words[i]
    return words


def _wrong_answers(task, prompt, answer, rng):
    """Plausible wrong answers to a prompt of `task`: the mistakes a model half-way to the
    rule makes (off by one, the other number, the input order, one pair out of place)."""
    if task == "add":
        a, b = _numbers(prompt)
        s = a + b
        return [str(s + 1), str(s - 1), str(s + 10), str(abs(s - 10)), str(max(a, b))]
    if task == "compare":
        a, b = _numbers(prompt)
        return [str(min(a, b)), str(max(a, b) + 1), str(a + b)]
    if task in ("reverse", "sort"):
        words = _words_after_colon(prompt)
        target = answer.split()
        return [" ".join(words), " ".join(_swap_one(target, rng)),
                " ".join(reversed(target)), " ".join(target[:-1])]
    if task == "count":
        c = int(answer)
        return [str(c + 1), str(c - 1) if c > 0 else str(c + 2), str(c + 2)]
    raise ValueError(f"no rule for wrong answers of task {task!r}; built-in pairs come from "
                     f"{', '.join(BUILTIN_TASKS)}")


_FORMAT_BREAKS = ("The answer is {}.", "{} is the answer.", "Sure! {}", "{}, I think.")


def rejected_reply(task, prompt, answer, rng):
    """A reply that is worse than `answer`: most often a wrong answer, sometimes the right
    answer in extra words (the asked-for format is bare). Never equal to `answer`."""
    if rng.random() < FORMAT_BREAK_SHARE:
        return _FORMAT_BREAKS[int(rng.integers(len(_FORMAT_BREAKS)))].format(answer)
    wrong = [w for w in _wrong_answers(task, prompt, answer, rng) if w.strip() != answer.strip()]
    return wrong[int(rng.integers(len(wrong)))]


def builtin_pairs(split, n, seed=tasks.DEFAULT_SEED):
    """n preference pairs from the built-in tasks (BUILTIN_TASKS equally, interleaved), the
    prompts of one split only (held-out pairs use held-out prompts), the same for the same
    (split, n, seed)."""
    triples = tasks.mixed_examples(split, n, seed, mix={t: 1.0 for t in BUILTIN_TASKS})
    rng = np.random.default_rng([seed, tasks._stable_id("preference"), tasks.SPLITS.index(split)])
    pairs = []
    for task, prompt, answer in triples:
        pairs.append(PreferencePair(
            [{"role": "user", "content": prompt}],
            [{"role": "assistant", "content": answer}],
            [{"role": "assistant", "content": rejected_reply(task, prompt, answer, rng)}]))
    return pairs
