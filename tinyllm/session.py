"""Talking to a chat model: a multi-turn session that keeps its KV cache between turns, and the
`tinyllm chat` command.

Every turn renders the whole conversation with the chat template, so the model sees exactly
the tokens it would see if the conversation were encoded afresh, and reuses the cache for the
part it has already computed:

    target = render(messages + [user], add_generation_prompt=True)
    p      = the longest common prefix of the cached ids and target
    cache.crop(p); prefill target[p:]           a new turn computes only its own tokens
    decode until <|im_end|> or max_new_tokens   greedy (temperature 0) or sampled with
                                                generate.py's filters
    messages += [user, assistant reply]

A reply ends at `<|im_end|>` or at any other special token (a base model ends a document with
`<|endoftext|>`): those never belong to a message's text. The reply's text is then encoded
like any other message, which may tokenize it differently from the sampled tokens; the common
prefix takes care of that, so the cache always holds a prefix of the rendered conversation.

When the conversation no longer leaves room for a reply in the model's context, the oldest
user/assistant turns are dropped (the system message stays) and the session says so once
(`on_note`). A single message too long for the context is refused with ValueError.
"""

import sys
from pathlib import Path

import numpy as np

from autograd import amp
from tinyllm import chat
from tinyllm.chat import render
from tinyllm.cli import UsageError, check_choice, check_float, nonnegative_float, \
    nonnegative_int, positive_float, positive_int
from tinyllm.generate import _check_sampling, _forward, _TextRow, choose_next, \
    load_for_generation

__all__ = ["ChatSession", "stop_ids", "common_prefix", "load_chat_model", "register"]

# the session's sampling defaults, also the `tinyllm chat` flags' defaults
DEFAULTS = dict(max_new_tokens=256, temperature=0.7, top_k=None, top_p=0.9, min_p=None,
                repetition_penalty=1.0, seed=None)
DTYPES = ("float32", "float64") + amp.MODES[1:]  # parameter dtypes, then mixed precision


def stop_ids(tokenizer):
    """The ids a reply stops at: every special token (`<|im_end|>` ends a turn; the others,
    such as `<|endoftext|>`, cannot be part of a message's text)."""
    return set(tokenizer.special_tokens.values())


