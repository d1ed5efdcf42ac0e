"""Built-in chat tasks: seeded, procedurally generated (prompt, answer) pairs that need no
download, for supervised fine-tuning, for `tinyllm eval` (exact match on held-out prompts)
and for reinforcement learning with verifiable rewards.

The tasks, one example each:

    add       What is 23 + 58?                                       -> 81
    compare   Which is larger, 347 or 82?                            -> 347
    reverse   Reverse the words: apple tree house                    -> house tree apple
    sort      Sort the words: pear apple fig                         -> apple fig pear
    count     How many times does the letter e appear in 'element'?  -> 3
    qa        What is the Python topic 'while' about?                -> The "while" statement
              is used for repeated execution as long as an expression is true.

The first five are verifiable: the answer is a function of the prompt, and `Task.check`
scores a completion by exact match. Each uses one fixed phrasing, so the only thing a tiny
model has to learn is the operation, and held-out prompts are unseen inputs, not unseen
wordings. Their words are the ~500 most frequent short lowercase words of the built-in corpus.

`qa` is not verifiable: it asks about a help topic of the built-in corpus (`pydoc_data`) or
about a section title inside one, and the answer is that text's first sentence(s), at most
200 characters. It teaches the chat format on real English.

Train and held-out data never overlap: a prompt is held out when the SHA-256 of its text
falls in the last eighth (`split_of`); `qa` splits by topic name instead, so no topic (and
no answer text) appears in both. `examples` draws distinct pairs of one split, `chat_dataset`
mixes the tasks into conversations.
"""

import functools
import hashlib
import re
from collections import Counter

import numpy as np

DEFAULT_SEED = 0
SPLITS = ("train", "heldout")
HELDOUT_EVERY = 8      # one prompt in 8 is held out
N_WORDS = 500          # size of the word list of the word tasks
QA_MAX_CHARS = 200     # longest qa answer
# The default chat mix: the verifiable tasks equally, qa a fifth (1.25 / 6.25) of the whole.
# Tasks registered later join a mix only when named in it, so the default data stays put.
DEFAULT_MIX = {"add": 1.0, "compare": 1.0, "reverse": 1.0, "sort": 1.0, "count": 1.0,
               "qa": 1.25}


# ---- the split ---------------------------------------------------------------------------

def split_of(text):
    """'heldout' for about one text in `HELDOUT_EVERY` (by the SHA-256 of its UTF-8 bytes),
    else 'train'. A pure function of the text, so the split never depends on a seed.
    `Task.split_of` is the split of a task's prompt (qa splits by topic instead)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % HELDOUT_EVERY == 0 else "train"


def _stable_id(name):
    """A seed component from a name that is the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big")


# ---- tasks and the registry ----------------------------------------------------------------

class Task:
    """A named source of (prompt, answer) pairs.

    `generate(rng)` draws one pair from a numpy Generator. A task with a small, finite set
    of pairs also gives `pool()`, all of them in a fixed order; `examples` then shuffles the
    pool instead of sampling, so it can tell exactly when a split runs out.
    """

    def __init__(self, name, description, generate, verifiable=True, pool=None):
        self.name, self.description, self.verifiable = name, description, verifiable
        self._generate, self._pool = generate, pool

    def sample(self, rng):
        """One (prompt, answer) pair drawn with `rng` (a numpy.random.Generator)."""
        return self._generate(rng)

    def check(self, completion, answer):
        """Whether `completion` is right: exact match once surrounding whitespace is gone."""
        return completion.strip() == answer.strip()

    def split_of(self, prompt):
        """The split a prompt of this task belongs to."""
        return split_of(prompt)

    def pool(self):
        """Every (prompt, answer) pair of a finite task, in a fixed order; None otherwise."""
        return self._pool() if self._pool is not None else None

    def __repr__(self):
        return f"Task({self.name!r}, verifiable={self.verifiable})"


TASKS = {}


def register_task(task):
    """Add `task` to `TASKS` under its name; a name can be registered only once."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task needs a Task, got {type(task).__name__}")
    if task.name in TASKS:
        raise ValueError(f"a task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name):
    """The registered task called `name`."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def verifiable_tasks():
    """Names of the verifiable tasks, in registration order."""
    return [name for name, task in TASKS.items() if task.verifiable]


