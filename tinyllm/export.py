"""Export a trained model to Hugging Face `transformers` and `tokenizers`.

`export_hf(model, tokenizer, out_dir)` writes a folder that
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)`,
`transformers.AutoTokenizer.from_pretrained(out_dir)` and
`tokenizers.Tokenizer.from_file(out_dir / "tokenizer.json")` load as they are:

    config.json               GPT2LMHeadModel (learned positions) or LlamaForCausalLM (RoPE)
    model.safetensors         the weights under Hugging Face's names
    generation_config.json    bos/eos ids (<|endoftext|>, and <|im_end|> for a chat model)
    tokenizer.json            byte-level BPE giving the same ids as our Tokenizer.encode
    tokenizer_config.json     PreTrainedTokenizerFast, special tokens, ChatML chat template
    special_tokens_map.json

The weights are the inverse of `tinyllm.checkpoints_hf` (its docstring has the name table):
GPT-2's Conv1D layers store (in, out), so our (out, in) matrices are transposed, and its fused
c_attn is q, k, v side by side. GPT-2 always has biases, so a model without them exports
zeros, which add nothing. Llama applies RoPE in rotate-half form, channels (i, i + D/2); a
model trained with interleaved RoPE, pairs (2i, 2i+1), exports with the rows of each head of
wq and wk reordered to (0, 2, 4, ..., 1, 3, 5, ...): rotate-half on the reordered rows is the
interleaved rotation reordered the same way, and the same reordering of q and k leaves every
score q . k unchanged.

The tokenizer. `tokenizers` runs: added (special) tokens split out first, then the pre-tokenizer
(our split regex, each match its own piece, then each byte spelled as GPT-2's printable
character), then BPE over those characters, merging the lowest-ranked pair first, leftmost on
ties: our algorithm, with a merge's rank its position in the list, which is the order of our
ids. An OpenAI vocabulary (whole_token_lookup) looks a whole piece up first, which is BPE's
`ignore_merges`. Hugging Face names tokens by their text, so a vocabulary where two ids spell
the same bytes cannot be exported (refused by name).

The folder is written beside `out_dir` under a temporary name and renamed at the end: a failure
leaves no half-written export.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from autograd import backend
from tinyllm.atomic import atomic_write
from tinyllm.cli import UsageError, check_choice
from tinyllm.safetensors import save_file
from tinyllm.tokenizer.patterns import bytes_to_unicode, onig_pattern

FORMATS = ("hf",)
DTYPES = ("float32", "bfloat16", "float16")
ENDOFTEXT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# What each Hugging Face architecture can represent: (setting, value, what it means).
_GPT2_NEEDS = (("positions", "learned", "learned position embeddings"),
               ("norm", "layer", "LayerNorm"), ("mlp", "gelu", "a GELU MLP"))
_LLAMA_NEEDS = (("positions", "rope", "RoPE"), ("norm", "rms", "RMSNorm"),
                ("mlp", "swiglu", "a SwiGLU MLP"))


# ---- the architecture ---------------------------------------------------------------------------

def hf_architecture(cfg):
    """"gpt2" or "llama": the Hugging Face model a ModelConfig exports to. The flavour is the
    one most of positions/norm/mlp agree with; a setting it cannot represent raises ValueError
    naming the setting."""
    gpt2_votes = sum(getattr(cfg, k) == v for k, v, _ in _GPT2_NEEDS)
    arch, needs, name = (("gpt2", _GPT2_NEEDS, "GPT-2") if gpt2_votes >= 2
                         else ("llama", _LLAMA_NEEDS, "Llama"))
    bad = [f"{k}={getattr(cfg, k)!r} (it has {what}, {k}={v!r})"
           for k, v, what in needs if getattr(cfg, k) != v]
    if cfg.norm_position != "pre":
        bad.append(f"norm_position={cfg.norm_position!r} (it normalizes each branch's input, "
                   f"norm_position='pre')")
    if arch == "gpt2" and cfg.n_kv_heads != cfg.n_heads:
        bad.append(f"n_kv_heads={cfg.n_kv_heads} with n_heads={cfg.n_heads} (it has no "
                   f"grouped-query attention)")
    if bad:
        raise ValueError(f"cannot export this {name}-like model as Hugging Face {name}: "
                         + "; ".join(bad))
    return arch


def _token_ids(tokenizer):
    """bos_token_id and eos_token_id: <|endoftext|> (our document separator), or None."""
    eot = tokenizer.special_tokens.get(ENDOFTEXT) if tokenizer is not None else None
    return dict(bos_token_id=eot, eos_token_id=eot)


def gpt2_config(cfg, tokenizer=None, dtype="float32"):
    """config.json for GPT2LMHeadModel."""
    return dict(
        architectures=["GPT2LMHeadModel"], model_type="gpt2",
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_ctx=cfg.context_length,
        n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
        activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False, initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings, use_cache=True, torch_dtype=dtype,
        **_token_ids(tokenizer),
    )


def llama_config(cfg, tokenizer=None, dtype="float32"):
    """config.json for LlamaForCausalLM. RoPE's base is written both as rope_theta
    (transformers 4) and rope_parameters (transformers 5)."""
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context_length,
        hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", rms_norm_eps=cfg.norm_eps,
        rope_theta=float(cfg.rope_theta), rope_scaling=None,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_bias=cfg.bias, mlp_bias=cfg.bias, attention_dropout=0.0, pretraining_tp=1,
        initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings, use_cache=True,
        torch_dtype=dtype, **_token_ids(tokenizer),
    )


# ---- the weights --------------------------------------------------------------------------------

def gpt2_state_dict(state, cfg):
    """Hugging Face GPT-2 name -> array from our name -> array (NumPy, float)."""
    d = cfg.d_model

    def bias(name, size):  # GPT-2 always has biases; ours may not (then they are zero)
        return state.get(name, np.zeros(size, state["tok_emb.weight"].dtype))

    out = {"transformer.wte.weight": state["tok_emb.weight"],
           "transformer.wpe.weight": state["pos_emb.weight"]}
    norms = {"norm1": "ln_1", "norm2": "ln_2"}
    for n in range(cfg.n_layers):
        p, h = f"blocks.{n}.", f"transformer.h.{n}."
        for ours, theirs in norms.items():
            out[f"{h}{theirs}.weight"] = state[f"{p}{ours}.weight"]
            out[f"{h}{theirs}.bias"] = bias(f"{p}{ours}.bias", d)
        # Conv1D: weight (in, out) = our (out, in) transposed
        qkv = [state[f"{p}attn.w{c}.weight"] for c in "qkv"]
        out[f"{h}attn.c_attn.weight"] = np.concatenate(qkv, axis=0).T
        out[f"{h}attn.c_attn.bias"] = np.concatenate(
            [bias(f"{p}attn.w{c}.bias", d) for c in "qkv"])
        for ours, theirs, size in (("attn.wo", "attn.c_proj", d), ("mlp.w1", "mlp.c_fc", cfg.d_ff),
                                   ("mlp.w2", "mlp.c_proj", d)):
            out[f"{h}{theirs}.weight"] = state[f"{p}{ours}.weight"].T
            out[f"{h}{theirs}.bias"] = bias(f"{p}{ours}.bias", size)
    out["transformer.ln_f.weight"] = state["norm_f.weight"]
    out["transformer.ln_f.bias"] = bias("norm_f.bias", d)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def interleaved_to_half(w, n_heads, head_dim):
    """Reorder the rows (axis 0) of each head's block of a q or k projection from interleaved
    RoPE pairs (2i, 2i+1) to rotate-half pairs (i, i + head_dim/2). Works for weights (rows,
    in) and biases (rows,)."""
    order = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    rows = (np.arange(n_heads)[:, None] * head_dim + order).reshape(-1)
    return w[rows]


_LLAMA_LAYER = {"norm1.weight": "input_layernorm.weight",
                "norm2.weight": "post_attention_layernorm.weight",
                "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
                "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
                "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj"}


def llama_state_dict(state, cfg):
    """Hugging Face Llama name -> array from our name -> array (NumPy, float)."""
    out = {"model.embed_tokens.weight": state["tok_emb.weight"],
           "model.norm.weight": state["norm_f.weight"]}
    heads = {"attn.wq": cfg.n_heads, "attn.wk": cfg.n_kv_heads}
    for n in range(cfg.n_layers):
        p, h = f"blocks.{n}.", f"model.layers.{n}."
        for ours, theirs in _LLAMA_LAYER.items():
            names = [(ours, theirs)] if ours.endswith(".weight") else \
                [(f"{ours}.{k}", f"{theirs}.{k}") for k in ("weight", "bias")]
            for src, dst in names:
                if src.endswith(".bias") and not cfg.bias:
                    continue
                a = state[p + src]
                if cfg.rope_style == "interleaved" and ours in heads:
                    a = interleaved_to_half(a, heads[ours], cfg.head_dim)
                out[h + dst] = a
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


def _cast(tensors, dtype):
    """Every array in `dtype` (float32, float16 or bfloat16); a value the dtype cannot hold
    (beyond float16's 65504) raises ValueError naming the tensor."""
    check_choice("dtype", dtype, DTYPES)
    if dtype == "bfloat16":
        try:
            target = backend.bfloat16()
        except RuntimeError as e:
            raise ValueError(f"--dtype bfloat16: {e}") from None
    else:
        target = np.dtype(dtype)
    out = {}
    for name, a in tensors.items():
        a32 = np.asarray(a, np.float32)
        with np.errstate(over="ignore"):  # checked just below
            b = np.ascontiguousarray(a32.astype(target))
        if np.isfinite(a32).all() and not np.isfinite(b.astype(np.float32)).all():
            raise ValueError(f"{name}: values up to {np.abs(a32).max():.4g} overflow {dtype}; "
                             f"export as float32 or bfloat16")
        out[name] = b
    return out


def hf_state_dict(model, dtype="float32"):
    """(architecture, Hugging Face name -> NumPy array in `dtype`) for a GPT."""
    cfg = model.config
    arch = hf_architecture(cfg)
    state = {k: backend.to_device(v, "cpu") for k, v in model.state_dict().items()}
    convert = gpt2_state_dict if arch == "gpt2" else llama_state_dict
    return arch, _cast(convert(state, cfg), dtype)


# ---- the tokenizer ------------------------------------------------------------------------------

def hf_vocab(tokenizer):
    """Token text -> id for the BPE model: each byte spelled as GPT-2's printable character.
    ValueError when two ids (special tokens included) would have the same text."""
    spell = bytes_to_unicode()
    vocab, owner = {}, {}
    for i, b in sorted(tokenizer.vocab.items()):
        if i in tokenizer.inverse_special_tokens:
            continue
        text = "".join(spell[x] for x in b)
        if text in vocab:
            raise ValueError(f"tokenizer: ids {vocab[text]} and {i} are the same bytes {b!r}; "
                             f"Hugging Face names tokens by their text, so this vocabulary "
                             f"cannot be exported")
        vocab[text] = i
    for s, i in tokenizer.special_tokens.items():
        if s in vocab:  # tokenizers would give the special token the BPE token's id
            raise ValueError(f"tokenizer: special token {s!r} (id {i}) is spelled like "
                             f"token {vocab[s]}; it cannot be exported")
    return vocab


def tokenizer_json(tokenizer):
    """The `tokenizers` document (a dict) encoding every text to the ids `tokenizer.encode(
    text, allowed_special="all")` gives."""
    vocab = hf_vocab(tokenizer)
    # tokenizers numbers added tokens from the BPE vocabulary's size on, ignoring the ids
    # written for them, unless the BPE vocabulary holds their text: listing them there keeps
    # ids past gaps (cl100k_base has none at 100256). Being split out before the pre-tokenizer,
    # their text never reaches BPE, and no merge makes it.
    vocab.update(tokenizer.special_tokens)
    spell = bytes_to_unicode()
    text = {i: "".join(spell[x] for x in b) for i, b in tokenizer.vocab.items()}
    parents = sorted(tokenizer.merges.items(), key=lambda kv: kv[1])  # rank order
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": False}
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for s, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": onig_pattern(tokenizer.pattern)},
             "behavior": "Isolated", "invert": False},
            byte_level,
        ]},
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
            "byte_fallback": False, "ignore_merges": tokenizer.whole_token_lookup,
            "vocab": vocab,
            "merges": [[text[a], text[b]] for (a, b), _ in parents],
        },
    }


