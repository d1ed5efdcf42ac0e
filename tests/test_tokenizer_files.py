"""Tokenizer files and patterns are data, never code: custom split patterns are checked for
coverage and backtracking, a file's keys are checked by name and type, and the `tinyllm
tokenizer` command answers bad input with one line and exit code 2."""

import json
import time

import pytest
import regex

from tinyllm.cli import main
from tinyllm.tokenizer import GPT2_PATTERN, GPT4_PATTERN, O200K_PATTERN, Tokenizer, \
    TokenizerFileError
from tinyllm.tokenizer import patterns
from tinyllm.tokenizer.patterns import PatternError, check_pattern, coverage_texts

SAFE_CUSTOM = r"\w+|\s+|[^\w\s]+"
QUADRATIC = r"a*b|[\s\S]"  # on "aaaa...": every start scans to the end, then takes one "a"
EXPONENTIAL = r"(?:a|aa)*c|[\s\S]"  # 2^n ways to split a run of "a" before failing


# ---- the pattern check ----------------------------------------------------------------------

def test_named_patterns_load_and_tile_the_whole_battery():
    assert check_pattern("gpt2") == GPT2_PATTERN
    assert check_pattern("gpt4") == check_pattern("cl100k") == GPT4_PATTERN
    assert check_pattern("o200k") == O200K_PATTERN
    assert check_pattern(None) == GPT2_PATTERN
    # the battery holds characters of every Unicode general category ...
    import unicodedata
    cats = {unicodedata.category(c) for t in coverage_texts() for c in t}
    assert cats >= {"Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No", "Pc",
                    "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl",
                    "Zp", "Cc", "Cf", "Cs", "Co", "Cn"}
    # ... and patterns known to tile any text pass it (checked here by joining the pieces)
    for pattern in (GPT2_PATTERN, GPT4_PATTERN, O200K_PATTERN, SAFE_CUSTOM):
        for text in coverage_texts():
            assert "".join(regex.findall(pattern, text)) == text
        assert patterns.pattern_problem(pattern) is None


@pytest.mark.parametrize("pattern,char", [
    (r"[^\n]+", "U+000A"),                       # drops newlines
    (r"[^\u0301]+", "U+0301"),                   # drops a combining mark
    (r"[^\u3000]+", "U+3000"),                   # drops the ideographic space
    (r"[^\ud800-\udfff]+", "U+D800"),            # drops lone surrogates
    (r"[^\r]+", "U+000D"),                       # drops carriage returns (\r\n)
    (r"\p{L}+|\p{M}+|\p{N}+|\s+|\p{P}+", "U+002B"),  # drops symbols, "+" first
])
def test_pattern_that_drops_a_character_is_refused(pattern, char):
    with pytest.raises(PatternError, match="leaves out " + regex.escape(char)) as info:
        Tokenizer(pattern=pattern)
    assert "trust_pattern=True" in str(info.value) and "--trust-pattern" in str(info.value)
    with pytest.raises(PatternError, match=regex.escape(char)):
        Tokenizer.train("some text", 260, pattern=pattern)


@pytest.mark.parametrize("pattern", [QUADRATIC, EXPONENTIAL])
def test_backtracking_pattern_is_refused_in_bounded_time(pattern):
    t0 = time.perf_counter()
    with pytest.raises(PatternError, match="linear time"):
        Tokenizer(pattern=pattern)
    assert time.perf_counter() - t0 < 5.0


def test_regex_module_accepts_timeout():
    assert patterns.REGEX_HAS_TIMEOUT
    with pytest.raises(TimeoutError):
        regex.compile(EXPONENTIAL).findall("a" * 60, timeout=0.05)


def test_bad_names_and_bad_regexes_are_refused():
    with pytest.raises(PatternError, match="unknown pattern name 'gpt5'"):
        Tokenizer(pattern="gpt5")
    with pytest.raises(PatternError, match="unknown pattern name"):
        Tokenizer(pattern="gpt5", trust_pattern=True)  # a bare word is never a split
    with pytest.raises(PatternError, match="not a valid regex"):
        Tokenizer(pattern="(a|", trust_pattern=True)
    with pytest.raises(PatternError, match="must be a name .* or a regex string, got int"):
        Tokenizer(pattern=5)


def test_train_refuses_a_pattern_before_reading_the_text():
    def text():
        raise AssertionError("the text was read before the pattern was checked")
        yield "never"
    with pytest.raises(PatternError):
        Tokenizer.train(text(), 300, pattern=r"[^\n]+")


