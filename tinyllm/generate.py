"""Text generation with a key/value cache: sampling controls, stop rules, streaming, batches.

One generation step:

    logits  = model(last token, cache)            the prompt is prefilled in one forward pass,
                                                  then one position per step attends to the cache
    z       = repetition_penalty(z, seen)         tokens already in the row are made less likely
    z       = z / temperature                     temperature 0 means greedy: argmax, no sampling
    z       = top_k(z); top_p(z); min_p(z)        each sets the disallowed logits to -inf
    token   ~ softmax(z)                          a local numpy Generator (seeded), never global state

The filters are plain functions on a (batch, vocab) float64 array; they are vectorized over the
batch and easy to test one by one.

Context window: a cache holds at most `context_length` positions. With overflow="slide" (the
default) a full window drops its oldest `shift` positions and the kept ones are prefilled again
in one forward pass (shift=1 is nanoGPT's crop-every-step: exact but a full forward per token;
the default context_length // 4 re-prefills every context_length // 4 steps). A prompt longer
than the context keeps its last context_length tokens. With overflow="error" a prompt plus
max_new_tokens that does not fit raises ValueError before any work.

Batches: prompts of equal length run as one batch (one forward per step for all of them);
prompts of different lengths are grouped by length and each group runs as its own batch
(no padding, so no attention mask is needed and every row is exact). A row that has stopped is
still computed until its whole group stops; its extra tokens are dropped. Seeded results are
reproducible for the same call (same prompts in the same order); the random numbers of a row
depend on its group.

Streaming: `stream` yields text pieces as tokens arrive. Token bytes go through an incremental
UTF-8 decoder, so a character split across tokens is emitted once it is complete; text that
could be the start of a stop string is held back until it is known not to be one. Joining the
pieces gives exactly the text `generate_text` returns.

Entry points:
    generate(model, ids, ...)                  token ids -> new token ids (one list or a batch)
    generate_text(model, tokenizer, prompt)    text -> completion text (str or list of str)
    stream(model, tokenizer, prompt)           text -> iterator of completion text pieces
    decode_steps(model, ids, ...)              the loop itself: yields (tokens, logits) per step
    load_for_generation(path)                  (model, tokenizer) from a run folder, a .ckpt, or
                                               a Hugging Face folder (with tokenizer=...)
and the `tinyllm generate` command (see `register`).
"""

import argparse
import codecs
import os
import sys
from pathlib import Path

import numpy as np

from autograd import backend
from autograd.tensor import no_grad

__all__ = [
    "apply_repetition_penalty", "apply_temperature", "top_k_filter", "top_p_filter",
    "min_p_filter", "softmax", "sample_from", "decode_steps", "generate", "generate_text",
    "stream", "load_for_generation", "load_tokenizer", "register",
]

# ---- sampling filters: (B, V) float64 logits in, (B, V) logits out ------------------------------


def softmax(z):
    """Row-wise softmax of (B, V) logits; -inf logits get probability 0."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def apply_repetition_penalty(z, seen, penalty):
    """CTRL's penalty: a logit of a token already in the row (seen: (B, V) bool) is divided by
    `penalty` when positive and multiplied by it when negative (penalty > 1 discourages)."""
    if penalty == 1.0:
        return z
    return np.where(seen, np.where(z > 0, z / penalty, z * penalty), z)


def apply_temperature(z, temperature):
    """z / temperature (temperature > 0; 0 means greedy and is handled by the caller)."""
    return z if temperature == 1.0 else z / temperature


def top_k_filter(z, k):
    """Keep the k largest logits of each row (and any tied with the k-th), the rest -inf."""
    if k is None or k <= 0 or k >= z.shape[-1]:
        return z
    kth = np.partition(z, -k, axis=-1)[:, -k:-k + 1 or None]
    return np.where(z < kth, -np.inf, z)


def top_p_filter(z, p):
    """Nucleus: keep the smallest set of most probable tokens whose probability is >= p (the
    most probable token always stays); the rest -inf. Equal probabilities at the boundary are
    ordered by token id."""
    if p is None or p >= 1.0:
        return z
    order = np.argsort(-z, axis=-1, kind="stable")
    probs = np.take_along_axis(softmax(z), order, axis=-1)
    before = np.cumsum(probs, axis=-1) - probs  # mass of the more probable tokens
    keep = np.empty_like(before, dtype=bool)
    np.put_along_axis(keep, order, before < p, axis=-1)
    return np.where(keep, z, -np.inf)


def min_p_filter(z, min_p):
    """Keep tokens whose probability is >= min_p times the row's largest; the rest -inf."""
    if min_p is None or min_p <= 0.0:
        return z
    probs = softmax(z)
    return np.where(probs >= min_p * probs.max(axis=-1, keepdims=True), z, -np.inf)