def common_prefix(a, b):
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class ChatSession:
    """A conversation with a chat model, its messages and the KV cache of their tokens.

    `reply(text)` streams the assistant's answer as text pieces, `ask(text)` returns it whole;
    `reset()` forgets the turns (the system message stays), `set_system(text)` replaces the
    system message. Sampling settings are those of `generate.decode_steps` (temperature 0:
    greedy); `seed` seeds the session's own random numbers. `messages` starts the session
    from an earlier conversation; `on_note(text)` receives notes such as dropped turns.
    After a turn, `last_ids` holds the token ids it generated (without the stop token)."""

    def __init__(self, model, tokenizer, system=None, messages=None, on_note=None,
                 max_new_tokens=DEFAULTS["max_new_tokens"],
                 temperature=DEFAULTS["temperature"], top_k=DEFAULTS["top_k"],
                 top_p=DEFAULTS["top_p"], min_p=DEFAULTS["min_p"],
                 repetition_penalty=DEFAULTS["repetition_penalty"], seed=DEFAULTS["seed"]):
        if not chat.has_chat_tokens(tokenizer):
            raise ValueError("the tokenizer has no chat tokens (<|im_start|>, <|im_end|>): "
                             "use tinyllm.chat.prepare_for_chat(model, tokenizer) first")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{model.config.vocab_size}")
        _check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repetition_penalty=repetition_penalty)
        self.rng = np.random.default_rng(seed)
        self.on_note = on_note
        self.notes = []
        self.stops = stop_ids(tokenizer)
        self.last_ids = []
        self._cache = None
        self._ids = []  # the ids whose keys and values the cache holds
        self._dropping = False  # said once that old turns are being dropped
        self.messages = list(chat.check_messages(list(messages))) if messages else []
        if system is not None:
            self.set_system(system)

    # ---- the conversation ------------------------------------------------------------------
    @property
    def system(self):
        if self.messages and self.messages[0]["role"] == "system":
            return self.messages[0]["content"]
        return None

    def set_system(self, text):
        """Replace the system message (None or "": none); the turns stay."""
        turns = self.messages[1:] if self.system is not None else self.messages
        if text is not None and not isinstance(text, str):
            raise ValueError(f"system message must be a string, got {type(text).__name__}")
        self.messages = ([{"role": "system", "content": text}] if text else []) + turns
        self._keep_prefix_of(self._rendered())

    def reset(self):
        """Forget every turn; the system message stays (and so does its part of the cache)."""
        self.messages = self.messages[:1] if self.system is not None else []
        self._dropping = False
        self._keep_prefix_of(self._rendered())

    @property
    def cached_ids(self):
        """The token ids the KV cache holds: always a prefix of the rendered conversation."""
        return list(self._ids)

    def _rendered(self):
        """The ids of the conversation so far (an empty one is the document start only)."""
        if self.messages:
            return render(self.messages, self.tokenizer)[0]
        return [] if self.tokenizer.eot_id is None else [self.tokenizer.eot_id]

    def _note(self, text):
        self.notes.append(text)
        if self.on_note is not None:
            self.on_note(text)

    # ---- a turn ----------------------------------------------------------------------------
    def ask(self, user_text):
        """The assistant's whole reply to `user_text`."""
        return "".join(self.reply(user_text))

    def reply(self, user_text):
        """The assistant's reply to `user_text`, as an iterator of text pieces. The message is
        checked (and old turns chosen for dropping) now; the turn happens as it is iterated,
        and an iterator closed early (Ctrl-C) keeps the reply so far in the conversation."""
        if not isinstance(user_text, str):
            raise ValueError(f"a message must be a string, got {type(user_text).__name__}")
        messages, target, dropped = self._fit(self.messages + [{"role": "user",
                                                                "content": user_text}])
        return self._turn(messages, target, dropped)

    def _fit(self, messages):
        """(messages, target ids, turns dropped): the oldest turns dropped until the prompt
        leaves room for a reply of max_new_tokens (at most a quarter of the context)."""
        ctx = self.model.config.context_length
        room = min(self.max_new_tokens, max(1, ctx // 4))
        head = 1 if messages[0]["role"] == "system" else 0
        dropped = 0
        while True:
            target = render(messages, self.tokenizer, add_generation_prompt=True)[0]
            if len(target) + room - 1 <= ctx or len(messages) - head <= 1:
                break
            # a turn: a user message and what follows it up to the next user message
            k = head + 1
            while k < len(messages) - 1 and messages[k]["role"] != "user":
                k += 1
            messages = messages[:head] + messages[k:]
            dropped += 1
        if len(target) > ctx:
            raise ValueError(f"the message is too long: with the chat template"
                             f"{' and the system message' if head else ''} it takes "
                             f"{len(target)} tokens, more than the model's context of {ctx}")
        return messages, target, dropped

    def _turn(self, messages, target, dropped):
        self.messages = messages
        if dropped and not self._dropping:
            self._dropping = True
            self._note(f"the conversation outgrew the model's context of "
                       f"{self.model.config.context_length} tokens: the oldest turns are "
                       f"dropped from now on (the system message stays)")
        ctx, V = self.model.config.context_length, self.model.config.vocab_size
        budget = min(self.max_new_tokens, ctx - len(target) + 1)
        row = _TextRow(self.tokenizer, self.stops, ())
        tokens = []
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self._prefill(target)
            seen = np.zeros((1, V), bool)
            seen[0, target] = True
            for step in range(budget):
                t = int(choose_next(logits[None], seen, self.rng, **self.sampling)[0])
                piece = row.push(t)
                if row.done:  # a stop token: push flushed the text
                    if piece:
                        yield piece
                    break
                tokens.append(t)
                seen[0, t] = True
                if piece:
                    yield piece
                if step + 1 < budget:
                    logits = self._feed([t])
            else:
                if budget < self.max_new_tokens:
                    self._note(f"the reply was cut at the model's context of {ctx} tokens")
            piece = row.close()
            if piece:
                yield piece
        finally:
            self.model.train(was_training)
            self.last_ids = tokens
            self.messages = self.messages + [{"role": "assistant", "content": row.text}]
            self._keep_prefix_of(self._rendered())

    # ---- the cache -------------------------------------------------------------------------
    def _prefill(self, target):
        """Logits after `target`, computing only the ids the cache does not hold yet."""
        if self._cache is None:
            self._cache = self.model.new_cache(1)
        p = min(common_prefix(self._ids, target), len(target) - 1)  # >= 1 id for the logits
        self._keep_prefix_of(target[:p])
        return self._feed(target[p:])

    def _feed(self, ids):
        """Run `ids` after the cached ones; the logits (V,) after the last one."""
        logits = _forward(self.model, np.asarray([ids], np.int64), self._cache)
        self._ids.extend(ids)
        return logits[0]

    def _keep_prefix_of(self, ids):
        """Crop the cache to its longest common prefix with `ids` (which also forgets any
        positions an interrupted forward added after the last recorded id)."""
        p = common_prefix(self._ids, ids)
        del self._ids[p:]
        if self._cache is not None:
            self._cache.crop(p)


# ---- loading, shared with `tinyllm eval` ------------------------------------------------------

def check_model_settings(args):
    """The path, --device and --dtype of a command that loads a model, checked up front."""
    if not Path(args.path).exists():
        raise UsageError(f"{args.path}: no such run folder or checkpoint")
    if not (args.device == "cpu" or args.device == "cuda"
            or (args.device.startswith("cuda:") and args.device[5:].isdigit())):
        raise UsageError(f"--device: must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.dtype is not None:
        check_choice("--dtype", args.dtype, DTYPES)


def load_chat_model(args, chat_template=True):
    """(model, tokenizer, precision) from args.path/.tokenizer/.device/.dtype. With
    `chat_template`, a base model gets the chat tokens (`prepare_for_chat`) and a one-line
    warning on stderr. `precision` is the amp mode to run under."""
    dtype = args.dtype
    precision = dtype if dtype in amp.MODES[1:] else "float32"
    model, tok = load_for_generation(args.path, tokenizer=args.tokenizer, device=args.device,
                                     dtype="float32" if dtype in amp.MODES[1:] else dtype)
    if chat_template and not chat.has_chat_tokens(tok):
        print(f"warning: {args.path} is a base model (its tokenizer has no chat tokens): it "
              f"never saw the chat template, so expect continued text rather than answers",
              file=sys.stderr)
        model, tok = chat.prepare_for_chat(model, tok)
    return model, tok, precision


def add_model_args(p):
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="saved tokenizer, .tiktoken file, or folder with encoder.json + vocab.bpe "
                        "(for a Hugging Face folder without tokenizer files)")
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default=None, metavar="DTYPE",
                   help=f"one of {', '.join(DTYPES)} (default: the checkpoint's); the last "
                        f"three keep float32 weights and run the matrix products in that "
                        f"precision")


# ---- the command line ---------------------------------------------------------------------

COMMANDS = "/reset clears the conversation, /system TEXT sets the system message (/system " \
           "alone removes it), /quit or Ctrl-D ends; Ctrl-C stops a reply"


def register(subparsers):
    d = DEFAULTS
    p = subparsers.add_parser(
        "chat", help="talk to a chat model in the terminal",
        description="Talk to a chat model (a run folder, a .ckpt checkpoint or a Hugging Face "
                    "folder): each line you type is a message, the reply streams back. "
                    + COMMANDS + ". With --prompt: answer one message, print only the reply.")
    p.add_argument("path", metavar="RUN_DIR")
    p.add_argument("--system", default=None, metavar="TEXT", help="the system message")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="answer this one message, print only the reply text and exit")
    p.add_argument("--max-new-tokens", type=positive_int, default=d["max_new_tokens"], metavar="N",
                   help=f"longest reply in tokens (default {d['max_new_tokens']}; a reply also "
                        f"ends when the context is full)")
    p.add_argument("--temperature", type=nonnegative_float, default=d["temperature"], metavar="T",
                   help=f"0: greedy (default {d['temperature']})")
    p.add_argument("--top-k", type=nonnegative_int, default=d["top_k"], metavar="K",
                   help="keep the k most likely tokens (default: off)")
    p.add_argument("--top-p", type=float, default=d["top_p"], metavar="P",
                   help=f"nucleus sampling, in (0, 1] (default {d['top_p']}; 1: off)")
    p.add_argument("--min-p", type=float, default=d["min_p"], metavar="P",
                   help="keep tokens at least this times the most likely one's probability, "
                        "in [0, 1] (default: off)")
    p.add_argument("--repetition-penalty", type=positive_float, metavar="X",
                   default=d["repetition_penalty"], help="> 1 discourages repeats (default 1: off)")
    p.add_argument("--seed", type=nonnegative_int, default=None, metavar="S",
                   help="seed of the sampling (default: fresh each run)")
    add_model_args(p)
    p.set_defaults(func=cmd_chat)
    return p


