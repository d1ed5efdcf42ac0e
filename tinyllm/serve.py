"""`tinyllm serve`: an OpenAI-compatible chat endpoint, streaming included, and a chat page.

    POST /v1/chat/completions   messages, temperature, top_p, max_tokens, stop, seed, stream
                                (and stream_options.include_usage); `model` may name
                                anything, the one model answers
    GET  /v1/models             the one model served (its id: the run folder's name)
    GET  /health                {"status": "ok", ...} and the worker's queue and slots
    GET  /                      the chat page (tinyllm/static/chat.html)

Built on the standard library's `http.server.ThreadingHTTPServer`: one thread per connection,
a few hundred lines, no web framework to install for a server of this size. Bind it to
127.0.0.1 (the default) or put a real proxy in front of it.

One model, one worker. The model and its caches are not safe to share between threads, so the
HTTP threads only parse and check requests; the generation itself is a `Job` in a queue that a
single worker thread (`Engine`) serves:

    admit   queued jobs take free slots (at most max_batch rows decode at once); jobs with
            prompts of equal length are prefilled together as one batch, a "cohort" with one
            KV cache (the cache holds one length for all its rows, so rows of a cohort must
            share their position)
    step    every cohort chooses its rows' next tokens, each row with its own sampling
            settings and random generator, then feeds them in one forward pass
    retire  rows that stopped, reached their budget or were cancelled leave their cohort at
            once (their cache rows are dropped) and free their slots
    merge   cohorts that reached the same position join into one (continuous batching of the
            rows that share a step)

A row's tokens never mix with another's: each row has its own cache row, text decoder and
generator, and a batched forward computes every row as it would alone. In floating point
"as it would alone" holds to rounding: a BLAS product over B rows may sum in another order
than over one row, so float32 logits agree to about 1e-6 relative, and a greedy choice between
two tokens whose logits tie that closely may differ. `--max-batch 1` decodes every row on its own
(jobs still interleave step by step), which makes temperature-0 replies bit-for-bit
independent of the traffic.

A reply ends at `<|im_end|>` or any other special token (finish_reason "stop"), before a stop
string ("stop"), or at max_tokens or the end of the context ("length"). usage counts the
rendered prompt's tokens and the tokens generated (the end-of-turn token is not counted).
A client that disconnects cancels its job: the HTTP thread sees the closed socket (or a failed
write) and the worker drops the row at its next step.

Requests are checked before they are queued: the body's size (MAX_BODY_BYTES), the number of
messages (MAX_MESSAGES), max_tokens (--max-tokens-limit), every field's type and range, the
roles, and the prompt against the context. A refusal is a 400 with an OpenAI-style error
object whose `param` names the field; `--api-key` guards /v1/ (401 without the key).
"""

import hmac
import json
import os
import queue
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from autograd import amp, backend
from tinyllm import chat
from tinyllm.cli import UsageError, check_int, positive_int
from tinyllm.generate import _forward, _TextRow, choose_next
from tinyllm.session import add_model_args, check_model_settings, load_chat_model, stop_ids

__all__ = ["Engine", "Job", "RequestError", "make_server", "parse_request", "register"]

# request bounds (the command line sets max_tokens_limit and max_batch)
MAX_BODY_BYTES = 1 << 20
MAX_MESSAGES = 256
MAX_STOP_STRINGS = 4
MAX_QUEUED = 256
POLL_S = 0.05  # how often a waiting HTTP thread checks that its client is still there


# ---- the worker: jobs, cohorts, one thread ---------------------------------------------------

