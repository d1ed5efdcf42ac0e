"""Tests of the byte-level BPE tokenizer (tinyllm.tokenizer)."""

import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyllm.tokenizer import GPT2_PATTERN, GPT4_PATTERN, O200K_PATTERN, Tokenizer, \
    TokenizerFileError
from tinyllm.tokenizer.train import count_pieces, train_merges

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPECIALS_CL100K = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                   "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}


def shared(*parts):
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data file not found: {path}")
    return path


# ---- text strategies ------------------------------------------------------------------------

FRAGMENTS = ["<|endoftext|>", "<|fim_prefix|>", "<|endofprompt|>", "<|end", "\r\n", "\r\n\r\n",
             "\n\n", "  ", "\t", "'s", "'LL", " 123456", "e\u0301", "\u0300\u0301", "👍🏽",
             "👨‍👩‍👧", "🇫🇷", "\x00", "\x1b[0m", "\u200b", "\ufeff", "日本語", "ﷺ", " don't",
             "Hello", " World", "a" * 30, "\u00a0", "\u2028"]
unicode_text = st.lists(
    st.one_of(st.text(max_size=12), st.sampled_from(FRAGMENTS),
              st.text(alphabet=st.characters(codec="utf-8"), max_size=12)),
    max_size=12).map("".join)


# ---- the naive reference trainer ------------------------------------------------------------

def naive_train(text, vocab_size, pattern, special_tokens=("<|endoftext|>",)):
    """Recount every pair of every word at each step; same tie rule: highest count, then the
    smallest (left id, right id)."""
    if special_tokens:
        text_parts = regex.split("|".join(regex.escape(s) for s in special_tokens), text)
    else:
        text_parts = [text]
    counts = Counter()
    for part in text_parts:
        counts.update(regex.findall(pattern, part))
    words = [list(p.encode("utf-8")) for p in counts]
    freqs = list(counts.values())
    merges = []
    for new_id in range(256, vocab_size):
        stats = Counter()
        for w, f in zip(words, freqs):
            for pair in zip(w, w[1:]):
                stats[pair] += f
        if not stats:
            break
        best = min(stats, key=lambda p: (-stats[p], p))
        merges.append(best)
        a, b = best
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i < len(w) - 1 and w[i] == a and w[i + 1] == b:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    return merges


def corpora():
    base = [
        ("tiny", "hello hello world, low lower lowest newer wider " * 3),
        ("overlaps", "aaaa aaa aa a aaaaaaa bbbabab abababab " * 5 + "a" * 50),
        ("unicode", "naïve café 日本語のテキスト 👍🏽👍🏽 e\u0301e\u0301 \r\n\r\n  tabs\t\t "
                    "<|endoftext|> numbers 12345 678 don't WE'LL " * 4),
    ]
    path = DATA / "tinyshakespeare.txt"
    if path.exists():
        base.append(("shakespeare", path.read_text(encoding="utf-8")[:30_000]))
    return base


@pytest.mark.parametrize("name,text", corpora(), ids=[c[0] for c in corpora()])
@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN], ids=["gpt2", "gpt4"])
def test_incremental_trainer_equals_naive(name, text, pattern):
    for vocab_size in (256, 280, 400 if name != "shakespeare" else 700):
        expected = naive_train(text, vocab_size, pattern)
        got = train_merges(text, vocab_size, pattern, special_tokens=["<|endoftext|>"])
        assert got == expected, (name, vocab_size)


def test_trainer_o200k_and_custom_pattern():
    text = "HelloWorld CamelCaseWords they'RE 1234567 x/y/z\r\n" * 20
    for pattern in (O200K_PATTERN, r"\w+|\s+|[^\w\s]+"):
        assert train_merges(text, 320, pattern) == naive_train(text, 320, pattern, ())


def test_trainer_stops_when_nothing_left_to_merge():
    tok = Tokenizer.train("ab ab ab", 1000)
    assert len(tok.merges) == 2  # "ab", then " ab"
    assert tok.decode(tok.encode("ab ab")) == "ab ab"


