"""tinyllm export: the Hugging Face folder loads in transformers and tokenizers as it is, and
computes what our model and tokenizer compute.

The outside oracles are transformers (GPT2LMHeadModel, LlamaForCausalLM: their logits against
ours), tokenizers (tokenizer.json's ids against Tokenizer.encode) and tiktoken (OpenAI
vocabularies). Tests that need them skip when they are not installed.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import regex
from hypothesis import given
from hypothesis import strategies as st

from tinyllm import export
from tinyllm.cli import main as cli_main
from tinyllm.config import FLAVOURS
from tinyllm.export import (export_hf, hf_architecture, interleaved_to_half, onig_pattern,
                            tokenizer_json)
from tinyllm.model import GPT, ModelConfig
from tinyllm.safetensors import load_file, read_header
from tinyllm.tokenizer import Tokenizer
from tinyllm.tokenizer.patterns import resolve_pattern

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MULTILINGUAL = (
    "Hello, World! It's 2024: we'll see. DON'T shout.\n"
    "Café crème, naïve façade, Ångström, straße.\n"
    "Ελληνικά: Καλημέρα κόσμε, αβγ ΑΒΓ.\n"
    "中文：你好，世界！日本語のテキスト。한국어 문장.\n"
    "Emoji: 😀 👍🏽 🇫🇷 👨‍👩‍👧 ❤️\n"
    "def f(x):\n\treturn {'a': [x ** 2, x // 3]}  # comment\n"
    "Numbers: 3.14159 1,000,000 42nd 0xFF 1e-5 ٣٤٥\n"
    "Whitespace:   three  two\t\ttabs\r\nCRLF \u00a0nbsp \u3000ideographic\n\n\n  trailing   "
    "<|endoftext|>Next document.<|im_start|>user\nhi<|im_end|>\n"
)
# A fixed alphabet for generated texts: tokenizers' regex engine and ours agree on these
# (arbitrary code points could hit Unicode-version differences in \p{L} between them).
ALPHABET = (list("abcXYZ 019'sdtlmvre.,!?#(){}_-+*/\\\"\t\n\r\x0b\x0c") + list("\x85\xa0\u2028\u3000\u200b")
            + list("éÉñüßαβγΩμέ中文字日本語한국") + list("٣५²½") + ["😀", "👍🏽", "\u0301", "'S", "'LL"])
TEXT = MULTILINGUAL.replace("<|endoftext|>", "").replace("<|im_start|>", "").replace("<|im_end|>", "")


def hf_modules():
    return pytest.importorskip("transformers"), pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tok():
    """A small trained tokenizer with merges over every script of MULTILINGUAL."""
    corpus = (TEXT + "the cat sat on the mat. ") * 20
    return Tokenizer.train(corpus, vocab_size=400, special_tokens=SPECIALS)


def randomize(model, seed):
    """Weights large enough that every part shows in the logits: norms away from 1, biases
    away from 0, an untied head different from the embedding."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            value = (1.0 if name.endswith("weight") else 0.0) + 0.2 * rng.standard_normal(p.shape)
        else:
            fan_in = p.shape[-1] if p.ndim == 2 and "emb" not in name else 4
            value = rng.standard_normal(p.shape) / np.sqrt(fan_in)
        p.data[...] = value
    return model


CASES = {
    "gpt2-bias-untied": dict(FLAVOURS["gpt2"], bias=True, tie_embeddings=False),
    "gpt2-nobias-tied": dict(FLAVOURS["gpt2"], bias=False, tie_embeddings=True),
    "llama-gqa-interleaved": dict(FLAVOURS["llama"], n_kv_heads=2, rope_style="interleaved",
                                  rope_theta=100.0),
    "llama-gqa-half-untied": dict(FLAVOURS["llama"], n_kv_heads=2, rope_style="half",
                                  tie_embeddings=False),
    "llama-mqa-bias-interleaved": dict(FLAVOURS["llama"], n_kv_heads=1, bias=True,
                                       rope_style="interleaved"),
}


def tiny_model(tok, seed=0, **settings):
    # a padded vocabulary: the model has more ids than the tokenizer
    cfg = ModelConfig(vocab_size=tok.vocab_size + 13, context_length=24, d_model=32, n_layers=2,
                      n_heads=4, **settings)
    return randomize(GPT(cfg), seed)


def hf_logits(folder, idx):
    transformers, torch = hf_modules()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    # one thread: on several, PyTorch's CPU kernels gave logits that moved by up to 6e-5
    # between two calls on the same input (about 1 run in 20), past the comparison's 1e-5
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return type(model).__name__, model(torch.tensor(idx)).logits.numpy()
    finally:
        torch.set_num_threads(threads)


