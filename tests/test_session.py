"""The chat session: cached turns equal fresh encodings, only new tokens are computed, old
turns are dropped when the context fills; and the `tinyllm chat` command."""

import io

import numpy as np
import pytest

from autograd import manual_seed
from tinyllm import chat, cli, session
from tinyllm.chat import render
from tinyllm.generate import save_for_generation
from tinyllm.model import GPT
from tinyllm.session import ChatSession
from tinyllm.tokenizer import Tokenizer
from tinyllm.train import TrainConfig, train

TOK = chat.add_chat_tokens(Tokenizer.bytes(special_tokens=["<|endoftext|>"]))
IM_END = TOK.special_tokens["<|im_end|>"]
SPECIALS = set(TOK.special_tokens.values())


def tiny_model(context_length=256, seed=0):
    manual_seed(seed)
    return GPT.from_preset("laptop", n_layers=2, d_model=32, n_heads=2, vocab_size=TOK.vocab_size,
                           context_length=context_length, dtype="float64", init_std=0.3)


MODEL = tiny_model()


def reference_reply(model, messages, max_new_tokens):
    """Greedy reply ids by full forwards of the freshly rendered conversation, no cache."""
    ids = render(messages, TOK, add_generation_prompt=True)[0]
    out = []
    for _ in range(max_new_tokens):
        logits, _ = model(np.array([ids + out]))
        t = int(np.argmax(logits.data[0, -1]))
        if t in SPECIALS:
            break
        out.append(t)
    return out


class AsciiOnly:
    """The model with every non-ASCII byte made impossible: its replies are text that
    encodes back to the same tokens."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, idx, **kw):
        logits, loss = self.model(idx, **kw)
        logits.data[..., 128:256] = -1e9
        return logits, loss


class Counting:
    """Wraps a model's forward to record how many positions each call computes."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.forward = model.forward
        model.forward = self

    def __call__(self, idx, **kw):
        self.calls.append(np.shape(idx)[1])
        return self.forward(idx, **kw)

    def undo(self):
        del self.model.forward


@pytest.fixture
def counting():
    c = Counting(MODEL)
    yield c
    c.undo()


def test_turns_with_the_cache_equal_fresh_encodings_and_compute_only_new_tokens(counting):
    model = AsciiOnly(MODEL)
    s = ChatSession(model, TOK, system="Be brief.", temperature=0, max_new_tokens=6)
    for k, text in enumerate(["hello there", "and then?", "why so?"]):
        history, before = list(s.messages), s.cached_ids
        counting.calls.clear()
        reply = s.ask(text)
        calls = list(counting.calls)
        conversation = history + [{"role": "user", "content": text}]
        target = render(conversation, TOK, add_generation_prompt=True)[0]
        expected = reference_reply(model, conversation, 6)
        assert s.last_ids == expected and reply == TOK.decode(expected)
        # a fresh session fed the conversation so far answers with the same tokens
        fresh = ChatSession(model, TOK, messages=history, temperature=0, max_new_tokens=6)
        assert fresh.ask(text) == reply and fresh.last_ids == expected
        # the cache held a prefix of the new turn's ids: only the rest was prefilled, then
        # one position per generated token after the first
        assert before == target[:len(before)]
        if k > 0:  # all but the previous reply's end: <|im_end|>, newline, its last token
            assert len(before) >= len(render(history, TOK)[0]) - 3
        assert calls[0] == len(target) - len(before)
        assert calls[1:] == [1] * (len(expected) - (len(expected) == 6))
        assert s.messages == conversation + [{"role": "assistant", "content": reply}]
        full = render(s.messages, TOK)[0]
        assert s.cached_ids == full[:len(s.cached_ids)]


class EndsTurn:
    """A model whose replies end with <|im_end|> after `k` tokens."""

    def __init__(self, model, k):
        self.model, self.k, self.step = model, k, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, idx, **kw):
        logits, loss = self.model(idx, **kw)
        # a prefill gives the logits of the turn's first token, each step those of the next
        self.step = 1 if idx.shape[1] > 1 else self.step + 1
        if self.step == self.k + 1:
            logits.data[..., IM_END] = 1e9
        return logits, loss


