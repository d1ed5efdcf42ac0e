"""Named public corpora: `tinyllm data get NAME` downloads one, `load_corpus(NAME)` reads it.

Each corpus is one file with a known URL, size and SHA-256. It is downloaded once into the
cache (`$TINYLLM_CACHE/corpora/`, default `~/.cache/tinyllm/corpora/`; see
`tinyllm.data.default_cache_dir`), written atomically and verified: a download whose hash
differs is deleted and reported, and a cached file is verified again before each use, so a
truncated or altered file is never trained on.
"""

import dataclasses
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tinyllm.atomic import atomic_write
from tinyllm.cli import UsageError

# Seconds to wait for the server (connecting, and between reads).
TIMEOUT = 30


@dataclasses.dataclass(frozen=True)
class Corpus:
    name: str
    url: str
    sha256: str
    size: int  # bytes
    filename: str
    description: str


CORPORA = {
    "tinyshakespeare": Corpus(
        name="tinyshakespeare",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
            "input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        size=1_115_394,
        filename="tinyshakespeare.txt",
        description="40,000 lines of Shakespeare's plays (char-rnn's input.txt), 1.1 MB",
    ),
}


class CorpusError(OSError):
    """A corpus that could not be fetched or does not verify: one line for the user."""


def get_corpus(name):
    """The registry entry of `name`; UsageError listing the known names otherwise."""
    corpus = CORPORA.get(name)
    if corpus is None:
        raise UsageError(f"unknown corpus {name!r} (known: {', '.join(sorted(CORPORA))}; "
                         f"see `tinyllm data list`)")
    return corpus


def cache_folder():
    """Where downloaded corpora live: <cache>/corpora."""
    from tinyllm.data import default_cache_dir

    return Path(default_cache_dir()) / "corpora"


def sha256_of(path, block=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _fail_hint(corpus):
    return f"download it yourself from {corpus.url} and pass --data PATH with the local copy"


def fetch(corpus, path, quiet=False):
    """Download `corpus` into `path`: streamed to a temporary file while hashing, renamed over
    `path` only when size and SHA-256 match; otherwise nothing is left behind and
    CorpusError says what went wrong."""
    request = urllib.request.Request(corpus.url, headers={"User-Agent": "tinyllm"})
    h = hashlib.sha256()
    size = 0
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response, \
                atomic_write(path) as f:
            if not quiet:  # once the server answered: a refusal stays one line
                print(f"downloading {corpus.name} ({corpus.size / 1e6:.1f} MB) from "
                      f"{corpus.url}", file=sys.stderr, flush=True)
            while chunk := response.read(1 << 16):
                h.update(chunk)
                size += len(chunk)
                f.write(chunk)
            # Raising inside the block removes the temporary file: a bad download never
            # reaches `path`.
            if size != corpus.size or h.hexdigest() != corpus.sha256:
                raise CorpusError(
                    f"the download of {corpus.name} from {corpus.url} does not verify "
                    f"({size:,} bytes, sha256 {h.hexdigest()[:16]}...; expected "
                    f"{corpus.size:,} bytes, sha256 {corpus.sha256[:16]}...): deleted it; "
                    f"try again later, or {_fail_hint(corpus)}")
    except CorpusError:
        raise
    except urllib.error.HTTPError as e:
        raise CorpusError(f"cannot download {corpus.name}: {corpus.url} answered HTTP "
                          f"{e.code} {e.reason}; {_fail_hint(corpus)}") from None
    except urllib.error.URLError as e:
        raise CorpusError(f"cannot download {corpus.name} from {corpus.url} ({e.reason}; "
                          f"offline?); {_fail_hint(corpus)}") from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, cut-off replies
        raise CorpusError(f"cannot download {corpus.name} from {corpus.url} "
                          f"({type(e).__name__}: {e}); {_fail_hint(corpus)}") from None
    return path


def corpus_path(name, download=False, folder=None, quiet=False):
    """The verified local file of corpus `name`. When it is not there: with `download`,
    fetch it; without, FileNotFoundError telling how to get it. A cached file that does not
    verify is deleted (and fetched again when `download`). `folder`: use this folder instead
    of the cache; a file there that does not verify is the user's, so it is reported, never
    deleted or overwritten."""
    corpus = get_corpus(name)
    in_cache = folder is None
    folder = cache_folder() if in_cache else Path(folder)
    path = folder / corpus.filename
    if path.is_file():
        if sha256_of(path) == corpus.sha256:
            return path
        if not in_cache:
            raise CorpusError(f"{path} exists but is not the {name} corpus (its SHA-256 "
                              f"differs); move it away or choose another folder")
        path.unlink()
        if not download:
            raise CorpusError(f"{path}: the cached {name} does not match its SHA-256 (deleted "
                              f"it); run `tinyllm data get {name}` to fetch it again")
    elif not download:
        raise FileNotFoundError(f"corpus {name!r} is not downloaded yet: run `tinyllm data get "
                                f"{name}` (or pass --data PATH with a local copy)")
    if in_cache:
        folder.mkdir(parents=True, exist_ok=True)
    return fetch(corpus, path, quiet=quiet)


# ---- the command line ----------------------------------------------------------------------

def cmd_get(args):
    corpus = get_corpus(args.name)
    if args.to is not None:
        if not os.path.isdir(args.to):
            raise UsageError(f"--to: no such folder: {args.to}")
        if not os.access(args.to, os.W_OK):
            raise UsageError(f"--to: cannot write in {args.to} (permission denied)")
        folder = Path(args.to)
    else:
        folder = None
    path = corpus_path(corpus.name, download=True, folder=folder, quiet=args.quiet)
    print(path)  # alone on stdout, for `--data "$(tinyllm data get NAME)"`
    return 0


def cmd_list(args):
    folder = cache_folder()
    for corpus in CORPORA.values():
        here = "downloaded" if (folder / corpus.filename).is_file() else "not downloaded"
        print(f"{corpus.name}\t{corpus.description} [{here}]\n\t{corpus.url}")
    return 0


def register(subparsers):
    p = subparsers.add_parser("data", help="download named public corpora",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    g = sub.add_parser("get", help="download a corpus into the cache (or --to DIR) and verify it")
    g.add_argument("name", help=f"the corpus: {', '.join(sorted(CORPORA))}")
    g.add_argument("--to", metavar="DIR", help="put it in this (existing) folder instead")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    g.set_defaults(func=cmd_get)
    ls = sub.add_parser("list", help="the known corpora and whether they are downloaded")
    ls.set_defaults(func=cmd_list)
    return p