# ---- words of the built-in corpus -------------------------------------------------------------

def _topics():
    from tinyllm.data import builtin_documents  # raises RuntimeError without pydoc_data
    return builtin_documents()


@functools.cache
def corpus_words():
    """The `N_WORDS` most frequent lowercase alphabetic words of 3..8 letters in the built-in
    corpus, most frequent first (ties alphabetical): a fixed vocabulary the tokenizer knows.
    Identifiers such as `__init__` and contractions such as "don’t" are not words."""
    counts = Counter()
    for _, text in _topics():
        counts.update(w for w in re.findall(r"[\w'’]+", text) if re.fullmatch(r"[a-z]{3,8}", w))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return tuple(w for w, _ in ranked[:N_WORDS])


def _pick_words(rng):
    """3 or 4 different words of the corpus list."""
    words = corpus_words()
    k = int(rng.integers(3, 5))
    return [words[i] for i in rng.choice(len(words), size=k, replace=False)]


# ---- the verifiable tasks ------------------------------------------------------------------

def _add(rng):
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    return f"What is {a} + {b}?", str(a + b)


def _compare(rng):
    a, b = (int(x) for x in rng.choice(1000, size=2, replace=False))
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def _reverse(rng):
    words = _pick_words(rng)
    return "Reverse the words: " + " ".join(words), " ".join(reversed(words))


def _sort(rng):
    words = _pick_words(rng)
    return "Sort the words: " + " ".join(words), " ".join(sorted(words))


def _count(rng):
    words = corpus_words()
    word = words[int(rng.integers(len(words)))]
    # Half the time a letter of the word (else most answers would be 0).
    if rng.random() < 0.5:
        letter = word[int(rng.integers(len(word)))]
    else:
        letter = "abcdefghijklmnopqrstuvwxyz"[int(rng.integers(26))]
    return f"How many times does the letter {letter} appear in '{word}'?", str(word.count(letter))


# ---- qa: questions about the built-in corpus ----------------------------------------------

