"""Measuring a model: held-out accuracy on the built-in tasks, exact match on a user's own
prompt/reference pairs, and bits per byte of a text; the `tinyllm eval` command.

    tinyllm eval RUN_DIR --task add                 # held-out accuracy, one JSON line
    tinyllm eval RUN_DIR --task all                 # every verifiable task, a line each
    tinyllm eval RUN_DIR --data pairs.jsonl         # your prompts and references
    tinyllm eval RUN_DIR --task bpb --data text.txt # bits per byte of a text

Accuracy: each prompt is one user message rendered with the chat template and the generation
prompt; the answer is decoded greedily until `<|im_end|>` (or any special token, see
`session.stop_ids`) and scored by exact match once surrounding whitespace is gone. Prompts of
equal length share one batched forward per step (there is no attention mask for padding, so
prompts are grouped by length, as in `generate`). A base model is scored through
`prepare_for_chat`: what a model that never saw the template does.

Bits per byte: the summed next-token loss of a text's tokens, in nats, over ln 2 times the
text's UTF-8 byte count. The tokens are scored in windows of the context length (stride =
context, each window a fresh context), the first token predicted from `<|endoftext|>` when
the tokenizer has one (without it the first token goes unscored). Dividing by bytes, not
tokens, makes models with different tokenizers comparable.

Evaluations live in a registry (`register_eval`): every verifiable task of `tinyllm.tasks`
(read when asked, so tasks registered later join), `bpb` and `jsonl`. Each one checks and
reads its input in `prepare`, before any model is loaded, then `run` measures.
"""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from autograd import amp, backend
from autograd.tensor import no_grad
from tinyllm import tasks
from tinyllm.chat import read_conversations, render
from tinyllm.cli import UsageError, nonnegative_int, positive_int
from tinyllm.generate import _groups, decode_steps
from tinyllm.session import add_model_args, check_model_settings, load_chat_model, stop_ids

__all__ = ["answer", "evaluate_task", "evaluate_pairs", "bits_per_byte", "prompt_and_reference",
           "Eval", "EvalSettings", "register_eval", "known_evals", "get_eval", "register"]

MAX_NEW_TOKENS = 48  # enough for every built-in task's answers
BATCH_SIZE = 64


# ---- answering and scoring -----------------------------------------------------------------

def answer(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH_SIZE):
    """Greedy replies to `prompts`, each a user message (str) or a conversation (a list of
    messages); the model's reply is decoded until a stop token or max_new_tokens (fewer when
    the context fills). Prompts of equal token length run as one batch, `batch_size` rows at
    most. Returns the replies' texts in the order of `prompts`."""
    ctx = model.config.context_length
    ids = prompt_ids(model, tokenizer, prompts)
    stops = stop_ids(tokenizer)
    replies = [None] * len(ids)
    for group in _groups(ids):
        for start in range(0, len(group), batch_size):
            rows = group[start:start + batch_size]
            n_new = min(max_new_tokens, ctx - len(ids[rows[0]]) + 1)
            for i, tokens in zip(rows, _greedy(model, [ids[i] for i in rows], n_new, stops)):
                replies[i] = tokenizer.decode(tokens)
    return replies


def prompt_ids(model, tokenizer, prompts, where="prompt"):
    """The token ids of each prompt (a user message or a conversation) rendered with the
    generation prompt; ValueError naming the first one longer than the model's context."""
    ctx = model.config.context_length
    ids = []
    for k, p in enumerate(prompts):
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
        row = render(messages, tokenizer, add_generation_prompt=True)[0]
        if len(row) > ctx:
            raise ValueError(f"{where} {k + 1} takes {len(row)} tokens with the chat template, "
                             f"more than the model's context of {ctx}: {str(p)[:60]!r}")
        ids.append(row)
    return ids


def _greedy(model, prompts, max_new_tokens, stops):
    """Greedy new tokens of equal-length prompts, each row up to its first stop token."""
    out = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    steps = decode_steps(model, prompts, max_new_tokens, temperature=0, overflow="error")
    for tokens, _ in steps:
        for r, t in enumerate(tokens.tolist()):
            done[r] |= t in stops
            if not done[r]:
                out[r].append(t)
        if done.all():
            steps.close()
            break
    return out


def exact_match(reply, reference):
    """Right when equal once surrounding whitespace is gone (as `tasks.Task.check`)."""
    return reply.strip() == reference.strip()


def _accuracy(name, replies, references, check, seconds):
    correct = sum(bool(check(r, a)) for r, a in zip(replies, references))
    n = len(references)
    return {"task": name, "n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
            "seconds": round(seconds, 3)}


def evaluate_task(model, tokenizer, task, n=200, seed=tasks.DEFAULT_SEED,
                  max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH_SIZE):
    """Greedy held-out accuracy on the first n held-out prompts of `task` (a name or a
    tasks.Task): {"task", "n", "correct", "accuracy", "seconds"}."""
    task = tasks.get_task(task) if isinstance(task, str) else task
    pairs = tasks.examples(task.name, "heldout", n, seed)
    t0 = time.perf_counter()
    replies = answer(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size)
    return _accuracy(task.name, replies, [a for _, a in pairs], task.check,
                     time.perf_counter() - t0)


