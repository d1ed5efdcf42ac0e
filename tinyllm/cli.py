"""The `tinyllm` command line: one subcommand per job.

Each job's module owns its arguments through a `register(subparsers)` function that adds its
subparser and sets `func`; this file only wires them together. Modules are imported lazily
inside `register` calls' targets so that `tinyllm --help` stays fast.
"""

import argparse
import sys


def build_parser():
    parser = argparse.ArgumentParser(prog="tinyllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from tinyllm.tokenizer import cli as tokenizer_cli

    tokenizer_cli.register(sub)
    from tinyllm import plot, train

    train.register(sub)
    plot.register(sub)
    from tinyllm import generate

    generate.register(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
