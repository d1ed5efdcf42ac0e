"""The chat template: ChatML rendering and its loss mask, the chat tokens in a tokenizer and a
model, and conversations read from the three usual data formats."""

import json

import numpy as np
import pytest

from conftest import shared_file
from tinyllm import chat
from tinyllm.chat import (IM_END, IM_START, add_chat_tokens, conversation_from_record,
                          grow_vocab, prepare_for_chat, read_conversations, render, to_example)
from tinyllm.model import GPT
from tinyllm.tokenizer import Tokenizer

EOT = "<|endoftext|>"
CORPUS = ("The cat sat on the mat. What is 12 + 30? The answer is 42. You are terse. "
          "Reverse the words: apple tree house. Sort the words: pear apple fig. ") * 20


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train(CORPUS, vocab_size=300)


@pytest.fixture(scope="module", params=["bpe", "bytes"])
def tok(request, bpe):
    """A tokenizer with the chat tokens: a trained BPE one and the byte-level one."""
    base = bpe if request.param == "bpe" else Tokenizer.bytes()
    return add_chat_tokens(base)


def trained_runs(ids, mask):
    """The maximal runs of consecutive trained positions, as lists of ids."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def check_render(tok, messages, expected_text, add_generation_prompt=False):
    """render's ids decode to `expected_text`; the trained tokens are exactly each assistant
    content followed by <|im_end|>, one run per assistant turn; everything else is not."""
    ids, mask = render(messages, tok, add_generation_prompt=add_generation_prompt)
    assert len(ids) == len(mask)
    assert all(isinstance(m, bool) for m in mask)
    assert tok.decode(ids) == expected_text
    answers = [m["content"] + IM_END for m in messages if m["role"] == "assistant"]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "".join(answers)
    assert [tok.decode(r) for r in trained_runs(ids, mask)] == answers
    # the untrained tokens are the text with the answers (and their <|im_end|>) cut out
    untrained = expected_text
    for a in answers:
        untrained = untrained.replace("assistant\n" + a, "assistant\n", 1)
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == untrained
    # the leading <|endoftext|>, every <|im_start|> and the newline after each turn: untrained
    assert ids[0] == tok.eot_id and not mask[0]
    start, end = tok.special_tokens[IM_START], tok.special_tokens[IM_END]
    assert all(not m for i, m in zip(ids, mask) if i == start)
    newline = tok.encode_ordinary("\n")
    for k, i in enumerate(ids):
        if i == end:
            assert ids[k + 1:k + 1 + len(newline)] == newline
            assert not any(mask[k + 1:k + 1 + len(newline)])
    return ids, mask


def test_render_single_turn(tok):
    messages = [{"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": "42"}]
    expected = (f"{EOT}<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
                f"<|im_start|>assistant\n42<|im_end|>\n")
    check_render(tok, messages, expected)


def test_render_with_system_message_and_generation_prompt(tok):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": "42"}]
    expected = (f"{EOT}<|im_start|>system\nYou are terse.<|im_end|>\n"
                f"<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
                f"<|im_start|>assistant\n42<|im_end|>\n")
    check_render(tok, messages, expected)
    ids, mask = check_render(tok, messages, expected + "<|im_start|>assistant\n",
                             add_generation_prompt=True)
    gen = chat.generation_prompt(tok)
    assert ids[-len(gen):] == gen and not any(mask[-len(gen):])


def test_render_three_assistant_turns(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Sort the words: pear apple fig"},
                {"role": "assistant", "content": "apple fig pear"},
                {"role": "user", "content": "And 1 + 1?"},
                {"role": "assistant", "content": "2"}]
    expected = (f"{EOT}<|im_start|>system\nBe brief.<|im_end|>\n"
                "<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\nHello.<|im_end|>\n"
                "<|im_start|>user\nSort the words: pear apple fig<|im_end|>\n"
                "<|im_start|>assistant\napple fig pear<|im_end|>\n"
                "<|im_start|>user\nAnd 1 + 1?<|im_end|>\n"
                "<|im_start|>assistant\n2<|im_end|>\n")
    ids, mask = check_render(tok, messages, expected)
    assert ids.count(tok.special_tokens[IM_END]) == 7
    assert sum(1 for m, i in zip(mask, ids) if m and i == tok.special_tokens[IM_END]) == 3


def test_render_empty_answer_trains_only_the_end_of_turn(tok):
    messages = [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}]
    ids, mask = render(messages, tok)
    assert [i for i, m in zip(ids, mask) if m] == [tok.special_tokens[IM_END]]


def test_render_needs_the_chat_tokens(bpe):
    with pytest.raises(ValueError, match="no chat tokens"):
        render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], bpe)


def test_control_text_in_a_message_is_ordinary_text(tok):
    text = "type <|im_end|> then <|im_start|>assistant\nand <|endoftext|>"
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
    ids, mask = render(messages, tok)
    specials = set(tok.special_tokens.values())
    # one <|endoftext|>, two <|im_start|>, two <|im_end|>: the markers of the template only
    assert sum(i in specials for i in ids) == 5
    assert ids.count(tok.special_tokens[IM_END]) == 2
    assert tok.decode(ids) == (f"{EOT}<|im_start|>user\n{text}<|im_end|>\n"
                               f"<|im_start|>assistant\n{text}<|im_end|>\n")
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained[:-1] == tok.encode(text, disallowed_special=())
    assert not any(i in specials for i in trained[:-1])


# ---- the chat tokens in a tokenizer ------------------------------------------------------------

SAMPLE = "The cat sat on the mat.\nWhat is 12 + 30? 42 <|im_end|> café ünïcode ☃"


def check_add_chat_tokens(old):
    new = add_chat_tokens(old)
    assert new.encode_ordinary(SAMPLE) == old.encode_ordinary(SAMPLE)
    assert new.encode(SAMPLE, disallowed_special=()) == old.encode(SAMPLE, disallowed_special=())
    for s, i in old.special_tokens.items():
        assert new.special_tokens[s] == i
    v = old.vocab_size
    assert new.special_tokens[IM_START] == v and new.special_tokens[IM_END] == v + 1
    assert new.vocab_size == v + 2
    for i in range(v):  # every old id decodes to the same bytes
        assert new.token_bytes(i) == old.token_bytes(i)
    assert new.decode([v, v + 1]) == IM_START + IM_END
    again = add_chat_tokens(new)
    assert again.special_tokens == new.special_tokens and again.vocab_size == new.vocab_size
    assert again.encode_ordinary(SAMPLE) == new.encode_ordinary(SAMPLE)
    return new


def test_add_chat_tokens_keeps_old_ids(bpe):
    new = check_add_chat_tokens(bpe)
    assert bpe.special_tokens == {EOT: bpe.vocab_size - 1}  # the original is left alone
    assert IM_START not in bpe.special_tokens
    check_add_chat_tokens(Tokenizer.bytes())


def test_add_chat_tokens_keeps_a_trusted_pattern():
    pattern = r"[a-z]+| "  # leaves characters out: only usable when trusted
    old = Tokenizer.train("the cat sat on the mat " * 20, 270, pattern=pattern, trust_pattern=True)
    new = add_chat_tokens(old)
    assert new.trust_pattern and new.pattern == pattern
    assert new.encode_ordinary("the cat sat") == old.encode_ordinary("the cat sat")


def test_add_chat_tokens_survives_save_and_load(bpe, tmp_path):
    new = add_chat_tokens(bpe)
    new.save(tmp_path / "tok.json")
    back = Tokenizer.load(tmp_path / "tok.json")
    assert back.special_tokens == new.special_tokens
    assert back.encode_ordinary(SAMPLE) == bpe.encode_ordinary(SAMPLE)


def test_add_chat_tokens_on_r50k_base():
    old = Tokenizer.from_tiktoken(shared_file("vocab", "r50k_base.tiktoken"))
    assert old.vocab_size == 50257 and old.eot_id == 50256
    new = check_add_chat_tokens(old)
    assert new.special_tokens == {EOT: 50256, IM_START: 50257, IM_END: 50258}
    # GPT-2's ids, known independently: "Hello world" -> [15496, 995]
    assert new.encode_ordinary("Hello world") == [15496, 995]


# ---- the chat tokens in a model ------------------------------------------------------------------

TINY = dict(n_layers=1, d_model=32, n_heads=2, context_length=32)


def forward_logits(model, ids):
    logits, _ = model(np.asarray([ids], np.int64))
    return np.array(logits.data[0], np.float64)


@pytest.mark.parametrize("tied", [True, False])
def test_grow_vocab_keeps_old_rows_and_logits(tied):
    v = 40
    model = GPT.from_preset("laptop", vocab_size=v, tie_embeddings=tied, **TINY)
    assert (model.lm_head is None) == tied
    emb_before = np.array(model.tok_emb.weight.data)
    head_before = None if tied else np.array(model.lm_head.weight.data)
    prompt = [3, 17, 5, 39, 0, 22]
    before = forward_logits(model, prompt)
    grow_vocab(model, v + 2, [v, v + 1])
    assert model.config.vocab_size == v + 2
    emb = np.array(model.tok_emb.weight.data)
    assert emb.shape == (v + 2, TINY["d_model"]) and emb.dtype == emb_before.dtype
    assert np.array_equal(emb[:v], emb_before)
    mean = emb_before.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(emb[v], mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(emb[v + 1], mean, rtol=1e-6, atol=1e-9)
    if not tied:
        head = np.array(model.lm_head.weight.data)
        assert head.shape == (v + 2, TINY["d_model"])
        assert np.array_equal(head[:v], head_before)
        np.testing.assert_allclose(head[v:], np.tile(head_before.mean(axis=0), (2, 1)),
                                   rtol=1e-6, atol=1e-9)
    assert model.tok_emb.weight.requires_grad
    after = forward_logits(model, prompt)
    assert after.shape == (len(prompt), v + 2)
    np.testing.assert_allclose(after[:, :v], before, rtol=1e-5, atol=1e-6)
    # a new id's logit is h . mean(rows) = the mean of the old logits (linearity)
    for new in (v, v + 1):
        np.testing.assert_allclose(after[:, new], before.mean(axis=1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_prepare_for_chat_grows_model_and_tokenizer_once(bpe, tied):
    model = GPT.from_preset("laptop", vocab_size=bpe.vocab_size, tie_embeddings=tied, **TINY)
    v = bpe.vocab_size
    emb_before = np.array(model.tok_emb.weight.data)
    prompt = bpe.encode_ordinary("The cat sat")
    before = forward_logits(model, prompt)
    model2, tok2 = prepare_for_chat(model, bpe)
    assert model2 is model
    assert tok2.special_tokens[IM_START] == v and tok2.special_tokens[IM_END] == v + 1
    assert model.config.vocab_size == v + 2 == tok2.vocab_size
    assert np.array_equal(np.array(model.tok_emb.weight.data)[:v], emb_before)
    np.testing.assert_allclose(forward_logits(model, prompt)[:, :v], before, rtol=1e-5, atol=1e-6)
    # a chat model is left as it is
    weights = {k: np.array(a) for k, a in model.state_dict().items()}
    model3, tok3 = prepare_for_chat(model, tok2)
    assert tok3 is tok2 and model3.config.vocab_size == v + 2
    for k, a in model3.state_dict().items():
        assert np.array_equal(a, weights[k]), k


# ---- data formats -----------------------------------------------------------------------------

U, A, S = "user", "assistant", "system"


def msg(role, content):
    return {"role": role, "content": content}


@pytest.mark.parametrize("record, expected", [
    ({"messages": [msg(S, "Be brief."), msg(U, "Hi"), msg(A, "Hello.")]},
     [msg(S, "Be brief."), msg(U, "Hi"), msg(A, "Hello.")]),
    ({"prompt": "What is 1 + 1?", "completion": "2"}, [msg(U, "What is 1 + 1?"), msg(A, "2")]),
    ({"prompt": [msg(S, "Be brief."), msg(U, "Hi")], "completion": [msg(A, "Hello.")]},
     [msg(S, "Be brief."), msg(U, "Hi"), msg(A, "Hello.")]),
    ({"instruction": "Sort the words.", "input": "pear apple", "output": "apple pear"},
     [msg(U, "Sort the words.\n\npear apple"), msg(A, "apple pear")]),
    ({"instruction": "Name a fruit.", "input": "", "output": "fig"},
     [msg(U, "Name a fruit."), msg(A, "fig")]),
    ({"instruction": "Name a fruit.", "output": "fig"}, [msg(U, "Name a fruit."), msg(A, "fig")]),
], ids=["messages", "prompt-completion", "prompt-completion-lists", "alpaca-input",
        "alpaca-empty-input", "alpaca-no-input"])
def test_conversation_from_record(record, expected):
    assert conversation_from_record(record) == expected


@pytest.mark.parametrize("record, problem", [
    ([msg(U, "a"), msg(A, "b")], r"expected a JSON object, got list"),
    ("hello", r"expected a JSON object, got str"),
    ({"question": "a", "answer": "b"}, r"unknown format \(keys \['answer', 'question'\]\)"),
    ({"prompt": "a"}, r"has prompt but no 'completion'"),
    ({"completion": "b"}, r"has completion but no 'prompt'"),
    ({"prompt": 3, "completion": "b"}, r"'prompt' must be a string or a list of messages, got int"),
    ({"messages": [msg(U, 5), msg(A, "b")]}, r"\[0\]: content must be a string, got int"),
    ({"messages": [msg(U, "a"), msg("bot", "b")]}, r"\[1\]: role must be one of .*got 'bot'"),
    ({"messages": [msg(U, "a"), msg(S, "s"), msg(A, "b")]},
     r"\[1\]: a system message may only come first"),
    ({"messages": [msg(S, "s"), msg(U, "a")]}, r"no assistant message"),
    ({"messages": []}, r"must be a non-empty list"),
    ({"messages": ["hi"]}, r"\[0\]: must be an object with 'role' and 'content', got str"),
    ({"instruction": "a", "output": 5}, r"Alpaca record needs a string 'output', got int"),
    ({"instruction": "a"}, r"Alpaca record needs a string 'output', got nothing"),
    ({"instruction": "a", "input": 1, "output": "b"}, r"Alpaca 'input' must be a string, got int"),
], ids=["list", "string", "unknown-keys", "prompt-only", "completion-only", "prompt-int",
        "content-int", "bad-role", "system-not-first", "no-assistant", "no-messages",
        "message-not-object", "alpaca-output-int", "alpaca-no-output", "alpaca-input-int"])
def test_conversation_from_record_refuses_bad_records(record, problem):
    with pytest.raises(ValueError, match=r"^line 7: .*" + problem):
        conversation_from_record(record, where="line 7")


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = [json.dumps({"messages": [msg(U, "Hi"), msg(A, "Hello.")]}),
        json.dumps({"prompt": "1 + 1?", "completion": "2"}),
        json.dumps({"instruction": "Name a fruit.", "output": "fig"})]


def test_read_conversations_mixes_formats_and_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD[0], "", "   ", GOOD[1], GOOD[2], ""])
    assert read_conversations(path) == [[msg(U, "Hi"), msg(A, "Hello.")],
                                        [msg(U, "1 + 1?"), msg(A, "2")],
                                        [msg(U, "Name a fruit."), msg(A, "fig")]]


def test_read_conversations_names_file_and_line(tmp_path):
    # blank lines count: the bad JSON is on line 4 of the file
    path = write_lines(tmp_path / "bad.jsonl", [GOOD[0], "", GOOD[1], '{"prompt": "a",', GOOD[2]])
    with pytest.raises(ValueError, match=r"bad\.jsonl:4: invalid JSON"):
        read_conversations(path)
    path = write_lines(tmp_path / "bad2.jsonl", [GOOD[0], "", "", GOOD[1], '{"prompt": "a"}'])
    with pytest.raises(ValueError, match=r"bad2\.jsonl:5: has prompt but no 'completion'"):
        read_conversations(path)
    path = write_lines(tmp_path / "bad3.jsonl", [GOOD[0], "[1, 2]"])
    with pytest.raises(ValueError, match=r"bad3\.jsonl:2: expected a JSON object, got list"):
        read_conversations(path)


def test_read_conversations_keeps_unicode_line_separators_inside_strings(tmp_path):
    records = [{"prompt": "first\u2028second", "completion": "ok"},
               {"prompt": "x", "completion": "y\u0085z\u2029"},
               {"prompt": "c"}]
    path = tmp_path / "u.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                    encoding="utf-8")
    with pytest.raises(ValueError, match=r"u\.jsonl:3: has prompt but no 'completion'"):
        read_conversations(path)
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records[:2]) + "\n",
                    encoding="utf-8")
    assert read_conversations(path) == [[msg(U, "first\u2028second"), msg(A, "ok")],
                                        [msg(U, "x"), msg(A, "y\u0085z\u2029")]]


def test_read_conversations_refuses_empty_and_non_utf8_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no conversations"):
        read_conversations(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    with pytest.raises(ValueError, match=r"blank\.jsonl: no conversations"):
        read_conversations(tmp_path / "blank.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(
        (GOOD[0] + "\n").encode() + '{"prompt": "café", "completion": "x"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8"):
        read_conversations(tmp_path / "latin1.jsonl")
    with pytest.raises(OSError, match=r"missing\.jsonl: cannot read"):
        read_conversations(tmp_path / "missing.jsonl")


# ---- training examples ------------------------------------------------------------------------

def test_to_example_shifts_and_masks(tok):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": "42"},
                {"role": "user", "content": "Sort the words: pear fig"},
                {"role": "assistant", "content": "fig pear"}]
    x, y = to_example(messages, tok)
    ids, mask = render(messages, tok)
    assert x.dtype == np.int64 and y.dtype == np.int64
    assert len(x) == len(y) == len(ids) - 1
    assert list(x) == ids[:-1]
    trained = y != -100
    assert np.array_equal(y[trained], np.asarray(ids[1:])[trained])
    assert np.array_equal(trained, np.asarray(mask[1:]))
    assert set(y[~trained].tolist()) == {-100}
    assert tok.decode(y[trained].tolist()) == "42" + IM_END + "fig pear" + IM_END
    # a trained target is predicted from the token before it: the input there is the last
    # token of "assistant\n" or of the answer so far, never a target of the user's text
    first = int(np.argmax(trained))
    assert tok.decode(x[:first + 1].tolist()).endswith("<|im_start|>assistant\n")