def prompt_and_reference(messages):
    """(the conversation before its last assistant message, that message's content)."""
    k = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:k], messages[k]["content"]


def evaluate_pairs(model, tokenizer, conversations, max_new_tokens=None, batch_size=BATCH_SIZE,
                   name="jsonl"):
    """Exact-match accuracy on conversations (as `chat.read_conversations` gives): each one's
    last assistant message is the reference, what comes before it the prompt. max_new_tokens
    None: the longest reference's tokens plus 16."""
    pairs = [prompt_and_reference(c) for c in conversations]
    if max_new_tokens is None:
        max_new_tokens = 16 + max(len(tokenizer.encode_ordinary(ref.strip())) for _, ref in pairs)
    t0 = time.perf_counter()
    replies = answer(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size)
    return _accuracy(name, replies, [r for _, r in pairs], exact_match, time.perf_counter() - t0)


# ---- bits per byte -----------------------------------------------------------------------------

def bits_per_byte(model, tokenizer, text, batch_size=8):
    """Bits per UTF-8 byte of `text` under the model (see the module docstring):
    {"bytes", "tokens", "nats", "bpb"}, `tokens` counting the text's tokens."""
    n_bytes = len(text.encode("utf-8"))
    tokens = tokenizer.encode_ordinary(text)
    seq = np.asarray(([tokenizer.eot_id] if tokenizer.eot_id is not None else []) + tokens,
                     np.int64)
    if len(seq) < 2:
        raise ValueError("the text is too short to score: it needs a token to predict (the "
                         "tokenizer has no <|endoftext|> to predict the first one from)")
    ctx = model.config.context_length
    starts = list(range(0, len(seq) - 1, ctx))
    full = [s for s in starts if s + ctx <= len(seq) - 1]  # whole windows batch together
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s in starts if s not in full]  # the last, shorter window
    nats = 0.0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            n = min(ctx, len(seq) - 1 - batch[0])
            x = np.stack([seq[s:s + n] for s in batch])
            y = np.stack([seq[s + 1:s + n + 1] for s in batch])
            with no_grad():
                _, loss = model(x, y, return_logits=False)
            nats += float(backend.to_device(loss.data, "cpu")) * y.size
    finally:
        model.train(was_training)
    return {"bytes": n_bytes, "tokens": len(tokens), "nats": nats,
            "bpb": nats / (math.log(2) * n_bytes)}


