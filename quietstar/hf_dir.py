"""HF model dirs of the Llama / Mistral / Qwen2 family: config.json <-> ModelConfig, HF tensor names <-> ours.

A dir holds config.json + model.safetensors (or a sharded model.safetensors.index.json; pickled
pytorch_model.bin only when opted in). `load_hf_model` reads one into a Transformer; `hf_config` and
`hf_state_dict` run the same tables backwards, so that an exporter can write a dir transformers loads.
The key map is an explicit table (`hf_key_map`). `model_from_tensors` builds a Transformer from tensors
under our names without a random init (GGUF files are built through it too).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch

from quietstar.errors import LoadError, MissingFileError
from quietstar.model import ModelConfig, Transformer, rope_inv_freq

PathLike = Union[str, Path]

HF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
HF_LAYER_KEYS = {  # ours -> HF, under layers.{i}. / model.layers.{i}.
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
HF_BIAS_KEYS = {f"attention.{w}.bias": f"self_attn.{p}_proj.bias" for w, p in (("wq", "q"), ("wk", "k"), ("wv", "v"))}
HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer some old checkpoints saved


def hf_key_map(cfg: ModelConfig) -> dict[str, str]:
    """Our state-dict name -> the HF name, for every tensor a model with this config has."""
    keys = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        keys["output.weight"] = "lm_head.weight"
    layer_keys = {**HF_LAYER_KEYS, **(HF_BIAS_KEYS if cfg.qkv_bias else {})}
    for i in range(cfg.n_layers):
        keys.update({f"layers.{i}.{ours}": f"model.layers.{i}.{hf}" for ours, hf in layer_keys.items()})
    return keys


def _hf_rope(hf: dict, where: Path) -> tuple[float, Optional[dict]]:
    """(rope_theta, llama3 rope_scaling or None) from either the transformers 4 or the 5 config layout."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = params or hf.get("rope_scaling") or None
    if scaling is None:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise LoadError(f"{where}: rope scaling type {kind!r} is not supported (only llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {"rope_type": "llama3", **{k: scaling[k] for k in keys if k in scaling}}


def _hf_sliding_window(hf: dict, arch: str, where: Path) -> Optional[int]:
    """Mistral: sliding_window (null = none). Qwen2: only with use_sliding_window, and on every layer."""
    window = hf.get("sliding_window")
    if arch == "llama" or window is None:
        return None
    if arch == "qwen2":
        if not hf.get("use_sliding_window", False):
            return None
        n = hf["num_hidden_layers"]
        types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", n) else "full_attention" for i in range(n)]
        if all(t == "full_attention" for t in types):
            return None
        if not all(t == "sliding_attention" for t in types):
            raise LoadError(f"{where}: a sliding window on some layers only (layer_types={types}) is not supported")
    return int(window)


HF_FIELD_TYPES = {"vocab_size": int, "hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int,
                  "num_key_value_heads": int, "head_dim": int, "intermediate_size": int, "rms_norm_eps": float,
                  "rope_theta": float, "max_position_embeddings": int, "tie_word_embeddings": bool,
                  "sliding_window": int, "max_window_layers": int, "use_sliding_window": bool}


def _check_hf_types(hf, where: Path) -> None:
    """Each config.json field this loader reads has the JSON type it needs (null: the field is unset)."""
    if not isinstance(hf, dict):
        raise LoadError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    for key, kind in HF_FIELD_TYPES.items():
        value = hf.get(key)
        if value is None:
            continue
        ok = isinstance(value, bool) if kind is bool else (
            isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool))
        if not ok:
            want = {int: "an integer", float: "a number", bool: "true or false"}[kind]
            raise LoadError(f"{where}: field {key!r} must be {want}, got {value!r}")


