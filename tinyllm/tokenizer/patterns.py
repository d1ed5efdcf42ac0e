"""Pre-tokenization split patterns, by name, and GPT-2's byte <-> printable-character map.

The strings are the ones tiktoken ships (`tiktoken_ext.openai_public`), so that our regex
split of a text is the same list of pieces as tiktoken's. They use possessive quantifiers
(`++`, `?+`), which the `regex` package supports and the standard `re` module does not.
"""

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