def sample_from(probs, rng):
    """One token per row of (B, V) probabilities, by inverse CDF with one uniform per row;
    a token of probability 0 is never chosen."""
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(len(probs)) * cdf[:, -1]
    idx = (cdf <= u[:, None]).sum(axis=-1)
    # u can round up to the total: take the last token with probability > 0
    last = probs.shape[-1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=-1)
    return np.minimum(idx, last)


def choose_next(z, seen, rng, temperature=1.0, top_k=None, top_p=None, min_p=None,
                repetition_penalty=1.0):
    """The next token of each row from raw logits z (B, V): penalty, then greedy or filters and
    sampling."""
    z = apply_repetition_penalty(z, seen, repetition_penalty)
    if temperature == 0:
        return z.argmax(axis=-1)
    z = apply_temperature(z, temperature)
    z = min_p_filter(top_p_filter(top_k_filter(z, top_k), top_p), min_p)
    return sample_from(softmax(z), rng)


def _check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens):
    if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    for name, v in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                    ("repetition_penalty", repetition_penalty)):
        if v is not None and not np.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1: off), got {repetition_penalty}")


# ---- the decoding loop ------------------------------------------------------------------------


def _as_batch(ids, vocab_size):
    """A (B, T) int64 array of equal-length prompts, with a clear error for bad ids."""
    try:
        a = np.asarray(ids)
    except ValueError:
        a = None
    if a is None or a.dtype == object or a.ndim != 2:
        raise ValueError("decode_steps: prompts must be equal-length lists of token ids, "
                         "shape (batch, time)")
    if a.size and a.dtype.kind not in "iu":
        raise TypeError(f"prompt token ids must be integers, not {a.dtype}")
    if a.shape[1] == 0:
        raise ValueError("empty prompt: give at least one token (e.g. the end-of-text token)")
    bad = (a < 0) | (a >= vocab_size)
    if bad.any():
        raise ValueError(f"prompt token id {int(a[bad][0])} is outside the model's vocabulary "
                         f"(0..{vocab_size - 1})")
    return a.astype(np.int64)