def read_text(path):
    """The text of a UTF-8 file, with a clear error for a missing, binary or empty one."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"--data: {path}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data: {path}: not UTF-8 text ({e.reason} at byte {e.start})") \
            from None
    if not text:
        raise ValueError(f"--data: {path}: the file is empty")
    return text


# ---- the registry --------------------------------------------------------------------------------

@dataclass
class EvalSettings:
    """What `tinyllm eval` was asked for, handed to every evaluation."""
    n: int = 200
    seed: int = tasks.DEFAULT_SEED
    max_new_tokens: int | None = None  # None: the evaluation's own default
    batch_size: int = BATCH_SIZE
    data: str | None = None


@dataclass
class Eval:
    """An evaluation `tinyllm eval --task NAME` runs. `prepare(settings)` checks and reads its
    input before any model is loaded (raising ValueError/OSError for bad input) and returns
    what `run(model, tokenizer, prepared, settings)` needs; `run` returns the JSON line's
    dict. `check(model, tokenizer, prepared)`, when given, checks the input against the
    loaded model before any evaluation runs. `chat`: answers in the chat template (a base
    model gets the chat tokens); `data`: needs --data; `in_all`: one of `--task all`."""
    name: str
    description: str
    prepare: Callable
    run: Callable
    check: Callable | None = None
    chat: bool = True
    data: bool = False
    in_all: bool = False


EVALS = {}


def register_eval(spec):
    """Add an evaluation to the registry under its name (once)."""
    if spec.name in EVALS or spec.name in tasks.TASKS or spec.name == "all":
        raise ValueError(f"an evaluation named {spec.name!r} already exists")
    EVALS[spec.name] = spec
    return spec


def _task_eval(name):
    task = tasks.get_task(name)

    def prepare(s):
        pairs = tasks.examples(name, "heldout", s.n, s.seed, allow_fewer=True)
        if len(pairs) < s.n:
            raise UsageError(f"--n: task {name!r} has only {len(pairs)} distinct held-out "
                             f"prompts, asked for {s.n}")
        return pairs

    def run(model, tokenizer, pairs, s):
        return evaluate_task(model, tokenizer, task, len(pairs), s.seed,
                             s.max_new_tokens or MAX_NEW_TOKENS, s.batch_size)

    def check(model, tokenizer, pairs):
        prompt_ids(model, tokenizer, [p for p, _ in pairs], f"task {name}: held-out prompt")

    return Eval(name, task.description, prepare, run, check, in_all=True)


def known_evals():
    """name -> Eval: the verifiable tasks of tinyllm.tasks, then the registered ones."""
    return {**{name: _task_eval(name) for name in tasks.verifiable_tasks()}, **EVALS}


def get_eval(name):
    known = known_evals()
    if name not in known:
        raise UsageError(f"--task: unknown evaluation {name!r}; known: "
                         f"{', '.join(list(known) + ['all'])}")
    return known[name]


def _prepare_jsonl(s):
    conversations = read_conversations(s.data)
    for k, c in enumerate(conversations):
        if not prompt_and_reference(c)[0]:
            raise ValueError(f"--data: {s.data}: conversation {k + 1} has nothing before its "
                             f"last assistant message to use as the prompt")
    return conversations


def _check_jsonl(model, tokenizer, conversations):
    prompt_ids(model, tokenizer, [prompt_and_reference(c)[0] for c in conversations],
               "--data: conversation")


def _run_jsonl(model, tokenizer, conversations, s):
    result = evaluate_pairs(model, tokenizer, conversations, s.max_new_tokens, s.batch_size)
    return {"task": "jsonl", "data": str(s.data), **{k: v for k, v in result.items()
                                                     if k != "task"}}


def _run_bpb(model, tokenizer, text, s):
    t0 = time.perf_counter()
    result = bits_per_byte(model, tokenizer, text, s.batch_size)
    return {"task": "bpb", "data": str(s.data), "bytes": result["bytes"],
            "tokens": result["tokens"], "bpb": result["bpb"],
            "seconds": round(time.perf_counter() - t0, 3)}


register_eval(Eval("bpb", "bits per byte of a UTF-8 text file (--data FILE)",
                   lambda s: read_text(s.data), _run_bpb, chat=False, data=True))
register_eval(Eval("jsonl", "exact match on your prompt/reference pairs (--data FILE.jsonl)",
                   _prepare_jsonl, _run_jsonl, _check_jsonl, data=True))


# ---- the command line ------------------------------------------------------------------------

def register(subparsers):
    p = subparsers.add_parser(
        "eval", help="measure a model: task accuracy, your own pairs, bits per byte",
        description="Measure a model and print one JSON line per evaluation on stdout: "
                    "greedy exact-match accuracy on a built-in task's held-out prompts "
                    "(--task NAME, or all), on your prompt/reference pairs (--data "
                    "FILE.jsonl), or bits per byte of a text (--task bpb --data FILE).")
    p.add_argument("path", metavar="RUN_DIR")
    p.add_argument("--task", default=None, metavar="NAME",
                   help="a verifiable task (add, compare, ...), all, bpb or jsonl (default "
                        "jsonl when --data is given)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="the text file of bpb, or the JSON-lines pairs of jsonl")
    p.add_argument("--n", type=positive_int, default=200,
                   help="held-out prompts per task (default 200)")
    p.add_argument("--seed", type=nonnegative_int, default=tasks.DEFAULT_SEED,
                   help=f"seed that picks the held-out prompts (default {tasks.DEFAULT_SEED})")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, metavar="N",
                   help=f"longest answer in tokens (default {MAX_NEW_TOKENS}; jsonl: the "
                        f"longest reference plus 16)")
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, metavar="B",
                   help=f"prompts (or bpb windows) per forward pass (default {BATCH_SIZE})")
    add_model_args(p)
    p.set_defaults(func=cmd_eval)
    return p


def chosen_evals(task, data):
    """The evaluations `--task` and `--data` ask for, checked against each other."""
    if task is None:
        if data is None:
            raise UsageError(f"--task: required unless --data FILE.jsonl is given; one of "
                             f"{', '.join(list(known_evals()) + ['all'])}")
        task = "jsonl"
    specs = [s for s in known_evals().values() if s.in_all] if task == "all" else [get_eval(task)]
    needs_data = any(s.data for s in specs)
    if needs_data and data is None:
        raise UsageError(f"--task {task}: needs --data FILE")
    if data is not None and not needs_data:
        raise UsageError(f"--data: only for --task bpb or jsonl, not --task {task}")
    return specs


def cmd_eval(args):
    specs = chosen_evals(args.task, args.data)
    check_model_settings(args)
    settings = EvalSettings(n=args.n, seed=args.seed, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, data=args.data)
    prepared = [spec.prepare(settings) for spec in specs]  # bad input fails before loading
    model, tok, precision = load_chat_model(args, chat_template=any(s.chat for s in specs))
    for spec, inputs in zip(specs, prepared):
        if spec.check is not None:
            spec.check(model, tok, inputs)
    with amp.autocast(precision):
        for spec, inputs in zip(specs, prepared):
            result = spec.run(model, tok, inputs, settings)
            print(json.dumps(result), flush=True)
    return 0