def chat_template():
    """ChatML as tinyllm.chat renders it: <|endoftext|>, then each message as
    <|im_start|>role\\ncontent<|im_end|>\\n, then <|im_start|>assistant\\n to generate."""
    return ("{{ '" + ENDOFTEXT + "' }}{% for message in messages %}"
            "{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '"
            + IM_END + "' + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{% endif %}")


def tokenizer_files(tokenizer, context_length):
    """{file name: JSON-able dict} for tokenizer_config.json and special_tokens_map.json."""
    specials = tokenizer.special_tokens
    eot = ENDOFTEXT if ENDOFTEXT in specials else None
    named = {"bos_token": eot, "eos_token": eot, "unk_token": None}
    extra = [s for s in specials if s != eot]
    config = dict(
        tokenizer_class="PreTrainedTokenizerFast", model_max_length=context_length,
        clean_up_tokenization_spaces=False, add_prefix_space=False,
        added_tokens_decoder={str(i): {"content": s, "single_word": False, "lstrip": False,
                                       "rstrip": False, "normalized": False, "special": True}
                              for s, i in sorted(specials.items(), key=lambda kv: kv[1])},
        additional_special_tokens=extra, **named,
    )
    if IM_START in specials and IM_END in specials and eot is not None:
        config["chat_template"] = chat_template()
    special_map = {k: v for k, v in named.items() if v is not None}
    if extra:
        special_map["additional_special_tokens"] = extra
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}


