"""`tinyllm eval`: exact-match accuracy, batched greedy answers, bits per byte, a user's
pairs, and the command line's checks."""

import json
import math
import re

import numpy as np
import pytest

from autograd import manual_seed
from tinyllm import chat, cli, evaluate, session, tasks
from tinyllm.chat import render
from tinyllm.evaluate import answer, bits_per_byte, evaluate_task
from tinyllm.generate import save_for_generation
from tinyllm.model import GPT
from tinyllm.tokenizer import Tokenizer
from tinyllm.train import TrainConfig, train

TOK = chat.add_chat_tokens(Tokenizer.bytes(special_tokens=["<|endoftext|>"]))
SPECIALS = set(TOK.special_tokens.values())


def tiny_model(context_length=128, seed=0):
    manual_seed(seed)
    return GPT.from_preset("laptop", n_layers=2, d_model=32, n_heads=2, vocab_size=TOK.vocab_size,
                           context_length=context_length, dtype="float64", init_std=0.3)


MODEL = tiny_model()


def right_answer(prompt):
    """The answer of an `add` prompt, computed from its text."""
    a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt).groups())
    return str(a + b)


def controlled_answers(right):
    """A stand-in for `answer` that is right exactly for the prompts whose index is in
    `right` (with whitespace around, which does not count) and wrong for the others."""
    def fake(model, tokenizer, prompts, max_new_tokens=48, batch_size=64):
        return [f"  {right_answer(p)}\n" if i in right else right_answer(p) + "0"
                for i, p in enumerate(prompts)]
    return fake


def test_accuracy_is_the_share_of_exact_matches(monkeypatch):
    monkeypatch.setattr(evaluate, "answer", controlled_answers({0, 3, 4, 7}))
    result = evaluate_task(None, None, "add", n=10)
    assert result["task"] == "add" and result["n"] == 10
    assert result["correct"] == 4 and result["accuracy"] == 0.4


def reference_answer(model, messages, max_new_tokens):
    """Greedy reply by full forwards without a cache, up to the first special token."""
    ids = render(messages, TOK, add_generation_prompt=True)[0]
    out = []
    for _ in range(max_new_tokens):
        logits, _ = model(np.array([ids + out]))
        t = int(np.argmax(logits.data[0, -1]))
        if t in SPECIALS:
            break
        out.append(t)
    return TOK.decode(out)


def test_batched_answers_equal_full_forward_greedy_decoding():
    prompts = ["ab", "What is 1 + 2?", "cd", "a longer prompt", "ef",
               [{"role": "system", "content": "S"}, {"role": "user", "content": "gh"}]]
    got = answer(MODEL, TOK, prompts, max_new_tokens=5, batch_size=2)
    expected = [reference_answer(MODEL, [{"role": "user", "content": p}]
                                 if isinstance(p, str) else p, 5) for p in prompts]
    assert got == expected
    # a prompt near the end of the context gets only the tokens that fit
    long = "x" * (127 - 20)  # 20 template tokens: 127 in all, room for 2 new tokens
    assert len(render([{"role": "user", "content": long}], TOK, True)[0]) == 127
    assert answer(MODEL, TOK, [long], max_new_tokens=5) == \
        [reference_answer(MODEL, [{"role": "user", "content": long}], 2)]
    with pytest.raises(ValueError, match="prompt 2 takes 130 tokens"):
        answer(MODEL, TOK, ["a", "y" * 110], max_new_tokens=5)


def test_evaluate_task_scores_the_models_own_answers():
    pairs = tasks.examples("add", "heldout", 6, seed=3)
    result = evaluate_task(MODEL, TOK, "add", n=6, seed=3, max_new_tokens=4)
    replies = [reference_answer(MODEL, [{"role": "user", "content": p}], 4) for p, _ in pairs]
    assert result["correct"] == sum(r.strip() == a for r, (_, a) in zip(replies, pairs))
    assert set(result) == {"task", "n", "correct", "accuracy", "seconds"}


# ---- bits per byte ----------------------------------------------------------------------------

