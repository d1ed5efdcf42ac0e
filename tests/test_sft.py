"""Supervised fine-tuning end to end on tiny models: the loss it lowers, its batches, exact
resume, user data files, LoRA, and the run folder it leaves."""

import json
import os
import signal

import numpy as np
import pytest

from tinyllm import chat
from tinyllm.checkpoint import load_checkpoint
from tinyllm.cli import main as cli_main
from tinyllm.sft import BUCKET, SFTConfig, SFTRun, pad_batch, split_conversations
from tinyllm.train import IGNORE_INDEX, TrainConfig, train

TINY = {"n_layers": 1, "d_model": 32, "n_heads": 2, "context_length": 128}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pretrained run folder (character level) to fine-tune."""
    tmp = tmp_path_factory.mktemp("sft-base")
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and what is one two three 12 + 30 = 42 larger sort".split()
    (tmp / "corpus.txt").write_text(
        "\n".join(" ".join(rng.choice(words, 12)) for _ in range(300)) + "\n")
    train(TrainConfig(preset="laptop", model=dict(TINY), char=True, steps=30, batch_size=4,
                      eval_every=30, eval_iters=1, sample_tokens=0, quiet=True,
                      out=str(tmp / "base"), data=str(tmp / "corpus.txt"),
                      cache_dir=str(tmp / "cache")))
    return tmp / "base"


def sft_config(base, out, **kw):
    settings = dict(base=str(base), n_train=200, n_val=16, steps=20, batch_size=4,
                    eval_every=10, eval_iters=2, log_every=5, warmup=2, out=str(out), quiet=True)
    settings.update(kw)
    return SFTConfig(**settings).validate()


def sft_args(base, out, *extra):
    return ["sft", "--from", str(base), "-o", str(out), "--n-train", "120", "--n-val", "8",
            "--steps", "6", "--batch-size", "4", "--eval-every", "3", "--eval-iters", "2",
            "--log-every", "3", "--warmup", "2", "-q", *extra]


def model_arrays(path):
    _, arrays = load_checkpoint(path)
    return {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}


# ---- learning ----------------------------------------------------------------------------------

def test_short_sft_lowers_the_heldout_assistant_loss(base, tmp_path):
    run = SFTRun(sft_config(base, tmp_path / "sft", steps=40, batch_size=8, eval_every=20,
                            lr=3e-3))
    before = run.evaluate()
    summary = run.fit()
    after = run.evaluate()
    assert not summary["diverged"] and summary["step"] == 40
    print(f"held-out assistant loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.3, (before, after)
    records = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text()
               .splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert [r["step"] for r in records if "val_loss" in r] == [20, 40]
    assert vals[-1] == pytest.approx(after, rel=1e-6)
    # the log records say that only a part of each batch is trained (user text, padding)
    shares = [r["trained_share"] for r in records if "trained_share" in r]
    assert shares and all(0 < s < 0.9 for s in shares)


def test_validation_counts_only_assistant_tokens(base, tmp_path):
    from tinyllm.sft import builtin_conversations

    cfg = sft_config(base, tmp_path / "sft")
    run = SFTRun(cfg)
    held_out = builtin_conversations(cfg)[1]
    answers = {c[-1]["content"] + chat.IM_END for c in held_out}
    assert len(run.val_examples) == 8  # eval_iters x batch_size of them
    for x, y in run.val_examples:
        trained = y[y != IGNORE_INDEX].tolist()
        assert run.tokenizer.decode(trained) in answers
        assert trained[-1] == run.tokenizer.special_tokens[chat.IM_END]
    # the held-out prompts are not training prompts
    prompts = {run.tokenizer.decode(x.tolist()).split("user\n")[1] for x, _ in run.train_examples}
    assert not prompts & {run.tokenizer.decode(x.tolist()).split("user\n")[1]
                          for x, _ in run.val_examples}


# ---- batches -----------------------------------------------------------------------------------

def test_pad_batch_pads_targets_with_ignore_index():
    a = (np.array([5, 6, 7, 8]), np.array([-100, -100, 8, 9]))
    b = (np.array([1, 2]), np.array([2, -100]))
    c = (np.array([3, 4, 5]), np.array([-100, 5, 6]))
    X, Y = pad_batch([a, b, c], pad_id=99)
    assert X.shape == Y.shape == (3, 4) and X.dtype == Y.dtype == np.int64
    assert X.tolist() == [[5, 6, 7, 8], [1, 2, 99, 99], [3, 4, 5, 99]]
    assert Y.tolist() == [[-100, -100, 8, 9], [2, -100, -100, -100], [-100, 5, 6, -100]]


def test_micro_batch_rows_hold_one_conversation_each(base, tmp_path):
    run = SFTRun(sft_config(base, tmp_path / "sft"))
    eot = run.tokenizer.eot_id
    start = run.tokenizer.special_tokens[chat.IM_START]
    examples = {tuple(x.tolist()): y for x, y in run.train_examples}
    for k in range(6):
        X, Y = run.micro_batch(k)
        assert X.shape == Y.shape and X.shape[0] == 4
        lengths = []
        for row_x, row_y in zip(X, Y):
            # the row is one training conversation followed by padding only
            n = next(n for n in range(len(row_x), 0, -1) if tuple(row_x[:n].tolist()) in examples)
            assert np.array_equal(row_y[:n], examples[tuple(row_x[:n].tolist())])
            assert np.all(row_x[n:] == run.pad_id) and np.all(row_y[n:] == IGNORE_INDEX)
            assert row_x[0] == eot and eot not in row_x[1:n].tolist()
            assert row_x[:n].tolist().count(start) == 2  # its user turn and its assistant turn
            lengths.append(n)
        assert max(lengths) == X.shape[1]  # padded to the longest, no further
        assert max(lengths) - min(lengths) < BUCKET  # drawn from one length bucket


def test_micro_batch_is_a_pure_function_of_seed_and_k(base, tmp_path):
    run = SFTRun(sft_config(base, tmp_path / "a"))
    first = [run.micro_batch(k) for k in range(5)]
    run.micro_batch(40)
    again = SFTRun(sft_config(base, tmp_path / "b"))
    for k in reversed(range(5)):
        assert same(run.micro_batch(k), first[k]) and same(again.micro_batch(k), first[k])
    other = SFTRun(sft_config(base, tmp_path / "c", seed=7))
    assert not all(same(other.micro_batch(k), first[k]) for k in range(5))


def same(a, b):
    return all(u.shape == v.shape and np.array_equal(u, v) for u, v in zip(a, b))


def test_split_conversations_is_by_content_and_holds_some_out():
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
             for i in range(200)]
    train_part, val = split_conversations(convs, 0.1)
    assert len(train_part) + len(val) == 200 and 5 <= len(val) <= 40
    assert not {json.dumps(c) for c in train_part} & {json.dumps(c) for c in val}
    # the side of a conversation does not depend on the others
    train2, val2 = split_conversations(list(reversed(convs[:100])), 0.1)
    assert {json.dumps(c) for c in val2} == {json.dumps(c) for c in val if c in convs[:100]}
    tr, va = split_conversations(convs[:2], 1e-9)
    assert len(tr) == 1 and len(va) == 1


def test_split_conversations_refuses_a_single_conversation():
    from tinyllm.cli import UsageError

    one = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    with pytest.raises(UsageError, match="at least 2 conversations"):
        split_conversations(one, 0.05)


# ---- resume ------------------------------------------------------------------------------------

def interrupted_and_resumed(base, tmp_path, monkeypatch, *extra):
    """(uninterrupted run folder, run folder stopped by Ctrl-C at step 4 then resumed)."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli_main(sft_args(base, full, *extra)) == 0

    real_step = SFTRun.train_step

    def interrupt_at_4(self):  # Ctrl-C during step 4: that step finishes, then the run saves
        out = real_step(self)
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(SFTRun, "train_step", interrupt_at_4)
    assert cli_main(sft_args(base, part, *extra)) == 130
    monkeypatch.setattr(SFTRun, "train_step", real_step)
    meta, _ = load_checkpoint(part / "last.ckpt")
    assert meta["step"] == 4 and meta["kind"] == "sft"
    assert cli_main(["sft", "--resume", str(part), "-q"]) == 0
    return full, part