def decode_steps(model, ids, max_new_tokens=100, temperature=1.0, top_k=None, top_p=None,
                 min_p=None, repetition_penalty=1.0, seed=None, overflow="slide", shift=None):
    """Generate from equal-length prompts ids (B, T), yielding `(tokens (B,), logits (B, V))` for
    each step: the chosen tokens and the raw float64 logits they were chosen from (before the
    penalty and filters). Arguments are checked when the first step is asked for. Stop by
    leaving the loop (or `.close()`); the model is in eval mode until then."""
    _check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens)
    cfg = model.config
    ctx, V = cfg.context_length, cfg.vocab_size
    ids = _as_batch(ids, V)
    B, T = ids.shape
    shift = max(1, ctx // 4) if shift is None else shift
    if overflow not in ("slide", "error"):
        raise ValueError(f"overflow must be 'slide' or 'error', got {overflow!r}")
    if not 1 <= shift <= ctx:
        raise ValueError(f"shift must be in 1..{ctx} (the context length), got {shift}")
    if overflow == "error" and T + max(max_new_tokens - 1, 0) > ctx:
        raise ValueError(
            f"prompt of {T} tokens plus {max_new_tokens} new tokens needs {T + max_new_tokens - 1}"
            f" positions, more than the model's context of {ctx}; use overflow='slide', a "
            f"shorter prompt or fewer new tokens")
    if max_new_tokens == 0:
        return
    rng = np.random.default_rng(seed)
    buf = np.empty((B, T + max_new_tokens), np.int64)  # the prompt and every token so far
    buf[:, :T] = ids
    n = T
    seen = np.zeros((B, V), bool)
    seen[np.arange(B)[:, None], ids] = True
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B)
        logits = _forward(model, buf[:, max(0, n - ctx):n], cache)
        for step in range(max_new_tokens):
            nxt = choose_next(logits, seen, rng, temperature, top_k, top_p, min_p,
                              repetition_penalty)
            yield nxt, logits
            buf[:, n] = nxt
            n += 1
            seen[np.arange(B), nxt] = True
            if step == max_new_tokens - 1:
                break
            if cache.length == ctx:  # window full: drop `shift` oldest, prefill the rest
                cache.reset()
                logits = _forward(model, buf[:, n - (ctx + 1 - shift):n], cache)
            else:
                logits = _forward(model, buf[:, n - 1:n], cache)
    finally:
        model.train(was_training)


def _forward(model, idx, cache):
    """Float64 logits (B, V) of the last position, on the CPU. (no_grad per call, not around
    the loop: the caller's code between steps keeps its own gradient mode.)"""
    with no_grad():
        logits, _ = model(idx, cache=cache, last_only=True)
    return backend.to_device(logits.data[:, -1], "cpu").astype(np.float64)


def _groups(prompts):
    """Indices of the prompts grouped by length (first-seen order)."""
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    return list(groups.values())


def _is_batch(ids):
    return len(ids) > 0 and not isinstance(ids[0], (int, np.integer)) and np.ndim(ids[0]) == 1


def generate(model, ids, max_new_tokens=100, temperature=1.0, top_k=None, top_p=None,
             min_p=None, repetition_penalty=1.0, seed=None, stop_tokens=(), overflow="slide",
             shift=None):
    """New token ids after prompt `ids`: a list of ints gives a list of ints; a list of prompts
    (any lengths) gives a list of lists. A row ends at max_new_tokens or at a token in
    `stop_tokens` (the stop token is not included)."""
    batch = _is_batch(ids)
    prompts = [list(map(int, p)) for p in ids] if batch else [list(map(int, ids))]
    stops = set(int(t) for t in stop_tokens)
    out = [None] * len(prompts)
    for group in _groups(prompts):
        rows = [[] for _ in group]
        done = np.zeros(len(group), bool)
        steps = decode_steps(model, [prompts[i] for i in group], max_new_tokens, temperature,
                             top_k, top_p, min_p, repetition_penalty, seed, overflow, shift)
        for tokens, _ in steps:
            for r, t in enumerate(tokens.tolist()):
                if not done[r]:
                    done[r] = t in stops
                    if not done[r]:
                        rows[r].append(t)
            if done.all():
                steps.close()
                break
        for i, row in zip(group, rows):
            out[i] = row
    return out if batch else out[0]


# ---- text: stop strings and streaming ------------------------------------------------------------


