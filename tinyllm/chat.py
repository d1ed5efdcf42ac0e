"""The chat template: conversations as token ids, and which of them are trained.

A conversation is the usual list of `{"role": ..., "content": ...}` messages, roles `system`
(optional, first only), `user` and `assistant`. It is rendered in ChatML, the habit of many
open chat models (Qwen, the Hugging Face chat templates), so an exported model's template is
one the ecosystem already knows, and a system role needs no special token of its own:

    <|endoftext|>                                   the document start the base model knows
    <|im_start|>system\\n{content}<|im_end|>\\n       optional
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n     trained: content and <|im_end|>
    ...
    <|im_start|>assistant\\n                          the generation prompt

`<|im_start|>` and `<|im_end|>` are two special tokens added to the tokenizer (`add_chat_tokens`)
and to the model's embedding (`grow_vocab`, new rows at the mean of the old ones). Each piece is
encoded on its own, so the boundary between a role marker and its content never merges into
one token, and message text is encoded as ordinary text: a user who types "<|im_end|>" gets
those characters, not the control token.

`render(messages, tokenizer)` returns `(ids, loss_mask)`: `loss_mask[i]` is true exactly for
the tokens of assistant contents and the `<|im_end|>` that closes each assistant turn. Every
assistant turn of a multi-turn conversation is trained; the model learns to end its turn,
which is where generation stops.
"""

import numpy as np

from autograd import backend
from autograd.nn import Parameter

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_TOKENS = (IM_START, IM_END)
ROLES = ("system", "user", "assistant")


# ---- the tokenizer and the model gain the chat tokens -------------------------------------------

def has_chat_tokens(tokenizer):
    return all(t in tokenizer.special_tokens for t in CHAT_TOKENS)


def add_chat_tokens(tokenizer):
    """The tokenizer with `<|im_start|>` and `<|im_end|>` as special tokens (ids after its
    largest id); every old id keeps its meaning. Returns it unchanged when it has them."""
    if has_chat_tokens(tokenizer):
        return tokenizer
    specials = dict(tokenizer.special_tokens)
    next_id = tokenizer.vocab_size
    for t in CHAT_TOKENS:
        if t not in specials:
            specials[t] = next_id
            next_id += 1
    merges = [(a, b, c) for (a, b), c in sorted(tokenizer.merges.items(), key=lambda kv: kv[1])]
    return type(tokenizer)(merges, pattern=tokenizer.pattern, special_tokens=specials,
                           byte_ids=tokenizer.byte_ids,
                           whole_token_lookup=tokenizer.whole_token_lookup,
                           trust_pattern=getattr(tokenizer, "trust_pattern", False))


def grow_vocab(model, vocab_size, new_ids):
    """Make `model` hold `vocab_size` ids: the token embedding (and an untied LM head) grow to
    that many rows, and the rows of `new_ids` start at the mean of the existing rows (an
    average token: no new id starts out louder than the others). Old rows are unchanged, so
    old ids keep their meaning. Works in place; returns the model."""
    old_v = model.config.vocab_size
    new_v = max(old_v, vocab_size)
    tables = [model.tok_emb] + ([model.lm_head] if model.lm_head is not None else [])
    for layer in tables:
        w = layer.weight
        xp = backend.xp_for_device(w.device)
        old = w.data
        mean = old.astype(xp.float64).mean(axis=0).astype(old.dtype)
        data = xp.concatenate([old, xp.zeros((new_v - old_v, old.shape[1]), old.dtype)])
        data[list(new_ids)] = mean
        layer.weight = Parameter(data, device=w.device)
        layer.weight.requires_grad = w.requires_grad
    model.config.vocab_size = new_v
    return model