def test_safe_custom_patterns_are_accepted_and_round_trip():
    text = "Hello, wörld! 日本語 \u0301x\r\n\u3000 $5 👍🏽\ud800 end"
    for pattern in (SAFE_CUSTOM, r"(\w+)|\W"):  # a capture group: pieces are whole matches
        tok = Tokenizer.train(text * 5, 300, pattern=pattern)
        assert tok.decode_bytes(tok.encode(text)) == text.encode("utf-8", "surrogatepass")
        # the pieces are the pattern's whole matches: compare with an independent split
        pieces = [m.group() for m in regex.finditer(pattern, text)]
        assert tok.encode(text) == [i for p in pieces for i in tok.encode(p)]


def test_trusted_pattern_with_gaps_raises_at_encode_time():
    tok = Tokenizer(pattern=r"[^\n]+", trust_pattern=True)
    assert tok.encode("ab c") == list(b"ab c")
    with pytest.raises(ValueError, match=r"leaves out U\+000A .* at position 2"):
        tok.encode("ab\ncd")
    with pytest.raises(ValueError, match="leaves out"):
        Tokenizer.train("ab\ncd", 300, pattern=r"[^\n]+", trust_pattern=True)
    trained = Tokenizer.train("abab abab", 260, pattern=r"[^\n]+", trust_pattern=True)
    assert trained.decode(trained.encode("abab")) == "abab"


def test_trusted_backtracking_pattern_times_out_at_encode_time(monkeypatch):
    tok = Tokenizer(pattern=EXPONENTIAL, trust_pattern=True)
    assert tok.decode(tok.encode("aab c")) == "aab c"
    monkeypatch.setattr(patterns, "encode_timeout", lambda n_chars: 0.05)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"split pattern .*\(\?:a\|aa\).* took over 0.05s"):
        tok.encode("a" * 5000)
    assert time.perf_counter() - t0 < 5.0


# ---- tokenizer files ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_tok():
    return Tokenizer.train("to be or not to be, that is the question " * 20, 280)


def write_doc(path, doc):
    """Write `doc` as a tokenizer file with a valid checksum (as a hand-edited file would)."""
    body = {k: v for k, v in doc.items() if k != "sha256"}
    path.write_text(json.dumps(dict(body, sha256=Tokenizer._checksum(body))))
    return path


def test_file_with_unsafe_pattern_is_refused_unless_trusted(tmp_path):
    tok = Tokenizer.train("ab\nab\n", 260, pattern=r"[^\n]+|\n")  # safe: it tiles
    path = tmp_path / "tok.json"
    tok.save(path)
    assert Tokenizer.load(path).pattern == r"[^\n]+|\n"
    doc = json.loads(path.read_text())
    doc["pattern"] = r"[^\n]+"  # now it drops newlines
    write_doc(path, doc)
    with pytest.raises(TokenizerFileError, match="leaves out U\\+000A") as info:
        Tokenizer.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert Tokenizer.load(path, trust_pattern=True).pattern == r"[^\n]+"
    doc["pattern"] = EXPONENTIAL
    write_doc(path, doc)
    with pytest.raises(TokenizerFileError, match="linear time"):
        Tokenizer.load(path)


def _set(key, value):
    def edit(doc):
        if "." in key:
            outer, inner = key.split(".")
            doc[outer][inner] = value
        else:
            doc[key] = value
    return edit


def _drop(key):
    def edit(doc):
        if "." in key:
            outer, inner = key.split(".")
            del doc[outer][inner]
        else:
            del doc[key]
    return edit


BAD_DOCS = [
    (_drop("pattern"), "missing key 'pattern'"),
    (_drop("merges"), "missing key 'merges'"),
    (_drop("special_tokens"), "missing key 'special_tokens'"),
    (_drop("byte_ids"), "missing key 'byte_ids'"),
    (_drop("whole_token_lookup"), "missing key 'whole_token_lookup'"),
    (_drop("counts"), "missing key 'counts'"),
    (_drop("counts.vocab_size"), "missing key 'counts.vocab_size'"),
    (_set("pattern", 5), "key 'pattern' must be a str, got int"),
    (_set("pattern_name", 3), "key 'pattern_name' must be a str or null, got int"),
    (_set("merges", "abc"), "key 'merges' must be a list of [int, int, int], got str"),
    (_set("merges", {"a": 1}), "key 'merges' must be a list of [int, int, int], got dict"),
    (_set("merges", [[97, 98]]), "key 'merges' must be a list of [int, int, int], item 0 is"),
    (_set("merges", [[97, 98, 256], [97, "b", 257]]), "item 1 is [97, \"b\", 257]"),
    (_set("merges", [[97, 98, True]]), "item 0 is [97, 98, true]"),
    (_set("special_tokens", ["<|endoftext|>"]),
     "key 'special_tokens' must be an object of str -> int, got list"),
    (_set("special_tokens", {"<|endoftext|>": "256"}), "'<|endoftext|>' is str"),
    (_set("byte_ids", [1, 2]), "key 'byte_ids' must be null or a list of 256 ints, got a list "
                               "of 2 items"),
    (_set("byte_ids", "identity"), "key 'byte_ids' must be null or a list of 256 ints, got str"),
    (_set("whole_token_lookup", "yes"), "key 'whole_token_lookup' must be a bool, got str"),
    (_set("counts", []), "key 'counts' must be an object, got list"),
    (_set("counts.merges", "24"), "key 'counts.merges' must be an int, got str"),
    (_set("special_tokens", {"": 300}), "special tokens must be non-empty strings"),
]


