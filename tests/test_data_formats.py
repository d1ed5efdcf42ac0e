"""Pretraining data beyond .txt: JSON-lines files (one document per line) and folders of
.txt and .jsonl files, with the other files listed once."""

import json

import pytest

from tinyllm.data import builtin_documents, load_corpus, read_documents, tokenize_documents
from tinyllm.tokenizer import Tokenizer


def write_lines(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode() + b"\n"
                              for line in lines))
    return path


def test_jsonl_file_gives_one_document_per_line(tmp_path):
    f = write_lines(tmp_path / "web.jsonl", [
        json.dumps({"text": "first page", "url": "http://a", "id": 1}),
        json.dumps({"id": 2, "text": "zweite Seite: naïve 日本 👍\nwith a newline"}),
        "",  # blank lines are skipped
        json.dumps({"text": ""}),
        json.dumps({"text": "last"}),
    ])
    assert read_documents(f) == [
        ("web.jsonl:1", "first page"),
        ("web.jsonl:2", "zweite Seite: naïve 日本 👍\nwith a newline"),
        ("web.jsonl:4", ""),
        ("web.jsonl:5", "last"),
    ]
    assert load_corpus(str(f)) == read_documents(f)


def test_each_jsonl_line_is_a_document_in_the_tokens(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "ab"}), json.dumps({"text": "c"})])
    tok = Tokenizer.bytes()
    tokens = tokenize_documents(read_documents(f), tok, progress=False)
    eot = tok.eot_id
    assert tokens.tolist() == [ord("a"), ord("b"), eot, ord("c"), eot]


@pytest.mark.parametrize("line,message", [
    (b'{"text": "unterminated\n', 'd.jsonl:2: invalid JSON (Unterminated string'),
    (b'["text", "in a list"]\n', 'd.jsonl:2: expected a JSON object with a "text" string, '
                                 'got an array'),
    (b'"just a string"\n', 'd.jsonl:2: expected a JSON object with a "text" string, got a '
                           'string'),
    (b'{"content": "x", "id": 3}\n', "d.jsonl:2: the object has no \"text\" field (its keys: "
                                     "'content', 'id')"),
    (b'{"text": 42}\n', 'd.jsonl:2: "text" must be a string, got a number'),
    (b'{"text": null}\n', 'd.jsonl:2: "text" must be a string, got null'),
    (b'{"text": "caf\xe9"}\n', "d.jsonl:2: not UTF-8 text"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, message):
    f = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "good"}), line,
                                           json.dumps({"text": "also good"})])
    with pytest.raises(ValueError) as info:
        read_documents(f)
    assert str(info.value).startswith(str(tmp_path / "d.jsonl") + ":2: ")
    assert message in str(info.value)


def test_folder_of_txt_and_jsonl_lists_skipped_files_once(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "sub").mkdir()
    write_lines(tmp_path / "sub" / "b.jsonl", [json.dumps({"text": "one"}),
                                               json.dumps({"text": "two"})])
    (tmp_path / "c.csv").write_text("x,y\n")
    (tmp_path / "sub" / "d.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "e.txt").write_text("hidden folders are not read")
    (tmp_path / ".DS_Store").write_bytes(b"\x00")
    capsys.readouterr()
    docs = read_documents(tmp_path)
    assert docs == [("a.txt", "plain text"), ("sub/b.jsonl:1", "one"), ("sub/b.jsonl:2", "two")]
    err = capsys.readouterr().err
    assert err == (f"note: {tmp_path}: skipped 2 files that are not .txt or .jsonl: c.csv, "
                   f"sub/d.bin\n")
    read_documents(tmp_path, quiet=True)
    assert capsys.readouterr().err == ""


def test_many_skipped_files_are_summarized(tmp_path, capsys):
    (tmp_path / "doc.txt").write_text("text")
    for i in range(13):
        (tmp_path / f"f{i:02d}.dat").write_text("x")
    capsys.readouterr()
    read_documents(tmp_path)
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "skipped 13 files" in err and "f00.dat, f01.dat" in err and "f09.dat, and 3 more" in err
    assert "f10.dat" not in err


def test_folder_without_documents_names_what_it_holds(tmp_path):
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"folder has no \.txt or \.jsonl files "
                                                r"\(.*skipped 1 file that is not .*: data.csv\)"):
        read_documents(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="the corpus is empty"):
        read_documents(tmp_path, quiet=True)


def test_builtin_and_plain_paths_are_unchanged(tmp_path):
    assert load_corpus("builtin") == load_corpus(None) == builtin_documents()
    f = tmp_path / "notes.md"  # a single file of any other extension is one text document
    f.write_text("# title\nbody\n")
    assert load_corpus(str(f)) == [("notes.md", "# title\nbody\n")]


def test_custom_pattern_documents_are_encoded_whole():
    # "(?s:.{1,4})": pieces of 4 characters that run across newlines, so the chunk cut
    # points of the named patterns are not safe for it.
    text = "".join(f"line {i}\nx" for i in range(60_000))  # longer than one chunk
    tok = Tokenizer.train(text[:20_000], 400, pattern=r"(?s:.{1,4})")
    tokens = tokenize_documents([("doc", text)], tok, progress=False)
    assert tokens.tolist() == tok.encode_ordinary(text) + [tok.eot_id]
