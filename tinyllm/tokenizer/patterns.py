"""Pre-tokenization split patterns, by name, the safety check of custom ones, and GPT-2's
byte <-> printable-character map.

The named strings are the ones tiktoken ships (`tiktoken_ext.openai_public`), so that our
regex split of a text is the same list of pieces as tiktoken's. They use possessive
quantifiers (`++`, `?+`), which the `regex` package supports and the standard `re` module
does not.

A custom pattern comes from a user or from a tokenizer file, which is data, not code: it is
used only when it is safe (`check_pattern`). Safe means two things. Coverage: its matches
tile any text, so no character is silently left out of the tokens (checked on characters of
every Unicode general category in several contexts). Speed: it runs in about linear time,
so no input makes it backtrack for hours (checked on long runs of one character and of
alternating characters, under the `regex` module's `timeout=`). `trust_pattern=True` skips
the check; even then a custom pattern is run with a timeout and a text it leaves gaps in is
refused at encode time.
"""

import functools
import re
import unicodedata

import regex

# GPT-2 / r50k_base. The original GPT-2 release spells it
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# which splits every text the same way.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# GPT-4 / cl100k_base: case-insensitive contractions, digits in groups of at most 3,
# newlines kept apart from other whitespace.
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""

# GPT-4o / o200k_base: words split at case changes, contractions attached to the word.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# The same two patterns for ASCII-only text, for the standard `re` module (possessive
# quantifiers need Python 3.11), which splits ASCII about twice as fast as `regex`. On ASCII,
# \p{L} is [A-Za-z], \p{N} is [0-9] and \s is [\t\n\x0b\x0c\r ] (Unicode White_Space, as
# `regex` and tiktoken use it; not \x1c-\x1f, which Python's str.isspace counts). Used only
# when `text.isascii()`; the tests check both give the same pieces.
_WS = r"\t\n\x0b\x0c\r "
GPT2_ASCII_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]++| ?[0-9]++| ?[^%(ws)sA-Za-z0-9]++|[%(ws)s]++$"""
    r"""|[%(ws)s]+(?![^%(ws)s])|[%(ws)s]""" % {"ws": _WS}
)
GPT4_ASCII_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?+[A-Za-z]++|[0-9]{1,3}+"""
    r"""| ?[^%(ws)sA-Za-z0-9]++[\r\n]*+|[%(ws)s]++$|[%(ws)s]*[\r\n]|[%(ws)s]+(?![^%(ws)s])"""
    r"""|[%(ws)s]""" % {"ws": _WS}
)
ASCII_PATTERNS = {GPT2_PATTERN: GPT2_ASCII_PATTERN, GPT4_PATTERN: GPT4_ASCII_PATTERN}


def ascii_findall(pattern):
    """A `findall` for ASCII-only text equivalent to `regex.compile(pattern).findall`, or None
    when there is none for this pattern (or this Python's `re` lacks possessive quantifiers)."""
    import re

    ascii_pattern = ASCII_PATTERNS.get(pattern)
    if ascii_pattern is None:
        return None
    try:
        return re.compile(ascii_pattern).findall
    except re.error:
        return None


PATTERNS = {
    "gpt2": GPT2_PATTERN,
    "r50k": GPT2_PATTERN,
    "gpt4": GPT4_PATTERN,
    "cl100k": GPT4_PATTERN,
    "o200k": O200K_PATTERN,
}


def resolve_pattern(pattern):
    """A pattern name ('gpt2', 'gpt4', 'o200k') or a regex string -> the regex string."""
    if pattern is None:
        return GPT2_PATTERN
    return PATTERNS.get(pattern, pattern)


# ---- custom patterns: the safety check ----------------------------------------------------

class PatternError(ValueError):
    """A split pattern that is refused: unknown name, not a regex, leaves text out, or slow."""


# Seconds one adversarial text may take in the check. A named pattern takes about 3 ms on
# each (20,000 characters); a quadratic one about 0.5 s, an exponential one forever.
CHECK_TIMEOUT = 0.25
ADVERSARIAL_CHARS = 20_000


def encode_timeout(n_chars):
    """Seconds a custom pattern may take to split `n_chars` characters: generous (about 100x
    what the named patterns need) but finite, so that no input hangs the process."""
    return 10.0 + 1e-5 * n_chars