class Job:
    """One request's generation: its prompt, settings, progress, and the events the HTTP
    thread reads: ("text", piece) as text becomes final, then ("done", finish_reason) or
    ("error", message)."""

    def __init__(self, prompt_ids, max_tokens, temperature=1.0, top_p=1.0, seed=None,
                 stop=(), tokenizer=None, stop_tokens=()):
        if len(prompt_ids) == 0 or max_tokens < 1:
            raise ValueError(f"a job needs a prompt and max_tokens >= 1, got "
                             f"{len(prompt_ids)} prompt ids and max_tokens={max_tokens}")
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = int(max_tokens)
        self.sampling = dict(temperature=float(temperature), top_p=float(top_p))
        self.rng = np.random.default_rng(seed)
        self.row = _TextRow(tokenizer, stop_tokens, tuple(stop))
        self.completion_tokens = 0
        self.finish_reason = None
        self.admitted = False  # holds one of the worker's slots
        self.events = queue.Queue()
        self._cancelled = threading.Event()

    def cancel(self):
        """Ask the worker to drop this job (the client went away); safe from any thread."""
        self._cancelled.set()

    @property
    def cancelled(self):
        return self._cancelled.is_set()


class _Cohort:
    """Rows that sit at the same position: one KV cache (batch = len(jobs)) and the logits
    (B, V) their next tokens are chosen from."""

    def __init__(self, jobs, cache, logits):
        self.jobs, self.cache, self.logits = jobs, cache, logits

    @property
    def length(self):
        return self.cache.length

    def keep(self, rows):
        """Keep only `rows` (indices): the others' cache rows are dropped."""
        if len(rows) == len(self.jobs):
            return
        c = self.cache
        c.k = [k[rows] for k in c.k]
        c.v = [v[rows] for v in c.v]
        c.batch_size = len(rows)
        self.jobs = [self.jobs[r] for r in rows]
        self.logits = self.logits[rows]

    def join(self, other):
        """Append `other`'s rows (same position) to this cohort."""
        c, o = self.cache, other.cache
        xp = backend.get_array_module(c.k[0])
        c.k = [xp.concatenate([a, b]) for a, b in zip(c.k, o.k)]
        c.v = [xp.concatenate([a, b]) for a, b in zip(c.v, o.v)]
        c.batch_size += o.batch_size
        self.jobs = self.jobs + other.jobs
        self.logits = np.concatenate([self.logits, other.logits])