def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def independent_bpb(model, ids, n_bytes):
    """Nats summed by hand over windows of the context, one full forward each."""
    ctx, nats = model.config.context_length, 0.0
    for s in range(0, len(ids) - 1, ctx):
        x = ids[s:s + ctx]
        y = ids[s + 1:s + ctx + 1]
        logp = log_softmax(model(np.array([x[:len(y)]]))[0].data[0].astype(np.float64))
        nats -= logp[np.arange(len(y)), y].sum()
    return nats / (math.log(2) * n_bytes)


def test_bpb_of_one_window_equals_a_full_forward_by_hand():
    text = "héllo, wörld"
    data = text.encode("utf-8")
    result = bits_per_byte(MODEL, TOK, text)
    ids = [TOK.eot_id] + list(data)
    assert result["bytes"] == len(data) == 14 and result["tokens"] == 14
    logp = log_softmax(MODEL(np.array([ids[:-1]]))[0].data[0])
    nats = -logp[np.arange(14), ids[1:]].sum()
    assert result["bpb"] == pytest.approx(nats / (math.log(2) * 14), rel=1e-10)


def test_bpb_over_several_windows_and_without_endoftext():
    model = tiny_model(context_length=16, seed=2)
    text = "The quick brown fox — jumps over the lazy dog; 日本語 too."
    data = text.encode("utf-8")
    ids = [TOK.eot_id] + list(data)  # 3 whole windows of 16 and a shorter one
    result = bits_per_byte(model, TOK, text, batch_size=2)
    assert result["bpb"] == pytest.approx(independent_bpb(model, ids, len(data)), rel=1e-10)
    plain = Tokenizer.bytes(special_tokens=[])  # no <|endoftext|>: the first byte is not scored
    assert plain.eot_id is None
    result = bits_per_byte(model, plain, text, batch_size=2)
    assert result["bpb"] == pytest.approx(independent_bpb(model, list(data), len(data)),
                                          rel=1e-10)
    with pytest.raises(ValueError, match="too short"):
        bits_per_byte(model, plain, "a")


# ---- the command line -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run folder of a model with chat tokens, and a tiny pretrained (base) run."""
    tmp = tmp_path_factory.mktemp("eval")
    model = tiny_model(context_length=256, seed=1)
    (tmp / "corpus.txt").write_text("the cat sat on the mat. " * 80)
    train(TrainConfig(preset="laptop", model={"n_layers": 1, "d_model": 32, "n_heads": 2,
                                              "context_length": 64},
                      char=True, steps=2, batch_size=2, eval_every=2, eval_iters=1,
                      sample_tokens=0, quiet=True, out=str(tmp / "base"),
                      data=str(tmp / "corpus.txt"), cache_dir=str(tmp / "cache")))
    return {"chat": save_for_generation(tmp / "chat", model, TOK), "model": model,
            "base": tmp / "base", "tmp": tmp}


def run_cli(capsys, *args):
    code = cli.main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()] if code == 0 else out, err


def test_cli_prints_one_json_line_per_task(runs, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "answer", controlled_answers({1, 2, 5}))
    code, lines, err = run_cli(capsys, runs["chat"], "--task", "add", "--n", "8")
    assert code == 0 and err == "" and len(lines) == 1
    assert set(lines[0]) == {"task", "n", "correct", "accuracy", "seconds"}
    assert lines[0]["task"] == "add" and lines[0]["n"] == 8
    assert lines[0]["correct"] == 3 and lines[0]["accuracy"] == 3 / 8
    monkeypatch.setattr(evaluate, "answer", lambda m, t, prompts, *a: [""] * len(prompts))
    code, lines, _ = run_cli(capsys, runs["chat"], "--task", "all", "--n", "4")
    assert code == 0 and [r["task"] for r in lines] == tasks.verifiable_tasks()
    assert all(r["n"] == 4 and r["correct"] == 0 for r in lines)


def test_cli_evaluates_a_base_model_through_the_chat_template(runs, capsys):
    code, lines, err = run_cli(capsys, runs["base"], "--task", "add", "--n", "3",
                               "--max-new-tokens", "3")
    assert code == 0 and len(err.splitlines()) == 1 and "base model" in err
    assert lines[0]["n"] == 3 and 0 <= lines[0]["correct"] <= 3
    # --task all: every prompt must fit the context, checked before any task runs
    code, out, err = run_cli(capsys, runs["base"], "--task", "all", "--n", "20")
    assert code == 2 and out == "" and "more than the model's context of 64" in err


