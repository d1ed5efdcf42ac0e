"""`tinyllm serve`, used as a client would: replies equal an independent greedy decode, plain
and streamed agree, the OpenAI client works unchanged, bad requests get their 400 (and 401,
404, 405), 16 concurrent streams each get their own text, and a client that hangs up frees
its slot at once."""

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from autograd import manual_seed
from tinyllm import chat, cli, serve
from tinyllm.generate import save_for_generation
from tinyllm.model import GPT
from tinyllm.tokenizer import Tokenizer

TOK = chat.add_chat_tokens(Tokenizer.bytes(special_tokens=["<|endoftext|>"]))
EOT, IM_START, IM_END = (TOK.special_tokens[t] for t in ("<|endoftext|>", "<|im_start|>",
                                                          "<|im_end|>"))
SPECIALS = set(TOK.special_tokens.values())
CONTEXT = 96


def tiny_model():
    # float64 and a wide init: logits far apart, so a batch of rows and a row alone make
    # the same greedy choices (they differ only by rounding)
    # the embedding rows of control bytes and of bytes >= 128 are shrunk (the LM head is tied
    # to them), so replies are mostly printable ASCII and differ visibly from one another
    manual_seed(0)
    model = GPT.from_preset("laptop", n_layers=1, d_model=32, n_heads=2,
                            vocab_size=TOK.vocab_size, context_length=CONTEXT, dtype="float64",
                            init_std=0.3)
    w = model.tok_emb.weight.data
    w[:32] *= 0.05
    w[128:256] *= 0.05
    return model


MODEL = tiny_model()


def prompt_ids(messages):
    """The chat template written out by hand for the byte tokenizer."""
    ids = [EOT]
    for m in messages:
        ids += [IM_START] + list(f"{m['role']}\n".encode()) + list(m["content"].encode())
        ids += [IM_END] + list(b"\n")
    return ids + [IM_START] + list(b"assistant\n")


def reference(messages, max_tokens):
    """(text, finish_reason, completion tokens) by greedy full forwards, no cache."""
    ids = prompt_ids(messages)
    out = []
    while len(out) < max_tokens and len(ids) + len(out) <= CONTEXT:
        logits, _ = MODEL(np.array([ids + out]))
        t = int(np.argmax(logits.data[0, -1]))
        if t in SPECIALS:
            return bytes(out).decode("utf-8", "replace"), "stop", len(out)
        out.append(t)
    return bytes(out).decode("utf-8", "replace"), "length", len(out)


def user(text):
    return [{"role": "user", "content": text}]


# ---- the server in a thread, and a client -------------------------------------------------

def start(model=MODEL, **settings):
    server = serve.make_server(model, TOK, model_id="tiny", port=0, **settings)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return server


def stop(server):
    server.shutdown()
    server.server_close()
    server.engine.close()


@pytest.fixture(scope="module")
def server():
    s = start(max_tokens_limit=64, max_batch=8, max_body_bytes=4096, max_messages=8)
    yield s
    stop(s)


