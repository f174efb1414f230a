"""The base decoder against HF transformers (fp32, random weights, tiny configs of each family), the KV
cache against full forwards, and ModelConfig's checks."""

import json

import pytest
import torch
from safetensors.torch import save_file

from quietstar.hf_dir import hf_config, hf_state_dict
from quietstar.loading import load_pretrained
from quietstar.model import KVCache, ModelConfig, Transformer

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=80, max_position_embeddings=256, rms_norm_eps=1e-6)
FAMILIES = {  # name: (HF config class, overrides, sequence length, position offset)
    "llama_tied_gqa": ("LlamaConfig", dict(tie_word_embeddings=True), 11, 0),
    "llama_mha_head_dim": ("LlamaConfig", dict(num_key_value_heads=4, head_dim=24), 11, 0),
    "llama3_rope_scaling": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32)), 12, 90),
    "mistral_sliding_window": ("MistralConfig", dict(sliding_window=4), 13, 0),
    "qwen2_qkv_bias": ("Qwen2Config", dict(tie_word_embeddings=True), 11, 0),
    "qwen2_mha_sliding_window": ("Qwen2Config", dict(num_key_value_heads=4, use_sliding_window=True,
                                                     sliding_window=5, max_window_layers=0), 12, 0),
}


def randomize_(model: torch.nn.Module, seed: int = 0):
    """Weights large enough that a wrong key, bias or RoPE layout shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def hf_model(family: str, seed: int = 0):
    cls_name, overrides, _, _ = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**SMALL, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_(transformers.AutoModelForCausalLM.from_config(cfg), seed).eval()


def inputs(family: str, batch: int = 2, seed: int = 1):
    _, _, L, offset = FAMILIES[family]
    ids = torch.randint(0, SMALL["vocab_size"], (batch, L), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(offset, offset + L).expand(batch, L)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_hf(family, tmp_path):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path)  # safetensors
    ours, tok = load_pretrained(tmp_path)
    assert tok is None  # no tokenizer.json in the dir
    assert ours.cfg.arch == FAMILIES[family][0].removesuffix("Config").lower()
    ids, pos = inputs(family)
    with torch.no_grad():
        want = hf(ids, position_ids=pos).logits
        got = ours(ids, position_ids=pos)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, f"{family}: max |ours - hf| = {diff:.2e} (logits scale {want.abs().max():.1f})"


def test_sliding_window_really_limits_attention():
    # a check that the window tests above are not vacuous: without the window the logits differ
    cfg = ModelConfig.from_preset("tiny", sliding_window=3)
    model = randomize_(Transformer(cfg)).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        windowed = model(ids)
        model.cfg.sliding_window = None
        full = model(ids)
    assert torch.allclose(windowed[:, :3], full[:, :3], atol=1e-6)
    assert (windowed[:, 3:] - full[:, 3:]).abs().max() > 1e-3


def test_sharded_safetensors_dir(tmp_path):
    hf = hf_model("llama_tied_gqa")
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours, _ = load_pretrained(tmp_path)
    ids, pos = inputs("llama_tied_gqa")
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["llama_tied_gqa", "llama3_rope_scaling", "mistral_sliding_window",
                                    "qwen2_qkv_bias", "qwen2_mha_sliding_window"])
def test_hf_export_loads_in_transformers(family, tmp_path):
    ours, _ = load_pretrained(_saved(family, tmp_path / "src"))
    out = tmp_path / "export"
    out.mkdir()
    save_file(hf_state_dict(ours), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(ours.cfg, dtype=torch.float32)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ids, pos = inputs(family)
    with torch.no_grad():
        diff = (hf(ids, position_ids=pos).logits - ours(ids, position_ids=pos)).abs().max().item()
    assert diff <= 1e-4, f"{family}: {diff:.2e}"
    again, _ = load_pretrained(out)
    assert again.cfg == ours.cfg


def test_qwen2_export_without_bias_writes_zero_biases():
    cfg = ModelConfig.from_preset("tiny", arch="qwen2")
    sd = hf_state_dict(Transformer(cfg))
    assert sd["model.layers.0.self_attn.q_proj.bias"].abs().sum() == 0
    assert "lm_head.weight" not in sd  # tied
    with pytest.raises(ValueError, match="qkv_bias"):
        hf_config(ModelConfig.from_preset("tiny", qkv_bias=True))


def _saved(family, path):
    hf_model(family).save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------------
# KV cache


def _tiny(**overrides):
    cfg = ModelConfig.from_preset("tiny", **overrides)
    return randomize_(Transformer(cfg), seed=3).eval()


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 4, "arch": "mistral"}, {"qkv_bias": True}])
def test_kv_cache_decoding_equals_full_forward(overrides):
    model = _tiny(**overrides)
    B, L, P = 2, 14, 5
    ids = torch.randint(0, model.cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.cfg, B, max_len=L)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :P], attn=cache)] + [model(ids[:, t:t + 1], attn=cache) for t in range(P, L)]
    assert cache.seen == L
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


def test_kv_cache_left_padded_batch():
    model = _tiny()
    seqs = [[5, 17, 42, 8, 99, 3, 61, 7, 12], [33, 2, 71, 140, 9]]
    n_new = 4
    P = max(map(len, seqs))
    ids = torch.tensor([[0] * (P - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (P - len(s)) + [1] * len(s) for s in seqs])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cont = torch.randint(0, model.cfg.vocab_size, (2, n_new), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.cfg, 2, max_len=P + n_new)
    cache.key_valid[:, :P] = mask.bool()
    with torch.no_grad():
        got = [model(ids, attn=cache, position_ids=pos)[:, -1:]]
        for t in range(n_new):
            got.append(model(cont[:, t:t + 1], attn=cache, position_ids=pos[:, -1:] + 1 + t))
        got = torch.cat(got, 1)  # (B, 1 + n_new, V): predictions after the prompt and each new token
        padded_full = model(torch.cat([ids, cont], 1), attention_mask=torch.cat([mask, torch.ones_like(cont)], 1),
                            position_ids=torch.cat([pos, pos[:, -1:] + 1 + torch.arange(n_new)], 1))
        for b, s in enumerate(seqs):
            ref = model(torch.tensor([s + cont[b].tolist()]))[0, len(s) - 1:]  # unpadded, alone
            assert (got[b] - ref).abs().max() <= 1e-5
            real = P - len(s)
            assert (padded_full[b, real:] - model(torch.tensor([s + cont[b].tolist()]))[0]).abs().max() <= 1e-5


# --------------------------------------------------------------------------------------------------
# ModelConfig checks


@pytest.mark.parametrize("kwargs, field", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(dim=0), "dim"),
    (dict(n_layers=0), "n_layers"),
    (dict(dim=66, n_heads=4), "n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
])
def test_model_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_preset("tiny", **kwargs)
