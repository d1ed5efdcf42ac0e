"""Generation: cached logits equal full forwards, sampling filters, stop rules, streaming, CLI."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import autograd
from autograd.tensor import Tensor, no_grad
from tinyllm import cli
from tinyllm.checkpoint import save_checkpoint
from tinyllm.generate import (apply_repetition_penalty, choose_next, decode_steps, generate,
                              generate_text, load_for_generation, min_p_filter, sample_from,
                              softmax, stream, top_k_filter, top_p_filter)
from tinyllm.model import GPT, ModelConfig
from tinyllm.tokenizer import Tokenizer

FLAVOURS = {"llama": dict(positions="rope", norm="rms", mlp="swiglu", bias=False),
            "gpt2": dict(positions="learned", norm="layer", mlp="gelu", bias=True)}


def tiny_model(flavour="llama", seed=0, **kw):
    cfg = dict(vocab_size=23, context_length=16, d_model=16, n_layers=2, n_heads=4,
                     dtype="float64", tie_embeddings=False, init_std=0.5)
    cfg.update(FLAVOURS[flavour])
    cfg.update(kw)
    autograd.manual_seed(seed)
    return GPT(ModelConfig(**cfg))


def last_logits(model, seq):
    """Reference: a full forward without a cache over `seq` (B, T); logits of the last position."""
    with no_grad():
        return model(np.asarray(seq))[0].data[:, -1]


# ---- the cache: step-by-step logits equal a full forward ---------------------------------------

@given(flavour=st.sampled_from(["llama", "gpt2"]), kv=st.sampled_from([4, 2, 1]),
       batch=st.integers(1, 3), prompt_len=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_cached_step_logits_equal_full_forward(flavour, kv, batch, prompt_len, seed):
    model = tiny_model(flavour, seed=seed % 7, n_kv_heads=kv)
    prompt = np.random.default_rng(seed).integers(0, 23, (batch, prompt_len))
    seq = prompt
    steps = decode_steps(model, prompt, max_new_tokens=16 - prompt_len + 1, temperature=1.5,
                         seed=seed)
    for tokens, logits in steps:  # no sliding: the last token is never fed back
        np.testing.assert_allclose(logits, last_logits(model, seq), rtol=1e-10, atol=1e-10)
        seq = np.concatenate([seq, tokens[:, None]], axis=1)
    assert seq.shape[1] == 17


@pytest.mark.parametrize("shift", [1, 3, 8])
@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_sliding_window_logits_equal_full_forward_over_the_window(flavour, shift):
    ctx = 8
    model = tiny_model(flavour, context_length=ctx)
    prompt = np.random.default_rng(1).integers(0, 23, (2, 11))  # longer than the context
    seq, start = prompt, prompt.shape[1] - ctx  # the window keeps the last ctx tokens
    for tokens, logits in decode_steps(model, prompt, max_new_tokens=20, temperature=1.0,
                                       seed=0, shift=shift):
        np.testing.assert_allclose(logits, last_logits(model, seq[:, start:]), rtol=1e-10,
                                   atol=1e-10)
        seq = np.concatenate([seq, tokens[:, None]], axis=1)
        if seq.shape[1] - start > ctx:  # full: drop the `shift` oldest of the ctx + 1
            start += shift
            assert seq.shape[1] - start == ctx + 1 - shift


def test_overflow_error_is_clear_and_up_front():
    model = tiny_model(context_length=8)
    with pytest.raises(ValueError, match="context of 8.*overflow='slide'"):
        generate(model, [1, 2, 3], max_new_tokens=7, overflow="error")
    assert len(generate(model, [1, 2, 3], max_new_tokens=6, overflow="error")) == 6
    with pytest.raises(ValueError, match="overflow must be"):
        generate(model, [1], overflow="crop")
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, [1, 23])
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [])
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], temperature=-1)


# ---- greedy, seeds, batches -------------------------------------------------------------------

def test_greedy_is_the_argmax_of_full_forwards_and_deterministic():
    model = tiny_model("gpt2", dropout=0.3)  # dropout must be off while generating
    model.train()
    ids = [3, 1, 4]
    expected = list(ids)
    for _ in range(10):
        model.eval()
        expected.append(int(last_logits(model, [expected]).argmax()))
    model.train()
    out = generate(model, ids, max_new_tokens=10, temperature=0)
    assert out == expected[3:]
    assert generate(model, ids, max_new_tokens=10, temperature=0) == out
    assert model.training  # the mode is restored
    for _ in decode_steps(model, [ids], max_new_tokens=2):
        assert autograd.is_grad_enabled()  # no_grad covers the forwards, not the caller


def test_seeded_sampling_is_reproducible_and_ignores_global_state():
    model = tiny_model()
    a = generate(model, [5], max_new_tokens=15, temperature=2.0, seed=7)
    np.random.seed(123)
    autograd.manual_seed(99)
    b = generate(model, [5], max_new_tokens=15, temperature=2.0, seed=7)
    c = generate(model, [5], max_new_tokens=15, temperature=2.0, seed=8)
    assert a == b and a != c


def test_batches_of_mixed_lengths_equal_each_prompt_alone():
    model = tiny_model("llama", n_kv_heads=2)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8], [9]]
    batch = generate(model, prompts, max_new_tokens=6, temperature=0)
    assert batch == [generate(model, p, max_new_tokens=6, temperature=0) for p in prompts]


# ---- the sampling filters -------------------------------------------------------------------

logit_rows = st.integers(1, 3).flatmap(lambda b: st.integers(2, 12).flatmap(
    lambda v: st.lists(st.lists(st.integers(-8, 8), min_size=v, max_size=v), min_size=b,
                       max_size=b)))  # small integers: many ties


@given(z=logit_rows, k=st.integers(1, 12))
def test_top_k_keeps_exactly_the_logits_at_least_the_kth_largest(z, k):
    z = np.array(z, float) / 2
    out = top_k_filter(z, k)
    for row, orow in zip(z, out):
        kth = np.sort(row)[::-1][min(k, len(row)) - 1]
        allowed = row >= kth
        np.testing.assert_array_equal(np.isfinite(orow), allowed)
        np.testing.assert_array_equal(orow[allowed], row[allowed])
        assert softmax(orow[None])[0][~allowed].sum() == 0


@given(z=logit_rows, p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_most_probable_set_with_mass_p(z, p):
    z = np.array(z, float) / 2
    out = top_p_filter(z, p)
    for row, orow in zip(z, out):
        probs, kept = softmax(row[None])[0], np.isfinite(orow)
        assert kept.any()
        assert probs[kept].sum() >= min(p, 1.0) - 1e-12  # enough mass
        assert probs[kept].sum() - probs[kept].min() < p + 1e-12  # none to spare
        if (~kept).any():
            assert probs[kept].min() >= probs[~kept].max()  # the most probable ones
        # NumPy reference: sort by probability (ties by id), keep while the mass before < p
        order = np.lexsort((np.arange(len(row)), -row))
        before = np.concatenate([[0], np.cumsum(probs[order])[:-1]])
        ref = np.zeros(len(row), bool)
        ref[order[before < p]] = True
        np.testing.assert_array_equal(kept, ref)


@given(z=logit_rows, m=st.floats(0.0, 1.0))
def test_min_p_keeps_tokens_at_least_min_p_times_the_top(z, m):
    z = np.array(z, float) / 2
    out = min_p_filter(z, m)
    for row, orow in zip(z, out):
        e = np.exp(row - row.max())
        probs = e / e.sum()
        np.testing.assert_array_equal(np.isfinite(orow), probs >= m * probs.max())
        assert np.isfinite(orow[row.argmax()])


@given(z=logit_rows, k=st.integers(1, 4), p=st.floats(0.05, 1.0), m=st.floats(0.0, 0.9),
       seed=st.integers(0, 1000))
def test_sampling_never_leaves_the_allowed_set(z, k, p, m, seed):
    z = np.array(z, float) / 2
    allowed = np.isfinite(min_p_filter(top_p_filter(top_k_filter(z, k), p), m))
    rng = np.random.default_rng(seed)
    seen = np.zeros(z.shape, bool)
    for _ in range(30):
        t = choose_next(z, seen, rng, temperature=1.0, top_k=k, top_p=p, min_p=m)
        assert allowed[np.arange(len(z)), t].all()


def test_sample_from_follows_the_distribution_and_skips_zeros():
    probs = np.array([[0.5, 0.0, 0.2, 0.3, 0.0]] * 20000)
    t = sample_from(probs, np.random.default_rng(0))
    freq = np.bincount(t, minlength=5) / len(t)
    np.testing.assert_allclose(freq, probs[0], atol=0.015)
    assert freq[1] == 0 and freq[4] == 0


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    z = np.array([[2.0, -1.0, 3.0, -4.0]])
    seen = np.array([[True, True, False, False]])
    np.testing.assert_array_equal(apply_repetition_penalty(z, seen, 2.0), [[1.0, -2.0, 3.0, -4.0]])
    np.testing.assert_array_equal(apply_repetition_penalty(z, seen, 1.0), z)


def test_repetition_penalty_in_generation_matches_a_plain_loop():
    model = tiny_model("gpt2")
    ids = [3, 3, 7]
    expected = list(ids)
    for _ in range(8):
        z = last_logits(model, [expected])[0]
        for t in set(expected):
            z[t] = z[t] / 1.5 if z[t] > 0 else z[t] * 1.5
        expected.append(int(z.argmax()))
    assert generate(model, ids, max_new_tokens=8, temperature=0, repetition_penalty=1.5) \
        == expected[3:]
    assert expected[3:] != generate(model, ids, max_new_tokens=8, temperature=0)


# ---- stop rules and streaming, on a model that emits a script --------------------------------

TOK = Tokenizer.bytes(special_tokens=["<|endoftext|>"])  # one token per byte: UTF-8 is split


class _Cache:
    def __init__(self, n):
        self.length, self.max_len, self.batch_size = 0, n, 1

    def reset(self):
        self.length = 0


class ScriptedModel:
    """Greedy decoding of this 'model' emits `script` (token ids) after the prompt."""

    def __init__(self, script, context_length=512):
        self.config = ModelConfig(vocab_size=TOK.vocab_size, context_length=context_length)
        self.script, self.training, self.calls = script, False, 0

    def new_cache(self, batch_size):
        return _Cache(self.config.context_length)

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def __call__(self, idx, cache=None, last_only=False):
        self.calls += 1
        cache.length += idx.shape[1]
        logits = np.zeros((idx.shape[0], 1, self.config.vocab_size))
        logits[:, 0, self.script[self.calls - 1]] = 1.0  # the prefill gives the first
        return Tensor(logits), None


def scripted(text):
    return ScriptedModel(list(text.encode("utf-8")) + [0] * 64)


def run(text, **kw):
    kw.setdefault("max_new_tokens", 60)
    out = generate_text(scripted(text), TOK, "p", temperature=0, **kw)
    pieces = list(stream(scripted(text), TOK, "p", temperature=0, **kw))
    assert "".join(pieces) == out  # streaming reassembles to the same text
    return out, pieces


def test_stop_token_ends_the_text_and_is_not_included():
    script = list(b"ab") + [TOK.eot_id] + list(b"cd") + [0] * 8
    assert generate_text(ScriptedModel(script), TOK, "p", temperature=0,
                         max_new_tokens=10) == "ab"
    assert generate(ScriptedModel(script), [1], temperature=0, max_new_tokens=10,
                    stop_tokens=[TOK.eot_id]) == list(b"ab")
    text = generate_text(ScriptedModel(script), TOK, "p", temperature=0, max_new_tokens=6,
                         stop_tokens=())
    assert text == "ab<|endoftext|>cd\x00"


def test_stop_strings_cut_the_text_before_the_first_one():
    out, pieces = run("tea STOP and more", stop_strings=["STOP"])
    assert out == "tea "
    out, _ = run("ST, STO, then END here", stop_strings=["STOP", "END"])
    assert out == "ST, STO, then "  # false starts are released, not swallowed
    out, _ = run("no stop here", max_new_tokens=12, stop_strings=["zzz"])
    assert out == "no stop here"
    out, _ = run("日本語のテキスト", stop_strings=["のテ"])
    assert out == "日本語"


def test_streaming_yields_whole_characters_as_they_complete():
    text = "aé日😀b"
    model = scripted(text)
    pieces = []
    for piece in stream(model, TOK, "p", temperature=0, max_new_tokens=len(text.encode())):
        pieces.append((piece, model.calls))
    assert [p for p, _ in pieces] == list(text)  # one piece per character, never U+FFFD
    assert [c for _, c in pieces] == [1, 3, 6, 10, 11]  # each as soon as its last byte came


def test_stream_flushes_an_incomplete_character_as_replacement():
    out, pieces = run("ab😀", max_new_tokens=4)  # 2 of the emoji's 4 bytes
    assert out == "ab\ufffd" and pieces == ["a", "b", "\ufffd"]
    script = list("a😀".encode()[:3]) + [TOK.eot_id] + [0] * 8  # cut by the stop token
    assert generate_text(ScriptedModel(script), TOK, "p", temperature=0) == "a\ufffd"
    assert list(stream(ScriptedModel(script), TOK, "p", temperature=0)) == ["a", "\ufffd"]


@given(seed=st.integers(0, 10_000), stop=st.sampled_from([(), ("\x80",), ("a", "é")]))
def test_stream_equals_generate_text_on_random_bytes(seed, stop):
    model = tiny_model(vocab_size=TOK.vocab_size, seed=seed % 3, init_std=0.05)
    kw = dict(max_new_tokens=12, temperature=1.0, seed=seed, stop_strings=stop)
    text = generate_text(model, TOK, "é", **kw)
    assert "".join(stream(model, TOK, "é", **kw)) == text
    toks = generate(model, TOK.encode("é"), max_new_tokens=12, temperature=1.0, seed=seed,
                    stop_tokens=[TOK.eot_id])
    full = TOK.decode(toks)
    cut = min([full.find(s) for s in stop if s in full], default=len(full))
    assert text == full[:cut]


def test_batched_text_equals_each_prompt_alone():
    model = tiny_model(vocab_size=TOK.vocab_size, init_std=0.05)
    prompts = ["ab", "xyz", "cd", ""]
    kw = dict(max_new_tokens=8, temperature=0, stop_strings=["\x01"])
    assert generate_text(model, TOK, prompts, **kw) == [generate_text(model, TOK, p, **kw)
                                                        for p in prompts]


# ---- loading and the command line -------------------------------------------------------------

def save_run(tmp_path, model, tok):
    run_dir = tmp_path / "run"
    tok.save(tmp_path / "tok.json")
    meta = {"step": 1, "model_config": model.config.to_dict(),
            "tokenizer": (tmp_path / "tok.json").read_text()}
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(run_dir / "last.ckpt", meta, arrays)
    return run_dir


def test_cli_generates_from_a_saved_run(tmp_path, capsys):
    model = tiny_model("gpt2", vocab_size=TOK.vocab_size, dtype="float32", init_std=0.05)
    run_dir = save_run(tmp_path, model, TOK)
    loaded, tok = load_for_generation(run_dir)
    assert tok.eot_id == TOK.eot_id
    idx = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(loaded(idx)[0].data, model(idx)[0].data)
    expected = generate_text(model, TOK, "hé", max_new_tokens=10, temperature=0.9, top_k=50,
                             seed=3)
    args = ["generate", str(run_dir), "--prompt", "hé", "--max-new-tokens", "10",
            "--temperature", "0.9", "--top-k", "50", "--seed", "3"]
    assert cli.main(args) == 0
    assert capsys.readouterr().out == "hé" + expected + "\n"
    assert cli.main(args[:2] + ["--no-stream", "--no-echo"] + args[2:]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert cli.main(args[:2] + ["--prompt", "ab"] + args[2:]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- 0\nab") and "--- 1\nhé" + expected + "\n" in out
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        load_for_generation(tmp_path / "nothing")


def test_cli_generates_from_a_hugging_face_folder(tmp_path, capsys):
    from tinyllm.safetensors import save_file

    hf_cfg = dict(model_type="llama", vocab_size=TOK.vocab_size, hidden_size=16,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=24, rms_norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=32, tie_word_embeddings=True, hidden_act="silu")
    shapes = {"model.embed_tokens.weight": (TOK.vocab_size, 16), "model.norm.weight": (16,)}
    p = "model.layers.0."
    shapes.update({p + "input_layernorm.weight": (16,), p + "post_attention_layernorm.weight": (16,),
                   p + "self_attn.q_proj.weight": (16, 16), p + "self_attn.k_proj.weight": (8, 16),
                   p + "self_attn.v_proj.weight": (8, 16), p + "self_attn.o_proj.weight": (16, 16),
                   p + "mlp.gate_proj.weight": (24, 16), p + "mlp.up_proj.weight": (24, 16),
                   p + "mlp.down_proj.weight": (16, 24)})
    rng = np.random.default_rng(0)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(hf_cfg))
    save_file({k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in shapes.items()},
              hf_dir / "model.safetensors")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_for_generation(hf_dir)
    TOK.save(tmp_path / "tok.json")
    expected = generate_text(GPT.from_pretrained(hf_dir), TOK, "x", max_new_tokens=40,
                             temperature=0)  # 41 positions > 32: the window slides
    assert cli.main(["generate", str(hf_dir), "--tokenizer", str(tmp_path / "tok.json"),
                     "--prompt", "x", "--max-new-tokens", "40", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "x" + expected + "\n"
