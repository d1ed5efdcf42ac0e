"""RL's rollouts against plain generation on the same model and batch.

    python benchmarks/rl_rollout.py                          # laptop preset, random weights, CPU
    python benchmarks/rl_rollout.py --run runs/laptop-sft    # a trained chat model
    python benchmarks/rl_rollout.py --device cuda --preset llama-shakespeare-char

Both sides decode the same prompts (rows = prompts x group size, one prompt length) for a
fixed number of new tokens with the KV cache at temperature 1:

    generate   tinyllm.generate.decode_steps, the decoder `tinyllm generate` runs, sampling
               each step's tokens and nothing more;
    rollout    tinyllm.rl.rollout, which also keeps each token's log-probability and the
               sampling distribution's entropy (stops are off, so both run every step).

Tokens/s = rows x new tokens / wall time, median of --repeats runs after one warm-up. The
issue's bar: the two within 20% of each other.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autograd  # noqa: E402
from tinyllm.generate import decode_steps, load_for_generation  # noqa: E402
from tinyllm.model import GPT  # noqa: E402
from tinyllm.rl import rollout  # noqa: E402


def model_of(args):
    if args.run:
        model, _ = load_for_generation(args.run, device=args.device)
        return model
    autograd.manual_seed(0)
    return GPT.from_preset(args.preset, vocab_size=512, device=args.device)


def timed(fn, repeats):
    fn()  # warm-up: kernels compiled, caches sized
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="a run folder (default: random weights of --preset)")
    p.add_argument("--preset", default="laptop")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    model = model_of(args)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, args.prompt_len).tolist() for _ in range(args.prompts)]
    rows = [p for p in prompts for _ in range(args.group_size)]
    n = len(rows) * args.new_tokens

    def generate():
        for _ in decode_steps(model, rows, args.new_tokens, temperature=1.0, seed=1):
            pass

    def rl():
        ro = rollout(model, prompts, args.group_size, args.new_tokens, 1.0, seed=1)
        assert ro.n_tokens == n

    t_gen, t_rl = timed(generate, args.repeats), timed(rl, args.repeats)
    result = {"model": args.run or args.preset, "device": args.device, "rows": len(rows),
              "new_tokens": args.new_tokens, "generate_tok_s": n / t_gen,
              "rollout_tok_s": n / t_rl, "rollout_vs_generate": t_gen / t_rl}
    print(f"{len(rows)} rows x {args.new_tokens} new tokens on {args.device}: generate "
          f"{n / t_gen:,.0f} tok/s, rollout {n / t_rl:,.0f} tok/s ({t_gen / t_rl:.2f}x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