def test_streaming_counts_equal_whole_text():
    text = ("It was the best of times,\r\n\r\n   it was   the worst of times.\n\n\n"
            "  x  \t\t y 1234567 don't \u00a0 日本 👍 ") * 200
    for pattern in (GPT2_PATTERN, GPT4_PATTERN, O200K_PATTERN):
        whole = Counter(regex.findall(pattern, text))
        for chunk_chars in (1, 7, 64, 1000):
            assert count_pieces(text, pattern, chunk_chars=chunk_chars) == whole
        lines = text.splitlines(keepends=True)
        assert count_pieces(iter(lines), pattern, chunk_chars=50) == whole


def test_train_from_iterable_equals_string():
    text = "the quick brown fox\njumps over\n\nthe lazy dog\r\n" * 50
    a = Tokenizer.train(text, 300)
    b = Tokenizer.train(iter(text.splitlines(keepends=True)), 300)
    assert a.merges == b.merges


def test_special_tokens_are_not_trained_on():
    tok = Tokenizer.train("<|endoftext|>" * 100 + "ab", 300)
    assert all(b"|" not in tok.token_bytes(i) for i in tok.merges.values())


# ---- trained tokenizers: encode/decode -------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    path = DATA / "tinyshakespeare.txt"
    text = path.read_text(encoding="utf-8")[:100_000] if path.exists() else corpora()[0][1]
    text += corpora()[2][1]
    return Tokenizer.train(text, 1000, special_tokens=["<|endoftext|>", "<|user|> says"])


def test_byte_level_tokenizer():
    tok = Tokenizer.train("some text", 256)
    assert tok.vocab_size == 257 and tok.eot_id == 256 and not tok.merges
    assert tok.encode("hé") == list("hé".encode())
    b = Tokenizer.bytes()
    assert b.vocab_size == 257 and b.eot_id == 256
    assert b.encode("<|endoftext|>x", allowed_special="all") == [256, ord("x")]
    assert Tokenizer.bytes(special_tokens=[]).vocab_size == 256


@given(unicode_text)
def test_roundtrip_trained(trained, text):
    assert trained.decode(trained.encode(text, disallowed_special=())) == text
    assert trained.decode(trained.encode(text, allowed_special="all")) == text
    assert trained.decode_bytes(trained.encode_ordinary(text)) == text.encode("utf-8")


