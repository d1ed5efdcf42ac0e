"""Character-level Shakespeare with the nanoGPT CPU recipe, from Python.

    python examples/train_shakespeare_char.py [--gpt2] [--steps N]

The same run as `tinyllm train --config examples/shakespeare_char.toml`: a byte tokenizer with
no merges, 4 layers x 4 heads x 128 wide, context 64, batch 12, 2000 AdamW steps (lr 1e-3,
100 warmup steps, cosine to 1e-4, betas 0.9/0.99, weight decay 0.1, clip 1.0). nanoGPT's
GPT-2-flavoured model reaches a validation loss of 1.88 on this recipe.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tinyllm.train import TrainConfig, read_config_file, train  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpt2", action="store_true", help="GPT-2 flavour (nanoGPT's) instead of Llama")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not os.path.exists(args.data):
        sys.exit(f"{args.data}: not found (download tinyshakespeare's input.txt and pass --data)")
    settings = read_config_file(os.path.join(ROOT, "examples", "shakespeare_char.toml"))
    settings.update(data=args.data, steps=args.steps)
    if args.gpt2:
        settings["model"] = dict(settings["model"], flavour="gpt2")
    settings["out"] = args.out or f"runs/shakespeare-char-{'gpt2' if args.gpt2 else 'llama'}"
    cfg = TrainConfig.from_dict(settings)
    t0 = time.perf_counter()
    run, summary = train(cfg)
    print(f"best val loss {summary['best_val']:.4f} after {summary['step']} steps, "
          f"{time.perf_counter() - t0:.0f}s wall (nanoGPT: 1.88)")
    print(run.sample(400, prompt="\n", temperature=0.8, top_k=None, seed=0))


if __name__ == "__main__":
    main()
