"""`tinyllm lab NAME`: runnable, measured experiments on the design choices of an LLM.

Each experiment is a module of this package, named in EXPERIMENTS in the order a learner
should run them. A module has a docstring whose first line is its question, and:

    add_arguments(parser)   its own options (sizes, grids, steps)
    SMOKE                   a dict of option values for a tiny run (`--smoke`, used by the tests)
    run(args) -> Result     trains, measures, and returns the table, the findings and how
                            to draw the plot (tinyllm/lab/common.py's Result)

`tinyllm lab NAME` runs one and writes docs/lab/NAME.md and NAME.png (`--out DIR`), with the
command, the machine, the date and the wall time (see tinyllm/lab/common.py).
"""

import argparse
import importlib
import importlib.util
import shlex
import time

# The order a learner should run them in (docs/lab/README.md follows it).
EXPERIMENTS = ("norm", "positions", "init", "precision", "schedule", "packing", "tokenizer")


def available():
    """{name: module} of the experiments present in this checkout, in EXPERIMENTS order."""
    return {name: importlib.import_module(f"tinyllm.lab.{name}") for name in EXPERIMENTS
            if importlib.util.find_spec(f"tinyllm.lab.{name}") is not None}


def question(module):
    return (module.__doc__ or "").strip().splitlines()[0]


def command_line(name, parser, args):
    """The `tinyllm lab NAME ...` command that repeats this run: every option whose value
    differs from its default (lists written comma-separated)."""
    words = ["tinyllm", "lab", name]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            words.append(action.option_strings[0])
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        elif isinstance(value, float):
            value = f"{value:g}"
        words += [action.option_strings[0], str(value)]
    return " ".join(shlex.quote(w) for w in words)


def cmd_lab(args):
    from tinyllm.cli import UsageError
    from tinyllm.lab import common

    experiments = available()
    if args.list or not args.experiment:
        for name in EXPERIMENTS:
            text = question(experiments[name]) if name in experiments else "(not in this checkout)"
            print(f"{EXPERIMENTS.index(name) + 1}. {name:<10} {text}")
        return 0
    if not (args.device == "cpu" or args.device == "cuda" or args.device.startswith("cuda:")):
        raise UsageError(f"--device: must be cpu, cuda or cuda:N, got {args.device!r}")
    try:
        common.pyplot("tinyllm lab")  # a missing matplotlib is said before any training
    except RuntimeError as e:
        raise UsageError(str(e)) from None
    module = experiments[args.experiment]
    command = command_line(args.experiment, args.lab_parser, args)
    if args.smoke:
        for key, value in module.SMOKE.items():
            setattr(args, key, value)
    t0 = time.perf_counter()
    result = module.run(args)
    wall = time.perf_counter() - t0
    page = common.write_page(args.out, args.experiment, result, command, args.device, wall)
    print(f"wrote {page} and {page.with_suffix('.png')} ({wall:.0f} s)")
    return 0


def register(subparsers):
    from tinyllm.cli import ArgumentParser

    p = subparsers.add_parser(
        "lab", help="run an experiment on a design choice and write its page to docs/lab",
        description="Runnable experiments on the design choices of an LLM, each writing a "
                    "page (docs/lab/NAME.md) with a table, a plot and what it shows.")
    p.add_argument("--list", action="store_true", help="list the experiments and their questions")
    sub = p.add_subparsers(dest="experiment", metavar="NAME", parser_class=ArgumentParser)
    for name, module in available().items():
        sp = sub.add_parser(name, help=question(module), description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("--out", default="docs/lab", metavar="DIR",
                        help="folder of the page and its PNG (default docs/lab)")
        sp.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
        sp.add_argument("--seed", type=int, default=1337, help="seed of weights and batches")
        sp.add_argument("--smoke", action="store_true",
                        help="a tiny configuration (seconds): checks the experiment runs")
        module.add_arguments(sp)
        sp.set_defaults(lab_parser=sp)
    p.set_defaults(func=cmd_lab)
    return p