def assert_close_logits(ours, theirs):
    scale = max(1.0, float(np.abs(ours).max()))
    assert theirs.shape == ours.shape
    assert np.abs(ours - theirs).max() <= 1e-5 * scale


# ---- the model ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_transformers_computes_our_logits(case, tok, tmp_path):
    model = tiny_model(tok, **CASES[case])
    cfg = model.config
    out = export_hf(model, tok, tmp_path / "hf")
    idx = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, cfg.context_length))
    ours = model(idx)[0].data
    name, theirs = hf_logits(out, idx)
    assert name == ("GPT2LMHeadModel" if case.startswith("gpt2") else "LlamaForCausalLM")
    assert_close_logits(ours, theirs)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == cfg.vocab_size == tok.vocab_size + 13
    assert config["tie_word_embeddings"] == cfg.tie_embeddings
    names = read_header(out / "model.safetensors")[0]
    assert ("lm_head.weight" in names) == (not cfg.tie_embeddings)


def test_a_model_without_biases_exports_zero_gpt2_biases(tok, tmp_path):
    model = tiny_model(tok, **CASES["gpt2-nobias-tied"])
    out = export_hf(model, tok, tmp_path / "hf")
    weights = load_file(out / "model.safetensors")
    biases = [k for k in weights if k.endswith(".bias")]
    assert len(biases) == 2 * 6 + 1  # per layer ln_1, c_attn, c_proj, ln_2, c_fc, mlp.c_proj; ln_f
    assert all(not weights[k].any() for k in biases)
    # c_attn: q, k, v side by side, each Conv1D weight the transpose of ours
    w = weights["transformer.h.1.attn.c_attn.weight"]
    assert w.shape == (32, 96)
    np.testing.assert_array_equal(w[:, 32:64], model.blocks[1].attn.wk.weight.data.T)


def test_interleaved_rows_become_rotate_half_rows():
    w = np.arange(8)[:, None] * np.ones((1, 3))  # 2 heads of head_dim 4, rows numbered
    got = interleaved_to_half(w, n_heads=2, head_dim=4)
    assert got[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert interleaved_to_half(np.arange(8.0), 2, 4).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("case", ["gpt2-nobias-tied", "llama-gqa-interleaved"])
def test_our_own_loader_reads_the_export_back(case, tok, tmp_path):
    """GPT.from_pretrained (the inverse mapping) gives the same logits; an interleaved model
    comes back as a rotate-half one."""
    model = tiny_model(tok, **CASES[case])
    out = export_hf(model, tok, tmp_path / "hf")
    back = GPT.from_pretrained(out)
    assert back.config.rope_style == "half" and back.config.rope_theta == model.config.rope_theta
    idx = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 24))
    np.testing.assert_allclose(back(idx)[0].data, model(idx)[0].data, atol=1e-5, rtol=1e-5)


