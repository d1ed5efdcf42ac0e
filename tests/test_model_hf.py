"""Checkpoints: the .safetensors reader/writer and GPT.from_pretrained on Hugging Face layouts.

The files are written by the tests: safetensors bytes by hand (struct + json, independent of
tinyllm.safetensors) and tiny GPT-2 / Llama checkpoints in the HF naming. Numerical agreement
with an outside reference is in test_model_torch.py.
"""

import json
import struct

import numpy as np
import pytest

import autograd
from tinyllm.model import GPT, ModelConfig
from tinyllm.safetensors import load_file, save_file


def write_raw(path, entries):
    """entries: name -> (dtype code, shape, raw little-endian bytes)."""
    header, blob = {}, b""
    for name, (code, shape, data) in entries.items():
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob)


def test_load_file_reads_every_float_dtype(tmp_path):
    a = np.arange(6, dtype="<f4").reshape(2, 3) / 7
    b = np.array([1.5, -2.25, 1e-3], dtype="<f8")
    c = np.array([[0.5, -1.0]], dtype="<f2")
    # bfloat16 by hand: 1.0 = 0x3F80, -2.5 = 0xC020, 0.15625 = 0x3E20
    bf = np.array([0x3F80, 0xC020, 0x3E20], dtype="<u2")
    write_raw(tmp_path / "w.safetensors", {
        "a": ("F32", a.shape, a.tobytes()), "b": ("F64", b.shape, b.tobytes()),
        "c": ("F16", c.shape, c.tobytes()), "bf": ("BF16", bf.shape, bf.tobytes()),
        "i": ("I64", (2,), np.array([3, -4], "<i8").tobytes()),
    })
    got = load_file(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)
    assert got["c"].dtype == np.float16 and got["c"].tolist() == [[0.5, -1.0]]
    assert got["bf"].dtype == np.float32 and got["bf"].tolist() == [1.0, -2.5, 0.15625]
    assert got["i"].tolist() == [3, -4]


def test_save_file_round_trip_and_layout(tmp_path):
    tensors = {"w": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
               "x": np.array([1.0, 2.0]), "n": np.array([7], np.int32)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"step": 3})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert (8 + n) % 8 == 0  # data 8-byte aligned
    assert header["w"]["dtype"] == "F32" and header["x"]["dtype"] == "F64" and header["n"]["dtype"] == "I32"
    assert header["__metadata__"] == {"step": "3"}
    begin, end = header["w"]["data_offsets"]
    np.testing.assert_array_equal(np.frombuffer(raw[8 + n + begin:8 + n + end], "<f4").reshape(3, 4), tensors["w"])
    back = load_file(path)
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left over


def test_load_file_errors_name_the_file_and_tensor(tmp_path):
    path = tmp_path / "bad.safetensors"
    write_raw(path, {"w": ("F32", (2, 3), b"\0" * 20)})
    with pytest.raises(ValueError, match=r"bad.safetensors: tensor 'w'.*does not fit"):
        load_file(path)
    write_raw(path, {"w": ("C64", (1,), b"\0" * 8)})
    with pytest.raises(ValueError, match="unsupported dtype C64"):
        load_file(path)


# ---- Hugging Face layouts ---------------------------------------------------------------------

GPT2_CFG = dict(model_type="gpt2", vocab_size=29, n_positions=12, n_embd=16, n_layer=2, n_head=4,
                layer_norm_epsilon=1e-5, activation_function="gelu_new")
LLAMA_CFG = dict(model_type="llama", vocab_size=31, hidden_size=16, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
                 rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=12,
                 tie_word_embeddings=False, hidden_act="silu")


