"""Loading: SmolLM2-135M from its GGUF against transformers' own GGUF loading, the tokenizer against
transformers', the thought tokens, tiny GGUF files written here (every supported tensor type, the
llama.cpp q/k permutation), and a clear error for every kind of bad input."""

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from quietstar.errors import LoadError, MissingFileError
from quietstar.gguf_file import unpermute_qk
from quietstar.hf_dir import hf_config, hf_state_dict
from quietstar.loading import load_pretrained, load_tokenizer, resolve_gguf
from quietstar.model import KVCache, ModelConfig, Transformer
from quietstar.tokenizer import END_THOUGHT, START_THOUGHT, bytes_to_unicode


pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER_STRINGS = [
    "Hello world", "  leading spaces and   runs of    spaces  ", "tabs\tand\nnewlines\r\n\n\nend",
    "Numbers: 1234567890, 3.14159, -42, 1e-10, 12,345  12", "x  12  y   345",
    "Unicode: café naïve Zürich Ångström — “quotes” ‘single’ …", "中文字符测试，日本語のテキスト、한국어",
    "Emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷", r"Math: $\frac{a}{b} + \sqrt{x^2 + y^2} = \int_0^1 f(x)\,dx$",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\tpass", "<|im_start|>user\nHi<|im_end|>\n",
    f"literal {START_THOUGHT} thought {END_THOUGHT} text", "", " ", "\n\n", "I'm you're it's we'll they've he'd",
    "Ελληνικά кириллица עברית العربية", "a\u0301 e\u0300 combining", "\u200b zero width\u00a0nbsp",
    "<|endoftext|>The end.", "ALLCAPS and MiXeD", "http://example.com/a?b=c&d=e#f", "    indented code",
]
PARAGRAPH = (
    "The library opened early on Saturday morning, and a small crowd was already waiting at the door. "
    "Most of them were students who needed a quiet place to study for their exams, but there were also "
    "a few older readers who came every week to look through the newspapers. The librarian greeted "
    "everyone by name and reminded them that the reading room on the second floor would be closed for "
    "cleaning until noon. By the afternoon, almost every table was taken, and the only sound was the "
    "turning of pages."
)


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M (the real model, loaded once per session by the `smollm2` fixture)


def transformers_gguf_model(path: Path):
    """transformers' own loading of the GGUF. from_pretrained(gguf_file=...) needs accelerate; without it,
    the same transformers functions (config from GGUF metadata, dequantise + q/k un-permutation) are
    called directly."""
    transformers = pytest.importorskip("transformers")
    import importlib.util

    if importlib.util.find_spec("accelerate") is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                 dtype=torch.float32).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    return model.eval()


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf(smollm2):
    model, tok = smollm2
    hf = transformers_gguf_model(resolve_gguf("smollm2-135m"))
    assert model.cfg.tie_embeddings and model.cfg.n_kv_heads == 3 and model.cfg.vocab_size == 49152
    worst = 0.0
    for text in ["The quick brown fox jumps over the lazy dog.",
                 "In 1905, Einstein published four papers; $E = mc^2$ is one of the results.",
                 "def add(a, b):\n    return a + b\n"]:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            diff = (model(ids) - hf(ids).logits).abs().max().item()
        worst = max(worst, diff)
    print(f"\nSmolLM2-135M GGUF: max |ours - transformers| logits = {worst:.2e}")
    assert worst <= 1e-3


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    _, tok = smollm2
    path = resolve_gguf("smollm2-135m")
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TOKENIZER_STRINGS:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"] == hf.encode(text, add_special_tokens=False), repr(text)
        assert tok.decode(ids) == hf.decode(ids), repr(text)
    assert tok.encode_batch(TOKENIZER_STRINGS) == [tok.encode(t) for t in TOKENIZER_STRINGS]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)


