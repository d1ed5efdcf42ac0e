"""Generate text from a trained model, three ways: streamed, all at once, and as a batch.

    python examples/generate.py runs/laptop "ROMEO:"      # a run folder from `tinyllm train`
    python examples/generate.py                           # no run: an untrained model (noise)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autograd  # noqa: E402
from tinyllm.generate import generate_text, load_for_generation, stream  # noqa: E402
from tinyllm.model import GPT  # noqa: E402
from tinyllm.tokenizer import Tokenizer  # noqa: E402

if len(sys.argv) > 1:
    model, tok = load_for_generation(sys.argv[1])  # best.ckpt (else last.ckpt) of the run
else:
    tok = Tokenizer.bytes(special_tokens=["<|endoftext|>"])
    autograd.manual_seed(0)
    model = GPT.from_preset("laptop", vocab_size=tok.vocab_size)
prompt = sys.argv[2] if len(sys.argv) > 2 else "The "

# 1. streamed: pieces arrive as tokens are generated (whole UTF-8 characters only)
print(prompt, end="", flush=True)
for piece in stream(model, tok, prompt, max_new_tokens=100, temperature=0.8, top_p=0.95,
                    seed=0):
    print(piece, end="", flush=True)
print("\n")

# 2. all at once, with a stop string and a repetition penalty; greedy (temperature 0)
text = generate_text(model, tok, prompt, max_new_tokens=100, temperature=0,
                     repetition_penalty=1.3, stop_strings=["\n\n"])
print(prompt + text + "\n")

# 3. a batch: prompts of equal length share each forward pass
for p, t in zip(["A", "B", "Once"], generate_text(model, tok, ["A", "B", "Once"],
                                                  max_new_tokens=40, top_k=20, seed=1)):
    print(repr(p + t))