@given(unicode_text)
def test_roundtrip_bytes_tokenizer(text):
    tok = Tokenizer.bytes()
    assert tok.encode_ordinary(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


def test_special_token_semantics(trained):
    text = "hi <|endoftext|> there <|user|> says x"
    with pytest.raises(ValueError, match=regex.escape("<|endoftext|>")):
        trained.encode(text)
    with pytest.raises(ValueError, match="<\\|user\\|> says"):
        trained.encode("a <|user|> says", allowed_special={"<|endoftext|>"})
    ids = trained.encode(text, allowed_special="all")
    assert ids.count(trained.eot_id) == 1
    assert trained.special_tokens["<|user|> says"] in ids
    assert trained.decode(ids) == text
    only_eot = trained.encode(text, allowed_special={"<|endoftext|>"}, disallowed_special=())
    assert trained.special_tokens["<|user|> says"] not in only_eot
    ordinary = trained.encode(text, disallowed_special=())
    assert ordinary == trained.encode_ordinary(text)
    assert trained.eot_id not in ordinary
    assert trained.eot_id == 256 + len(trained.merges) and trained.vocab_size == trained.eot_id + 2
    assert trained.encode_batch(["a b", "<|endoftext|>"], allowed_special="all") == [
        trained.encode("a b"), [trained.eot_id]]
    with pytest.raises(ValueError):
        trained.encode("x", allowed_special={"<|nope|>"})


def test_decode_partial_utf8_and_bad_ids(trained):
    ids = Tokenizer.bytes().encode("é")  # two bytes
    assert trained.decode(ids[:1]) == "\ufffd"
    assert trained.decode_bytes(ids[:1]) == b"\xc3"
    with pytest.raises(ValueError, match="invalid token id"):
        trained.decode([5, 10 ** 6])
    with pytest.raises(ValueError, match="invalid token id"):
        trained.decode([-1])


def test_long_piece_is_not_quadratic(trained):
    for tok in (trained, Tokenizer.train("aaaa aaaaaaaaaaaaaaaa " * 50, 300)):
        t0 = time.perf_counter()
        ids = tok.encode("a" * 100_000)
        assert time.perf_counter() - t0 < 5.0
        assert tok.decode(ids) == "a" * 100_000
    # the heap path (long pieces) and the rescan path (short ones) agree
    from tinyllm.tokenizer.bpe import bpe_long, bpe_short
    tok = Tokenizer.train("aaaa abababab aab " * 50, 320)
    for s in ["a" * n for n in range(1, 40)] + ["ab" * 20 + "a", "aab" * 15]:
        ids = list(s.encode())
        assert bpe_long(ids, tok.merges) == bpe_short(ids, tok.merges)


# ---- save and load ---------------------------------------------------------------------------

@given(unicode_text)
def test_save_load_roundtrip(trained, tmp_path_factory, text):
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    trained.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.encode(text, allowed_special="all") == trained.encode(text, allowed_special="all")
    assert loaded.special_tokens == trained.special_tokens
    assert loaded.vocab == trained.vocab


def test_save_is_atomic_and_self_describing(trained, tmp_path):
    path = tmp_path / "tok.json"
    trained.save(path)
    trained.save(path)  # overwrite in place
    assert os.listdir(tmp_path) == ["tok.json"]  # no temporary left behind
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and doc["pattern_name"] == "gpt2"
    assert len(doc["merges"]) == doc["counts"]["merges"] == len(trained.merges) > 0
    vocab_path = tmp_path / "vocab.txt"
    trained.save_vocab(vocab_path)
    lines = vocab_path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == trained.vocab_size and "special" in lines[-1]


def test_load_rejects_bad_files(trained, tmp_path):
    path = tmp_path / "tok.json"
    trained.save(path)
    raw = path.read_bytes()

    def expect(data, match):
        bad = tmp_path / "bad.json"
        bad.write_bytes(data)
        with pytest.raises(TokenizerFileError, match=match) as info:
            Tokenizer.load(bad)
        assert str(bad) in str(info.value)

    expect(raw[: len(raw) // 2], "truncated or corrupt")
    expect(b"", "empty")
    expect(b"\xff\xfe" + raw, "UTF-8")
    expect(raw.replace(b'"merges":[[', b'"merges":[[1,', 1), "checksum")
    doc = json.loads(raw)
    doc["version"] = 99
    expect(json.dumps(doc).encode(), "version 99")
    doc = json.loads(raw)
    doc["merges"] = doc["merges"][:-1]
    body = {k: v for k, v in doc.items() if k != "sha256"}
    doc["sha256"] = Tokenizer._checksum(body)
    expect(json.dumps(doc).encode(), "merges, header says")
    expect(b'{"format": "something else"}', "not a tinyllm tokenizer")
    with pytest.raises(TokenizerFileError, match="cannot read"):
        Tokenizer.load(tmp_path / "missing.json")


ascii_text = st.lists(
    st.one_of(st.text(alphabet=st.characters(max_codepoint=127), max_size=12),
              st.sampled_from([f for f in FRAGMENTS if f.isascii()])),
    max_size=12).map("".join)


@given(ascii_text)
def test_ascii_fast_split_equals_regex(text):
    from tinyllm.tokenizer.patterns import ascii_findall
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        fast = ascii_findall(pattern)
        if fast is None:
            pytest.skip("no possessive quantifiers in this Python's re")
        assert fast(text) == regex.findall(pattern, text)


# ---- OpenAI vocabularies against tiktoken ----------------------------------------------------

def _ours_and_tiktoken(filename, pattern, specials):
    """Our tokenizer and tiktoken's, both built offline from the same rank file."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    path = shared("vocab", filename)
    theirs = tiktoken.Encoding(name=f"{filename}_test", pat_str=pattern,
                               mergeable_ranks=load_tiktoken_bpe(str(path)),
                               special_tokens=specials)
    return Tokenizer.from_tiktoken(path), theirs


@pytest.fixture(scope="module")
def r50k():
    return _ours_and_tiktoken("r50k_base.tiktoken", GPT2_PATTERN, {"<|endoftext|>": 50256})


@pytest.fixture(scope="module")
def cl100k():
    return _ours_and_tiktoken("cl100k_base.tiktoken", GPT4_PATTERN, SPECIALS_CL100K)


@pytest.fixture(scope="module", params=["r50k", "cl100k"])
def openai_pair(request):
    return request.getfixturevalue(request.param)


def test_loaded_metadata(r50k, cl100k):
    assert r50k[0].vocab_size == r50k[1].n_vocab == 50257 and r50k[0].eot_id == 50256
    assert cl100k[0].vocab_size == cl100k[1].n_vocab == 100277
    assert cl100k[0].eot_id == 100257 and cl100k[0].special_tokens == SPECIALS_CL100K


def test_ids_equal_tiktoken_on_shakespeare(openai_pair):
    ours, theirs = openai_pair
    text = shared("tinyshakespeare.txt").read_text(encoding="utf-8")
    assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)
    assert ours.decode(theirs.encode_ordinary(text)) == text


@given(text=unicode_text)
def test_ids_equal_tiktoken_on_generated_text(openai_pair, text):
    ours, theirs = openai_pair
    assert ours.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all")
    assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)
    assert ours.decode(ours.encode(text, disallowed_special=())) == text


@given(text=ascii_text)
def test_ids_equal_tiktoken_on_ascii_text(openai_pair, text):
    ours, theirs = openai_pair
    assert ours.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all")


def test_loaded_long_pieces_match_tiktoken(openai_pair):
    ours, theirs = openai_pair
    for text in ["a" * 5000, "ab" * 2000 + "x", " " * 3000 + "z", "1" * 999, "=" * 4000]:
        assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)


def test_disallowed_special_error_like_tiktoken(cl100k):
    ours, theirs = cl100k
    with pytest.raises(ValueError, match="fim_prefix"):
        ours.encode("a <|fim_prefix|> b")
    with pytest.raises(ValueError):
        theirs.encode("a <|fim_prefix|> b")


def test_from_gpt2_files_equal_r50k(r50k):
    ours, theirs = r50k
    gpt2 = Tokenizer.from_gpt2(shared("vocab", "encoder.json"), shared("vocab", "vocab.bpe"))
    assert gpt2.merges == ours.merges and gpt2.byte_ids == ours.byte_ids
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}
    text = "Hello, world! <|endoftext|> 日本語 👍"
    assert gpt2.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all")


def test_loaded_save_load(cl100k, tmp_path):
    ours, theirs = cl100k
    path = tmp_path / "cl100k.json"
    ours.save(path)
    loaded = Tokenizer.load(path)
    text = "Some text\r\n\r\n with 12345 digits and 👍 <|endoftext|>"
    assert loaded.encode(text, allowed_special="all") == theirs.encode(text, allowed_special="all")


# ---- command line ----------------------------------------------------------------------------

def test_cli(tmp_path, capsys):
    from tinyllm.cli import main
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 100, encoding="utf-8")
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "-o", str(out),
                 "--special", "<|pad|>", "-q"]) == 0
    tok = Tokenizer.load(out)
    n = 256 + len(tok.merges)  # the corpus runs out of pairs before 300
    assert tok.special_tokens == {"<|endoftext|>": n, "<|pad|>": n + 1}
    capsys.readouterr()
    assert main(["tokenizer", "encode", "-t", str(out), "--text", "to be"]) == 0
    ids = capsys.readouterr().out.split()
    assert [int(i) for i in ids] == tok.encode("to be")
    assert main(["tokenizer", "decode", "-t", str(out), "-n"] + ids) == 0
    assert capsys.readouterr().out == "to be"
    assert main(["tokenizer", "encode", "-t", str(out), "--text", "<|pad|>"]) == 2  # bad input
    assert main(["tokenizer", "stats", "-t", str(out), str(corpus), "--top", "3",
                 "--dump-vocab", str(tmp_path / "v.txt")]) == 0
    assert "bytes/token" in capsys.readouterr().out
