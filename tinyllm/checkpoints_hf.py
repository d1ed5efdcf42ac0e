"""Load Hugging Face GPT-2 and Llama checkpoints (config.json + .safetensors) into GPT.

Name mapping (N = layer number; GPT-2 names may lack the "transformer." prefix):

    GPT-2                                   here
    transformer.wte.weight                  tok_emb.weight (the LM head is tied to it)
    transformer.wpe.weight                  pos_emb.weight
    transformer.h.N.ln_1.{weight,bias}      blocks.N.norm1
    transformer.h.N.attn.c_attn.{w,b}       blocks.N.attn.wq / wk / wv (q, k, v concatenated)
    transformer.h.N.attn.c_proj.{w,b}       blocks.N.attn.wo
    transformer.h.N.ln_2.{weight,bias}      blocks.N.norm2
    transformer.h.N.mlp.c_fc.{w,b}          blocks.N.mlp.w1
    transformer.h.N.mlp.c_proj.{w,b}        blocks.N.mlp.w2
    transformer.ln_f.{weight,bias}          norm_f

GPT-2's Conv1D layers store their weight as (in, out), the transpose of a Linear's (out, in).

    Llama                                             here
    model.embed_tokens.weight                         tok_emb.weight
    model.layers.N.input_layernorm.weight             blocks.N.norm1.weight
    model.layers.N.self_attn.{q,k,v,o}_proj.weight    blocks.N.attn.w{q,k,v,o}.weight
    model.layers.N.post_attention_layernorm.weight    blocks.N.norm2.weight
    model.layers.N.mlp.gate_proj.weight               blocks.N.mlp.w1.weight
    model.layers.N.mlp.up_proj.weight                 blocks.N.mlp.w3.weight
    model.layers.N.mlp.down_proj.weight               blocks.N.mlp.w2.weight
    model.norm.weight                                 norm_f.weight
    lm_head.weight                                    lm_head.weight (unless tie_word_embeddings)

HF Llama applies RoPE in rotate-half form to q and k as stored, which is rope_style="half".
"""

import json
import re
from pathlib import Path

import numpy as np

from tinyllm.config import ModelConfig
from tinyllm.safetensors import load_file

_GPT2_IGNORED = re.compile(r"(^|\.)attn\.(masked_)?bias$")
_LLAMA_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def config_from_hf(hf, source="config.json"):
    """A ModelConfig from a Hugging Face config dict (model_type gpt2 or llama)."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{source}: GPT-2 activation {act!r} is not supported (gelu_new only)")
        d = hf["n_embd"]
        return ModelConfig(
            vocab_size=hf["vocab_size"], context_length=hf.get("n_positions", hf.get("n_ctx")),
            d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * d, norm="layer", mlp="gelu", positions="learned",
            bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), dropout=0.0,
        )
    if kind == "llama":
        if hf.get("rope_scaling"):
            raise ValueError(f"{source}: rope_scaling {hf['rope_scaling']} is not supported")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError(f"{source}: Llama with attention/MLP biases is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: Llama activation {hf['hidden_act']!r} is not supported")
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, d // heads):
            raise ValueError(f"{source}: head_dim {hf['head_dim']} != hidden_size / heads")
        return ModelConfig(
            vocab_size=hf["vocab_size"], context_length=hf["max_position_embeddings"],
            d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"],
            norm="rms", mlp="swiglu", positions="rope", rope_theta=_rope_theta(hf),
            rope_style="half", bias=False, tie_embeddings=hf.get("tie_word_embeddings", False),
            norm_eps=hf.get("rms_norm_eps", 1e-6), dropout=0.0,
        )
    raise ValueError(
        f"{source}: unknown architecture model_type={kind!r} (supported: gpt2, llama)"
    )


def _rope_theta(hf):
    """RoPE's base: `rope_theta` (transformers 4) or `rope_parameters.rope_theta` (5)."""
    params = hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))


