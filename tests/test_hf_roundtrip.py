"""A model exported to the Hugging Face layout loads back into tinyllm unchanged: the same
logits, the same token ids from the exported tokenizer.json, and fine-tuning starts from it."""

import numpy as np
import pytest

import autograd
from tinyllm import chat
from tinyllm.export import export_hf
from tinyllm.generate import load_for_generation, load_tokenizer
from tinyllm.model import GPT
from tinyllm.tokenizer import Tokenizer

TEXT = "def f(x):\n    return x + 1  # ünïcode, 数字 123456, emoji 🙂 <|im_end|>\n\n\n  end"


@pytest.fixture(scope="module")
def tokenizer():
    corpus = "the quick brown fox jumps over the lazy dog. " * 40 + "def f(x): return x + 1\n" * 20
    return chat.add_chat_tokens(Tokenizer.train(corpus, vocab_size=300))


@pytest.mark.parametrize("flavour,tied", [("gpt2", False), ("gpt2", True), ("llama", False)])
def test_export_then_load_gives_the_same_logits(tmp_path, tokenizer, flavour, tied):
    autograd.manual_seed(3)
    model = GPT.from_preset("laptop", flavour=flavour, n_layers=2, d_model=32, n_heads=4,
                            n_kv_heads=2 if flavour == "llama" else None,
                            vocab_size=tokenizer.vocab_size, context_length=32,
                            tie_embeddings=tied, bias=flavour == "gpt2")
    rng = np.random.default_rng(0)
    for p in model.parameters():  # every weight matters (biases and an untied head too)
        p.data = (p.data + 0.05 * rng.standard_normal(p.shape)).astype(np.float32)
    out = export_hf(model, tokenizer, tmp_path / "hf")
    back, tok = load_for_generation(out)
    idx = rng.integers(0, tokenizer.vocab_size, (2, 16))
    want, _ = model(idx)
    got, _ = back(idx)
    np.testing.assert_allclose(got.data, want.data, rtol=1e-5, atol=1e-5)
    assert tok.encode(TEXT, allowed_special="all") == tokenizer.encode(TEXT, allowed_special="all")
    assert tok.special_tokens == tokenizer.special_tokens


def test_hf_tokenizer_json_of_r50k(tmp_path):
    from conftest import shared_file

    tok = Tokenizer.from_tiktoken(shared_file("vocab", "r50k_base.tiktoken"))
    model = GPT.from_preset("laptop", n_layers=1, d_model=16, n_heads=2, vocab_size=tok.vocab_size,
                            context_length=16)
    out = export_hf(model, tok, tmp_path / "hf")
    back = load_tokenizer(out)
    assert back.encode(TEXT, allowed_special="all") == tok.encode(TEXT, allowed_special="all")


def test_sft_starts_from_an_exported_folder(tmp_path, tokenizer):
    from tinyllm.cli import main

    autograd.manual_seed(0)
    model = GPT.from_preset("laptop", n_layers=1, d_model=32, n_heads=2,
                            vocab_size=tokenizer.vocab_size, context_length=128)
    hf = export_hf(model, tokenizer, tmp_path / "hf")
    rc = main(["sft", "--from", str(hf), "--out", str(tmp_path / "sft"), "--steps", "2",
               "--batch-size", "2", "--n-train", "20", "--n-val", "4", "--eval-every", "2",
               "--eval-iters", "1", "-q"])
    assert rc == 0
    _, tok = load_for_generation(tmp_path / "sft")
    assert chat.has_chat_tokens(tok) and tok.encode(TEXT, allowed_special="all") == \
        tokenizer.encode(TEXT, allowed_special="all")