_TOPIC_QUESTIONS = (
    "What is the Python topic '{}' about?",
    "Explain the Python help topic '{}'.",
    "Tell me about '{}' in Python.",
)
_SECTION_QUESTIONS = (
    "What does the Python help section '{}' say?",
    "Summarize the Python docs section '{}'.",
)
_UNDERLINE = re.compile(r"^([*=\-])\1*$")
_NOT_PROSE = re.compile(r"^(New in version|Changed in version|Deprecated since|Added in version"
                        r"|Note:|See also:|Warning:)")
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!e\.g\.)(?<!i\.e\.)\s+(?=[A-Z\"(])")


def _clean(text):
    """Help text as plain prose: emphasis stars gone, whitespace runs made single spaces."""
    text = re.sub(r"(?<=\w)-\n\s*(?=\w)", "-", text)  # a word broken at a line end
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*(?=[^\s*])([^*]+?)\*(?![\w*])", r"\1", text)
    return " ".join(text.split())


def _sections(text):
    """(title, body) for the document title (underlined with '*') and every section title
    (underlined with '=' or '-') of a help text, in order."""
    lines = text.split("\n")
    heads = [i - 1 for i in range(1, len(lines))
             if _UNDERLINE.match(lines[i]) and lines[i - 1].strip()
             and len(lines[i]) == len(lines[i - 1])]
    bounds = heads + [len(lines) + 1]
    return [(lines[h].strip(), "\n".join(lines[h + 2:bounds[j + 1]]))
            for j, h in enumerate(heads)]


def _sentences(para):
    """The sentences of a paragraph of help text, or [] when it is not prose: indented
    (code, grammar, the text under a definition), a version note, or too short. A short
    last sentence ending in ':' ("The syntax is:") only introduced a code block and is
    dropped; a longer one is a statement and ends in '.' instead."""
    first = para.strip("\n").split("\n")[0]
    if not first or first[0].isspace() or _NOT_PROSE.match(first):
        return []
    sentences = _SENTENCE_END.split(_clean(para))
    if sentences[-1].endswith(":"):
        last = sentences.pop()
        if len(last.split()) >= 8:
            sentences.append(last[:-1] + ".")
    text = " ".join(sentences)
    if len(text.split()) < 5 or not (text[0].isupper() or text[0] == '"'):
        return []
    return sentences


def _first_sentences(sentences, limit=QA_MAX_CHARS):
    """As many whole first sentences as fit in `limit` characters; when even the first
    does not fit, it is cut at a word boundary and ends in '...'."""
    out = ""
    for sentence in sentences:
        joined = f"{out} {sentence}" if out else sentence
        if len(joined) > limit:
            break
        out = joined
    if not out:
        out = sentences[0][:limit - 3].rsplit(" ", 1)[0].rstrip(",;:-") + "..."
    return out


def _summary(body):
    """The first sentences of the first prose paragraph of a section body, or None."""
    for para in re.split(r"\n\s*\n", body):
        sentences = _sentences(para)
        if sentences:
            return _first_sentences(sentences)
    return None


@functools.cache
def _qa_items():
    """(topic, prompt, answer) for every qa question, in a fixed order; `topic` is the help
    topic the answer comes from, the unit of the train/held-out split.

    Some help texts repeat: "if" and "else" are one text, and "compound" holds the "if"
    text as a section. A repeated text belongs to its owner, the first topic that has it as
    its own document (else the first topic that has it at all); every question answered by
    it counts as the owner's, and a repeated question is asked once, of its owner. So no
    prompt and no answer is found under two topics, and splitting by topic keeps the two
    splits' texts apart."""
    items = []
    for topic, text in _topics():
        for k, (title, body) in enumerate(_sections(text)):
            answer = _summary(body)
            if answer is None:
                continue
            questions = [q.format(_clean(title)) for q in _SECTION_QUESTIONS]
            if k == 0:  # the document itself: also asked by its topic name
                questions = [q.format(topic) for q in _TOPIC_QUESTIONS] + questions
            items += [(topic, k == 0, q, answer) for q in questions]
    rank = {}  # text -> (not a document's own text, position, topic): the least owns it
    for i, (topic, own, prompt, answer) in enumerate(items):
        for key in (prompt, answer):
            rank[key] = min(rank.get(key, (True, i, topic)), (not own, i, topic))
    seen, unique = set(), []
    for topic, _, prompt, answer in items:
        if rank[prompt][2] == topic and prompt not in seen:
            seen.add(prompt)
            unique.append((rank[answer][2], prompt, answer))
    return tuple(unique)


@functools.cache
def _qa_topic_of():
    return {prompt: topic for topic, prompt, _ in _qa_items()}


class QATask(Task):
    """Questions about the help topics of the built-in corpus, split by topic name."""

    def __init__(self):
        super().__init__(
            "qa", "questions about Python help topics, answered with the topic's first "
                  "sentences (not verifiable)",
            self._generate_one, verifiable=False, pool=self._all)

    @staticmethod
    def _all():
        return [(prompt, answer) for _, prompt, answer in _qa_items()]

    @staticmethod
    def _generate_one(rng):
        items = _qa_items()
        _, prompt, answer = items[int(rng.integers(len(items)))]
        return prompt, answer

    def topic_of(self, prompt):
        """The help topic whose text answers a qa prompt: the unit of qa's split (for a
        text that several topics share, the one that owns it; see `_qa_items`)."""
        try:
            return _qa_topic_of()[prompt]
        except KeyError:
            raise ValueError(f"not a qa prompt: {prompt!r}") from None

    def split_of(self, prompt):
        return split_of(self.topic_of(prompt))


register_task(Task("add", "the sum of two numbers 0..99", _add))
register_task(Task("compare", "the larger of two different numbers 0..999", _compare))
register_task(Task("reverse", "3 or 4 words in reverse order", _reverse))
register_task(Task("sort", "3 or 4 words in alphabetical order", _sort))
register_task(Task("count", "how many times a letter occurs in a word", _count))
register_task(QATask())


# ---- data sets -------------------------------------------------------------------------------

def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def examples(task_name, split, n, seed=DEFAULT_SEED, allow_fewer=False):
    """n distinct (prompt, answer) pairs of `task_name` from one split, the same for the same
    (task, split, n, seed); a longer list begins with the shorter one.

    A task with a pool (qa) shuffles the pairs of that split; any other task draws from a
    generator seeded by (seed, task, split) and keeps each new pair of the split until it has
    n, giving up after 1000 + 200 n draws. When n distinct pairs cannot be had this raises
    ValueError, unless `allow_fewer`, which returns those found.
    """
    task = get_task(task_name)
    _check_split(split)
    n = _check_count("n", n)
    seed = _check_count("seed", seed)
    rng = np.random.default_rng([seed, _stable_id(task.name), SPLITS.index(split)])
    pool = task.pool()
    if pool is not None:
        mine = [pair for pair in pool if task.split_of(pair[0]) == split]
        found = [mine[i] for i in rng.permutation(len(mine))[:n]]
    else:
        found, seen = [], set()
        for _ in range(1000 + 200 * n):
            if len(found) == n:
                break
            prompt, answer = task.sample(rng)
            if prompt not in seen and task.split_of(prompt) == split:
                seen.add(prompt)
                found.append((prompt, answer))
    if len(found) < n and not allow_fewer:
        raise ValueError(f"task {task.name!r} has only {len(found)} distinct {split} examples "
                         f"(asked for {n}); pass allow_fewer=True to take those")
    return found


def conversation(prompt, answer):
    """A chat of one user turn and one assistant turn."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _counts(mix, n):
    """n split among the tasks of `mix` in proportion to their weights (largest remainders,
    ties to the earlier task), so the proportions are as close as whole numbers allow."""
    names = list(mix)
    weights = np.array([mix[name] for name in names], dtype=np.float64)
    exact = n * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    order = sorted(range(len(names)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:n - int(counts.sum())]:
        counts[i] += 1
    return dict(zip(names, (int(c) for c in counts)))


def _check_mix(mix):
    if not isinstance(mix, dict) or not mix:
        raise ValueError(f"mix must be a non-empty dict of task name -> weight, got {mix!r}")
    for name, weight in mix.items():
        get_task(name)
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.number)) \
                or not np.isfinite(weight) or weight < 0:
            raise ValueError(f"mix weight of task {name!r} must be a finite number >= 0, "
                             f"got {weight!r}")
    if sum(mix.values()) <= 0:
        raise ValueError(f"mix weights must not all be 0: {mix!r}")


def mixed_examples(split, n, seed=DEFAULT_SEED, mix=None):
    """n (task name, prompt, answer) triples mixing tasks by `mix` (task name -> weight;
    default `DEFAULT_MIX`), interleaved in a seeded shuffled order.

    Each task contributes its share of distinct examples (`examples`); a task with fewer
    distinct examples in the split than its share (qa has a few hundred train examples, so
    under the default mix this happens for n above about 2,400) repeats them, drawn at
    random.
    """
    _check_split(split)
    n = _check_count("n", n)
    seed = _check_count("seed", seed)
    mix = DEFAULT_MIX if mix is None else mix
    _check_mix(mix)
    rng = np.random.default_rng([seed, _stable_id("chat"), SPLITS.index(split)])
    triples = []
    for name, count in _counts(mix, n).items():
        found = examples(name, split, count, seed, allow_fewer=True)
        if not found and count:
            raise ValueError(f"task {name!r} has no {split} examples")
        if len(found) < count:
            found += [found[i] for i in rng.integers(len(found), size=count - len(found))]
        triples += [(name, prompt, answer) for prompt, answer in found]
    return [triples[i] for i in rng.permutation(len(triples))]


def chat_dataset(split, n, seed=DEFAULT_SEED, mix=None):
    """n conversations (lists of {'role', 'content'} messages) mixing the tasks; see
    `mixed_examples` for the mix, and for qa examples repeating when n is large."""
    return [conversation(prompt, answer)
            for _, prompt, answer in mixed_examples(split, n, seed, mix)]