def generation_config(tokenizer):
    """generation_config.json: generation stops at <|endoftext|> and, for a chat model, at
    <|im_end|> (the end of the assistant's turn)."""
    ids = _token_ids(tokenizer)
    stops = [tokenizer.special_tokens[s] for s in (IM_END, ENDOFTEXT)
             if tokenizer is not None and s in tokenizer.special_tokens]
    if len(stops) > 1:
        ids["eos_token_id"] = stops
    return {k: v for k, v in ids.items() if v is not None}


# ---- writing ------------------------------------------------------------------------------------

def check_out_dir(out_dir, overwrite=False):
    """Refuse an output folder that exists with files in it (unless overwrite) or is a file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--to {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--to {out}: folder exists and is not empty (pass --overwrite "
                              f"to replace it)")
    return out


def _write_json(path, obj):
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def export_hf(model, tokenizer, out_dir, dtype="float32", overwrite=False):
    """Write `model` (a GPT) and `tokenizer` (a Tokenizer, or None for the weights alone) as a
    Hugging Face folder `out_dir`; returns its Path. Everything is checked before anything is
    written; ValueError names what cannot be exported."""
    cfg = model.config
    out = check_out_dir(out_dir, overwrite)
    arch, weights = hf_state_dict(model, dtype)
    make_config = gpt2_config if arch == "gpt2" else llama_config
    files = {"config.json": make_config(cfg, tokenizer, dtype)}
    if tokenizer is not None:
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{cfg.vocab_size}")
        files["generation_config.json"] = generation_config(tokenizer)
        files["tokenizer.json"] = tokenizer_json(tokenizer)
        files.update(tokenizer_files(tokenizer, cfg.context_length))
    else:
        files["generation_config.json"] = {}

    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        for name, obj in files.items():
            _write_json(tmp / name, obj)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(new, out):
    """Move folder `new` to `out`, replacing an existing folder there: the old one is renamed
    aside first and put back if the move fails, then removed."""
    if not out.exists():
        os.rename(new, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.absolute().parent))
    os.rename(out, aside / "previous")
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(aside / "previous", out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


# ---- command line -------------------------------------------------------------------------------

def register(subparsers):
    p = subparsers.add_parser(
        "export", help="export a trained model to Hugging Face transformers",
        description="Write a run folder's model and tokenizer as a Hugging Face folder that "
                    "transformers (AutoModelForCausalLM, AutoTokenizer) and tokenizers load.")
    p.add_argument("path", metavar="RUN_DIR", help="run folder or .ckpt checkpoint")
    p.add_argument("--to", required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--format", default="hf", help="hf (the only one; default)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--tokenizer", default=None,
                   help="export this tokenizer instead of the checkpoint's")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it is not empty")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args):
    from tinyllm.generate import load_for_generation

    check_choice("--format", args.format, FORMATS)
    check_choice("--dtype", args.dtype, DTYPES)
    if not os.path.exists(args.path):
        raise UsageError(f"RUN_DIR {args.path}: no such file or folder")
    source, out = Path(args.path).resolve(), Path(args.to).resolve()
    if out == source or out in source.parents:
        raise UsageError(f"--to {args.to}: would replace what is being exported ({args.path})")
    check_out_dir(args.to, args.overwrite)
    model, tokenizer = load_for_generation(args.path, tokenizer=args.tokenizer)
    out = export_hf(model, tokenizer, args.to, dtype=args.dtype, overwrite=args.overwrite)
    arch = "GPT2LMHeadModel" if hf_architecture(model.config) == "gpt2" else "LlamaForCausalLM"
    print(f"wrote {out} ({arch}, {args.dtype}, vocab {model.config.vocab_size})")
    return 0
