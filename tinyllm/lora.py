"""LoRA adapters on a GPT: wrap the projections, train only the adapters, save, load, merge.

    config = LoRAConfig(rank=8)                    # alpha = 2 * rank, every projection
    params = apply_lora(model, config)             # the only trainable parameters now
    opt = AdamW(params, lr=1e-3) ...               # fine-tune
    save_adapters("adapters.safetensors", model)   # only the A and B arrays, config in metadata
    load_adapters_into(other_model, "adapters.safetensors")
    merge_lora(model)                              # back to plain Linears, W + (alpha/rank) B A

Each wrapped projection computes y = x W^T + b + (alpha / rank) (x A^T) B^T with W and b
frozen (see autograd.nn.LoRALinear). The base weights keep their state-dict names, and the
adapters add `<layer>.lora_A` (rank, in) and `<layer>.lora_B` (out, rank), e.g.
`blocks.0.attn.wq.lora_A`.

The adapter file is a .safetensors file holding only those arrays; its metadata holds
`format` ("tinyllm-lora-1", what marks an adapter file), `lora_config` (LoRAConfig.to_dict as
JSON) and `extra_meta` (a JSON object the caller passes, e.g. the base model's fingerprint).
"""

import dataclasses
import json
import math

import numpy as np

from autograd import backend, nn
from tinyllm import safetensors

# The attention (wq, wk, wv, wo) and MLP (w1, w2, w3) projections of tinyllm.model; w3 exists
# only in SwiGLU MLPs, so on a GELU model it simply matches nothing.
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")

_FORMAT = "tinyllm-lora-1"  # the metadata marker of an adapter file


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v):
    return _is_int(v) or isinstance(v, (float, np.floating))


@dataclasses.dataclass
class LoRAConfig:
    """rank r of the update, its scale numerator alpha (scale = alpha / r; default 2 * rank,
    a common choice), and the attribute names of the Linear layers to wrap (default: all of
    TARGETS)."""

    rank: int
    alpha: float | None = None
    targets: tuple = TARGETS

    def __post_init__(self):
        allowed = ", ".join(TARGETS)
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"LoRAConfig: rank={self.rank!r}: must be a positive integer")
        self.rank = int(self.rank)
        if self.alpha is None:
            self.alpha = 2 * self.rank
        if not _is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRAConfig: alpha={self.alpha!r}: must be a finite number > 0")
        self.alpha = float(self.alpha)
        if isinstance(self.targets, str) or not isinstance(self.targets, (list, tuple)):
            raise ValueError(f"LoRAConfig: targets={self.targets!r}: must be a list or tuple of "
                             f"names from {allowed}")
        self.targets = tuple(self.targets)
        if not self.targets:
            raise ValueError(f"LoRAConfig: targets=(): name at least one of {allowed}")
        for t in self.targets:
            if t not in TARGETS:
                raise ValueError(f"LoRAConfig: unknown target {t!r} in targets; allowed: {allowed}")
            if self.targets.count(t) > 1:
                raise ValueError(f"LoRAConfig: target {t!r} is named twice in targets")

    @property
    def scale(self):
        return self.alpha / self.rank

    def to_dict(self):
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise ValueError(f"LoRAConfig.from_dict: expected a dict, got {type(d).__name__}")
        fields = {"rank", "alpha", "targets"}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"LoRAConfig.from_dict: unknown fields {unknown}; "
                             f"allowed: {sorted(fields)}")
        if "rank" not in d:
            raise ValueError("LoRAConfig.from_dict: the field 'rank' is missing")
        return cls(**d)


# ---- wrapping and unwrapping -------------------------------------------------------------------

def _layers(model, kind, names=None):
    """(owner module, attribute name, dotted path) of every attribute that is a `kind` module
    (and named in `names`, when given), in module-tree order."""
    found = []
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            if isinstance(value, kind) and (names is None or name in names):
                found.append((module, name, f"{path}.{name}" if path else name))
    return found


def _target_layers(model, targets):
    """The Linear and LoRALinear layers named in `targets`."""
    return _layers(model, (nn.Linear, nn.LoRALinear), targets)


def _lora_layers(model):
    return _layers(model, nn.LoRALinear)


def apply_lora(model, config):
    """Wrap every Linear attribute named in config.targets in a LoRALinear, freeze every other
    parameter, record `model.lora = config`; return the trainable adapter parameters (lora_A
    then lora_B of each layer, in module-tree order)."""
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"apply_lora: config must be a LoRAConfig, not {type(config).__name__}")
    if getattr(model, "lora", None) is not None or _lora_layers(model):
        raise ValueError("apply_lora: the model already has LoRA adapters (merge_lora first)")
    layers = _target_layers(model, config.targets)
    if not layers:
        raise ValueError(f"apply_lora: targets {list(config.targets)} match no nn.Linear "
                         "attribute of the model")
    for owner, name, _ in layers:
        setattr(owner, name, nn.LoRALinear(getattr(owner, name), config.rank, config.alpha))
    params = []
    for owner, name, _ in layers:
        layer = getattr(owner, name)
        params += [layer.lora_A, layer.lora_B]
    trainable = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad = id(p) in trainable
    model.lora = config
    return params