def gpt2_tensors(rng):
    t = {"wte.weight": (29, 16), "wpe.weight": (12, 16), "ln_f.weight": (16,), "ln_f.bias": (16,)}
    for n in range(2):
        t.update({f"h.{n}.ln_1.weight": (16,), f"h.{n}.ln_1.bias": (16,),
                  f"h.{n}.attn.c_attn.weight": (16, 48), f"h.{n}.attn.c_attn.bias": (48,),
                  f"h.{n}.attn.c_proj.weight": (16, 16), f"h.{n}.attn.c_proj.bias": (16,),
                  f"h.{n}.ln_2.weight": (16,), f"h.{n}.ln_2.bias": (16,),
                  f"h.{n}.mlp.c_fc.weight": (16, 64), f"h.{n}.mlp.c_fc.bias": (64,),
                  f"h.{n}.mlp.c_proj.weight": (64, 16), f"h.{n}.mlp.c_proj.bias": (16,)})
    return {"transformer." + k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in t.items()}


def llama_tensors(rng):
    t = {"model.embed_tokens.weight": (31, 16), "model.norm.weight": (16,), "lm_head.weight": (31, 16)}
    for n in range(2):
        p = f"model.layers.{n}."
        t.update({p + "input_layernorm.weight": (16,), p + "post_attention_layernorm.weight": (16,),
                  p + "self_attn.q_proj.weight": (16, 16), p + "self_attn.k_proj.weight": (8, 16),
                  p + "self_attn.v_proj.weight": (8, 16), p + "self_attn.o_proj.weight": (16, 16),
                  p + "mlp.gate_proj.weight": (24, 16), p + "mlp.up_proj.weight": (24, 16),
                  p + "mlp.down_proj.weight": (16, 24)})
    return {k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in t.items()}


def write_checkpoint(path, hf_cfg, tensors):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_cfg))
    save_file(tensors, path / "model.safetensors")
    return path


def test_from_pretrained_gpt2_names_shapes_and_forward(tmp_path):
    hf = gpt2_tensors(np.random.default_rng(0))
    model = GPT.from_pretrained(write_checkpoint(tmp_path / "gpt2", GPT2_CFG, hf))
    cfg = model.config
    assert (cfg.positions, cfg.norm, cfg.mlp, cfg.bias, cfg.tie_embeddings) == ("learned", "layer", "gelu", True, True)
    assert (cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.n_layers, cfg.n_heads) == (29, 12, 16, 2, 4)
    sd = model.state_dict()
    assert "lm_head.weight" not in sd
    w = hf["transformer.h.1.attn.c_attn.weight"]  # Conv1D (in, out): q | k | v columns
    np.testing.assert_array_equal(sd["blocks.1.attn.wq.weight"], w[:, :16].T)
    np.testing.assert_array_equal(sd["blocks.1.attn.wk.weight"], w[:, 16:32].T)
    np.testing.assert_array_equal(sd["blocks.1.attn.wv.bias"], hf["transformer.h.1.attn.c_attn.bias"][32:])
    np.testing.assert_array_equal(sd["blocks.0.mlp.w2.weight"], hf["transformer.h.0.mlp.c_proj.weight"].T)
    np.testing.assert_array_equal(sd["pos_emb.weight"], hf["transformer.wpe.weight"])
    np.testing.assert_array_equal(sd["norm_f.bias"], hf["transformer.ln_f.bias"])
    logits, loss = model(np.array([[1, 2, 3, 4]]), np.array([[2, 3, 4, 5]]))
    assert logits.shape == (1, 4, 29) and np.isfinite(loss.item())


def test_from_pretrained_accepts_unprefixed_gpt2_names(tmp_path):
    # the original openai gpt2 checkpoint has no "transformer." prefix
    hf = {k[len("transformer."):]: v for k, v in gpt2_tensors(np.random.default_rng(1)).items()}
    model = GPT.from_pretrained(write_checkpoint(tmp_path / "g", GPT2_CFG, hf) / "model.safetensors")
    np.testing.assert_array_equal(model.tok_emb.weight.data, hf["wte.weight"])