def test_a_reply_ends_at_im_end_and_the_next_turn_starts_after_it():
    model = EndsTurn(AsciiOnly(MODEL), 3)
    s = ChatSession(model, TOK, temperature=0, max_new_tokens=20)
    reply = s.ask("hi")
    assert len(s.last_ids) == 3 and reply == TOK.decode(s.last_ids)
    assert "<|im_end|>" not in reply
    full = render(s.messages, TOK)[0]
    # everything but the closing <|im_end|> and newline is already computed
    assert s.cached_ids == full[:-2]
    s.ask("more")
    assert s.messages[1] == {"role": "assistant", "content": reply}
    assert len(s.messages) == 4 and s.cached_ids == render(s.messages, TOK)[0][:-2]


def test_overflow_drops_the_oldest_turns_keeps_the_system_message_and_still_answers():
    notes = []
    s = ChatSession(MODEL, TOK, system="sys", temperature=0, max_new_tokens=8,
                    on_note=notes.append)
    users = [f"message {k}: " + "x" * 50 for k in range(6)]
    for k, text in enumerate(users):
        history = list(s.messages)
        reply = s.ask(text)
        assert len(s.last_ids) > 0 or reply == ""
        ids = render(s.messages[:-1], TOK, add_generation_prompt=True)[0]
        assert len(ids) + 8 - 1 <= 256  # the prompt left room for the reply
        assert s.messages[0] == {"role": "system", "content": "sys"}
        assert s.messages[-2]["content"] == text
        kept = [m["content"] for m in s.messages if m["role"] == "user"]
        assert kept == users[k + 1 - len(kept):k + 1]  # the newest turns, in order
        if len(kept) < k + 1:  # turns were dropped: the answer is a fresh session's
            fresh = ChatSession(MODEL, TOK, messages=s.messages[:-2], temperature=0,
                                max_new_tokens=8)
            assert fresh.ask(text) == reply
        else:
            assert s.messages[:-2] == history
    assert len(kept) < len(users)
    assert len(notes) == 1 and "context of 256" in notes[0]  # said once
    assert s.cached_ids == render(s.messages, TOK)[0][:len(s.cached_ids)]


def test_a_message_too_long_for_the_context_is_refused_and_changes_nothing():
    s = ChatSession(MODEL, TOK, temperature=0, max_new_tokens=4)
    s.ask("hi")
    before = list(s.messages)
    with pytest.raises(ValueError, match="more than the model's context of 256"):
        s.reply("y" * 300)
    assert s.messages == before
    s.ask("ok")  # the session still works


def test_reset_and_set_system():
    s = ChatSession(MODEL, TOK, system="A", temperature=0, max_new_tokens=4)
    s.ask("one")
    s.reset()
    assert s.messages == [{"role": "system", "content": "A"}]
    # the system message's part of the cache is kept
    prefix = render(s.messages, TOK)[0]
    assert len(s.cached_ids) == len(prefix) and s.cached_ids == prefix
    s.ask("two")
    s.set_system("B")
    assert s.messages[0] == {"role": "system", "content": "B"} and len(s.messages) == 3
    conversation = s.messages + [{"role": "user", "content": "three"}]
    assert s.ask("three") == TOK.decode(reference_reply(MODEL, conversation, 4))
    s.set_system(None)
    assert s.system is None and s.messages[0]["role"] == "user"
    with pytest.raises(ValueError, match="no chat tokens"):
        ChatSession(MODEL, Tokenizer.bytes(special_tokens=["<|endoftext|>"]))


def test_stopping_a_reply_keeps_the_text_so_far():
    s = ChatSession(MODEL, TOK, temperature=0, max_new_tokens=8)
    pieces = s.reply("hi")
    first = next(pieces)
    pieces.close()
    assert s.messages[-1] == {"role": "assistant", "content": first}
    assert s.cached_ids == render(s.messages, TOK)[0][:len(s.cached_ids)]
    conversation = s.messages + [{"role": "user", "content": "again"}]
    assert s.ask("again") == TOK.decode(reference_reply(MODEL, conversation, 8))


def test_seeded_sampling_is_reproducible():
    a = ChatSession(MODEL, TOK, temperature=1.0, top_p=0.9, seed=5, max_new_tokens=8)
    b = ChatSession(MODEL, TOK, temperature=1.0, top_p=0.9, seed=5, max_new_tokens=8)
    assert [a.ask("x"), a.ask("y")] == [b.ask("x"), b.ask("y")]