def lora_state_dict(model):
    """Name -> array of the adapter parameters only (the live arrays, as state_dict)."""
    out = {}
    for owner, name, path in _lora_layers(model):
        layer = getattr(owner, name)
        out[f"{path}.lora_A"], out[f"{path}.lora_B"] = layer.lora_A.data, layer.lora_B.data
    return out


def merge_lora(model):
    """Replace every LoRALinear by its merged Linear (W + scale B A), make every parameter
    trainable again and clear `model.lora`; returns the model, whose state dict then has the
    names of an unwrapped one."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("merge_lora: the model has no LoRA adapters")
    for owner, name, _ in layers:
        setattr(owner, name, getattr(owner, name).merged())
    for p in model.parameters():
        p.requires_grad = True
    model.lora = None
    return model


# ---- adapter files -------------------------------------------------------------------------------

def save_adapters(path, model, extra_meta=None):
    """Write the adapter arrays of `model` to a .safetensors file (atomically), with the LoRA
    config and `extra_meta` (a JSON-serializable dict) in its metadata."""
    config = getattr(model, "lora", None)
    if config is None:
        raise ValueError(f"save_adapters: the model has no LoRA adapters to save to {path}")
    if extra_meta is not None and not isinstance(extra_meta, dict):
        raise ValueError(f"save_adapters: extra_meta must be a dict, not "
                         f"{type(extra_meta).__name__}")
    try:
        extra = json.dumps(extra_meta or {})
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_adapters: extra_meta is not JSON-serializable ({e})") from None
    arrays = {name: backend.to_device(a, "cpu") for name, a in lora_state_dict(model).items()}
    meta = {"format": _FORMAT, "lora_config": json.dumps(config.to_dict()), "extra_meta": extra}
    safetensors.save_file(arrays, path, metadata=meta)


def load_adapters(path):
    """(LoRAConfig, extra_meta dict, name -> array) from an adapter file written by save_adapters.

    Raises ValueError naming the file when it is not an adapter file or its arrays do not fit
    its config (names other than `<layer>.lora_A` / `.lora_B` of a target, unpaired, or shapes
    of another rank)."""
    header, _ = safetensors.read_header(path)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a LoRA adapter file (no '{_FORMAT}' format in its metadata)")
    try:
        config = LoRAConfig.from_dict(json.loads(meta["lora_config"]))
        extra = json.loads(meta.get("extra_meta", "{}"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad LoRA metadata: {e}") from None
    if not isinstance(extra, dict):
        raise ValueError(f"{path}: bad LoRA metadata: extra_meta is a {type(extra).__name__}, "
                         "not a dict")
    try:
        arrays = safetensors.load_file(path)
    except (KeyError, TypeError) as e:  # a malformed header entry (load_file names the rest)
        raise ValueError(f"{path}: malformed tensor entry in the header ({e!r})") from None
    _check_adapter_arrays(path, config, arrays)
    return config, extra, arrays


def _check_adapter_arrays(path, config, arrays):
    if not arrays:
        raise ValueError(f"{path}: the adapter file holds no arrays")
    for name, a in arrays.items():
        layer, _, kind = name.rpartition(".")
        if kind not in ("lora_A", "lora_B") or layer.rpartition(".")[2] not in config.targets:
            raise ValueError(f"{path}: array {name!r} is not the lora_A/lora_B of a layer in the "
                             f"targets {list(config.targets)}")
        other = f"{layer}.{'lora_B' if kind == 'lora_A' else 'lora_A'}"
        if other not in arrays:
            raise ValueError(f"{path}: array {name!r} has no matching {other!r}")
        rank_axis = 0 if kind == "lora_A" else 1
        if a.ndim != 2 or a.shape[rank_axis] != config.rank:
            want = "(rank, in)" if kind == "lora_A" else "(out, rank)"
            raise ValueError(f"{path}: array {name!r} has shape {a.shape}, want {want} with "
                             f"rank {config.rank}")


def _expected_shapes(model, config):
    """Name -> shape of every adapter array `config` gives `model` (wrapped or not)."""
    shapes = {}
    for owner, name, path in _target_layers(model, config.targets):
        out_features, in_features = getattr(owner, name).weight.shape
        shapes[f"{path}.lora_A"] = (config.rank, in_features)
        shapes[f"{path}.lora_B"] = (out_features, config.rank)
    return shapes


def load_adapters_into(model, path):
    """Load an adapter file into `model`: wrap it with the file's config first if it has no
    adapters yet. Everything is checked (config, names, shapes) before the model changes.
    Returns the extra_meta dict of the file."""
    config, extra, arrays = load_adapters(path)
    current = getattr(model, "lora", None)
    if current is not None and current != config:
        raise ValueError(f"{path}: adapters of config {config.to_dict()} for a model wrapped "
                         f"with {current.to_dict()}")
    want = _expected_shapes(model, config)
    missing = sorted(set(want) - set(arrays))
    unexpected = sorted(set(arrays) - set(want))
    if missing or unexpected:
        raise ValueError(f"{path}: adapters do not match the model: missing {missing or 'none'}, "
                         f"unexpected {unexpected or 'none'}")
    for name, shape in want.items():
        if arrays[name].shape != shape:
            raise ValueError(f"{path}: array {name!r} has shape {arrays[name].shape}, the model's "
                             f"layer needs {shape}")
    if current is None:
        apply_lora(model, config)
    model.load_state_dict(arrays, strict=False)
    return extra
