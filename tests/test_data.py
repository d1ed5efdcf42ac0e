"""Corpus splitting, token files and batches."""

import numpy as np
import pytest

from tinyllm.data import (
    Batches, builtin_documents, eval_windows, prepare_dataset, read_documents, split_documents,
    token_dtype, tokenize_documents, _chunks,
)
from tinyllm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def byte_tok():
    return Tokenizer.bytes()


def test_builtin_corpus_is_english_documents():
    docs = builtin_documents()
    assert len(docs) > 20
    text = " ".join(t for _, t in docs)
    assert len(text) > 100_000
    assert text.count(" the ") > 1000


def test_token_dtype_by_vocab_size():
    assert token_dtype(256) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(100_277) == np.uint32


def test_split_by_documents_is_deterministic_and_disjoint():
    docs = [(f"doc{i}", f"text number {i} " * (5 + i % 7)) for i in range(50)]
    train, val = split_documents(docs, 0.1)
    assert split_documents(docs, 0.1) == (train, val)
    names_t, names_v = {n for n, _ in train}, {n for n, _ in val}
    assert names_t.isdisjoint(names_v) and len(names_t | names_v) == 50
    frac = sum(len(t) for _, t in val) / sum(len(t) for _, t in docs)
    assert 0.05 <= frac <= 0.15
    # corpus order is kept inside each split
    assert [n for n, _ in train] == [n for n, _ in docs if n in names_t]


def test_single_document_is_cut_at_ninety_percent():
    text = "abcdefghij" * 100
    train, val = split_documents([("one", text)], 0.1)
    assert train == [("one", text[:900])] and val == [("one", text[900:])]


def test_read_documents_folder_and_errors(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("nested")
    (tmp_path / "skip.md").write_text("not text")
    docs = read_documents(tmp_path)
    assert docs == [("b.txt", "second"), ("sub/a.txt", "nested")]
    with pytest.raises(FileNotFoundError, match="nope"):
        read_documents(tmp_path / "nope")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="bad.txt: not UTF-8"):
        read_documents(tmp_path)


def test_tokens_have_eot_after_every_document(byte_tok):
    docs = [("a", "hi"), ("b", "yo!")]
    tokens = tokenize_documents(docs, byte_tok, progress=False)
    eot = byte_tok.eot_id
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [ord("h"), ord("i"), eot, ord("y"), ord("o"), ord("!"), eot]


def test_chunked_encoding_equals_whole_encoding():
    text = "".join(f"Line {i}:  words, and more\n\n  indented {i}\n" for i in range(3000))
    tok = Tokenizer.train(text[:20000], 300)
    pieces = list(_chunks(text, size=1000))
    assert len(pieces) > 10 and "".join(pieces) == text
    assert sum((tok.encode_ordinary(p) for p in pieces), []) == tok.encode_ordinary(text)


def test_prepare_dataset_caches_and_memmaps(tmp_path, byte_tok):
    docs = [(f"d{i}", f"document {i} says hello.\n" * 20) for i in range(30)]
    ds = prepare_dataset(docs, byte_tok, cache_dir=tmp_path, progress=False)
    assert isinstance(ds.train, np.memmap) and ds.train.dtype == np.uint16
    train_docs, val_docs = split_documents(docs)
    expect = tokenize_documents(train_docs, byte_tok, progress=False)
    np.testing.assert_array_equal(ds.train, expect)
    assert len(ds.val) == sum(len(t) + 1 for _, t in val_docs)
    again = prepare_dataset(docs, byte_tok, cache_dir=tmp_path, progress=False)
    assert again.folder == ds.folder
    other = prepare_dataset(docs[:-1], byte_tok, cache_dir=tmp_path, progress=False)
    assert other.folder != ds.folder  # other content, other key
    # a truncated cache file is reported, naming the file
    with open(ds.folder / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="train.bin"):
        prepare_dataset(docs, byte_tok, cache_dir=tmp_path, progress=False)


def test_batches_windows_are_shifted_by_one():
    tokens = np.arange(1000, dtype=np.uint16)
    b = Batches(tokens, batch_size=4, block_size=16, seed=3)
    x, y = b.get(7)
    assert x.shape == y.shape == (4, 16) and x.dtype == np.int64
    np.testing.assert_array_equal(y, x + 1)  # the next token of an arange
    np.testing.assert_array_equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows
    assert x.min() >= 0 and y.max() <= 999


def test_batches_are_deterministic_under_a_seed():
    tokens = np.random.default_rng(0).integers(0, 500, size=5000).astype(np.uint16)
    a, b, c = (Batches(tokens, 8, 32, seed=s) for s in (1, 1, 2))
    for k in (0, 5, 123):
        np.testing.assert_array_equal(a.get(k)[0], b.get(k)[0])
    assert not np.array_equal(a.get(0)[0], c.get(0)[0])
    assert not np.array_equal(a.get(0)[0], a.get(1)[0])


def test_sequential_batches_follow_each_other_and_wrap():
    tokens = np.arange(100, dtype=np.uint16)
    b = Batches(tokens, batch_size=2, block_size=10, order="sequential")
    x0, _ = b.get(0)
    x1, _ = b.get(1)
    assert x0[:, 0].tolist() == [0, 10] and x1[:, 0].tolist() == [20, 30]
    starts = np.concatenate([b.starts(k) for k in range(10)])
    assert starts.max() <= 100 - 11  # every window fits, wrapping around
    with pytest.raises(ValueError, match="too few"):
        Batches(tokens[:5], 2, 10)


def test_eval_windows_are_spread_and_fit():
    starts = eval_windows(np.zeros(1000), block_size=10, max_windows=50)
    assert len(starts) == 50 and starts[0] == 0 and starts[-1] == 989
    assert len(eval_windows(np.zeros(100), 10, 1000)) == 9  # non-overlapping when few