def test_from_pretrained_llama_names_shapes_and_forward(tmp_path):
    hf = llama_tensors(np.random.default_rng(2))
    model = GPT.from_pretrained(write_checkpoint(tmp_path / "llama", LLAMA_CFG, hf), dtype="float64")
    cfg = model.config
    assert (cfg.positions, cfg.norm, cfg.mlp, cfg.bias) == ("rope", "rms", "swiglu", False)
    assert (cfg.n_kv_heads, cfg.d_ff, cfg.tie_embeddings, cfg.norm_eps) == (2, 24, False, 1e-6)
    sd = model.state_dict()
    pairs = {"blocks.0.attn.wk.weight": "model.layers.0.self_attn.k_proj.weight",
             "blocks.1.mlp.w1.weight": "model.layers.1.mlp.gate_proj.weight",
             "blocks.1.mlp.w3.weight": "model.layers.1.mlp.up_proj.weight",
             "blocks.1.mlp.w2.weight": "model.layers.1.mlp.down_proj.weight",
             "blocks.0.norm2.weight": "model.layers.0.post_attention_layernorm.weight",
             "lm_head.weight": "lm_head.weight", "norm_f.weight": "model.norm.weight"}
    for ours, theirs in pairs.items():
        assert sd[ours].dtype == np.float64
        np.testing.assert_array_equal(sd[ours], hf[theirs])
    assert len(sd) == len(hf)
    logits, _ = model(np.array([[0, 5, 30]]))
    assert logits.shape == (1, 3, 31) and np.isfinite(logits.data).all()


def test_round_trip_through_hf_layout_keeps_logits(tmp_path):
    # our model -> HF Llama tensors (tied) -> from_pretrained gives the same function
    autograd.manual_seed(0)
    ours = GPT(ModelConfig(vocab_size=31, context_length=12, d_model=16, n_layers=2, n_heads=4,
                           n_kv_heads=2, d_ff=24, tie_embeddings=True, norm_eps=1e-6))
    sd = ours.state_dict()
    hf = {k: v for k, v in llama_tensors(np.random.default_rng(0)).items() if k != "lm_head.weight"}
    names = {"input_layernorm": "norm1", "post_attention_layernorm": "norm2", "self_attn.q_proj": "attn.wq",
             "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv", "self_attn.o_proj": "attn.wo",
             "mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w3", "mlp.down_proj": "mlp.w2"}
    for k in hf:
        if k.startswith("model.layers."):
            n, part = k.split(".")[2], ".".join(k.split(".")[3:-1])
            hf[k] = sd[f"blocks.{n}.{names[part]}.weight"]
    hf["model.embed_tokens.weight"], hf["model.norm.weight"] = sd["tok_emb.weight"], sd["norm_f.weight"]
    loaded = GPT.from_pretrained(write_checkpoint(tmp_path / "rt", dict(LLAMA_CFG, tie_word_embeddings=True), hf))
    idx = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    np.testing.assert_array_equal(loaded(idx)[0].data, ours(idx)[0].data)


def test_from_pretrained_errors(tmp_path):
    hf = llama_tensors(np.random.default_rng(3))
    with pytest.raises(ValueError, match="unknown architecture model_type='bert'"):
        GPT.from_pretrained(write_checkpoint(tmp_path / "a", dict(LLAMA_CFG, model_type="bert"), hf))
    bad = dict(hf, **{"model.layers.1.mlp.up_proj.weight": np.zeros((25, 16), np.float32)})
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight.*\(25, 16\).*blocks.1.mlp.w3.weight"):
        GPT.from_pretrained(write_checkpoint(tmp_path / "b", LLAMA_CFG, bad))
    extra = dict(hf, **{"model.layers.0.self_attn.q_norm.weight": np.ones(4, np.float32)})
    with pytest.raises(KeyError, match="unexpected tensor 'model.layers.0.self_attn.q_norm.weight'"):
        GPT.from_pretrained(write_checkpoint(tmp_path / "c", LLAMA_CFG, extra))
    missing = {k: v for k, v in hf.items() if k != "model.norm.weight"}
    with pytest.raises(KeyError, match="norm_f.weight"):
        GPT.from_pretrained(write_checkpoint(tmp_path / "d", LLAMA_CFG, missing))
    (tmp_path / "e").mkdir()
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        GPT.from_pretrained(tmp_path / "e")