def bf16_round(a):
    """float32 -> the bits of the nearest bfloat16 (ties to even), by integer arithmetic."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def test_half_precision_exports(tok, tmp_path):
    model = tiny_model(tok, **CASES["llama-gqa-half-untied"])
    out = export_hf(model, tok, tmp_path / "bf16", dtype="bfloat16")
    header = read_header(out / "model.safetensors")[0]
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    got = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    want = bf16_round(model.tok_emb.weight.data)
    np.testing.assert_array_equal(got.astype(np.float32).view(np.uint32) >> 16, want)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    out16 = export_hf(model, tok, tmp_path / "f16", dtype="float16")
    got = load_file(out16 / "model.safetensors")["lm_head.weight"]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, model.lm_head.weight.data.astype(np.float16))
    transformers, torch = hf_modules()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert next(hf.parameters()).dtype == torch.bfloat16


def test_float16_overflow_is_refused_and_nothing_written(tok, tmp_path):
    model = tiny_model(tok, **CASES["llama-gqa-half-untied"])
    model.blocks[0].mlp.w2.weight.data[0, 0] = 1e5
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*float16"):
        export_hf(model, tok, tmp_path / "hf", dtype="float16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("settings, words", [
    (dict(FLAVOURS["gpt2"], norm="rms"), ["GPT-2", "norm='rms'"]),
    (dict(FLAVOURS["gpt2"], mlp="swiglu"), ["GPT-2", "mlp='swiglu'"]),
    (dict(FLAVOURS["gpt2"], positions="rope"), ["GPT-2", "positions='rope'"]),
    (dict(FLAVOURS["gpt2"], n_kv_heads=2), ["GPT-2", "n_kv_heads=2"]),
    (dict(FLAVOURS["llama"], norm="layer"), ["Llama", "norm='layer'"]),
    (dict(FLAVOURS["llama"], positions="learned"), ["Llama", "positions='learned'"]),
    (dict(FLAVOURS["llama"], mlp="gelu"), ["Llama", "mlp='gelu'"]),
    (dict(FLAVOURS["llama"], norm_position="post"), ["Llama", "norm_position='post'"]),
    (dict(FLAVOURS["gpt2"], norm_position="post"), ["GPT-2", "norm_position='post'"]),
    (dict(FLAVOURS["llama"], positions="sinusoidal"), ["Llama", "positions='sinusoidal'"]),
    (dict(FLAVOURS["gpt2"], positions="none"), ["GPT-2", "positions='none'"]),
])
def test_settings_hugging_face_cannot_represent_are_refused(settings, words, tok, tmp_path):
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=4, n_layers=1, **settings)
    with pytest.raises(ValueError) as e:
        hf_architecture(cfg)
    assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(ValueError):
        export_hf(GPT(cfg), tok, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ---- the tokenizer ----------------------------------------------------------------------------

def hf_tokenizer(tokenizer, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tokenizer_json(tokenizer)), encoding="utf-8")
    return tokenizers.Tokenizer.from_file(str(path))


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    return hf_tokenizer(tok, tmp_path_factory.mktemp("tok"))


def test_tokenizers_encodes_to_our_ids_and_decodes_back(tok, hf_tok):
    ids = tok.encode(MULTILINGUAL, allowed_special="all")
    assert [i for i in ids if i in tok.inverse_special_tokens] == \
        [tok.special_tokens[s] for s in SPECIALS]
    assert hf_tok.encode(MULTILINGUAL).ids == ids
    assert hf_tok.decode(ids, skip_special_tokens=False) == MULTILINGUAL
    assert tok.decode(ids) == MULTILINGUAL


@given(st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join))
def test_tokenizers_agrees_on_generated_text(tok, hf_tok, text):
    ids = tok.encode(text)
    assert hf_tok.encode(text).ids == ids
    assert hf_tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("name", ["gpt2", "gpt4", "o200k"])
def test_split_pattern_gives_tokenizers_our_pieces(name):
    tokenizers = pytest.importorskip("tokenizers")
    pattern = resolve_pattern(name)
    split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(onig_pattern(pattern)), "isolated")
    text = TEXT + " 1234567 x12345y 99"
    assert [p for p, _ in split.pre_tokenize_str(text)] == regex.findall(pattern, text)


def test_possessive_bounded_repeats_become_atomic_groups():
    assert onig_pattern(r"\p{N}{1,3}+|a++") == r"(?>\p{N}{1,3})|a++"
    assert onig_pattern(r"(ab|[c}]){2,}+x{3}") == r"(?>(ab|[c}]){2,})x{3}"
    assert onig_pattern(r"[]{]{1}+\x41{2}+") == r"(?>[]{]{1})(?>\x41{2})"


@pytest.mark.parametrize("pattern", ["gpt4", "o200k"])
def test_other_split_patterns_carry_over(tok, pattern, tmp_path):
    merges = [(a, b, c) for (a, b), c in sorted(tok.merges.items(), key=lambda kv: kv[1])]
    other = Tokenizer(merges, pattern=pattern, special_tokens=tok.special_tokens)
    assert hf_tokenizer(other, tmp_path).encode(MULTILINGUAL).ids == \
        other.encode(MULTILINGUAL, allowed_special="all")


def shared_file(*parts):
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data file not found: {path}")
    return path


def tiktoken_encoding(path, pattern, specials):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    return tiktoken.Encoding(name=f"{path.stem}_export_test", pat_str=pattern,
                             mergeable_ranks=load_tiktoken_bpe(str(path)), special_tokens=specials)


@pytest.mark.parametrize("name", ["r50k_base", "cl100k_base"])
def test_openai_vocabularies(name, tmp_path):
    """Ids not 0..255 for the bytes, whole-piece lookup, and (cl100k_base) unused ids below
    and between the special tokens."""
    path = shared_file("vocab", f"{name}.tiktoken")
    ours = Tokenizer.from_tiktoken(path)
    assert ours.byte_ids != list(range(256))
    hf = hf_tokenizer(ours, tmp_path)
    ids = hf.encode(MULTILINGUAL.replace("<|im_start|>", "").replace("<|im_end|>", "")).ids
    text = MULTILINGUAL.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert ids == ours.encode(text, allowed_special="all")
    assert ids == tiktoken_encoding(path, ours.pattern, ours.special_tokens).encode(
        text, allowed_special="all")
    assert hf.decode(ids, skip_special_tokens=False) == text
    assert {s: hf.token_to_id(s) for s in ours.special_tokens} == ours.special_tokens


def test_a_vocabulary_with_two_ids_for_the_same_bytes_is_refused(tmp_path):
    # "abc" twice: (ab)c -> 257 and a(bc) -> 259
    a, b, c = 97, 98, 99
    twin = Tokenizer([(a, b, 256), (256, c, 257), (b, c, 258), (a, 258, 259)])
    with pytest.raises(ValueError, match=r"257 and 259.*b'abc'"):
        tokenizer_json(twin)


def test_transformers_autotokenizer_and_chat_template(tok, tmp_path):
    transformers, _ = hf_modules()
    from tinyllm.chat import render

    out = export_hf(tiny_model(tok, **CASES["llama-gqa-half-untied"]), tok, tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.encode(MULTILINGUAL, allowed_special="all")
    assert auto(MULTILINGUAL)["input_ids"] == ids
    assert auto.decode(ids) == MULTILINGUAL
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == tok.eot_id
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": "Café?"}]
    text = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert auto(text)["input_ids"] == render(messages, tok, add_generation_prompt=True)[0]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.special_tokens["<|im_end|>"], tok.eot_id]


# ---- the command line -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real run folders (llama and gpt2 flavours), two training steps each."""
    from tinyllm.train import TrainConfig, train

    root = tmp_path_factory.mktemp("runs")
    (root / "corpus").mkdir()
    (root / "corpus" / "doc.txt").write_text(TEXT * 10, encoding="utf-8")
    folders = {}
    for flavour in ("llama", "gpt2"):
        cfg = TrainConfig(data=str(root / "corpus"), vocab_size=300, steps=2, batch_size=2,
                          block_size=16, warmup=1, eval_every=2, eval_iters=1, log_every=1,
                          sample_tokens=0, quiet=True, out=str(root / flavour),
                          cache_dir=str(root / "cache"),
                          model=dict(flavour=flavour, n_layers=1, d_model=32, n_heads=2,
                                     context_length=16))
        train(cfg)
        folders[flavour] = root / flavour
    return folders


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_cli_exports_a_run_folder(runs, flavour, tmp_path, capsys):
    from tinyllm.generate import load_for_generation

    out = tmp_path / "export" / "hf"  # the parent is created too
    assert cli_main(["export", str(runs[flavour]), "--to", str(out), "--format", "hf"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]  # no temporary folder left
    model, tok = load_for_generation(runs[flavour])
    transformers, _ = hf_modules()
    ids = tok.encode(TEXT)[:16]
    assert transformers.AutoTokenizer.from_pretrained(out)(TEXT)["input_ids"][:16] == ids
    _, theirs = hf_logits(out, np.array([ids]))
    assert_close_logits(model(np.array([ids]))[0].data, theirs)


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tinyllm"), err
    return err


def test_cli_bad_inputs_exit_2_with_one_line(runs, tmp_path, capsys):
    run = str(runs["llama"])
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["export", str(tmp_path / "nowhere"), "--to", str(tmp_path / "a")], "nowhere"),
        (["export", str(empty), "--to", str(tmp_path / "a")], "run folder"),
        (["export", run, "--to", str(full)], "not empty"),
        (["export", run, "--to", str(tmp_path / "a"), "--format", "onnx"], "--format"),
        (["export", run, "--to", str(tmp_path / "a"), "--dtype", "int8"], "--dtype"),
        (["export", run], "--to"),
        (["export", run, "--to", run, "--overwrite"], "would replace"),
        (["export", os.path.join(run, "last.ckpt"), "--to", run, "--overwrite"], "would replace"),
    ]
    for argv, word in cases:
        assert cli_main(argv) == 2, argv
        assert word in one_error_line(capsys), argv
    assert not (tmp_path / "a").exists()
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert (runs["llama"] / "last.ckpt").exists()


def test_cli_overwrite_replaces_a_folder(runs, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert cli_main(["export", str(runs["gpt2"]), "--to", str(out), "--overwrite"]) == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_inner"] == 128


def test_a_failed_export_leaves_the_old_folder_and_no_temporary_one(tok, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_file", disk_full)
    with pytest.raises(OSError):
        export_hf(tiny_model(tok, **CASES["gpt2-nobias-tied"]), tok, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    assert os.listdir(out) == ["old.txt"]