# ---- the command line -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run folder of a model with chat tokens, and a tiny pretrained (base) run."""
    tmp = tmp_path_factory.mktemp("chat")
    model = tiny_model(seed=1)
    chat_run = save_for_generation(tmp / "chat", model, TOK)
    (tmp / "corpus.txt").write_text("the cat sat on the mat. " * 80)
    train(TrainConfig(preset="laptop", model={"n_layers": 1, "d_model": 32, "n_heads": 2,
                                              "context_length": 64},
                      char=True, steps=2, batch_size=2, eval_every=2, eval_iters=1,
                      sample_tokens=0, quiet=True, out=str(tmp / "base"),
                      data=str(tmp / "corpus.txt"), cache_dir=str(tmp / "cache")))
    return {"chat": chat_run, "base": tmp / "base", "model": model}


def test_prompt_prints_only_the_reply(runs, capsys):
    assert cli.main(["chat", str(runs["chat"]), "--prompt", "hi there", "--temperature", "0",
                     "--max-new-tokens", "7", "--system", "S"]) == 0
    out, err = capsys.readouterr()
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi there"}]
    assert out == TOK.decode(reference_reply(runs["model"], messages, 7)) + "\n"
    assert "<|im_start|>" not in out and err == ""


def test_a_base_model_is_prepared_and_warned_about(runs, capsys):
    assert cli.main(["chat", str(runs["base"]), "--prompt", "hi", "--max-new-tokens", "5",
                     "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and "base model" in err
    assert "<|im_start|>" not in out and out.endswith("\n")


def test_interactive_commands(runs, capsys, monkeypatch):
    lines = "hello\n/system Be terse.\nsecond\n/reset\n/bogus\nthird\n/quit\nnot read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert cli.main(["chat", str(runs["chat"]), "--temperature", "0",
                     "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    m = runs["model"]
    r1 = TOK.decode(reference_reply(m, [{"role": "user", "content": "hello"}], 5))
    system = {"role": "system", "content": "Be terse."}
    r2 = TOK.decode(reference_reply(m, [system, {"role": "user", "content": "hello"},
                                        {"role": "assistant", "content": r1},
                                        {"role": "user", "content": "second"}], 5))
    r3 = TOK.decode(reference_reply(m, [system, {"role": "user", "content": "third"}], 5))
    assert out == f"> {r1}\n> > {r2}\n> > > {r3}\n> "
    assert "unknown command /bogus" in err and "(conversation cleared)" in err


def test_ctrl_c_stops_a_reply_and_keeps_the_session(runs, capsys, monkeypatch):
    model = runs["model"]

    class Interrupting:  # Ctrl-C as the forward of turn one's second token ends
        def __init__(self):
            self.calls = 0

        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, idx, **kw):
            self.calls += 1
            out = model(idx, **kw)  # the cache has grown by then
            if self.calls == 3:
                raise KeyboardInterrupt
            return out

    monkeypatch.setattr(session, "load_for_generation", lambda *a, **k: (Interrupting(), TOK))
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n"))
    assert cli.main(["chat", str(runs["chat"]), "--temperature", "0", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    first = reference_reply(model, [{"role": "user", "content": "hello"}], 5)
    partial = TOK.decode(first[:2])  # the tokens chosen before the interrupted step
    r2 = TOK.decode(reference_reply(model, [{"role": "user", "content": "hello"},
                                            {"role": "assistant", "content": partial},
                                            {"role": "user", "content": "again"}], 5))
    assert "(reply stopped)" in err
    assert out == f"> {partial}\n> {r2}\n> "


@pytest.mark.parametrize("flags, name", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--min-p", "2"], "--min-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--dtype", "int8"], "--dtype"),
    (["--device", "tpu"], "--device"),
])
def test_bad_flags_exit_2_before_loading(runs, capsys, monkeypatch, flags, name):
    def no_loading(*a, **k):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(session, "load_for_generation", no_loading)
    assert cli.main(["chat", str(runs["chat"]), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and name in err
    assert cli.main(["chat", "no/such/run", "--prompt", "x"]) == 2
    assert "no/such/run" in capsys.readouterr().err