def test_cli_bpb(runs, capsys):
    text = "the cat sat on the mat, naïvely. " * 12
    path = runs["tmp"] / "text.txt"
    path.write_text(text, encoding="utf-8")
    code, lines, err = run_cli(capsys, runs["chat"], "--task", "bpb", "--data", path)
    assert code == 0 and err == "" and len(lines) == 1
    data = text.encode("utf-8")
    assert lines[0]["task"] == "bpb" and lines[0]["data"] == str(path)
    assert lines[0]["bytes"] == len(data) and lines[0]["tokens"] == len(data)
    expected = independent_bpb(runs["model"], [TOK.eot_id] + list(data), len(data))
    assert lines[0]["bpb"] == pytest.approx(expected, rel=1e-5)  # float32 weights


def test_cli_jsonl_pairs(runs, capsys, monkeypatch):
    path = runs["tmp"] / "pairs.jsonl"
    path.write_text(
        '{"prompt": "What is 1 + 2?", "completion": "3"}\n\n'
        '{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},'
        ' {"role": "assistant", "content": "a"}, {"role": "user", "content": "r"},'
        ' {"role": "assistant", "content": "ref"}]}\n'
        '{"instruction": "Say hi", "output": "hi"}\n')
    seen = []

    def fake(model, tokenizer, prompts, max_new_tokens=48, batch_size=64):
        seen.extend(prompts)
        return [" 3 ", "wrong", "hi"]

    monkeypatch.setattr(evaluate, "answer", fake)
    code, lines, err = run_cli(capsys, runs["chat"], "--data", path)
    assert code == 0 and lines[0]["task"] == "jsonl" and lines[0]["data"] == str(path)
    assert lines[0]["n"] == 3 and lines[0]["correct"] == 2
    assert seen[1] == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                       {"role": "assistant", "content": "a"}, {"role": "user", "content": "r"}]
    assert seen[0] == [{"role": "user", "content": "What is 1 + 2?"}]


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(session, "load_for_generation", fail)


@pytest.mark.parametrize("args, expected", [
    (["--task", "nope"], ["unknown evaluation 'nope'", "add", "compare", "all", "bpb", "jsonl"]),
    (["--task", "add", "--n", "0"], ["--n"]),
    (["--task", "add", "--seed", "-1"], ["--seed"]),
    (["--task", "add", "--batch-size", "0"], ["--batch-size"]),
    (["--task", "bpb"], ["needs --data"]),
    (["--task", "jsonl"], ["needs --data"]),
    ([], ["--task: required"]),
    (["--task", "add", "--data", "x.txt"], ["--data: only for"]),
    (["--task", "bpb", "--data", "missing.txt"], ["missing.txt"]),
    (["--task", "add", "--device", "gpu"], ["--device"]),
])
def test_bad_input_exits_2_with_one_line_before_loading(runs, capsys, no_loading, args,
                                                        expected):
    code, out, err = run_cli(capsys, runs["chat"], *args)
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    for word in expected:
        assert word in err


def test_more_prompts_than_a_task_has_is_refused(runs, capsys, no_loading, monkeypatch):
    monkeypatch.setattr(tasks, "examples", lambda name, split, n, seed, allow_fewer:
                        [("What is 1 + 2?", "3")] * min(n, 7))
    code, out, err = run_cli(capsys, runs["chat"], "--task", "add", "--n", "8")
    assert code == 2 and "--n: task 'add' has only 7 distinct held-out prompts, asked for 8" in err


def test_a_bad_jsonl_line_is_named_before_loading(runs, capsys, no_loading):
    path = runs["tmp"] / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    code, out, err = run_cli(capsys, runs["chat"], "--data", path)
    assert code == 2 and len(err.splitlines()) == 1 and f"{path}:2:" in err
    path.write_text('{"messages": [{"role": "assistant", "content": "b"}]}\n')
    code, out, err = run_cli(capsys, runs["chat"], "--task", "jsonl", "--data", path)
    assert code == 2 and "nothing before its last assistant message" in err