@pytest.mark.parametrize("edit,message", BAD_DOCS, ids=[m for _, m in BAD_DOCS])
def test_missing_or_ill_typed_key_names_file_and_key(small_tok, tmp_path, edit, message):
    doc = json.loads(small_tok.to_json())
    edit(doc)
    path = write_doc(tmp_path / "tok.json", doc)
    with pytest.raises(TokenizerFileError) as info:
        Tokenizer.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_bad_gpt2_and_tiktoken_files_name_file_and_line(tmp_path):
    enc, bpe = tmp_path / "encoder.json", tmp_path / "vocab.bpe"
    enc.write_text("[1, 2]")
    bpe.write_text("#version: 0.2\n")
    with pytest.raises(TokenizerFileError, match="encoder.json: must be an object"):
        Tokenizer.from_gpt2(enc, bpe)
    from tinyllm.tokenizer.patterns import bytes_to_unicode
    encoder = {c: b for b, c in bytes_to_unicode().items()}
    enc.write_text(json.dumps(encoder))
    bpe.write_text("#version: 0.2\na b\nzz q\n")
    with pytest.raises(TokenizerFileError, match=r"vocab.bpe:2: token 'ab' is not in"):
        Tokenizer.from_gpt2(enc, bpe)
    bpe.write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerFileError, match=r"vocab.bpe:2: expected two tokens"):
        Tokenizer.from_gpt2(enc, bpe)
    tk = tmp_path / "x.tiktoken"
    tk.write_text("YQ== 0\nnot-base64 1\n")
    with pytest.raises(TokenizerFileError, match=r"x.tiktoken:2: not a 'base64 rank' line"):
        Tokenizer.from_tiktoken(tk)


# ---- the command line -------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path, small_tok):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 50, encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    tok = tmp_path / "tok.json"
    small_tok.save(tok)
    (tmp_path / "garbage.json").write_text("not json at all")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "bad.tiktoken").write_text("!!! x\n")
    doc = json.loads(small_tok.to_json())
    doc["merges"] = "abc"
    write_doc(tmp_path / "badkey.json", doc)
    doc = json.loads(small_tok.to_json())
    doc["pattern"] = r"[^\n]+"
    write_doc(tmp_path / "unsafe.json", doc)
    return tmp_path


def run_cli(argv, capsys):
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