def request(server, method, path, body=None, headers=None, raw=None):
    """(status, parsed JSON or text) of one request."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    kind = resp.getheader("Content-Type", "")
    return resp.status, json.loads(text) if kind.startswith("application/json") else text


def complete(server, **body):
    status, out = request(server, "POST", "/v1/chat/completions", dict(body))
    assert status == 200, out
    return out


def stream_events(server, **body):
    """The `data:` payloads of a streamed completion, read with urllib line by line."""
    req = urllib.request.Request(f"{server.url}/v1/chat/completions", method="POST",
                                 data=json.dumps(dict(body, stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        for line in resp:
            line = line.decode().rstrip("\n")
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
            else:
                assert line == "", line
    return events


def streamed_text(events):
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]
                   if e["choices"])


def wait_idle(server, seconds=2.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.engine.active == 0 and server.engine.queued == 0:
            return True
        time.sleep(0.01)
    return False


# ---- replies ---------------------------------------------------------------------------

def test_plain_reply_equals_greedy_reference(server):
    messages = user("hello there")
    text, reason, n = reference(messages, 20)
    out = complete(server, model="anything", messages=messages, temperature=0, max_tokens=20)
    assert out["object"] == "chat.completion" and out["model"] == "tiny"
    assert out["id"].startswith("chatcmpl-") and isinstance(out["created"], int)
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] == reason
    p = len("hello there") + 20  # see prompt_ids: 20 template tokens around the text
    assert out["usage"] == {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}


def test_streamed_reply_equals_plain_reply(server):
    messages = [{"role": "system", "content": "be brief"}] + user("what is a cat?")
    plain = complete(server, messages=messages, temperature=0, max_tokens=30)
    events = stream_events(server, messages=messages, temperature=0, max_tokens=30,
                           stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    first, *middle, last, usage = events[:-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == first["id"]
               for e in events[:-1])
    assert all(e["choices"][0]["finish_reason"] is None for e in [first] + middle)
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": plain["choices"][0]["finish_reason"]}
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]
    assert streamed_text(events) == plain["choices"][0]["message"]["content"]


def test_max_tokens_ends_with_length(server):
    messages = user("count")
    text, _, _ = reference(messages, 3)
    out = complete(server, messages=messages, temperature=0, max_tokens=3)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["message"]["content"] == text
    assert out["usage"]["completion_tokens"] == 3
    events = stream_events(server, messages=messages, temperature=0, max_tokens=3)
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert streamed_text(events) == text


def test_the_context_ends_a_reply_with_length(server):
    messages = user("x" * (CONTEXT - 22))  # the prompt leaves room for 3 tokens
    text, reason, n = reference(messages, 64)
    out = complete(server, messages=messages, temperature=0)
    assert (n, reason) == (3, "length")
    assert out["choices"][0]["message"]["content"] == text
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 3


def test_stop_string_cuts_the_reply(server):
    messages = user("hello there")
    text, _, _ = reference(messages, 20)
    assert len(text) >= 6
    stop = text[3:5]
    want = text[:text.find(stop)]
    for s in (stop, ["\u2603never", stop]):
        out = complete(server, messages=messages, temperature=0, max_tokens=20, stop=s)
        assert out["choices"][0]["message"]["content"] == want
        assert out["choices"][0]["finish_reason"] == "stop"
        assert streamed_text(stream_events(server, messages=messages, temperature=0,
                                           max_tokens=20, stop=s)) == want


def test_seeded_sampling_repeats(server):
    body = dict(messages=user("tell me"), temperature=1.0, top_p=0.9, max_tokens=12, seed=7)
    a, b = complete(server, **body), complete(server, **body)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]


def test_models_and_health(server):
    status, out = request(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in out["data"]] == ["tiny"]
    assert out["data"][0]["object"] == "model"
    assert request(server, "GET", "/v1/models/tiny")[1]["id"] == "tiny"
    assert request(server, "GET", "/v1/models/other")[0] == 404
    status, out = request(server, "GET", "/health")
    assert status == 200 and out["status"] == "ok"
    status, page = request(server, "GET", "/")
    assert status == 200 and "/v1/chat/completions" in page


def test_openai_client_plain_and_streamed(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = user("hi")
    text, reason, n = reference(messages, 16)
    out = client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                         max_tokens=16)
    assert out.choices[0].message.content == text
    assert out.choices[0].finish_reason == reason
    assert out.usage.completion_tokens == n
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                                 max_tokens=16, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=4)


# ---- refusals ----------------------------------------------------------------------------

OK = user("hi")
BAD = [  # (body, param, words the message must hold)
    (b"{not json", None, "not valid JSON"),
    (b"\xff\xfe", None, "not valid JSON"),
    ([1, 2], None, "must be a JSON object"),
    ({}, "messages", "required"),
    ({"messages": []}, "messages", "at least one"),
    ({"messages": "hi"}, "messages", "must be an array"),
    ({"messages": ["hi"]}, "messages[0]", "must be an object"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "robot"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "must be a string"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "integer"),
    ({"messages": OK + [{"role": "system", "content": "x"}]}, "messages[1].role", "first"),
    ({"messages": OK * 9}, "messages", "the limit is 8"),
    ({"messages": user("x" * 200)}, "messages", "context of 96"),
    ({"messages": OK, "model": 5}, "model", "must be a string"),
    ({"messages": OK, "temperature": "hot"}, "temperature", "must be a number"),
    ({"messages": OK, "temperature": -1}, "temperature", "[0, 2]"),
    ({"messages": OK, "top_p": 0}, "top_p", "(0, 1]"),
    ({"messages": OK, "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"messages": OK, "max_tokens": 2.5}, "max_tokens", "must be an integer"),
    ({"messages": OK, "max_tokens": True}, "max_tokens", "must be an integer"),
    ({"messages": OK, "max_tokens": 65}, "max_tokens", "at most 64"),
    ({"messages": OK, "max_completion_tokens": 100}, "max_completion_tokens", "at most 64"),
    ({"messages": OK, "stop": 3}, "stop", "string or an array"),
    ({"messages": OK, "stop": ["a", 1]}, "stop", "string or an array"),
    ({"messages": OK, "stop": list("abcde")}, "stop", "the limit is 4"),
    ({"messages": OK, "seed": -1}, "seed", ">= 0"),
    ({"messages": OK, "stream": "yes"}, "stream", "must be a boolean"),
    ({"messages": OK, "stream_options": 1}, "stream_options", "must be an object"),
    ({"messages": OK, "n": 2}, "n", "at most 1"),
]


@pytest.mark.parametrize("body, param, words", BAD)
def test_bad_request_gets_400(server, body, param, words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, out = request(server, "POST", "/v1/chat/completions", raw=raw)
    assert status == 400, out
    err = out["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert words in err["message"], err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_body_over_the_limit_gets_400_and_the_server_goes_on(server):
    raw = json.dumps({"messages": user("x" * 5000)}).encode()
    status, out = request(server, "POST", "/v1/chat/completions", raw=raw)
    assert status == 400 and "limit of 4096 bytes" in out["error"]["message"]
    out = complete(server, messages=OK, temperature=0, max_tokens=2)
    assert out["usage"]["completion_tokens"] == 2


def test_content_length_is_required(server):
    host, port = server.server_address[:2]
    for head in (b"", b"Content-Length: -3\r\n", b"Content-Length: ten\r\n"):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + head
                         + b"\r\n")
            reply = b""
            while b"}}" not in reply:
                reply += sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 400") and b"Content-Length header" in reply


def test_paths_and_methods(server):
    assert request(server, "GET", "/nowhere")[0] == 404
    assert request(server, "POST", "/v1/completions", {"prompt": "x"})[0] == 404
    for method, path in (("GET", "/v1/chat/completions"), ("POST", "/v1/models"),
                         ("DELETE", "/health"), ("PUT", "/")):
        status, out = request(server, method, path)
        assert status == 405 and out["error"]["code"] == "method_not_allowed"


def test_api_key():
    s = start(api_key="sesame")
    try:
        good = {"Authorization": "Bearer sesame"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            status, out = request(s, "POST", "/v1/chat/completions", {"messages": OK}, headers)
            assert status == 401 and out["error"]["code"] == "invalid_api_key"
            assert request(s, "GET", "/v1/models", headers=headers)[0] == 401
        status, out = request(s, "POST", "/v1/chat/completions",
                              {"messages": OK, "temperature": 0, "max_tokens": 2}, good)
        assert status == 200 and out["usage"]["completion_tokens"] == 2
        assert request(s, "GET", "/health")[0] == 200  # the page and health need no key
    finally:
        stop(s)


# ---- many clients, and clients that leave ---------------------------------------------------

@pytest.mark.parametrize("max_batch", [16, 4])
def test_sixteen_concurrent_streams_each_get_their_own_reply(max_batch):
    s = start(max_batch=max_batch)  # 4: most requests wait in the queue for a slot
    try:
        # lengths repeat, so some prompts share a prefill batch and others join mid-way
        prompts = ("cat dog sun sea red blue tree bird fish moon star rain wind fire snow "
                   "lake").split()
        alone = [complete(s, messages=user(p), temperature=0, max_tokens=8)
                 ["choices"][0]["message"]["content"] for p in prompts]
        assert alone[:3] == [reference(user(p), 8)[0] for p in prompts[:3]]
        assert len(set(alone)) >= 12  # replies that tell the requests apart
        got, errors = [None] * 16, []
        barrier = threading.Barrier(16)

        def client(i):
            try:
                barrier.wait(timeout=10)
                got[i] = streamed_text(stream_events(s, messages=user(prompts[i]),
                                                     temperature=0, max_tokens=8))
            except Exception as e:  # reported below, with the client's number
                errors.append((i, repr(e)))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert got == alone
        assert s.engine.failed == 0 and wait_idle(s)
    finally:
        stop(s)


def run_jobs(engine, jobs, submit_later=()):
    """Drive the engine by hand until every job ends; `submit_later` holds (round, job)
    pairs submitted before that round. Returns {job: (text, finish_reason)}."""
    later = dict(submit_later)
    everyone = list(jobs) + list(later.values())
    for job in jobs:
        engine.submit(job)
    texts = {job: [] for job in everyone}
    for n in range(1000):
        if n in later:
            engine.submit(later[n])
        engine.step()
        for job in everyone:
            while not job.events.empty():
                kind, value = job.events.get()
                if kind == "text":
                    texts[job].append(value)
        if all(job.finish_reason for job in everyone):
            return {job: ("".join(texts[job]), job.finish_reason) for job in everyone}
    raise AssertionError("the jobs did not end")


def test_rows_of_one_batch_each_get_their_own_reply():
    engine = serve.Engine(MODEL, TOK, max_batch=8)
    words = ["cat", "dog", "sun", "blue", "tree", "bird"]  # two prompt lengths: two batches
    stop = reference(user("sun"), 8)[0][2:4]
    settings = [dict(max_tokens=8), dict(max_tokens=2), dict(max_tokens=8, stop=[stop]),
                dict(max_tokens=8), dict(max_tokens=5), dict(max_tokens=8)]
    jobs = [engine.new_job(prompt_ids(user(w)), temperature=0, **kw)
            for w, kw in zip(words, settings)]
    out = run_jobs(engine, jobs)
    assert engine.peak_rows == 3 and engine.active == 0
    for w, kw, job in zip(words, settings, jobs):
        text, reason, n = reference(user(w), kw["max_tokens"])
        if "stop" in kw:
            text, reason = text[:text.find(stop)], "stop"
        else:
            assert job.completion_tokens == n
        assert out[job] == (text, reason), w


def test_rows_that_reach_one_position_merge_into_one_batch():
    engine = serve.Engine(MODEL, TOK, max_batch=8)
    # "cat" is prefilled at 23 positions and after one round sits at 24: where "blue" starts
    first = engine.new_job(prompt_ids(user("cat")), 10, temperature=0)
    second = engine.new_job(prompt_ids(user("blue")), 10, temperature=0)
    assert len(second.prompt_ids) == len(first.prompt_ids) + 1
    out = run_jobs(engine, [first], submit_later=[(1, second)])
    assert engine.peak_rows == 2
    assert out[first] == reference(user("cat"), 10)[:2]
    assert out[second] == reference(user("blue"), 10)[:2]


def test_a_model_with_dropout_is_served_in_eval_mode():
    manual_seed(1)
    model = GPT.from_preset("laptop", n_layers=1, d_model=32, n_heads=2, dropout=0.5,
                            vocab_size=TOK.vocab_size, context_length=CONTEXT,
                            dtype="float64", init_std=0.3)
    assert model.training
    s = start(model)
    try:
        replies = {complete(s, messages=user("cat"), temperature=0, max_tokens=12)
                   ["choices"][0]["message"]["content"] for _ in range(3)}
        model.eval()
        ids, out = prompt_ids(user("cat")), []
        for _ in range(12):  # the greedy reply of the model without dropout
            logits, _ = model(np.array([ids + out]))
            t = int(np.argmax(logits.data[0, -1]))
            if t in SPECIALS:
                break
            out.append(t)
        assert replies == {bytes(out).decode("utf-8", "replace")}
    finally:
        stop(s)


@pytest.fixture
def slow_server(monkeypatch):
    """A server whose every forward takes a few milliseconds, so a reply lasts long enough
    to hang up in the middle of it."""
    forward = serve._forward

    def slow(*args):
        time.sleep(0.005)
        return forward(*args)

    monkeypatch.setattr(serve, "_forward", slow)
    s = start(max_tokens_limit=90)
    yield s
    stop(s)


def raw_post(server, body):
    host, port = server.server_address[:2]
    sock = socket.create_connection((host, port), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: " + str(len(data)).encode()
                 + b"\r\n\r\n" + data)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_frees_its_slot(slow_server, stream):
    s, e = slow_server, slow_server.engine
    messages = user("count")  # a reply of 70 tokens: at least 0.35 s
    assert reference(messages, 70)[1] == "length"
    before = e.tokens_generated
    sock = raw_post(s, {"messages": messages, "temperature": 0, "max_tokens": 70,
                        "stream": stream})
    if stream:
        seen = b""
        while seen.count(b"data: ") < 3:  # the role chunk and two pieces of text
            seen += sock.recv(4096)
    else:
        deadline = time.monotonic() + 5
        while e.tokens_generated - before < 3 and time.monotonic() < deadline:
            time.sleep(0.002)
    sock.close()
    assert wait_idle(s, 0.3), "the cancelled job still holds its slot"
    assert e.cancelled >= 1
    assert e.tokens_generated - before < 70
    out = complete(s, messages=OK, temperature=0, max_tokens=4)
    assert out["usage"]["completion_tokens"] == 4 and e.failed == 0


def test_a_failing_step_ends_its_request_not_the_server(monkeypatch):
    forward, calls = serve._forward, []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return forward(*args)

    monkeypatch.setattr(serve, "_forward", fails_once)
    s = start()
    try:
        status, out = request(s, "POST", "/v1/chat/completions",
                              {"messages": OK, "max_tokens": 4})
        assert status == 500 and out["error"]["type"] == "server_error"
        assert "out of memory" in out["error"]["message"]
        out = complete(s, messages=OK, temperature=0, max_tokens=4)
        assert out["choices"][0]["message"]["content"] == reference(OK, 4)[0]
        status, health = request(s, "GET", "/health")
        assert status == 200 and health["failed"] == 1 and wait_idle(s)
    finally:
        stop(s)


# ---- the command line ------------------------------------------------------------------------

def test_command_line_serves_a_run_folder(tmp_path):
    run = save_for_generation(tmp_path / "my-chat", MODEL, TOK)
    proc = subprocess.Popen([sys.executable, "-m", "tinyllm", "serve", str(run), "--port", "0",
                             "--max-batch", "2"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # "serving my-chat at http://127.0.0.1:PORT/ ..."
        url = re.search(r"at (http://[\d.]+:\d+)/", line).group(1)
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as resp:
            assert [m["id"] for m in json.load(resp)["data"]] == ["my-chat"]
        req = urllib.request.Request(url + "/v1/chat/completions", method="POST",
                                     data=json.dumps({"messages": user("cat"), "temperature": 0,
                                                      "max_tokens": 8}).encode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            reply = json.load(resp)["choices"][0]["message"]["content"]
        assert reply == reference(user("cat"), 8)[0]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def test_command_line_refuses_bad_settings_before_loading(tmp_path, capsys):
    for argv, words in ((["serve", str(tmp_path / "missing")], "no such run folder"),
                        (["serve", str(tmp_path), "--port", "70000"], "--port"),
                        (["serve", str(tmp_path), "--max-batch", "0"], "--max-batch"),
                        (["serve", str(tmp_path), "--device", "tpu"], "--device")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_command_line_refuses_a_taken_port(tmp_path, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        assert cli.main(["serve", str(tmp_path), "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert "cannot listen" in err and err.count("\n") == 1
    finally:
        taken.close()