@pytest.mark.slow
def test_smollm2_thought_tokens(smollm2):
    _, tok = smollm2
    V = tok.vocab_size
    assert V == 49152 and len(tok) == V + 2
    assert (tok.start_thought_id, tok.end_thought_id) == (V, V + 1)
    text = f"2 + 3 {START_THOUGHT}let me think{END_THOUGHT} = 5"
    ids = tok.encode(text)
    assert max(ids) < V  # the literal strings are ordinary text
    assert tok.decode(ids) == text
    a, b = tok.encode("2 + 3"), tok.encode(" = 5")
    mixed = a + [tok.start_thought_id] + tok.encode("hmm") + [tok.end_thought_id] + b
    assert tok.decode(mixed) == f"2 + 3{START_THOUGHT}hmm{END_THOUGHT} = 5"
    assert tok.decode(torch.tensor(mixed), skip_thought_tokens=True) == "2 + 3hmm = 5"
    assert tok.encode("Hi", add_bos=True) == [tok.bos_id] + tok.encode("Hi") and not tok.add_bos
    with pytest.raises(ValueError):
        tok.decode([V + 2])


@pytest.mark.slow
def test_smollm2_is_a_language_model(smollm2):
    model, tok = smollm2
    ids = torch.tensor([tok.encode(PARAGRAPH)])
    with torch.no_grad():
        logits = model(ids)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    ppl = math.exp(nll.item())
    print(f"\nSmolLM2-135M perplexity on a plain English paragraph ({ids.shape[1]} tokens): {ppl:.2f}")
    assert ppl < 50

    prompt = tok.encode("The capital of France is")
    cache = KVCache(model.cfg, 1, max_len=len(prompt) + 16)
    out = []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), attn=cache)
        for _ in range(16):
            out.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[out[-1]]]), attn=cache)
        full = model(torch.tensor([prompt + out]))  # the cached decode agrees with a full forward
    assert full[0, len(prompt) - 1:-1].argmax(-1).tolist() == out
    text = tok.decode(out)
    print(f"greedy: The capital of France is|{text}")
    assert "Paris" in text


# --------------------------------------------------------------------------------------------------
# Tiny GGUF files written with gguf.GGUFWriter


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF q/k rows -> llama.cpp's interleaved RoPE layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight", "attention_norm.weight": "attn_norm.weight",
              "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
              "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
              "ffn_norm.weight": "ffn_norm.weight", "feed_forward.w1.weight": "ffn_gate.weight",
              "feed_forward.w3.weight": "ffn_up.weight", "feed_forward.w2.weight": "ffn_down.weight"}