def config_from_hf(hf: dict, where: Path = Path("config.json")) -> ModelConfig:
    """An HF config.json dict -> ModelConfig; LoadError (naming `where`) for anything this model cannot run."""
    _check_hf_types(hf, where)
    archs = hf.get("architectures") or []
    arch = next((HF_ARCHS[a] for a in archs if a in HF_ARCHS), None) or hf.get("model_type")
    if arch not in HF_ARCHS.values():
        raise LoadError(f"{where}: unsupported architecture {archs or hf.get('model_type')!r}; "
                        f"supported: {sorted(HF_ARCHS)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise LoadError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if arch == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise LoadError(f"{where}: Llama attention_bias / mlp_bias are not supported")

    def req(key):
        if hf.get(key) is None:
            raise LoadError(f"{where}: missing config field {key!r}")
        return hf[key]

    theta, scaling = _hf_rope(hf, where)
    try:
        return ModelConfig(
            vocab_size=req("vocab_size"), dim=req("hidden_size"), n_layers=req("num_hidden_layers"),
            n_heads=req("num_attention_heads"), n_kv_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"), intermediate_size=req("intermediate_size"),
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings") or 4096,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=arch == "qwen2",
            sliding_window=_hf_sliding_window(hf, arch, where), arch=arch)
    except LoadError:
        raise
    except (TypeError, ValueError, KeyError) as e:  # ModelConfig's own checks, or a field of the wrong type
        raise LoadError(f"{where}: {e}") from e


def hf_config(cfg: ModelConfig, dtype: Optional[torch.dtype] = None) -> dict:
    """ModelConfig -> an HF config.json dict (cfg.arch picks Llama / Mistral / Qwen2)."""
    arch = {v: k for k, v in HF_ARCHS.items()}.get(cfg.arch)
    if arch is None:
        raise ValueError(f"ModelConfig.arch={cfg.arch!r} has no HF architecture; "
                         f"use one of {sorted(HF_ARCHS.values())}")
    if cfg.qkv_bias and cfg.arch != "qwen2":
        raise ValueError(f"ModelConfig.qkv_bias is only exportable with arch='qwen2', got arch={cfg.arch!r}")
    if cfg.sliding_window is not None and cfg.arch == "llama":
        raise ValueError("ModelConfig.sliding_window is not exportable with arch='llama'; use 'mistral' or 'qwen2'")
    out = {
        "architectures": [arch], "model_type": cfg.arch, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
    }
    if cfg.arch == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if cfg.arch == "qwen2":  # max_window_layers=0: the window (if any) applies to every layer
        out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                   max_window_layers=0 if cfg.sliding_window is not None else cfg.n_layers)
    if dtype is not None:
        out["torch_dtype"] = str(dtype).removeprefix("torch.")
    return out


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under HF names (contiguous, no tied duplicate); Qwen2 gets zero q/k/v biases if it has none."""
    cfg, sd = model.cfg, model.state_dict()
    out = {hf: sd[ours].contiguous() for ours, hf in hf_key_map(cfg).items()}
    if cfg.arch == "qwen2" and not cfg.qkv_bias:
        for i in range(cfg.n_layers):
            for ours, hf in HF_BIAS_KEYS.items():
                w = sd[f"layers.{i}.{ours.replace('.bias', '.weight')}"]
                out[f"model.layers.{i}.{hf}"] = w.new_zeros(w.shape[0])
    return out


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: not a readable JSON file ({e})") from e


def _read_safetensors(path: Path, names: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in (f.keys() if names is None else names)}
    except Exception as e:  # safetensors raises its own SafetensorError for truncated / corrupt files
        raise LoadError(f"{path}: truncated or corrupt safetensors file ({type(e).__name__}: {e})") from e


def _read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoadError(f"{path}: cannot read the PyTorch checkpoint ({type(e).__name__}: {e})") from e


def read_hf_weights(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of an HF dir under their HF names: model.safetensors, sharded or not (or, opted in, .bin)."""
    if (path / "model.safetensors").is_file():
        return _read_safetensors(path / "model.safetensors")
    if (path / "model.safetensors.index.json").is_file():
        index = path / "model.safetensors.index.json"
        shards: dict[str, list[str]] = {}
        for name, shard in read_json(index).get("weight_map", {}).items():
            shards.setdefault(shard, []).append(name)
        if not shards:
            raise LoadError(f"{index}: no weight_map")
        return {k: v for shard, names in shards.items() for k, v in _read_safetensors(path / shard, names).items()}
    bins = [p for p in (path / "pytorch_model.bin", path / "pytorch_model.bin.index.json") if p.is_file()]
    if bins and not allow_pickle:
        raise LoadError(f"{bins[0]}: refusing to unpickle a PyTorch checkpoint; convert it to safetensors or "
                        "pass allow_pickle=True (it is then read with torch.load(weights_only=True))")
    if (path / "pytorch_model.bin").is_file():
        return _read_torch_bin(path / "pytorch_model.bin")
    if bins:
        shards = sorted(set(read_json(bins[0]).get("weight_map", {}).values()))
        return {k: v for shard in shards for k, v in _read_torch_bin(path / shard).items()}
    raise MissingFileError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def model_from_tensors(cfg: ModelConfig, ours: dict[str, torch.Tensor], file_name: Callable[[str], str],
                       where: Path, dtype, device) -> Transformer:
    """A Transformer holding exactly these tensors, built without a random init (meta device, then the
    tensors are assigned). file_name maps our tensor names to the file's, for the error messages."""
    with torch.device("meta"):
        model = Transformer(cfg)
    want = model.state_dict()
    missing = [file_name(k) for k in want if k not in ours]
    if missing:
        raise LoadError(f"{where}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for k, t in ours.items():
        if k not in want:
            raise LoadError(f"{where}: unexpected tensor {file_name(k)!r}")
        if tuple(t.shape) != tuple(want[k].shape):
            raise LoadError(f"{where}: tensor {file_name(k)!r} has shape {tuple(t.shape)}, but the config "
                            f"implies {tuple(want[k].shape)}")
    dtype = dtype or ours["tok_embeddings.weight"].dtype
    model.load_state_dict({k: t.to(dtype).contiguous() for k, t in ours.items()}, strict=True, assign=True)
    model.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)  # the meta one has no values
    return model.to(device) if device is not None else model


def load_hf_model(path: PathLike, dtype=None, device=None, allow_pickle: bool = False) -> Transformer:
    """An HF model dir -> Transformer (dtype None = the checkpoint's)."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"{path}: model directory not found")
    cfg = config_from_hf(read_json(path / "config.json"), path / "config.json")
    weights = read_hf_weights(path, allow_pickle)
    to_ours = {hf: ours for ours, hf in hf_key_map(cfg).items()}
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)  # some checkpoints store the tied copy as well
    ours = {}
    for k, t in weights.items():
        if HF_IGNORED.match(k):
            continue
        if k not in to_ours:
            raise LoadError(f"{path}: unexpected tensor {k!r} for a {cfg.arch} model with this config.json")
        ours[to_ours[k]] = t
    keys = hf_key_map(cfg)
    return model_from_tensors(cfg, ours, lambda k: keys.get(k, k), path, dtype, device)
