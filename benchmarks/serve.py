"""Throughput of `tinyllm serve` at 1, 4 and 16 concurrent clients, against the same prompts
through tinyllm.generate's loop directly.

    python benchmarks/serve.py RUN_DIR                      # 32 requests of up to 48 tokens
    python benchmarks/serve.py RUN_DIR --requests 64 --max-tokens 32 --batches 1 8
    OPENBLAS_NUM_THREADS=1 python benchmarks/serve.py ...   # on a small shared machine

The server runs in its own process (`python -m tinyllm serve RUN_DIR --max-batch B` on a free
port), so client threads and the model worker do not share one interpreter lock. Every
configuration answers the same requests: one user message each (held-out questions of the
built-in chat tasks), chat template, greedy (temperature 0), up to --max-tokens tokens,
ending at <|im_end|> as a chat reply does. Each client sends its share of the requests one
after another over one keep-alive connection. Every row is the best of --repeat runs.

    baseline    tinyllm.generate.generate in this process, one prompt at a time (what a
                script without a server does), and all prompts in one call (generate groups
                them by length into batches)
    serve       requests/s and tokens/s (completion tokens over the wall time of the whole
                run), the mean latency of a request, how many replies equal the baseline's
                text (batched rows agree with a row alone up to float rounding, which can
                flip a greedy choice between near-tied tokens), and the most rows one
                decoding forward carried (rows share a forward only at the same position:
                prompts of equal length)

Prints a markdown table.
"""

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinyllm import chat, tasks  # noqa: E402
from tinyllm.generate import generate, load_for_generation  # noqa: E402
from tinyllm.session import stop_ids  # noqa: E402
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

def prompts(n, seed=0):
    """n one-message conversations: held-out questions of the built-in chat tasks (what the
    SFT runs learn), so replies are short answers that end at <|im_end|>."""
    mix = {t: 1.0 for t in ("add", "compare", "reverse", "sort", "count")}
    return [[{"role": "user", "content": question}]
            for _, question, _ in tasks.mixed_examples("heldout", n, seed, mix=mix)]


# ---- the baseline: generate's loop in this process ---------------------------------------------

def best_of(repeat, fn):
    """fn()'s result with the shortest time (its first element) over `repeat` runs: other
    programs on a shared machine only ever add time."""
    return min((fn() for _ in range(repeat)), key=lambda r: r[0])


def baseline(run_dir, conversations, max_tokens, device, repeat):
    model, tok = chat.prepare_for_chat(*load_for_generation(run_dir, device=device))
    ids = [chat.render(m, tok, add_generation_prompt=True)[0] for m in conversations]
    stops = stop_ids(tok)

    def one_at_a_time():
        t0 = time.perf_counter()
        out = [generate(model, p, max_new_tokens=max_tokens, temperature=0, stop_tokens=stops)
               for p in ids]
        return time.perf_counter() - t0, out

    def all_at_once():
        t0 = time.perf_counter()
        out = generate(model, ids, max_new_tokens=max_tokens, temperature=0, stop_tokens=stops)
        return time.perf_counter() - t0, out

    runs = {"one at a time": best_of(repeat, one_at_a_time),
            "all in one call": best_of(repeat, all_at_once)}
    tokens = sum(len(o) for o in runs["one at a time"][1])
    rows = {name: (seconds, [tok.decode(o) for o in out]) for name, (seconds, out) in runs.items()}
    return rows, rows["one at a time"][1], tokens


# ---- the server: a subprocess, and client threads -----------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir, max_batch, max_tokens, device):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tinyllm", "serve", str(run_dir), "--port",
                             str(port), "--max-batch", str(max_batch), "--max-tokens-limit",
                             str(max_tokens), "--device", device], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start within 60 s")


def health(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


def run_clients(port, conversations, clients, max_tokens):
    """(seconds, replies, latencies, completion tokens): every conversation asked once,
    spread over `clients` threads."""
    replies, latencies, usage = [None] * len(conversations), [], []
    errors = []

    def client(k):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for i in range(k, len(conversations), clients):
            body = json.dumps({"messages": conversations[i], "temperature": 0,
                               "max_tokens": max_tokens})
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body,
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            out = json.loads(resp.read())
            latencies.append(time.perf_counter() - t0)
            if resp.status != 200:
                errors.append(out)
                continue
            replies[i] = out["choices"][0]["message"]["content"]
            usage.append(out["usage"]["completion_tokens"])
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, the first: {errors[0]}")
    return time.perf_counter() - t0, replies, latencies, sum(usage)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16],
                    help="the server's --max-batch values to try")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs per row")
    args = ap.parse_args()
    conversations = prompts(args.requests)
    n = len(conversations)

    base, texts, base_tokens = baseline(args.run_dir, conversations, args.max_tokens,
                                        args.device, args.repeat)
    print(f"{Path(args.run_dir).name}: {n} requests, greedy, up to {args.max_tokens} tokens "
          f"each ({base_tokens} in all); device {args.device}; {cpu_model()}, "
          f"{os.cpu_count()} cores; best of {args.repeat} runs\n")
    print("| how | clients | requests/s | tokens/s | mean latency (s) | same text as baseline "
          "| largest batch so far |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (seconds, out) in base.items():
        same = sum(a == b for a, b in zip(out, texts))
        print(f"| generate, {name} | - | {n / seconds:.1f} | {base_tokens / seconds:.0f} | "
              f"{seconds / n:.3f} | {same}/{n} | - |")
    for max_batch in args.batches:
        proc, port = start_server(args.run_dir, max_batch, args.max_tokens, args.device)
        try:
            run_clients(port, conversations[:2], 1, 4)  # warm-up
            for clients in args.clients:
                seconds, replies, latencies, tokens = best_of(
                    args.repeat, lambda: run_clients(port, conversations, clients,
                                                     args.max_tokens))
                same = sum(a == b for a, b in zip(replies, texts))
                peak = health(port)["peak_rows"]
                print(f"| serve --max-batch {max_batch} | {clients} | {n / seconds:.1f} | "
                      f"{tokens / seconds:.0f} | {sum(latencies) / n:.3f} | {same}/{n} | "
                      f"{peak} |", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