# Characters of every Unicode general category: letters (Lu Ll Lt Lm Lo) of several scripts,
# marks (Mn Mc Me), numbers (Nd Nl No), punctuation (Pc Pd Ps Pe Pi Pf Po), symbols (Sm Sc Sk
# So) and emoji, whitespace (Zs Zl Zp, and the Cc ones), controls, format characters, lone
# surrogates (the tokenizer encodes them with 'surrogatepass'), private use and unassigned;
# then sequences that split patterns treat specially.
COVERAGE_CHARS = (
    "AZaz\u00e9\u00df\u0416\u0436\u03b1\u01c5\u02b0\u65e5\u672c\u05d0\u0639\u0e01\u0905\ud55c"
    "\u0301\u0903\u20dd"
    "07\u0663\u2167\u00bd\u00b2"
    "_\u203f-\u2014(\u300c)\u300d\u00ab\u2018\u00bb\u2019!.,;:?'\"\u3001\u00bf\u2026/\\@#%&*"
    "+<=>|~\u2211\u221a$\u20ac\u00a3^`\u00a9\u00ae\u00b0"
    " \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2003\u200a\u2028\u2029\u202f\u205f\u3000"
    "\x00\x01\x1b\x1c\x7f\x9f\u200b\u200d\ufeff\u00ad"
    "\ud800\udfff\ue000\u0378\uffff\ufffd"
)
COVERAGE_SEQUENCES = (
    "\r\n", "\n\n", "  ", "e\u0301", "\U0001f44d", "\U0001f44d\U0001f3fd",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f1eb\U0001f1f7", "\U00010348",
    "\U000e0001", "<|endoftext|>", "'s", "'LL", "don't", "Hello World", "CamelCase",
    "12345678", "3.14", "x/y", "\x1b[0m",
)


def coverage_texts():
    """Short texts that hold every sample character and sequence: each alone first (for the
    plainest message), then in contexts, then all of them together."""
    samples = list(COVERAGE_CHARS) + list(COVERAGE_SEQUENCES)
    yield from samples
    for s in samples:
        yield from (s * 3, f"a{s}b", f" {s} ", f"1{s}2", f"{s}\n", f"x  {s}\r\n y", f".{s}!")
    yield "".join(samples)
    yield " ".join(samples)
    yield "\n".join(samples)


