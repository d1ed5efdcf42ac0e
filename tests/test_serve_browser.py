"""The chat page in a real browser: headless Chromium loads it from a test server, a message is
typed and sent, and the streamed reply that appears is the server's greedy answer.

The browser is driven through the Chrome DevTools protocol over --remote-debugging-pipe
(JSON messages ending in a NUL byte on file descriptors 3 and 4), so no websocket client is
needed. Skipped where no chromium binary is installed."""

import json
import os
import shutil
import subprocess
import threading
import time

import pytest

from tinyllm import chat, serve
from tinyllm.tokenizer import Tokenizer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium or chromium-browser "
                                                         "binary (apt-get install chromium)")


class Browser:
    """Headless Chromium and one page, driven over the DevTools pipe."""

    def __init__(self, user_data_dir, width=900, height=700):
        read_here, write_there = os.pipe()  # the browser writes to its fd 4
        read_there, write_here = os.pipe()  # and reads from its fd 3
        flags = ["--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                 "--remote-debugging-pipe", f"--user-data-dir={user_data_dir}",
                 f"--window-size={width},{height}"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run its sandbox as root

        def child_fds():
            os.dup2(read_there, 3)
            os.dup2(write_there, 4)

        self.proc = subprocess.Popen([CHROMIUM, *flags, "about:blank"], preexec_fn=child_fds,
                                     pass_fds=(3, 4),  # kept after preexec_fn
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(read_there)
        os.close(write_there)
        self.inp, self.out = os.fdopen(read_here, "rb"), os.fdopen(write_here, "wb")
        self.next_id, self.buffer, self.session = 0, b"", None

    def call(self, method, **params):
        """Send one command and return its result (events that arrive meanwhile are dropped)."""
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        self.out.write(json.dumps(msg).encode() + b"\0")
        self.out.flush()
        while True:
            while b"\0" not in self.buffer:
                data = self.inp.read1(65536)
                if not data:
                    raise RuntimeError(f"chromium closed the pipe (exit {self.proc.poll()})")
                self.buffer += data
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url):
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]

    def eval(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, seconds=20):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self):
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.inp.close()
        self.out.close()


@pytest.fixture
def server():
    from test_serve import tiny_model  # the same tiny float64 chat model

    tok = chat.add_chat_tokens(Tokenizer.bytes(special_tokens=["<|endoftext|>"]))
    s = serve.make_server(tiny_model(), tok, model_id="tiny", port=0)
    threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True).start()
    yield s
    s.shutdown()
    s.server_close()
    s.engine.close()


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


def api_reply(server, messages, **settings):
    import http.client

    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", "/v1/chat/completions",
                 json.dumps(dict(messages=messages, **settings)), {})
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out["choices"][0]["message"]["content"]


SEND = """(() => {
  document.getElementById("temperature").value = "0";
  document.getElementById("max_tokens").value = "%d";
  document.getElementById("system").value = %s;
  document.getElementById("input").value = %s;
  document.getElementById("send").click();
  return true;
})()"""
DONE = "document.querySelectorAll('.msg.assistant[data-done]').length"
REPLIES = "[...document.querySelectorAll('.msg.assistant')].map(d => d.textContent)"


def test_page_streams_a_reply_and_keeps_the_conversation(server, browser):
    browser.open(server.url + "/")
    browser.wait_for("document.getElementById('model')?.textContent.startsWith('tiny')")
    browser.eval(SEND % (12, json.dumps("be brief"), json.dumps("cat")))
    browser.wait_for(f"{DONE} == 1")
    system = [{"role": "system", "content": "be brief"}]
    first = api_reply(server, system + [{"role": "user", "content": "cat"}], temperature=0,
                      max_tokens=12)
    assert first and browser.eval(REPLIES) == [first]
    assert "tokens/s" in browser.eval("document.getElementById('speed').textContent")

    # a second message is sent with the first turn: the page keeps the conversation
    browser.eval(SEND % (12, json.dumps("be brief"), json.dumps("dog")))
    browser.wait_for(f"{DONE} == 2")
    second = api_reply(server, system + [{"role": "user", "content": "cat"},
                                         {"role": "assistant", "content": first},
                                         {"role": "user", "content": "dog"}],
                       temperature=0, max_tokens=12)
    assert browser.eval(REPLIES) == [first, second]

    # reset forgets the turns
    browser.eval("document.getElementById('reset').click(), true")
    assert browser.eval(REPLIES) == []
    browser.eval(SEND % (12, json.dumps("be brief"), json.dumps("cat")))
    browser.wait_for(f"{DONE} == 1")
    assert browser.eval(REPLIES) == [first]
    assert server.engine.failed == 0
