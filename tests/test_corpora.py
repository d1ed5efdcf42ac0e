"""`tinyllm data get/list` and `corpus_path`, against a local HTTP server (never the internet):
download, cache hit, hash mismatch, HTTP errors, offline."""

import dataclasses
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest

from tinyllm import corpora
from tinyllm.cli import main
from tinyllm.data import load_corpus, read_documents

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BODY = "First Citizen:\nBefore we proceed any further, hear me speak.\n".encode() * 50


class Server:
    """A local HTTP server in a thread: `routes` maps a path to (status, body bytes)."""

    def __init__(self):
        self.routes = {}
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                status, body = server.routes.get(self.path, (404, b"not found"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TINYLLM_DEBUG", raising=False)
    monkeypatch.setattr(corpora, "TIMEOUT", 5)
    return tmp_path / "cache" / "corpora"


def register(monkeypatch, url, body=BODY):
    """Point the tinyshakespeare entry at `url`, expecting `body`."""
    entry = dataclasses.replace(corpora.CORPORA["tinyshakespeare"], url=url,
                                sha256=hashlib.sha256(body).hexdigest(), size=len(body))
    monkeypatch.setitem(corpora.CORPORA, "tinyshakespeare", entry)
    return entry


def run_cli(argv, capsys):
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    return err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err


def test_registry_entry_matches_the_shared_copy():
    path = SHARED / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(f"shared data file not found: {path}")
    entry = corpora.CORPORA["tinyshakespeare"]
    raw = path.read_bytes()
    assert entry.size == len(raw) == 1_115_394
    assert entry.sha256 == hashlib.sha256(raw).hexdigest()
    sums = dict(line.split()[::-1] for line in (SHARED / "SHA256SUMS").read_text().splitlines()
                if line.strip())
    assert sums["tinyshakespeare.txt"] == entry.sha256
    assert entry.url == ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                         "tinyshakespeare/input.txt")


def test_get_downloads_verifies_and_then_hits_the_cache(server, cache, monkeypatch, capsys):
    server.routes["/input.txt"] = (200, BODY)
    register(monkeypatch, server.url + "/input.txt")
    with pytest.raises(FileNotFoundError, match="run `tinyllm data get tinyshakespeare`"):
        load_corpus("tinyshakespeare")
    code, out, err = run_cli(["data", "get", "tinyshakespeare"], capsys)
    assert code == 0, err
    path = cache / "tinyshakespeare.txt"
    assert out == f"{path}\n" and path.read_bytes() == BODY
    assert sorted(p.name for p in cache.iterdir()) == ["tinyshakespeare.txt"]  # no temp left
    assert server.requests == ["/input.txt"]
    code, out, _ = run_cli(["data", "get", "tinyshakespeare"], capsys)
    assert code == 0 and out == f"{path}\n"
    assert server.requests == ["/input.txt"]  # served from the cache
    assert corpora.corpus_path("tinyshakespeare") == path
    assert load_corpus("tinyshakespeare") == [("tinyshakespeare.txt", BODY.decode())]
    code, out, _ = run_cli(["data", "list"], capsys)
    assert code == 0 and "tinyshakespeare" in out and "[downloaded]" in out


def test_hash_mismatch_deletes_the_download(server, cache, monkeypatch, capsys):
    tampered = BODY[:-2] + b"?\n"  # same size, other bytes
    server.routes["/input.txt"] = (200, tampered)
    register(monkeypatch, server.url + "/input.txt")
    code, out, err = run_cli(["data", "get", "tinyshakespeare"], capsys)
    progress, error = err.split("\n", 1)  # the progress line, then one line of error
    assert code == 2 and out == "" and progress.startswith("downloading") and one_line(error)
    assert "does not verify" in error and "--data PATH" in error
    assert list(cache.iterdir()) == []  # neither the file nor a temporary one


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_is_one_line_naming_the_url(server, cache, monkeypatch, capsys, status):
    server.routes["/input.txt"] = (status, b"nope")
    url = server.url + "/input.txt"
    register(monkeypatch, url)
    code, _, err = run_cli(["data", "get", "tinyshakespeare"], capsys)
    assert code == 2 and one_line(err)
    assert f"HTTP {status}" in err and url in err and "--data PATH" in err
    assert list(cache.iterdir()) == []


def test_offline_is_one_line_naming_the_url(cache, monkeypatch, capsys):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/input.txt"
    register(monkeypatch, url)
    code, _, err = run_cli(["data", "get", "tinyshakespeare"], capsys)
    assert code == 2 and one_line(err)
    assert url in err and "offline?" in err and "--data PATH" in err


def test_corrupt_cached_file_is_deleted_and_fetched_again(server, cache, monkeypatch, capsys):
    server.routes["/input.txt"] = (200, BODY)
    register(monkeypatch, server.url + "/input.txt")
    cache.mkdir(parents=True)
    path = cache / "tinyshakespeare.txt"
    path.write_bytes(BODY[:100])  # a truncated earlier download
    with pytest.raises(corpora.CorpusError, match="does not match its SHA-256"):
        corpora.corpus_path("tinyshakespeare")
    assert not path.exists()
    path.write_bytes(BODY[:100])
    assert corpora.corpus_path("tinyshakespeare", download=True, quiet=True) == path
    assert path.read_bytes() == BODY and server.requests == ["/input.txt"]


def test_get_to_a_folder_and_bad_arguments(server, cache, monkeypatch, capsys, tmp_path):
    server.routes["/input.txt"] = (200, BODY)
    register(monkeypatch, server.url + "/input.txt")
    target = tmp_path / "mine"
    code, _, err = run_cli(["data", "get", "tinyshakespeare", "--to", str(target)], capsys)
    assert code == 2 and one_line(err) and f"--to: no such folder: {target}" in err
    target.mkdir()
    code, out, err = run_cli(["data", "get", "tinyshakespeare", "--to", str(target), "-q"],
                             capsys)
    assert code == 0 and err == ""
    assert out == f"{target / 'tinyshakespeare.txt'}\n"
    assert read_documents(target / "tinyshakespeare.txt") == [("tinyshakespeare.txt",
                                                               BODY.decode())]
    assert not cache.exists()  # --to bypasses the cache
    (target / "tinyshakespeare.txt").write_text("my own edited copy")
    code, _, err = run_cli(["data", "get", "tinyshakespeare", "--to", str(target)], capsys)
    assert code == 2 and one_line(err) and "exists but is not the tinyshakespeare corpus" in err
    assert (target / "tinyshakespeare.txt").read_text() == "my own edited copy"  # kept
    assert server.requests == ["/input.txt"]
    code, _, err = run_cli(["data", "get", "wikipedia"], capsys)
    assert code == 2 and one_line(err) and "unknown corpus 'wikipedia'" in err
    code, _, err = run_cli(["data"], capsys)
    assert code == 2 and one_line(err)


def test_recipes_name_the_corpus_and_resolve_through_the_cache(cache, monkeypatch):
    from tinyllm.train import read_config_file
    examples = Path(__file__).resolve().parents[1] / "examples"
    for name in ("shakespeare_char.toml", "shakespeare_char_gpu.toml"):
        assert read_config_file(examples / name)["data"] == "tinyshakespeare"
    with pytest.raises(FileNotFoundError) as info:
        load_corpus("tinyshakespeare")
    assert "\n" not in str(info.value) and "tinyllm data get tinyshakespeare" in str(info.value)
    shared = SHARED / "tinyshakespeare.txt"
    if not shared.exists():
        pytest.skip(f"shared data file not found: {shared}")
    cache.mkdir(parents=True)
    (cache / "tinyshakespeare.txt").write_bytes(shared.read_bytes())  # as `data get` leaves it
    docs = load_corpus("tinyshakespeare")
    assert docs == read_documents(shared)  # same name and text: the same token cache
    assert len(docs) == 1 and len(docs[0][1]) == 1_115_394