class Engine:
    """The model worker: jobs from `submit` are decoded by one thread, at most `max_batch`
    rows at a time (see the module docstring). `start()` runs the thread, `close()` ends it
    (jobs still running get an error event)."""

    def __init__(self, model, tokenizer, max_batch=8, precision="float32",
                 max_queued=MAX_QUEUED):
        if not chat.has_chat_tokens(tokenizer):
            raise ValueError("the tokenizer has no chat tokens: use "
                             "tinyllm.chat.prepare_for_chat(model, tokenizer) first")
        check_int("max_batch", max_batch, low=1)
        self.model, self.tokenizer = model, tokenizer
        model.eval()  # no dropout: a reply depends on the prompt and the sampling alone
        self.max_batch, self.precision, self.max_queued = max_batch, precision, max_queued
        self.context_length = model.config.context_length
        self.stop_tokens = stop_ids(tokenizer)
        self._queue = deque()
        self._cond = threading.Condition()
        self._cohorts = []
        self._closing = False
        self._thread = None
        # counters, read by /health and the tests
        self.active = 0
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.tokens_generated = 0
        self.peak_rows = 0  # the most rows one forward has carried

    # ---- the public side (any thread) ----------------------------------------------------
    def new_job(self, prompt_ids, max_tokens, **settings):
        return Job(prompt_ids, max_tokens, tokenizer=self.tokenizer,
                   stop_tokens=self.stop_tokens, **settings)

    def submit(self, job):
        """Queue `job`; False when the queue is full (the caller answers 503)."""
        with self._cond:
            if self._closing or len(self._queue) >= self.max_queued:
                return False
            self._queue.append(job)
            self._cond.notify()
        return True

    @property
    def queued(self):
        return len(self._queue)

    @property
    def alive(self):
        return self._thread is not None and self._thread.is_alive()

    def start(self):
        self._thread = threading.Thread(target=self._run, name="tinyllm-serve-worker",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self, timeout=5.0):
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the worker thread -----------------------------------------------------------------
    def _run(self):
        with amp.autocast(self.precision):
            while self._wait():
                self.step()
        for job in [j for c in self._cohorts for j in c.jobs] + list(self._queue):
            self._end(job, "error", "the server is shutting down")
        self._cohorts, self._queue = [], deque()

    def _wait(self):
        """Wait until there is work; False when the engine is closing."""
        with self._cond:
            while not self._closing and not self._cohorts and not self._queue:
                self._cond.wait()
            return not self._closing

    def step(self):
        """One round of the worker: queued jobs take the free slots (prefilled in batches of
        equal prompt length), every row gets its next token, cohorts that meet merge. Only
        one thread may call it: the worker (`start`), or a test that drives the engine."""
        for group in _by_length(self._admit()):
            self._guarded(group, self._prefill, group)
        for cohort in list(self._cohorts):
            self._guarded(cohort.jobs, self._step, cohort)
        self._merge()

    def _admit(self):
        """Queued jobs for the free slots (cancelled ones are ended instead)."""
        with self._cond:
            new = []
            while self._queue and self.active < self.max_batch:
                job = self._queue.popleft()
                if job.cancelled:
                    self._end(job, "cancelled")
                    continue
                new.append(job)
                job.admitted = True
                self.active += 1
            return new

    def _guarded(self, jobs, fn, arg):
        """Run one prefill or step; a failure ends those jobs with an error, never the worker."""
        try:
            fn(arg)
        except Exception as e:  # a bug or an out-of-memory: report it, keep serving
            traceback.print_exc(file=sys.stderr)
            self._cohorts = [c for c in self._cohorts if not set(c.jobs) & set(jobs)]
            for job in jobs:
                if job.finish_reason is None:
                    self._end(job, "error", f"generation failed: {type(e).__name__}: {e}")

    def _prefill(self, jobs):
        """Jobs with prompts of one length become a cohort: one forward over all prompts."""
        ids = np.asarray([j.prompt_ids for j in jobs], np.int64)
        cache = self.model.new_cache(len(jobs))
        self.peak_rows = max(self.peak_rows, len(jobs))
        self._cohorts.append(_Cohort(jobs, cache, _forward(self.model, ids, cache)))

    def _step(self, cohort):
        """Choose each row's next token, retire rows that end, feed the others."""
        tokens = self._choose(cohort)
        keep = []
        for r, (job, t) in enumerate(zip(cohort.jobs, tokens)):
            if job.cancelled:
                self._end(job, "cancelled")
                continue
            piece = job.row.push(int(t))
            if job.row.reason != "stop_token":
                job.completion_tokens += 1
                self.tokens_generated += 1
            if job.row.done:
                self._end(job, "stop", piece)
            elif job.completion_tokens >= self._budget(job):
                self._end(job, "length", piece + job.row.close())
            else:
                if piece:
                    job.events.put(("text", piece))
                keep.append(r)
        cohort.keep(keep)
        if not keep:
            self._cohorts.remove(cohort)
            return
        self.peak_rows = max(self.peak_rows, len(keep))
        cohort.logits = _forward(self.model, np.asarray(tokens, np.int64)[keep][:, None],
                                 cohort.cache)

    def _choose(self, cohort):
        """Next token of every row: greedy rows by one argmax, sampled rows one by one with
        their own generator (so a seeded reply does not depend on its neighbours)."""
        z = cohort.logits
        tokens = z.argmax(axis=-1)
        for r, job in enumerate(cohort.jobs):
            if job.sampling["temperature"] > 0 and not job.cancelled:
                tokens[r] = choose_next(z[r:r + 1], None, job.rng, **job.sampling)[0]
        return tokens

    def _budget(self, job):
        """Tokens the job may generate: max_tokens, and what the context leaves."""
        return min(job.max_tokens, self.context_length - len(job.prompt_ids) + 1)

    def _merge(self):
        """Cohorts at the same position become one."""
        by_length = {}
        for cohort in self._cohorts:
            first = by_length.setdefault(cohort.length, cohort)
            if first is not cohort:
                first.join(cohort)
        self._cohorts = list(by_length.values())

    def _end(self, job, reason, detail=""):
        """Finish a job: its last text, then the done (or error) event; frees its slot."""
        if job.finish_reason is not None:
            return
        job.finish_reason = reason
        if job.admitted:
            self.active -= 1
        if reason == "error":
            self.failed += 1
            job.events.put(("error", detail))
            return
        if reason == "cancelled":
            self.cancelled += 1
        else:
            self.completed += 1
        if detail:
            job.events.put(("text", detail))
        job.events.put(("done", reason))


