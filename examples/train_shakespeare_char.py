"""Character-level Shakespeare with the nanoGPT CPU recipe, from Python.

    python examples/train_shakespeare_char.py [--gpt2] [--steps N] [--data PATH]

The same run as `tinyllm train --config examples/shakespeare_char.toml`: a byte tokenizer with
no merges, 4 layers x 4 heads x 128 wide, context 64, batch 12, 2000 AdamW steps (lr 1e-3,
100 warmup steps, cosine to 1e-4, betas 0.9/0.99, weight decay 0.1, clip 1.0). nanoGPT's
GPT-2-flavoured model reaches a validation loss of 1.88 on this recipe.

The text is the `tinyshakespeare` corpus: downloaded (1.1 MB, verified by SHA-256) into the
cache on the first run, like `tinyllm data get tinyshakespeare`; `--data PATH` uses a local
copy instead.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tinyllm.corpora import CORPORA, corpus_path  # noqa: E402
from tinyllm.train import TrainConfig, read_config_file, train  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpt2", action="store_true", help="GPT-2 flavour (nanoGPT's) instead of Llama")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--data", default="tinyshakespeare",
                    help="a corpus name (downloaded when needed) or a local file")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    try:
        if args.data in CORPORA:
            args.data = str(corpus_path(args.data, download=True))
        elif not os.path.isfile(args.data):
            raise FileNotFoundError(f"--data: no such file: {args.data}")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
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