def _gpt2_names(hf_name, shape, cfg):
    """[(our name, transform)] for one GPT-2 tensor; transform maps the array to ours."""
    name = hf_name[len("transformer."):] if hf_name.startswith("transformer.") else hf_name
    if name == "wte.weight":
        return [("tok_emb.weight", None)]
    if name == "lm_head.weight":  # saved beside tied embeddings too: then it is wte again
        return [] if cfg.tie_embeddings else [("lm_head.weight", None)]
    if name == "wpe.weight":
        return [("pos_emb.weight", None)]
    if name.startswith("ln_f."):
        return [("norm_f." + name[5:], None)]
    m = re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", name)
    if not m:
        return None
    n, part, kind = m.groups()
    p = f"blocks.{n}."
    t = (lambda a: a.T) if kind == "weight" else None  # Conv1D (in, out) -> Linear (out, in)
    simple = {"ln_1": ("norm1", None), "ln_2": ("norm2", None), "attn.c_proj": ("attn.wo", t),
              "mlp.c_fc": ("mlp.w1", t), "mlp.c_proj": ("mlp.w2", t)}
    if part in simple:
        ours, fn = simple[part]
        return [(f"{p}{ours}.{kind}", fn)]
    if part == "attn.c_attn":  # q, k, v side by side along the output axis
        d = cfg.d_model

        def piece(i):
            if kind == "weight":
                return lambda a: a[:, i * d:(i + 1) * d].T
            return lambda a: a[i * d:(i + 1) * d]

        return [(f"{p}attn.w{c}.{kind}", piece(i)) for i, c in enumerate("qkv")]
    return None


_LLAMA_PARTS = {
    "input_layernorm": "norm1", "post_attention_layernorm": "norm2",
    "self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk",
    "self_attn.v_proj": "attn.wv", "self_attn.o_proj": "attn.wo",
    "mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w3", "mlp.down_proj": "mlp.w2",
}


def _llama_names(hf_name, shape, cfg):
    if hf_name == "model.embed_tokens.weight":
        return [("tok_emb.weight", None)]
    if hf_name == "model.norm.weight":
        return [("norm_f.weight", None)]
    if hf_name == "lm_head.weight":
        return [] if cfg.tie_embeddings else [("lm_head.weight", None)]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    if m and m.group(2) in _LLAMA_PARTS:
        return [(f"blocks.{m.group(1)}.{_LLAMA_PARTS[m.group(2)]}.weight", None)]
    return None


def convert_state_dict(hf_state, cfg, model_type, sources=None):
    """Map a Hugging Face state dict to this model's names, with clear errors.

    sources: optional hf name -> file, for error messages. Returns our name -> array.
    """
    names, ignored = (_gpt2_names, _GPT2_IGNORED) if model_type == "gpt2" else (_llama_names, _LLAMA_IGNORED)
    out = {}
    for hf_name, arr in hf_state.items():
        where = (sources or {}).get(hf_name, "checkpoint")
        targets = names(hf_name, arr.shape, cfg)
        if targets is None:
            if ignored.search(hf_name):
                continue
            raise KeyError(f"{where}: unexpected tensor {hf_name!r} for a {model_type} model")
        for ours, fn in targets:
            out[ours] = fn(arr) if fn is not None else arr
            if sources is not None:
                sources[ours] = f"{where}: {hf_name!r}"
    return out


def _weight_files(path):
    """(config.json path, [safetensors files]) for a directory or a .safetensors file."""
    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [path / f for f in sorted(set(weight_map.values()))]
        elif (path / "model.safetensors").exists():
            files = [path / "model.safetensors"]
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
            raise FileNotFoundError(f"{path}: no .safetensors weights found (found {found})")
        return path / "config.json", files
    if path.suffix == ".safetensors" and path.exists():
        return path.parent / "config.json", [path]
    raise FileNotFoundError(f"{path}: not a checkpoint directory or an existing .safetensors file")


def load_hf(cls, path, dtype="float32", device="cpu"):
    """Build a `cls` (GPT) from a Hugging Face checkpoint directory or .safetensors file."""
    config_path, files = _weight_files(path)
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: missing (needed to know the architecture)")
    hf = json.loads(config_path.read_text())
    cfg = config_from_hf(hf, str(config_path))
    cfg.dtype, cfg.device = str(np.dtype(dtype)) if dtype != "bfloat16" else dtype, device
    hf_state, sources = {}, {}
    for f in files:
        for k, v in load_file(f).items():
            hf_state[k], sources[k] = v, str(f)
    state = convert_state_dict(hf_state, cfg, hf["model_type"], sources)
    model = cls(cfg)
    params = dict(model.named_parameters())
    missing = [k for k in params if k not in state]
    if missing:
        raise KeyError(f"{path}: checkpoint lacks tensors for {missing}")
    unexpected = [sources[k] for k in state if k not in params]
    if unexpected:
        raise KeyError(f"{path}: tensors beyond the config {config_path}: {unexpected}")
    for k, v in state.items():
        if tuple(v.shape) != params[k].shape:
            raise ValueError(
                f"{sources[k]} has shape {tuple(v.shape)} but {k} needs {params[k].shape}"
                f" (config {config_path})"
            )
    model.load_state_dict(state)
    return model