def write_gguf(path: Path, model: Transformer, qtype: str = "F32", arch: str = "llama", skip=()) -> Path:
    """Write `model` as llama.cpp would: permuted q/k, 2-D weights in `qtype`, a 256-byte BPE vocabulary."""
    cfg = model.cfg
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([bytes_to_unicode()[b] for b in range(cfg.vocab_size)])
    w.add_token_merges([])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_eos_token_id(0)
    for name, t in model.state_dict().items():
        layer, _, key = name.partition(".")[2].partition(".") if name.startswith("layers.") else ("", "", name)
        gname = f"blk.{layer}.{GGUF_NAMES[key]}" if layer else GGUF_NAMES[key]
        if gname in skip:
            continue
        arr = t.float().numpy()
        if key == "attention.wq.weight":
            arr = llama_cpp_permute(arr, cfg.n_heads)
        elif key == "attention.wk.weight":
            arr = llama_cpp_permute(arr, cfg.n_kv_heads)
        q = gguf.GGMLQuantizationType[qtype]
        if arr.ndim == 2 and qtype == "Q5_K":  # no quantiser in gguf-py: any bytes of the right size do
            nbytes = gguf.GGML_QUANT_SIZES[q][1] * arr.shape[1] // gguf.GGML_QUANT_SIZES[q][0]
            w.add_tensor(gname, np.zeros((arr.shape[0], nbytes), np.uint8), raw_dtype=q)
        elif arr.ndim == 2 and qtype != "F32":
            w.add_tensor(gname, gguf.quants.quantize(arr, q), raw_dtype=q)
        else:
            w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def ids_for(model, L=12):
    return torch.randint(0, model.cfg.vocab_size, (2, L), generator=torch.Generator().manual_seed(0))


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((3 * 16, 8)).astype(np.float32)
    assert torch.equal(unpermute_qk(torch.from_numpy(llama_cpp_permute(w, 3)), 3), torch.from_numpy(w))


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_round_trip_is_exact(tmp_path, tied):
    model = tiny_model(tie_embeddings=tied)  # GQA: 4 query heads, 2 kv heads
    got, tok = load_pretrained(write_gguf(tmp_path / "tiny.gguf", model))
    assert got.cfg.to_dict() == {**model.cfg.to_dict(), "norm_eps": got.cfg.norm_eps}  # GGUF stores eps in fp32
    assert got.cfg.norm_eps == pytest.approx(model.cfg.norm_eps)
    ids = ids_for(model)
    with torch.no_grad():
        assert (got(ids) - model(ids)).abs().max() <= 1e-5
    assert tok.vocab_size == 256 and tok.encode("hi") == [ord("h"), ord("i")] and tok.decode([104, 105]) == "hi"
    assert load_tokenizer(tmp_path / "tiny.gguf").encode("hi there") == tok.encode("hi there")


@pytest.mark.parametrize("qtype, tol", [("F16", 2e-3), ("BF16", 1e-2), ("Q8_0", 1e-2), ("Q5_0", 0.07),
                                        ("Q5_1", 0.07), ("Q4_0", 0.15), ("Q4_1", 0.15)])
def test_tiny_gguf_quantised_types(tmp_path, qtype, tol):
    model = tiny_model()
    got, _ = load_pretrained(write_gguf(tmp_path / f"tiny-{qtype}.gguf", model, qtype), dtype=torch.float32)
    want = model.state_dict()
    for k, t in got.state_dict().items():
        err = (t - want[k]).abs().max() / want[k].abs().max()
        assert err <= tol, f"{qtype} {k}: relative error {err:.3g}"


# --------------------------------------------------------------------------------------------------
# HF dirs: tokenizer.json, pickles


def write_hf_dir(path: Path, model: Transformer, config_changes: dict = None, drop=(), extra=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v for k, v in hf_state_dict(model).items() if k not in drop}
    save_file({**sd, **(extra or {})}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({**hf_config(model.cfg), **(config_changes or {})}))
    return path


def test_hf_dir_with_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    inner = HFTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.train_from_iterator([PARAGRAPH] * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = tiny_model(vocab_size=320)
    d = write_hf_dir(tmp_path / "m", model)
    inner.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "add_bos_token": True}))
    got, tok = load_pretrained(d)
    assert tok.vocab_size == 320 and (tok.start_thought_id, tok.end_thought_id) == (320, 321)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    text = f"The library {START_THOUGHT}opened</s>"
    assert tok.encode(text) == [0] + inner.encode(text).ids and max(tok.encode(text)) < 320
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert load_tokenizer(d).encode("library") == tok.encode("library")


def test_pickled_bin_refused_unless_allowed(tmp_path):
    model = tiny_model()
    d = tmp_path / "bin"
    d.mkdir()
    torch.save(hf_state_dict(model), d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps(hf_config(model.cfg)))
    with pytest.raises(LoadError, match=r"pytorch_model\.bin.*allow_pickle"):
        load_pretrained(d)
    got, _ = load_pretrained(d, allow_pickle=True)
    ids = ids_for(model)
    with torch.no_grad():
        assert torch.equal(got(ids), model(ids))


# --------------------------------------------------------------------------------------------------
# Bad input: each a LoadError (a ValueError; MissingFileError is also a FileNotFoundError) naming the file