def prepare_for_chat(model, tokenizer):
    """(model, tokenizer) with the chat tokens in both; a no-op for a chat model."""
    if has_chat_tokens(tokenizer) and model.config.vocab_size >= tokenizer.vocab_size:
        return model, tokenizer
    chat = add_chat_tokens(tokenizer)
    new_ids = [chat.special_tokens[t] for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
    grow_vocab(model, chat.vocab_size, new_ids)
    return model, chat


# ---- messages -----------------------------------------------------------------------------------

def check_messages(messages, where="messages"):
    """Raise ValueError naming the message and what is wrong; returns the messages."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: must be a non-empty list of {{'role', 'content'}} objects")
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}[{k}]: must be an object with 'role' and 'content', got "
                             f"{type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}[{k}]: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{where}[{k}]: content must be a string, got "
                             f"{type(content).__name__}")
        if role == "system" and k != 0:
            raise ValueError(f"{where}[{k}]: a system message may only come first")
    return messages


# ---- rendering ----------------------------------------------------------------------------------

def _specials(tokenizer):
    if not has_chat_tokens(tokenizer):
        raise ValueError("the tokenizer has no chat tokens (<|im_start|>, <|im_end|>): "
                         "use tinyllm.chat.add_chat_tokens first")
    return tokenizer.special_tokens[IM_START], tokenizer.special_tokens[IM_END]


def render(messages, tokenizer, add_generation_prompt=False):
    """Token ids of a conversation and its loss mask, two lists of equal length.

    add_generation_prompt: end with `<|im_start|>assistant\\n`, the text that opens the
    assistant's turn (never trained)."""
    check_messages(messages)
    start, end = _specials(tokenizer)
    newline = tokenizer.encode_ordinary("\n")
    ids, mask = [], []

    def put(tokens, trained):
        ids.extend(tokens)
        mask.extend([trained] * len(tokens))

    if tokenizer.eot_id is not None:
        put([tokenizer.eot_id], False)
    for m in messages:
        trained = m["role"] == "assistant"
        put([start] + tokenizer.encode_ordinary(m["role"] + "\n"), False)
        put(tokenizer.encode_ordinary(m["content"]) + [end], trained)
        put(newline, False)
    if add_generation_prompt:
        put(generation_prompt(tokenizer), False)
    return ids, mask


def generation_prompt(tokenizer):
    start, _ = _specials(tokenizer)
    return [start] + tokenizer.encode_ordinary("assistant\n")


def end_of_turn(tokenizer):
    """The id that ends a turn: generation stops there."""
    return _specials(tokenizer)[1]


def to_example(messages, tokenizer):
    """(x, y) for training: inputs ids[:-1] and targets ids[1:], the target -100 where the
    token it predicts is not trained (GPT.forward ignores those)."""
    ids, mask = render(messages, tokenizer)
    ids = np.asarray(ids, np.int64)
    y = np.where(np.asarray(mask[1:], bool), ids[1:], -100)
    return ids[:-1], y


# ---- data files: the three formats people already have ---------------------------------------

FORMATS = {
    "messages": '{"messages": [{"role": ..., "content": ...}, ...]}',
    "prompt/completion": '{"prompt": ..., "completion": ...}',
    "alpaca": '{"instruction": ..., "input": ..., "output": ...}',
}


def conversation_from_record(obj, where="record"):
    """The messages of one JSON object in any of the three formats (detected by its keys):

        {"messages": [...]}                                  as is
        {"prompt": P, "completion": C}                       user P, assistant C; P and C may
                                                             also be lists of messages (TRL)
        {"instruction": I, "input": X, "output": O}          user "I\\n\\nX" (or I), assistant O

    Raises ValueError naming `where` and what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
    elif "prompt" in obj or "completion" in obj:
        messages = []
        for key, role in (("prompt", "user"), ("completion", "assistant")):
            if key not in obj:
                raise ValueError(f"{where}: has {'prompt' if key == 'completion' else 'completion'}"
                                 f" but no {key!r}")
            value = obj[key]
            if isinstance(value, str):
                messages.append({"role": role, "content": value})
            elif isinstance(value, list):
                messages.extend(value)
            else:
                raise ValueError(f"{where}: {key!r} must be a string or a list of messages, "
                                 f"got {type(value).__name__}")
    elif "instruction" in obj or "output" in obj:
        for key in ("instruction", "output"):
            if not isinstance(obj.get(key), str):
                raise ValueError(f"{where}: Alpaca record needs a string {key!r}, got "
                                 f"{type(obj.get(key)).__name__ if key in obj else 'nothing'}")
        extra = obj.get("input", "")
        if not isinstance(extra, str):
            raise ValueError(f"{where}: Alpaca 'input' must be a string, got {type(extra).__name__}")
        user = obj["instruction"] + ("\n\n" + extra if extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
    else:
        raise ValueError(f"{where}: unknown format (keys {sorted(obj)[:6]}); expected one of: "
                         + "; ".join(FORMATS.values()))
    check_messages(messages, f"{where}: messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message, so nothing to learn or to score")
    return messages


def read_conversations(path):
    """Every conversation of a JSON-lines file (blank lines skipped), each line in any of the
    FORMATS. The whole file is checked first: a bad line raises ValueError with the file, the
    line number and what is wrong."""
    from tinyllm.data import json_lines

    out = [conversation_from_record(obj, where) for _, where, obj in json_lines(path)]
    if not out:
        raise ValueError(f"{path}: no conversations (the file is empty)")
    return out