def _by_length(jobs):
    groups = {}
    for job in jobs:
        groups.setdefault(len(job.prompt_ids), []).append(job)
    return list(groups.values())
# ---- requests: checked in the HTTP thread, before any work ----------------------------------

class RequestError(ValueError):
    """A request the server refuses: an HTTP status and an OpenAI-style error object."""

    def __init__(self, message, param=None, code=None, status=400,
                 type="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type

    def body(self):
        return {"error": {"message": str(self), "type": self.type, "param": self.param,
                          "code": self.code}}


def _type_name(v):
    return {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _number(req, name, default, low, high, low_open=False):
    v = req.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) \
            or v > high or (v <= low if low_open else v < low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise RequestError(f"{name} must be a number in {interval}, got {json.dumps(v)}",
                           param=name, code="invalid_value")
    return float(v)


def _int(req, name, low, high=None, limit_name=None):
    v = req.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{name} must be an integer, got {_type_name(v)}", param=name,
                           code="invalid_type")
    if v < low:
        raise RequestError(f"{name} must be >= {low}, got {v}", param=name, code="invalid_value")
    if high is not None and v > high:
        raise RequestError(f"{name} must be at most {high} ({limit_name}), got {v}",
                           param=name, code="invalid_value")
    return v


def _content(m, k):
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    content = m.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"messages[{k}].content must be a string (or a list of text parts), "
                           f"got {_type_name(content)}", param=f"messages[{k}].content",
                           code="invalid_type")
    return content


def _messages(req, max_messages):
    messages = req.get("messages")
    if messages is None:
        raise RequestError("messages is required", param="messages", code="missing_required")
    if not isinstance(messages, list):
        raise RequestError(f"messages must be an array, got {_type_name(messages)}",
                           param="messages", code="invalid_type")
    if not messages:
        raise RequestError("messages must hold at least one message", param="messages",
                           code="invalid_value")
    if len(messages) > max_messages:
        raise RequestError(f"too many messages: {len(messages)}, the limit is {max_messages}",
                           param="messages", code="invalid_value")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{k}] must be an object with role and content, got "
                               f"{_type_name(m)}", param=f"messages[{k}]", code="invalid_type")
        role = m.get("role")
        if role not in chat.ROLES:
            raise RequestError(f"messages[{k}].role must be one of {', '.join(chat.ROLES)}, got "
                               f"{json.dumps(role)}", param=f"messages[{k}].role",
                               code="invalid_value")
        if role == "system" and k != 0:
            raise RequestError(f"messages[{k}]: a system message may only come first",
                               param=f"messages[{k}].role", code="invalid_value")
        out.append({"role": role, "content": _content(m, k)})
    return out


def _stop(req):
    stop = req.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError(f"stop must be a string or an array of strings, got "
                           f"{_type_name(stop)}", param="stop", code="invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop holds {len(stops)} strings, the limit is {MAX_STOP_STRINGS}",
                           param="stop", code="invalid_value")
    return stops