def _session_settings(args):
    check_float("--top-p", args.top_p, low=0, high=1, low_open=True)
    check_float("--min-p", args.min_p, low=0, high=1, allow_none=True)
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def cmd_chat(args):
    settings = _session_settings(args)
    check_model_settings(args)
    model, tok, precision = load_chat_model(args)
    session = ChatSession(model, tok, system=args.system,
                          on_note=lambda text: print(f"note: {text}", file=sys.stderr),
                          **settings)
    with amp.autocast(precision):
        if args.prompt is not None:
            for piece in session.reply(args.prompt):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            return 0
        return interact(session)


def interact(session):
    """The interactive loop: one message per line read from stdin, replies streamed to
    stdout, notes and command answers on stderr. Returns the exit code."""
    out, err, tty = sys.stdout, sys.stderr, sys.stdin.isatty()
    if tty:
        import readline  # noqa: F401  (line editing and history for input())
    print(f"chat: {COMMANDS}", file=err)
    while True:
        try:
            line = input("> ")
        except EOFError:
            if tty:  # the shell's prompt starts on a line of its own
                out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _command(session, text, err):
                return 0
            continue
        try:
            pieces = session.reply(text)
        except ValueError as e:  # a message too long for the context: say so, keep going
            print(f"error: {e}", file=err)
            continue
        try:
            for piece in pieces:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            pieces.close()  # the reply so far stays in the conversation
            out.write("\n")
            print("(reply stopped)", file=err)
            continue
        out.write("\n")
        out.flush()


def _command(session, text, err):
    """Carry out a /command; True when the session should end."""
    name, _, arg = text.partition(" ")
    if name in ("/quit", "/exit"):
        return True
    if name == "/reset":
        session.reset()
        print("(conversation cleared)", file=err)
    elif name == "/system":
        session.set_system(arg.strip() or None)
        print("(system message set)" if arg.strip() else "(system message removed)", file=err)
    else:
        print(f"unknown command {name}; commands: /reset, /system TEXT, /quit", file=err)
    return False