def test_missing_paths(tmp_path):
    for p in (tmp_path / "nope", tmp_path / "nope.gguf"):
        with pytest.raises(FileNotFoundError, match="nope"):
            load_pretrained(p)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="config.json"):
        load_pretrained(tmp_path / "empty")
    d = write_hf_dir(tmp_path / "noweights", tiny_model())
    (d / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match="model.safetensors"):
        load_pretrained(d)
    with pytest.raises(MissingFileError, match="tokenizer.json"):
        load_tokenizer(d)


@pytest.mark.parametrize("changes, pattern", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "unsupported architecture.*GPT2LMHeadModel"),
    ({"num_attention_heads": 6, "head_dim": None}, "n_heads=6"),  # hidden_size 64 is not divisible by 6
    ({"num_key_value_heads": 3}, "n_kv_heads=3"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"hidden_size": None}, "hidden_size|dim"),
])
def test_bad_config_json(tmp_path, changes, pattern):
    d = write_hf_dir(tmp_path / "m", tiny_model(), changes)
    with pytest.raises(LoadError, match=pattern) as e:
        load_pretrained(d)
    assert "config.json" in str(e.value)


def test_missing_unexpected_and_misshapen_tensors(tmp_path):
    model = tiny_model()
    d = write_hf_dir(tmp_path / "a", model, drop={"model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(LoadError, match=r"missing tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(d)
    d = write_hf_dir(tmp_path / "b", model, extra={"model.layers.0.mystery.weight": torch.zeros(3)})
    with pytest.raises(LoadError, match="unexpected tensor.*mystery"):
        load_pretrained(d)
    d = write_hf_dir(tmp_path / "c", model, {"intermediate_size": 96})
    pattern = r"'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \((128, 64|64, 128)\).*implies \((96, 64|64, 96)\)"
    with pytest.raises(LoadError, match=pattern):
        load_pretrained(d)


def test_truncated_safetensors(tmp_path):
    d = write_hf_dir(tmp_path / "m", tiny_model())
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LoadError, match=r"model\.safetensors.*truncated or corrupt"):
        load_pretrained(d)
    f.write_bytes(b"\x01")
    with pytest.raises(LoadError, match=r"model\.safetensors"):
        load_pretrained(d)


def test_truncated_or_corrupt_gguf(tmp_path):
    f = write_gguf(tmp_path / "t.gguf", tiny_model())
    data = f.read_bytes()
    for name, blob in [("half.gguf", data[: len(data) // 2]), ("header.gguf", data[:20]),
                       ("magic.gguf", b"XXXX" + data[4:]), ("tail.gguf", data[:-7])]:
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(LoadError, match=name.replace(".", r"\.") + ".*(truncated|corrupt)"):
            load_pretrained(tmp_path / name)


def test_unsupported_gguf_quant_type(tmp_path):
    model = tiny_model(dim=256, n_heads=4, n_kv_heads=2, intermediate_size=256, vocab_size=256)
    f = write_gguf(tmp_path / "k.gguf", model, "Q5_K")
    with pytest.raises(LoadError, match=r"k\.gguf.*tensor 'token_embd\.weight'.*Q5_K.*not supported"):
        load_pretrained(f)


def test_unsupported_or_incomplete_gguf(tmp_path):
    f = write_gguf(tmp_path / "arch.gguf", tiny_model(), arch="gpt2")
    with pytest.raises(LoadError, match=r"arch\.gguf.*architecture 'gpt2'"):
        load_pretrained(f)
    f = write_gguf(tmp_path / "miss.gguf", tiny_model(), skip={"blk.1.ffn_up.weight"})
    with pytest.raises(LoadError, match=r"miss\.gguf.*missing tensors.*blk\.1\.ffn_up\.weight"):
        load_pretrained(f)
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(LoadError, match="not a GGUF file"):
        load_pretrained(tmp_path / "model.bin")