def parse_request(body, tokenizer, context_length, max_tokens_limit=1024,
                  max_messages=MAX_MESSAGES):
    """The settings of a chat completion request body (bytes), checked: a dict with
    prompt_ids, max_tokens, temperature, top_p, seed, stop, stream, include_usage.
    Raises RequestError naming the field and what is wrong."""
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(req, dict):
        raise RequestError(f"the body must be a JSON object, got {_type_name(req)}",
                           code="invalid_type")
    messages = _messages(req, max_messages)
    if req.get("model") is not None and not isinstance(req["model"], str):
        raise RequestError(f"model must be a string, got {_type_name(req['model'])}",
                           param="model", code="invalid_type")
    _int(req, "n", 1, 1, "one choice per request")
    stream = req.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be a boolean, got {_type_name(stream)}",
                           param="stream", code="invalid_type")
    options = req.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(f"stream_options must be an object, got {_type_name(options)}",
                           param="stream_options", code="invalid_type")
    temperature = _number(req, "temperature", 1.0, 0, 2)
    top_p = _number(req, "top_p", 1.0, 0, 1, low_open=True)
    seed = _int(req, "seed", 0)
    stop = _stop(req)
    limit = f"the server's --max-tokens-limit"
    max_tokens = _int(req, "max_tokens", 1, max_tokens_limit, limit)
    if max_tokens is None:  # the newer name of the same setting
        max_tokens = _int(req, "max_completion_tokens", 1, max_tokens_limit, limit)
    ids = chat.render(messages, tokenizer, add_generation_prompt=True)[0]
    if len(ids) > context_length:
        raise RequestError(f"the prompt takes {len(ids)} tokens with the chat template, more "
                           f"than the model's context of {context_length}", param="messages",
                           code="context_length_exceeded")
    room = context_length - len(ids) + 1
    return dict(prompt_ids=ids, max_tokens=min(max_tokens or max_tokens_limit, room),
                temperature=temperature, top_p=top_p, seed=seed, stop=stop, stream=stream,
                include_usage=bool(options.get("include_usage")))


# ---- HTTP -----------------------------------------------------------------------------------

ROUTES = {"/": ("GET",), "/health": ("GET",), "/v1/models": ("GET",),
          "/v1/chat/completions": ("POST",)}