OUT = "out/tok.json"  # inside the test folder; written only by a successful train
CLI_CASES = [
    (["train", "{d}/nope.txt", "--vocab-size", "300", "-o", "{d}/" + OUT], "no such file"),
    (["train", "{d}/emptydir", "--vocab-size", "300", "-o", "{d}/t.json"], "is a folder"),
    (["train", "{d}/corpus.txt", "--vocab-size", "100", "-o", "{d}/t.json"],
     "--vocab-size: must be an integer >= 256, got 100"),
    (["train", "{d}/corpus.txt", "--vocab-size", "lots", "-o", "{d}/t.json"], "invalid int"),
    (["train", "{d}/corpus.txt", "--vocab-size", "300", "-o", "{d}/t.json", "--pattern", "gpt5"],
     "--pattern: unknown pattern name 'gpt5'"),
    (["train", "{d}/corpus.txt", "--vocab-size", "300", "-o", "{d}/t.json", "--pattern", "(a|"],
     "not a valid regex"),
    (["train", "{d}/corpus.txt", "--vocab-size", "300", "-o", "{d}/t.json",
      "--pattern", r"[^\n]+"], "leaves out U+000A"),
    (["train", "{d}/corpus.txt", "--vocab-size", "300", "-o", "{d}/t.json",
      "--pattern", QUADRATIC], "linear time"),
    (["train", "{d}/corpus.txt", "--vocab-size", "300", "-o", "{d}/nodir/t.json"],
     "-o/--output: the folder {d}/nodir does not exist"),
    (["train", "{d}/corpus.txt", "--vocab-size", "300", "-o", "{d}/emptydir"], "is a folder"),
    (["train", "{d}/corpus.txt", "--vocab-size", "300", "-o", "{d}/t.json",
      "--vocab-dump", "{d}/nodir/v.txt"], "--vocab-dump: the folder"),
    (["train", "{d}/corpus.txt", "--vocab-size", "300", "-o", "{d}/t.json", "--special", ""],
     "--special: a special token must be a non-empty string"),
    (["train", "{d}/latin1.txt", "--vocab-size", "300", "-o", "{d}/t.json", "-q"],
     "latin1.txt: not UTF-8 text"),
    (["train", "{d}/corpus.txt", "--vocab-size", "300", "-o", "{d}/t.json", "-q",
      "--pattern", r"[^\n]+", "--trust-pattern"], "leaves out U+000A"),
    (["train", "{d}/corpus.txt", "--vocab-size", "300"], "required: -o/--output"),
    (["encode", "-t", "{d}/missing.json", "--text", "hi"], "no such file or folder"),
    (["encode", "-t", "{d}/garbage.json", "--text", "hi"], "garbage.json: not a valid JSON"),
    (["encode", "-t", "{d}/badkey.json", "--text", "hi"],
     "badkey.json: key 'merges' must be a list of [int, int, int], got str"),
    (["encode", "-t", "{d}/unsafe.json", "--text", "hi"], "unsafe.json: the split pattern"),
    (["encode", "-t", "{d}/emptydir", "--text", "hi"], "without GPT-2's encoder.json"),
    (["encode", "-t", "{d}/bad.tiktoken", "--text", "hi"], "bad.tiktoken:1"),
    (["encode", "-t", "{d}/tok.json", "{d}/corpus.txt", "--text", "hi"], "not both"),
    (["encode", "-t", "{d}/tok.json", "{d}/nope.txt"], "INPUT: no such file"),
    (["encode", "-t", "{d}/tok.json", "--text", "a <|endoftext|>"], "disallowed special token"),
    (["decode", "-t", "{d}/tok.json", "5", "x"], "not a token id: 'x'"),
    (["decode", "-t", "{d}/tok.json", "5", "999999"], "invalid token id 999999"),
    (["stats", "-t", "{d}/tok.json", "--top", "0"], "--top: must be a positive integer, got 0"),
    (["stats", "-t", "{d}/tok.json", "--dump-vocab", "{d}/nodir/v.txt"], "--dump-vocab"),
    (["stats", "-t", "{d}/tok.json", "{d}/nope.txt"], "no such file"),
    (["stats"], "required: -t/--tokenizer"),
    ([], "required: ACTION"),
]


@pytest.mark.parametrize("argv,message", CLI_CASES, ids=[" ".join(a)[:60] for a, _ in CLI_CASES])
def test_cli_bad_input_is_one_line_and_exit_2(files, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("TINYLLM_DEBUG", raising=False)
    d = str(files)
    before = sorted(p.name for p in files.iterdir())
    code, out, err = run_cli(["tokenizer"] + [a.replace("{d}", d) for a in argv], capsys)
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert message.replace("{d}", d) in err, err
    assert sorted(p.name for p in files.iterdir()) == before  # nothing written


def test_cli_trust_pattern_loads_and_trains(files, capsys):
    d = files
    code, out, _ = run_cli(["tokenizer", "encode", "-t", str(d / "unsafe.json"), "--text", "to be",
                            "--trust-pattern"], capsys)
    assert code == 0 and out.split()
    code, _, err = run_cli(["tokenizer", "train", str(d / "corpus.txt"), "--vocab-size", "300",
                            "-o", str(d / "t.json"), "-q", "--pattern", r"[^\n]+|\n"], capsys)
    assert code == 0, err
    assert Tokenizer.load(d / "t.json").pattern == r"[^\n]+|\n"


def test_header_keys_are_checked_too(small_tok, tmp_path):
    doc = json.loads(small_tok.to_json())
    path = tmp_path / "tok.json"
    path.write_text(json.dumps(dict(doc, sha256=12)))
    with pytest.raises(TokenizerFileError, match="key 'sha256' must be a str, got int"):
        Tokenizer.load(path)
    write_doc(path, dict(doc, version=True))  # true == 1 in Python, not in the format
    with pytest.raises(TokenizerFileError, match="unsupported format version True"):
        Tokenizer.load(path)