def assert_same_checkpoints(a_path, b_path):
    _, a = load_checkpoint(a_path)
    _, b = load_checkpoint(b_path)
    assert a.keys() == b.keys() and any(k.startswith("optim/") for k in a)
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differ


def test_interrupted_sft_resumes_bit_identical(base, tmp_path, monkeypatch):
    full, part = interrupted_and_resumed(base, tmp_path, monkeypatch)
    assert_same_checkpoints(full / "last.ckpt", part / "last.ckpt")
    vals = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in line]
    assert vals == [3, 6]


def test_interrupted_lora_sft_resumes_bit_identical(base, tmp_path, monkeypatch):
    full, part = interrupted_and_resumed(base, tmp_path, monkeypatch, "--lora-rank", "2")
    before = model_arrays(base / "best.ckpt")["tok_emb.weight"]
    after = model_arrays(part / "last.ckpt")["tok_emb.weight"]
    assert np.array_equal(after[:len(before)], before)
    assert_same_checkpoints(full / "last.ckpt", part / "last.ckpt")


def test_resume_refuses_other_settings(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(sft_args(base, out) + ["--steps", "3"]) == 0
    capsys.readouterr()
    before = (out / "last.ckpt").read_bytes()
    assert cli_main(["sft", "--resume", str(out), "--lr", "0.1", "-q"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "cannot resume with other settings" in err and "lr" in err
    assert (out / "last.ckpt").read_bytes() == before
    assert cli_main(["train", "--resume", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line, whatever it says


def test_resume_with_other_eval_iters(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(sft_args(base, out, "--steps", "3")) == 0
    capsys.readouterr()
    rc = cli_main(["sft", "--resume", str(out), "--steps", "6", "--eval-iters", "1", "-q"])
    assert rc == 0, capsys.readouterr().err
    assert load_checkpoint(out / "last.ckpt")[0]["step"] == 6


# ---- user data ---------------------------------------------------------------------------------

def user_lines(n=30):
    lines = []
    for i in range(n):
        a, b = i % 7, i % 5
        if i % 3 == 0:
            lines.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                       {"role": "assistant", "content": str(a + b)}]})
        elif i % 3 == 1:
            lines.append({"prompt": f"What is {a} + {b}?", "completion": str(a + b)})
        else:
            lines.append({"instruction": "Add the numbers.", "input": f"{a} {b}",
                          "output": str(a + b)})
    return [json.dumps(x) for x in lines]


def test_user_file_of_mixed_formats_trains(base, tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(user_lines()) + "\n")
    out = tmp_path / "run"
    assert cli_main(sft_args(base, out, "--data", str(data), "--steps", "4")) == 0
    assert (out / "best.ckpt").exists() and (out / "last.ckpt").exists()
    meta, _ = load_checkpoint(out / "last.ckpt")
    assert meta["step"] == 4 and meta["train_config"]["data"] == str(data)
    assert "Traceback" not in capsys.readouterr().err


def test_bad_line_in_user_file_stops_before_writing(base, tmp_path, capsys):
    lines = user_lines(10)
    lines.insert(3, "")  # blank lines count
    lines.insert(7, json.dumps({"prompt": "What is 1 + 1?"}))  # line 8 of the file
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    capsys.readouterr()
    assert cli_main(sft_args(base, out, "--data", str(data))) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "chats.jsonl:8" in err[0] and "completion" in err[0], err
    assert "Traceback" not in captured.out + captured.err
    assert not out.exists()


# ---- the run folder ----------------------------------------------------------------------------

def test_sft_run_folder_loads_for_generation(base, tmp_path):
    from tinyllm.generate import generate_text, load_for_generation

    out = tmp_path / "run"
    assert cli_main(sft_args(base, out, "--steps", "3")) == 0
    model, tok = load_for_generation(out)
    assert chat.has_chat_tokens(tok)
    _, base_tok = load_for_generation(base)
    v = base_tok.vocab_size
    assert tok.special_tokens[chat.IM_START] == v and tok.special_tokens[chat.IM_END] == v + 1
    assert model.config.vocab_size == tok.vocab_size == v + 2
    saved = model_arrays(out / "best.ckpt")
    for k, a in model.state_dict().items():
        assert np.array_equal(np.asarray(a), saved[k]), k
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    ids, _ = chat.render(messages, tok, add_generation_prompt=True)
    text = generate_text(model, tok, tok.decode(ids), max_new_tokens=5, temperature=0)
    assert isinstance(text, str)


def test_lora_trains_only_adapters(base, tmp_path):
    from tinyllm.generate import load_for_generation
    from tinyllm.lora import load_adapters

    out = tmp_path / "lora"
    assert cli_main(sft_args(base, out, "--lora-rank", "2", "--lr", "1e-2")) == 0
    assert (out / "adapter.safetensors").exists()
    before = model_arrays(base / "best.ckpt")
    after = model_arrays(out / "last.ckpt")
    adapters = {k for k in after if ".lora_" in k}
    assert adapters and {k for k in after if k not in adapters} == set(before)
    v = before["tok_emb.weight"].shape[0]
    for k, w in before.items():
        if k == "tok_emb.weight":  # grown by the two chat tokens, whose rows may train
            assert after[k].shape == (v + 2, w.shape[1])
            assert np.array_equal(after[k][:v], w)
        else:
            assert np.array_equal(after[k], w), k
    # the adapters moved (B starts at zero)
    assert any(np.abs(after[k]).max() > 0 for k in adapters if k.endswith("lora_B"))
    config, _, arrays = load_adapters(out / "adapter.safetensors")
    assert config.rank == 2 and set(arrays) == adapters
    # the run folder loads, with the adapters folded in: W + (alpha / r) B A
    model, tok = load_for_generation(out)
    assert chat.has_chat_tokens(tok)
    best = model_arrays(out / "best.ckpt")
    merged = model.state_dict()
    scale = config.alpha / config.rank
    for k in before:
        layer = k[:-len(".weight")]
        if f"{layer}.lora_A" in best:
            want = best[k] + scale * best[f"{layer}.lora_B"] @ best[f"{layer}.lora_A"]
            np.testing.assert_allclose(np.asarray(merged[k]), want, rtol=1e-5, atol=1e-7)
        else:
            assert np.array_equal(np.asarray(merged[k]), best[k]), k
