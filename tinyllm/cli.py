"""The `tinyllm` command line: one subcommand per job, and the rules every one of them follows.

Each job's module owns its arguments through a `register(subparsers)` function that adds its
subparser and sets `func`; this file wires them together and applies the rules:

- Settings are checked before any work or any file is written. A bad path, flag, config value
  or file is answered with one line on stderr naming the setting, the value and what is
  allowed, and exit code 2. Jobs raise `UsageError` (or ValueError / OSError, which count as
  bad input too); argparse's own complaints come out as one line as well.
- No traceback reaches a user. An unexpected internal error prints one line and the path of
  a file holding the full traceback, exit code 1. `TINYLLM_DEBUG=1` re-raises instead.
- Ctrl-C exits with 130 (jobs that train save first, then return 130 themselves).

The `check_*` helpers and the argparse types below are what jobs use to validate settings, so
that every message has the same shape: `--steps: must be a positive integer, got -5`.
"""

import argparse
import datetime
import math
import os
import sys
import tempfile
import traceback


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one line (no usage block), raised as UsageError."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message}")


# ---- validation helpers: one message shape for every setting --------------------------------

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(name, value, low=None, high=None, allow_none=False):
    """`value` as an int in [low, high]; UsageError naming `name` otherwise."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or (low is not None and value < low) or \
            (high is not None and value > high):
        if low is not None and high is not None:
            allowed = f"an integer in {low}..{high}"
        elif low == 1:
            allowed = "a positive integer"
        elif low == 0:
            allowed = "an integer >= 0"
        elif low is not None:
            allowed = f"an integer >= {low}"
        else:
            allowed = "an integer"
        raise UsageError(f"{name}: must be {allowed}, got {value!r}")
    return value


def check_float(name, value, low=None, high=None, low_open=False, high_open=False,
                allow_none=False):
    """`value` as a finite float in the interval; UsageError naming `name` otherwise."""
    if value is None and allow_none:
        return None
    ok = _is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise UsageError(f"{name}: must be a finite number{' ' + bounds if bounds else ''}, "
                         f"got {value!r}")
    return float(value)


def check_choice(name, value, choices):
    if value not in choices:
        raise UsageError(f"{name}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _argtype(check, **kw):
    def parse(text):
        try:
            value = int(text) if check is check_int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if check is check_int else 'a number'}, got {text!r}"
            ) from None
        try:
            return check("value", value, **kw)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    parse.__name__ = "integer" if check is check_int else "number"
    return parse


positive_int = _argtype(check_int, low=1)
nonnegative_int = _argtype(check_int, low=0)
positive_float = _argtype(check_float, low=0, low_open=True)
nonnegative_float = _argtype(check_float, low=0)
probability = _argtype(check_float, low=0, high=1)


# ---- the entry point ----------------------------------------------------------------------------

def build_parser():
    parser = ArgumentParser(prog="tinyllm", description="tinyllm: a language model built from first principles, from tokenizer to chat model.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from tinyllm.tokenizer import cli as tokenizer_cli

    tokenizer_cli.register(sub)
    from tinyllm import corpora; corpora.register(sub)  # noqa: E702
    from tinyllm import plot, train

    train.register(sub)
    plot.register(sub)
    from tinyllm import generate

    generate.register(sub)
    from tinyllm import sft

    sft.register(sub)
    sft.register_merge(sub)
    from tinyllm import export; export.register(sub)  # noqa: E702
    from tinyllm import session; session.register(sub)  # noqa: E702
    from tinyllm import evaluate; evaluate.register(sub)  # noqa: E702
    from tinyllm import dpo; dpo.register(sub)  # noqa: E702
    from tinyllm import reward; reward.register(sub)  # noqa: E702
    from tinyllm import rl; rl.register(sub)  # noqa: E702
    from tinyllm import serve; serve.register(sub)  # noqa: E702
    from tinyllm import lab; lab.register(sub)  # noqa: E702
    return parser


def crash_report(exc, command):
    """Write the traceback of `exc` to a file; return its path."""
    folder = os.environ.get("TINYLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                              "tinyllm")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = (f"tinyllm {command or ''} crashed at {stamp}\nargv: {sys.argv}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    for base in (os.path.join(folder, "crashes"), tempfile.gettempdir()):
        try:
            os.makedirs(base, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix=f"crash-{stamp}-", suffix=".txt", dir=base)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return None


def main(argv=None):
    parser = build_parser()
    command = None
    try:
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what --gpus runs again
        command = args.command
        if getattr(args, "gpus", None) and "RANK" in os.environ:  # a worker of --gpus
            command = f"{command} (rank {os.environ['RANK']})"
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit:  # --help, --version
        raise
    except (UsageError, ValueError, OSError) as e:  # bad input: one line
        if os.environ.get("TINYLLM_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        prefix = "" if msg.startswith("tinyllm") else f"tinyllm {command or ''}: error: ".replace("  ", " ")
        print(prefix + msg, file=sys.stderr)
        return 2
    except Exception as e:  # a bug: one line, the traceback in a file
        if os.environ.get("TINYLLM_DEBUG"):
            raise
        path = crash_report(e, command)
        where = f"; traceback in {path}" if path else ""
        print(f"tinyllm {command or ''}: internal error: {type(e).__name__}: "
              f"{' '.join(str(e).split())[:300]}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