def adversarial_texts(n=ADVERSARIAL_CHARS):
    """Long runs of one character (alone and before another one) and of alternating
    characters: the inputs on which backtracking patterns blow up."""
    for c in ("a", "A", " ", "1", "!", "'", "\n", "\t", "\u65e5", "\u0301", "\u3000", "\x00"):
        yield c * n
        yield c * n + "\x00"
    for pair in ("ab", "aA", "a ", " \n", "1a", "a1", ".a", "a.", "\r\n", "a'", " !", "\u65e5a"):
        yield pair * (n // 2)


def describe_pattern(pattern):
    """A pattern's name, or its text shortened for a message."""
    name = pattern_name(pattern)
    if name:
        return name
    text = repr(pattern)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_char(c):
    """"U+0301 '\\u0301' COMBINING ACUTE ACCENT" (the category for unnamed characters)."""
    name = unicodedata.name(c, None) or f"(category {unicodedata.category(c)})"
    return f"U+{ord(c):04X} {c!r} {name}"


def compile_pattern(pattern):
    """regex.compile, with a bad pattern reported as PatternError."""
    if not isinstance(pattern, str):
        raise PatternError(f"pattern must be a name ({', '.join(PATTERNS)}) or a regex string, "
                           f"got {type(pattern).__name__}")
    try:
        return regex.compile(pattern)
    except (regex.error, ValueError, OverflowError, RecursionError) as e:
        raise PatternError(f"pattern {describe_pattern(pattern)} is not a valid regex: {e}") \
            from None


def first_gap(compiled, text, timeout=None):
    """The index of the first character of `text` that no match covers, or None."""
    pos = 0
    for m in compiled.finditer(text, timeout=timeout):
        if m.start() > pos:
            return pos
        pos = max(pos, m.end())
    return pos if pos < len(text) else None


def gap_message(pattern, text, i):
    return (f"the split pattern {describe_pattern(pattern)} leaves out {describe_char(text[i])} "
            f"at position {i} of {text[max(0, i - 20):i + 20]!r}: every character must belong "
            f"to a piece, or the tokens would drop text")


def timeout_message(pattern, n_chars, seconds):
    return (f"the split pattern {describe_pattern(pattern)} took over {seconds:g}s on a text of "
            f"{n_chars:,} characters (catastrophic backtracking?)")


def _regex_has_timeout():
    try:
        regex.compile("a").findall("a", timeout=1.0)
        return True
    except TypeError:
        return False


REGEX_HAS_TIMEOUT = _regex_has_timeout()


@functools.lru_cache(maxsize=64)
def pattern_problem(pattern):
    """Why the custom regex `pattern` is unsafe as a split pattern, or None when it is safe."""
    if not REGEX_HAS_TIMEOUT:
        return (f"this version of the regex module ({regex.__version__}) has no timeout=, so "
                f"custom patterns cannot be checked; upgrade regex")
    compiled = compile_pattern(pattern)
    for text in coverage_texts():
        try:
            i = first_gap(compiled, text, timeout=CHECK_TIMEOUT)
        except TimeoutError:
            return timeout_message(pattern, len(text), CHECK_TIMEOUT)
        if i is not None:
            return gap_message(pattern, text, i)
    for text in adversarial_texts():
        try:
            compiled.findall(text, timeout=CHECK_TIMEOUT)
        except TimeoutError:
            return (f"{timeout_message(pattern, len(text), CHECK_TIMEOUT)}: it must run in "
                    f"linear time (the text was {text[:3]!r}... repeated)")
    return None


def check_pattern(pattern, trust=False):
    """The regex string of `pattern` (a name or a regex). A named pattern is always used; a
    custom one only when it passes the check above, or when `trust` is true. PatternError
    otherwise, saying why."""
    if pattern is None:
        return GPT2_PATTERN
    resolved = resolve_pattern(pattern)
    if pattern_name(resolved) is not None:
        return resolved
    if isinstance(resolved, str) and regex.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", resolved):
        # A bare word is never a useful split (it would leave out every other text).
        raise PatternError(f"unknown pattern name {resolved!r} (known: {', '.join(PATTERNS)}; "
                           f"anything else is taken as a regex)")
    compile_pattern(resolved)
    if not trust:
        problem = pattern_problem(resolved)
        if problem:
            raise PatternError(f"{problem}. Pass trust_pattern=True (on the command line "
                               f"--trust-pattern) to use it anyway")
    return resolved


def split_function(pattern):
    """text -> pieces for a pattern string. A named pattern is trusted to tile any text in
    linear time; a custom one runs under `encode_timeout` and raises ValueError when it
    leaves a gap or times out, so a text is never silently cut short and never hangs."""
    compiled = compile_pattern(pattern)
    if pattern_name(pattern) is not None:
        return compiled.findall
    # With capture groups findall returns the groups, not the pieces: take whole matches.
    def pieces(text, timeout):
        if compiled.groups:
            return [m.group() for m in compiled.finditer(text, timeout=timeout)]
        return compiled.findall(text, timeout=timeout)

    def split(text):
        seconds = encode_timeout(len(text))
        try:
            out = pieces(text, seconds)
            if sum(map(len, out)) != len(text):  # matches do not overlap: equal iff they tile
                i = first_gap(compiled, text, timeout=seconds)
                raise ValueError(gap_message(pattern, text, i if i is not None else 0))
        except TimeoutError:
            raise ValueError(timeout_message(pattern, len(text), seconds)) from None
        return out

    return split


def pattern_name(pattern):
    """The short name of a known pattern string, or None for a user pattern."""
    for name in ("gpt2", "gpt4", "o200k"):
        if PATTERNS[name] == pattern:
            return name
    return None


def bytes_to_unicode():
    """GPT-2's map from each byte to a printable character (encoder.json/vocab.bpe spell tokens
    with it). Printable Latin-1 bytes map to themselves; the other 68 are shifted to 256+."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ---- the same patterns for Hugging Face tokenizers (Oniguruma) -------------------------------

_BOUNDED = re.compile(r"\{(?:\d+(?:,\d*)?|,\d+)\}")


def onig_pattern(pattern):
    """`pattern` as tokenizers' regex engine (Oniguruma, Ruby syntax) reads it the same way.

    The one difference in our patterns: Ruby reads a bounded repeat followed by `+`, as in
    GPT-4's `\\p{N}{1,3}+`, as "one or more times {1,3}" (any run of digits), where `regex`
    reads a possessive {1,3}. An atomic group, `(?>\\p{N}{1,3})`, means the possessive repeat
    in both. The rest (`++`, `?+`, `*+`, \\p{..}, (?i:..)) means the same in both."""
    out = []  # pieces; `atom` indexes where the last atom (what a quantifier applies to) starts
    groups, atom, i = [], None, 0
    while i < len(pattern):
        c = pattern[i]
        bounded = _BOUNDED.match(pattern, i)
        if bounded and atom is not None:  # a quantifier {n,m}
            j = bounded.end()
            if pattern[j:j + 1] == "+":
                out[atom:] = ["(?>" + "".join(out[atom:]) + bounded.group() + ")"]
                j += 1
            else:
                out.append(bounded.group())
            i = j
            continue
        if c == "\\":
            m = re.compile(r"\\[pPx]\{[^}]*\}|\\[pP][A-Za-z]|\\x[0-9A-Fa-f]{2}|\\u[0-9A-Fa-f]{4}"
                           r"|\\.", re.S).match(pattern, i)
            token = m.group()
        elif c == "[":
            token = pattern[i:_class_end(pattern, i)]
        elif c == "(":
            groups.append(len(out))
            out.append(c)
            i, atom = i + 1, None
            continue
        elif c == ")":
            out.append(c)
            atom = groups.pop() if groups else None
            i += 1
            continue
        elif c in "|*+?":
            out.append(c)
            i += 1
            atom = None
            continue
        else:
            token = c
        atom = len(out)
        out.append(token)
        i += len(token)
    return "".join(out)


def _class_end(pattern, start):
    """The index just past the character class `[...]` starting at `start` (nested classes,
    escapes, and a `]` first in the class taken literally)."""
    depth, i = 0, start
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            depth += 1
            i += 1
            if pattern[i:i + 1] == "^":
                i += 1
            if pattern[i:i + 1] == "]":
                i += 1
            continue
        if c == "]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError(f"tokenizer pattern: unterminated character class at {start}: {pattern!r}")