class _TextRow:
    """Turns one row's tokens into text pieces: incremental UTF-8 decoding, stop tokens, stop
    strings (the text stops before the first one), holding back a possible stop-string start."""

    def __init__(self, tokenizer, stop_tokens, stop_strings):
        self.tok, self.stop_tokens, self.stops = tokenizer, stop_tokens, [s for s in stop_strings if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.emitted, self.done, self.tokens = "", 0, False, []
        self.reason = None

    def push(self, token):
        """Add a token; return the text that became final ('' if none)."""
        if token in self.stop_tokens:
            return self.close("stop_token")
        self.tokens.append(token)
        self.text += self.decoder.decode(self.tok.decode_bytes([token]))
        return self._check()

    def _check(self):
        # a stop string can only start in the part not yet emitted, or overlap its end
        start = max(0, self.emitted - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._finish("stop_string")
        hold = max((k for s in self.stops for k in range(1, len(s))
                    if self.text.endswith(s[:k])), default=0)
        return self._emit(len(self.text) - hold)

    def _emit(self, upto):
        piece = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece

    def _finish(self, reason):
        self.done, self.reason = True, reason
        return self._emit(len(self.text))

    def close(self, reason="max_new_tokens"):
        """End of the row: flush an incomplete character (as U+FFFD) and held-back text."""
        if self.done:
            return ""
        self.text += self.decoder.decode(b"", final=True)
        piece = self._check()  # the flushed text may complete a stop string
        return piece + (self._finish(reason) if not self.done else "")


def _prompt_ids(tokenizer, prompt):
    ids = tokenizer.encode(prompt, allowed_special="all") if prompt else []
    if not ids:
        if tokenizer.eot_id is None:
            raise ValueError("empty prompt and the tokenizer has no <|endoftext|> to start from")
        ids = [tokenizer.eot_id]
    return ids


def _stop_tokens(tokenizer, stop_tokens):
    if stop_tokens is None:  # default: end of text
        return set() if tokenizer.eot_id is None else {tokenizer.eot_id}
    return set(int(t) for t in stop_tokens)


def _rows_text(model, tokenizer, prompts, stop_tokens=None, stop_strings=(), **sampling):
    """Yield (row index, text piece) as tokens of every prompt arrive (groups one after
    another); the last piece of a row comes when it stops."""
    stops = _stop_tokens(tokenizer, stop_tokens)
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    for group in _groups(ids):
        rows = [_TextRow(tokenizer, stops, stop_strings) for _ in group]
        steps = decode_steps(model, [ids[i] for i in group], **sampling)
        for tokens, _ in steps:
            for i, row, t in zip(group, rows, tokens.tolist()):
                if not row.done:
                    piece = row.push(t)
                    if piece:
                        yield i, piece
            if all(r.done for r in rows):
                steps.close()
                break
        for i, row in zip(group, rows):
            piece = row.close()
            if piece:
                yield i, piece


def stream(model, tokenizer, prompt, stop_tokens=None, stop_strings=(), **sampling):
    """Yield the completion of `prompt` (text) piece by piece as it is generated. Stops at the
    end-of-text token by default (stop_tokens=() for none), before any of `stop_strings`, or
    after max_new_tokens. Sampling options as in `decode_steps`."""
    for _, piece in _rows_text(model, tokenizer, [prompt], stop_tokens, stop_strings, **sampling):
        yield piece


def generate_text(model, tokenizer, prompt, stop_tokens=None, stop_strings=(), **sampling):
    """The completion of `prompt` (a str), or of each prompt of a list (a list of str)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    out = [[] for _ in prompts]
    for i, piece in _rows_text(model, tokenizer, prompts, stop_tokens, stop_strings, **sampling):
        out[i].append(piece)
    texts = ["".join(p) for p in out]
    return texts[0] if isinstance(prompt, str) else texts


# ---- loading ------------------------------------------------------------------------------------


def load_tokenizer(path):
    """A tokenizer from a saved tokenizer file, a `.tiktoken` rank file, or a folder holding
    GPT-2's encoder.json + vocab.bpe (or Hugging Face's vocab.json + merges.txt)."""
    from tinyllm.tokenizer import Tokenizer

    path = Path(path)
    if path.is_dir():
        for enc, bpe in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
            if (path / enc).exists() and (path / bpe).exists():
                return Tokenizer.from_gpt2(path / enc, path / bpe)
        if (path / "tokenizer.json").exists():
            return _load_tokenizer_json(path / "tokenizer.json")
        raise FileNotFoundError(f"{path}: no tokenizer here (expected encoder.json + vocab.bpe, "
                                f"vocab.json + merges.txt, or a saved tokenizer.json)")
    if not path.exists():
        raise FileNotFoundError(f"{path}: tokenizer file not found")
    if path.suffix == ".tiktoken":
        return Tokenizer.from_tiktoken(path)
    return Tokenizer.load(path)


def _load_tokenizer_json(path):
    """Our own tokenizer file, or a Hugging Face byte-level BPE tokenizer.json."""
    import json

    from tinyllm.tokenizer import Tokenizer

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    if isinstance(doc, dict) and "model" in doc and "format" not in doc:
        return Tokenizer.from_hf_json(path)
    return Tokenizer.load(path)


def _tokenizer_from_text(text):
    from tinyllm.tokenizer import Tokenizer

    return Tokenizer.from_json(text, source="the checkpoint's tokenizer")


def load_for_generation(path, tokenizer=None, device="cpu", dtype=None):
    """(model, tokenizer) ready to generate, from:
      - a training run folder (best.ckpt if present, else last.ckpt) or a .ckpt file written by
        tinyllm.checkpoint: model config, weights "model/<name>" and the tokenizer's JSON are in
        the checkpoint;
      - a Hugging Face GPT-2/Llama folder or .safetensors file (GPT.from_pretrained): the
        tokenizer comes from `tokenizer` or from GPT-2 tokenizer files in that folder.
    `tokenizer` (a path or a Tokenizer) overrides the saved one; dtype defaults to the saved one
    (float32 for Hugging Face checkpoints)."""
    from tinyllm.checkpoint import CheckpointError, load_checkpoint
    from tinyllm.model import GPT, ModelConfig

    path = Path(path)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    ckpt = path
    if path.is_dir():
        ckpt = next((path / n for n in ("best.ckpt", "last.ckpt") if (path / n).exists()), None)
    if ckpt is not None and ckpt.suffix == ".ckpt":
        meta, arrays = load_checkpoint(ckpt)
        if "model_config" not in meta:
            raise CheckpointError(f"{ckpt}: no model_config in the checkpoint's metadata")
        settings = dict(meta["model_config"], device=device)
        if dtype is not None:
            settings["dtype"] = dtype
        model = GPT(ModelConfig.from_dict(settings))
        weights = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
        if meta.get("lora"):  # a LoRA run saves base and adapters: load both, then fold
            from tinyllm.lora import LoRAConfig, apply_lora, merge_lora

            apply_lora(model, LoRAConfig.from_dict(meta["lora"]))
        try:
            model.load_state_dict(weights)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{ckpt}: weights do not fit the model config: {e}") from None
        if meta.get("lora"):
            merge_lora(model)
        if tokenizer is None:
            if not meta.get("tokenizer"):
                raise CheckpointError(f"{ckpt}: no tokenizer saved; pass one (--tokenizer)")
            tokenizer = _tokenizer_from_text(meta["tokenizer"])
    else:
        hf_dir = path if path.is_dir() else path.parent
        if not (hf_dir / "config.json").exists():
            raise FileNotFoundError(
                f"{path}: neither a run folder (best.ckpt/last.ckpt), a .ckpt file, nor a "
                f"Hugging Face checkpoint (config.json + .safetensors)")
        model = GPT.from_pretrained(path, dtype=dtype or "float32", device=device)
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(hf_dir)
            except FileNotFoundError:
                raise ValueError(f"{path}: a Hugging Face checkpoint needs a tokenizer: pass "
                                 f"--tokenizer (saved tokenizer, .tiktoken file, or a folder "
                                 f"with encoder.json + vocab.bpe)") from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}")
    return model, tokenizer


# ---- command line -------------------------------------------------------------------------------


def register(subparsers):
    p = subparsers.add_parser("generate", help="generate text from a trained model",
                              description="Generate text from a run folder, a .ckpt checkpoint "
                                          "or a Hugging Face GPT-2/Llama checkpoint folder.")
    p.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (repeat for a batch; default: start of a document)")
    p.add_argument("--max-new-tokens", type=int, default=200,
                   help="tokens to generate per prompt, >= 0 (default 200)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature, >= 0; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens, >= 0; 0 or unset: off")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: the most likely tokens up to this probability, in "
                        "(0, 1] (default off)")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens below this share of the top token's probability, in "
                        "[0, 1] (default off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 0; above 1 makes tokens already in the text less likely (default 1: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--no-eot-stop", action="store_true",
                   help="do not stop at <|endoftext|>")
    p.add_argument("--overflow", choices=("slide", "error"), default="slide",
                   help="when prompt + output exceed the context: slide the window or fail")
    p.add_argument("--shift", type=int, default=None,
                   help="positions dropped when the window slides (default context/4)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print text as it is generated (one prompt only; default on)")
    p.add_argument("--echo", action=argparse.BooleanOptionalAction, default=True,
                   help="print the prompt before the completion (default on)")
    p.add_argument("--tokenizer", default=None,
                   help="saved tokenizer, .tiktoken file, or folder with encoder.json + vocab.bpe")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default=None, help="float32, float64, float16 or bfloat16 "
                                                 "(default: the checkpoint's)")
    p.set_defaults(func=cmd_generate)
    return p


def cmd_generate(args):
    # every setting is checked before the model is loaded
    _check_sampling(args.temperature, args.top_k, args.top_p, args.min_p,
                    args.repetition_penalty, args.max_new_tokens)
    if args.shift is not None and args.shift < 1:
        raise ValueError(f"--shift: must be a positive integer, got {args.shift}")
    if args.dtype not in (None, "float32", "float64", "float16", "bfloat16"):
        raise ValueError(f"--dtype: must be one of float32, float64, float16, bfloat16, got "
                         f"{args.dtype!r}")
    if not Path(args.path).exists():
        raise FileNotFoundError(f"{args.path}: no such run folder, checkpoint or Hugging Face "
                                f"folder")
    if args.tokenizer is not None and not Path(args.tokenizer).exists():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such file or folder")
    model, tok = load_for_generation(args.path, tokenizer=args.tokenizer, device=args.device,
                                     dtype=args.dtype)
    prompts = args.prompt or [""]
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed,
                    overflow=args.overflow, shift=args.shift)
    opts = dict(stop_tokens=() if args.no_eot_stop else None, stop_strings=args.stop, **sampling)
    out = sys.stdout
    if args.stream and len(prompts) == 1:
        if args.echo:
            out.write(prompts[0])
        for piece in stream(model, tok, prompts[0], **opts):
            out.write(piece)
            out.flush()
        out.write("\n")
    else:
        texts = generate_text(model, tok, prompts, **opts)
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            if len(prompts) > 1:
                out.write(f"--- {i}\n")
            out.write((prompt if args.echo else "") + text + "\n")
    out.flush()
    return 0


def save_for_generation(out_dir, model, tokenizer, extra_meta=None):
    """Write a run folder that `load_for_generation` (and so generate, chat, eval, sft) loads:
    best.ckpt with the weights, model config and tokenizer, plus tokenizer.json and
    config.json. Written into a temporary folder beside `out_dir`, then renamed: a failure
    leaves no half-written folder."""
    import json
    import shutil
    import tempfile

    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.data import tokenizer_fingerprint

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        arrays = {f"model/{k}": backend.to_device(v, "cpu") for k, v in model.state_dict().items()}
        meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_json(),
                "tokenizer_sha256": tokenizer_fingerprint(tokenizer), **(extra_meta or {})}
        save_checkpoint(tmp / "best.ckpt", meta, arrays)
        tokenizer.save(tmp / "tokenizer.json")
        (tmp / "config.json").write_text(json.dumps({"model": model.config.to_dict(),
                                                     **(extra_meta or {})}, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