class ChatServer(ThreadingHTTPServer):
    """The HTTP server: holds the engine and the settings its handler threads read."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog: many clients may connect at once

    def __init__(self, address, engine, model_id, api_key=None, max_tokens_limit=1024,
                 max_body_bytes=MAX_BODY_BYTES, max_messages=MAX_MESSAGES, log=None):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.engine, self.model_id, self.api_key = engine, model_id, api_key
        self.max_tokens_limit, self.max_body_bytes = max_tokens_limit, max_body_bytes
        self.max_messages, self.log = max_messages, log
        self.created = int(time.time())

    @property
    def url(self):
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    timeout = 60  # seconds a client may stall while sending its request
    server_version = "tinyllm"

    def setup(self):
        super().setup()
        # small writes (a response's head and body, one event per token) go out at once,
        # not after the client's delayed acknowledgement (~40 ms each)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # ---- dispatch --------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def _dispatch(self, method):
        path = self.path.split("?", 1)[0]
        self._body_read = self._streaming = False
        try:
            if path.startswith("/v1/models/") and method == "GET":
                self._authorize()
                return self._model(path[len("/v1/models/"):])
            allowed = ROUTES.get(path)
            if allowed is None:
                raise RequestError(f"no such path: {path}", code="not_found", status=404)
            if method not in allowed:
                self._allow = ", ".join(allowed)
                raise RequestError(f"{method} is not allowed on {path}; use {self._allow}",
                                   code="method_not_allowed", status=405)
            if path.startswith("/v1/"):
                self._authorize()
            {"/": self._page, "/health": self._health, "/v1/models": self._models,
             "/v1/chat/completions": self._completions}[path]()
        except RequestError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # a bug: the client gets a 500, the server keeps going
            traceback.print_exc(file=sys.stderr)
            if self._streaming:  # too late for a status: end the connection instead
                self.close_connection = True
                return
            self._error(RequestError(f"internal error: {type(e).__name__}", status=500,
                                     type="server_error", code="internal_error"))

    def _authorize(self):
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise RequestError("missing or wrong API key: send Authorization: Bearer KEY",
                               code="invalid_api_key", status=401)

    # ---- responses ---------------------------------------------------------------------------
    def _send(self, status, body, content_type="application/json", headers=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, e):
        if not self._body_read and (self.headers.get("Content-Length", "0").strip() != "0"
                                    or self.headers.get("Transfer-Encoding")):
            self.close_connection = True  # an unread body would be taken for the next request
        headers = []
        if e.status == 405:
            headers.append(("Allow", getattr(self, "_allow", "")))
        if e.status == 401:
            headers.append(("WWW-Authenticate", "Bearer"))
        try:
            self._send(e.status, e.body(), headers=headers)
        except OSError:
            self.close_connection = True

    def log_message(self, format, *args):
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {format % args}")

    # ---- GET -----------------------------------------------------------------------------
    def _page(self):
        page = Path(__file__).with_name("static") / "chat.html"
        self._send(200, page.read_bytes(), "text/html; charset=utf-8",
                   [("Cache-Control", "no-cache")])

    def _health(self):
        e = self.server.engine
        alive = e.alive
        self._send(200 if alive else 503, {
            "status": "ok" if alive else "the model worker has stopped",
            "model": self.server.model_id, "active": e.active, "queued": e.queued,
            "max_batch": e.max_batch, "completed": e.completed, "cancelled": e.cancelled,
            "failed": e.failed, "tokens_generated": e.tokens_generated,
            "peak_rows": e.peak_rows})

    def _model_object(self):
        return {"id": self.server.model_id, "object": "model", "created": self.server.created,
                "owned_by": "tinyllm", "context_length": self.server.engine.context_length}

    def _models(self):
        self._send(200, {"object": "list", "data": [self._model_object()]})

    def _model(self, name):
        if name != self.server.model_id:
            raise RequestError(f"no model {name!r}; this server has {self.server.model_id!r}",
                               param="model", code="model_not_found", status=404)
        self._send(200, self._model_object())

    # ---- POST /v1/chat/completions ---------------------------------------------------------
    def _body(self):
        """The request body, read whole; its size is checked against the bound first."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError("send the body with a Content-Length, not chunked",
                               code="invalid_request")
        try:
            size = int(self.headers.get("Content-Length", ""))
        except ValueError:
            size = -1
        if size < 0:
            self.close_connection = True
            raise RequestError("a Content-Length header (bytes of the body) is required",
                               code="invalid_request")
        limit = self.server.max_body_bytes
        if size > limit:
            self.close_connection = True  # the body is not read: the connection cannot go on
            raise RequestError(f"the body of {size} bytes is over the limit of {limit} bytes",
                               code="request_too_large")
        body = self.rfile.read(size)
        self._body_read = True
        return body

    def _completions(self):
        server, engine = self.server, self.server.engine
        req = parse_request(self._body(), engine.tokenizer, engine.context_length,
                            server.max_tokens_limit, server.max_messages)
        job = engine.new_job(req["prompt_ids"], req["max_tokens"],
                             temperature=req["temperature"], top_p=req["top_p"],
                             seed=req["seed"], stop=req["stop"])
        if not engine.submit(job):
            raise RequestError("the server is busy: too many requests queued, retry later",
                               code="server_busy", status=503, type="server_error")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": server.model_id}
        try:
            if req["stream"]:
                self._stream(job, head, req["include_usage"])
            else:
                self._whole(job, head)
        finally:
            job.cancel()  # a no-op for a finished job; frees the slot of an abandoned one

    def _events(self, job):
        """The job's events as they come; cancels the job when the client goes away (checked
        every POLL_S seconds, also while text keeps coming)."""
        check_at = time.monotonic() + POLL_S
        while True:
            try:
                event = job.events.get(timeout=POLL_S)
            except queue.Empty:
                event = None
            if time.monotonic() >= check_at:
                check_at = time.monotonic() + POLL_S
                if _client_gone(self.connection):
                    job.cancel()
                    self.close_connection = True
                    return
            if event is None:
                continue
            yield event
            if event[0] != "text":
                return

    def _usage(self, job):
        p, c = len(job.prompt_ids), job.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _whole(self, job, head):
        text = []
        for kind, value in self._events(job):
            if kind == "text":
                text.append(value)
            elif kind == "error":
                raise RequestError(value, status=500, type="server_error", code="internal_error")
            else:
                self._send(200, dict(head, object="chat.completion", choices=[{
                    "index": 0, "message": {"role": "assistant", "content": "".join(text)},
                    "logprobs": None, "finish_reason": value}], usage=self._usage(job)))

    def _stream(self, job, head, include_usage):
        """Server-sent events: the role, the text pieces, the finish reason, [DONE]."""
        self._streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(delta, finish_reason=None, **extra):
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
            return dict(head, object="chat.completion.chunk", choices=[choice], **extra)

        self._event(chunk({"role": "assistant", "content": ""}))
        for kind, value in self._events(job):
            if kind == "text":
                self._event(chunk({"content": value}))
            elif kind == "error":
                self._event({"error": {"message": value, "type": "server_error",
                                       "param": None, "code": "internal_error"}})
            else:
                self._event(chunk({}, value))
                if include_usage:
                    self._event(dict(head, object="chat.completion.chunk", choices=[],
                                     usage=self._usage(job)))
        if job.finish_reason in ("cancelled", None):
            return  # the client is gone: nothing more to say
        self._write(b"data: [DONE]\n\n")
        self._write(b"")  # the last chunk of the chunked encoding

    def _event(self, obj):
        self._write(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _write(self, data):
        """One chunk of the chunked encoding; an empty one ends the body."""
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _client_gone(sock):
    """Whether the peer closed the connection: readable with nothing to read. (A client
    that sent more, such as its next request, is still there.)"""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def make_server(model, tokenizer, model_id="model", host="127.0.0.1", port=0, api_key=None,
                max_tokens_limit=1024, max_batch=8, precision="float32", log=None, **limits):
    """A ChatServer bound to (host, port) (port 0: a free one) with its worker started;
    run it with `serve_forever()`, stop it with `shutdown()`, then `server_close()` and
    `engine.close()`."""
    model, tokenizer = chat.prepare_for_chat(model, tokenizer)
    server = ChatServer((host, port), None, model_id, api_key=api_key,
                        max_tokens_limit=max_tokens_limit, log=log, **limits)
    server.engine = Engine(model, tokenizer, max_batch=max_batch, precision=precision).start()
    return server


# ---- the command line ---------------------------------------------------------------------

def register(subparsers):
    p = subparsers.add_parser(
        "serve", help="serve a chat model over HTTP (OpenAI-compatible API and a chat page)",
        description="Serve a chat model (a run folder, a .ckpt checkpoint or a Hugging Face "
                    "folder) over HTTP: POST /v1/chat/completions as in the OpenAI API "
                    "(streaming included), GET /v1/models, GET /health, and a chat page at /. "
                    "Ctrl-C stops it.")
    p.add_argument("path", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, metavar="PORT",
                   help="port, 0..65535; 0 picks a free one (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("TINYLLM_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: the "
                        "TINYLLM_API_KEY environment variable, else no key)")
    p.add_argument("--max-tokens-limit", type=positive_int, default=1024, metavar="N",
                   help="the largest max_tokens a request may ask for, and the default "
                        "(default 1024; the context bounds it too)")
    p.add_argument("--max-batch", type=positive_int, default=8, metavar="B",
                   help="requests decoded at once; more wait in a queue (default 8; 1: each "
                        "row on its own, bit-for-bit independent of other requests)")
    add_model_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args):
    check_int("--port", args.port, low=0, high=65535)
    if not args.host.strip():
        raise UsageError("--host: must be an address such as 127.0.0.1, got ''")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key: must not be empty")
    check_model_settings(args)
    if args.tokenizer is not None and not Path(args.tokenizer).exists():
        raise UsageError(f"--tokenizer {args.tokenizer}: no such file or folder")
    model_id = Path(args.path).resolve().name
    log = (lambda text: print(text, file=sys.stderr, flush=True))
    try:  # the port first: a taken one is refused before the model loads
        server = ChatServer((args.host, args.port), None, model_id, api_key=args.api_key,
                            max_tokens_limit=args.max_tokens_limit, log=log)
    except OSError as e:
        raise UsageError(f"--host {args.host} --port {args.port}: cannot listen there: "
                         f"{e.strerror or e}") from None
    try:
        model, tok, precision = load_chat_model(args)
        server.engine = Engine(model, tok, max_batch=args.max_batch,
                               precision=precision).start()
    except BaseException:
        server.server_close()
        raise
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach "
              f"this port can use the model", file=sys.stderr)
    print(f"serving {model_id} at {server.url}/ (chat page), {server.url}/v1 (API); "
          f"Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    finally:
        server.server_close()
        server.engine.close()
    return 0
