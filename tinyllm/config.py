"""ModelConfig: every size and design choice of the transformer, and the named presets.

Two flavours cover the usual decoder-only designs:

    gpt2:  learned positions, LayerNorm, GELU MLP (tanh approximation, as GPT-2), biases
    llama: RoPE, RMSNorm, SwiGLU MLP, no biases, optional grouped-query attention (n_kv_heads)

`GPT.from_preset(name, **overrides)` builds a model from PRESETS; `flavour="gpt2"|"llama"` as an
override switches a preset's flavour. `vocab_size` is usually set from the tokenizer:
`GPT.from_preset("laptop", vocab_size=tok.vocab_size)`.
"""

from dataclasses import asdict, dataclass, fields

POSITIONS = ("rope", "learned", "sinusoidal", "none")
INITS = ("gpt2", "normal", "fan_in")

FLAVOURS = {
    "gpt2": dict(positions="learned", norm="layer", mlp="gelu", bias=True),
    "llama": dict(positions="rope", norm="rms", mlp="swiglu", bias=False),
}


@dataclass
class ModelConfig:
    vocab_size: int = 256
    context_length: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: = n_heads (plain multi-head attention)
    d_ff: int | None = None  # None: 4 d_model for gelu, ~8/3 d_model (multiple of 32) for swiglu
    norm: str = "rms"  # "rms" | "layer"
    mlp: str = "swiglu"  # "swiglu" | "gelu" (tanh approximation, GPT-2's "gelu_new")
    # "rope" | "learned" | "sinusoidal" (the fixed table of Vaswani et al.) | "none" (no
    # position signal: only the causal mask tells positions apart)
    positions: str = "rope"
    rope_theta: float = 10000.0
    rope_style: str = "half"  # "half" (rotate-half, HF Llama) | "interleaved" (pairs 2i, 2i+1)
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix
    bias: bool = False  # biases in the Linear layers and LayerNorm
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # "pre": x = x + f(norm(x)), a final norm (GPT-2, Llama); "post": x = norm(x + f(x)), no
    # final norm (the original Transformer, GPT-1)
    norm_position: str = "pre"
    # "gpt2": normal(0, init_std), the residual projections / sqrt(2 n_layers); "normal":
    # normal(0, init_std) everywhere; "fan_in": PyTorch's defaults (Linear weights and biases
    # uniform(+-1/sqrt(fan_in)), embeddings normal(0, 1))
    init: str = "gpt2"
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else _swiglu_width(self.d_model)
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads",
                     "n_kv_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig: {name} must be a positive integer, got {value!r}")
        choices = dict(norm=("rms", "layer"), mlp=("swiglu", "gelu"),
                       positions=POSITIONS, rope_style=("half", "interleaved"),
                       norm_position=("pre", "post"), init=INITS)
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig: RoPE needs an even head_dim, got {self.head_dim}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"ModelConfig: dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Build from a dict (e.g. a checkpoint's), refusing unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {unknown}")
        return cls(**d)


def _swiglu_width(d_model):
    """8/3 d_model rounded up to a multiple of 32: SwiGLU's three matrices then hold about as
    many weights as a 4 d_model GELU MLP's two."""
    return -(-8 * d_model // 3 // 32) * 32


PRESETS = {
    # ~1M parameters (with a ~1k-token vocabulary): trains usefully on a laptop CPU in minutes.
    "laptop": dict(flavour="llama", n_layers=4, n_heads=4, d_model=128, context_length=128,
                   vocab_size=1024, tie_embeddings=True),
    # nanoGPT's config/train_shakespeare_char.py: 6 layers, 6 heads, 384 wide, context 256,
    # no biases, dropout 0.2, tied embeddings, 65 characters.
    "shakespeare-char": dict(flavour="gpt2", n_layers=6, n_heads=6, d_model=384,
                             context_length=256, vocab_size=65, bias=False, dropout=0.2,
                             tie_embeddings=True),
    "llama-shakespeare-char": dict(flavour="llama", n_layers=6, n_heads=6, d_model=384,
                                   context_length=256, vocab_size=65, dropout=0.2,
                                   tie_embeddings=True),
    # GPT-2 small (124M): 12 layers, 12 heads, 768 wide, context 1024, GPT-2's 50257 tokens.
    "gpt2-small": dict(flavour="gpt2", n_layers=12, n_heads=12, d_model=768,
                       context_length=1024, vocab_size=50257, tie_embeddings=True),
    "llama-gpt2-small": dict(flavour="llama", n_layers=12, n_heads=12, d_model=768,
                             context_length=1024, vocab_size=50257, tie_embeddings=True),
}


def preset_config(name, **overrides):
    """The ModelConfig of preset `name` with `overrides` applied (`flavour=` switches flavour)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    preset = dict(PRESETS[name])
    flavour = overrides.pop("flavour", preset.pop("flavour"))
    preset.pop("flavour", None)
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; known flavours: {', '.join(FLAVOURS)}")
    settings = dict(FLAVOURS[flavour])  # the flavour, then the preset's own choices, then yours
    settings.update(preset)
    settings.update(overrides)
    return ModelConfig.from_dict(settings)
