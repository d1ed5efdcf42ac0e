"""The quick examples newcomers read first still run and do what they say."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name):
    out = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_autograd_basics_learns_xor():
    out = run("autograd_basics.py")
    assert "gradcheck: True" in out
    assert "XOR predictions [0, 1, 1, 0]" in out


def test_tokenizer_example_round_trips():
    out = run("tokenizer.py")
    assert "Tokenizer(vocab_size=513, merges=256" in out
    assert out.rstrip().endswith("True")
