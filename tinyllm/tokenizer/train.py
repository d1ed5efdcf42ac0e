"""BPE training: count pre-tokens once, then merge with incremental pair counts.

1. Count. The corpus (a str or an iterable of str, e.g. a file's lines) is cut into ~1 MB
   chunks; each is split by the pattern and its pieces counted.
   The last pieces of a chunk (those within 256 characters of its end) are carried into the
   next one, since more text may change them, so the counts equal those of the whole corpus
   split at once. Special-token strings are boundaries and are not counted.
2. Merge. Each distinct piece becomes a "word" of byte ids with its frequency. We keep
   `counts[pair]` (occurrences weighted by frequency, overlapping ones counted like a plain
   scan of adjacent pairs does), `where[pair]` (the words that contain it, possibly stale) and
   a max-heap of (count, pair). A merge rewrites only the words in `where[pair]`, subtracting
   their old pairs and adding their new ones; no pass over the whole corpus.
   Lazy heap: a pair's count only falls after it is pushed, except for the pairs that contain
   the new token, which are pushed when created. So a popped entry whose count is stale is an
   upper bound: re-push it with the true count and pop again. The first entry popped whose count
   is current is the best pair.
   Tie-break: the highest count wins; among equal counts, the smallest (left id, right id).
"""

import heapq
import sys
import time
from collections import Counter

import regex

from .patterns import ascii_findall, split_function

CHUNK_CHARS = 1 << 20
CARRY_CHARS = 256


def _as_chunks(text, chunk_chars):
    if isinstance(text, str):
        for i in range(0, len(text), chunk_chars):
            yield text[i:i + chunk_chars]
    else:
        for t in text:
            if not isinstance(t, str):
                raise TypeError(f"training text must be str or an iterable of str, got {type(t)}")
            yield t


def count_pieces(text, pattern, special_tokens=(), chunk_chars=CHUNK_CHARS):
    """Counter of the pattern's pieces over the whole corpus, streaming in chunks. A custom
    pattern runs under a timeout and must tile the text (ValueError otherwise; see
    `patterns.split_function`), so no text is silently left out of the counts."""
    unicode_findall = split_function(pattern)
    ascii_split = ascii_findall(pattern)

    def findall(s):
        if ascii_split is not None and s.isascii():
            return ascii_split(s)
        return unicode_findall(s)
    specials = regex.compile("|".join(regex.escape(s) for s in
                                      sorted(special_tokens, key=lambda s: (-len(s), s))))
    counts = Counter()
    buf = []  # pending text, not yet counted
    buf_len = 0

    def flush(final):
        # Count the pending text; unless final, keep its last pieces pending (see carry_start).
        nonlocal buf, buf_len
        s = "".join(buf)
        buf, buf_len = [], 0
        if not s:
            return
        pieces = findall(s)
        if not final:
            k, start = carry_start(s, pieces)
            del pieces[k:]
            buf, buf_len = [s[start:]], len(s) - start
        counts.update(pieces)

    def carry_start(s, pieces):
        # The pieces that end within CARRY_CHARS of the buffer's end may change when more text
        # follows (a word goes on, "'" becomes "'t", "  " before "x" splits as " " + " x"), so
        # they are carried into the next buffer; earlier ones are final. With the named
        # patterns a piece depends on at most a few characters after it, far below the margin.
        # Returns (number of final pieces, where the carried text starts). The pieces tile
        # the text (split_function refuses a custom pattern that leaves gaps).
        k, tail = len(pieces), 0
        while k > 0 and tail < CARRY_CHARS:
            k -= 1
            tail += len(pieces[k])
        return k, len(s) - tail

    for chunk in _as_chunks(text, chunk_chars):
        parts = specials.split(chunk) if special_tokens else [chunk]
        for k, part in enumerate(parts):
            if k > 0:
                flush(final=True)  # a special token ends the text before it
            if part:
                buf.append(part)
                buf_len += len(part)
        if buf_len >= chunk_chars:
            flush(final=False)
    flush(final=True)
    return counts


def merge_word(word, a, b, new_id):
    """`word` with each non-overlapping (a, b), left to right, replaced by new_id.
    `list.index` jumps to each candidate `a` at C speed."""
    out = []
    i, n = 0, len(word)
    while a in word[i:]:  # slices are short: words are pieces of a few tokens
        j = word.index(a, i)
        if j + 1 < n and word[j + 1] == b:
            out += word[i:j]
            out.append(new_id)
            i = j + 2
        else:
            out += word[i:j + 1]
            i = j + 1
    out += word[i:]
    return out


def train_merges(text, vocab_size, pattern, special_tokens=(), verbose=False):
    """The list of (a, b) merges, in order; merge k creates id 256 + k."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the bytes), got {vocab_size}")
    num_merges = vocab_size - 256
    t0 = time.perf_counter()
    piece_counts = count_pieces(text, pattern, special_tokens)
    words = [list(p.encode("utf-8", "surrogatepass")) for p in piece_counts]
    freqs = list(piece_counts.values())
    if verbose:
        print(f"counted {sum(freqs):,} pieces, {len(words):,} distinct, in "
              f"{time.perf_counter() - t0:.2f}s", file=sys.stderr)

    counts = {}
    where = {}
    for w, (word, f) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            counts[pair] = counts.get(pair, 0) + f
            s = where.get(pair)
            if s is None:
                where[pair] = {w}
            else:
                s.add(w)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)

    merges = []
    t1 = last_report = time.perf_counter()
    while len(merges) < num_merges and heap:
        neg, pair = heapq.heappop(heap)
        c = counts.get(pair, 0)
        if c != -neg:
            if c > 0:
                heapq.heappush(heap, (-c, pair))
            continue
        new_id = 256 + len(merges)
        merges.append(pair)
        a, b = pair
        new_pairs = set()
        for w in where.pop(pair):
            word = words[w]
            new = merge_word(word, a, b, new_id)
            if len(new) == len(word):
                continue  # stale index entry: the pair left this word earlier
            f = freqs[w]
            for p in zip(word, word[1:]):
                counts[p] -= f
            # A pair of the new word without new_id was a pair of the old word too, so it is
            # already counted and indexed; only the pairs with new_id are new.
            for p in zip(new, new[1:]):
                if p[0] == new_id or p[1] == new_id:
                    if p in new_pairs:
                        counts[p] += f
                        where[p].add(w)
                    else:
                        new_pairs.add(p)
                        counts[p] = f
                        where[p] = {w}
                else:
                    counts[p] += f
            words[w] = new
        del counts[pair]
        for p in new_pairs:
            heapq.heappush(heap, (-counts[p], p))
        if verbose:
            now = time.perf_counter()
            if now - last_report >= 1.0 or len(merges) == num_merges:
                last_report = now
                print(f"merge {len(merges):,}/{num_merges:,}: {pair} -> {new_id} count {c:,} "
                      f"({len(merges) / (now - t1):,.0f} merges/s)", file=sys.stderr)
    if len(merges) < num_merges and verbose:
        print(f"stopped after {len(merges):,} merges: no pair left to merge", file=sys.stderr)
    return merges
