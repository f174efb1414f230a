"""Export: an HF dir that transformers loads with logits identical to ours, a plain safetensors export, and
load_thinker restoring the full thinking model from either (and from a training checkpoint)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from quietstar.checkpoint import save_checkpoint
from quietstar.config import OptimConfig
from quietstar.export import export, load_thinker, main
from quietstar.model import ModelConfig, Transformer
from quietstar.optim import build_optimizer
from quietstar.tokenizer import ByteTokenizer
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.config import ThoughtConfig

transformers = pytest.importorskip("transformers")


def checkpoint_of(qs, root, tok):
    """Save qs as a training checkpoint (what export reads). -> the step dir."""
    opt, sched = build_optimizer(qs, OptimConfig(), max_steps=1)
    yaml = "thought:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in vars(qs.cfg).items())
    return save_checkpoint(root, 1, qs, opt, sched, data_state={}, generator=None, config_yaml=yaml,
                           tokenizer=tok, save_optimizer=False)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    tok = ByteTokenizer()
    qs = QuietStar(Transformer(ModelConfig.from_preset("tiny")), tok, ThoughtConfig(n_ahead=4, n_ahead_talk=2))
    with torch.no_grad():  # a trained-looking model: non-trivial talk head and thought embeddings
        qs.talk_head.net[4].weight.normal_(std=0.3)
        qs.start_embedding.add_(0.01)
    return qs, checkpoint_of(qs, tmp_path_factory.mktemp("run") / "checkpoints", tok)


def thinking_outputs(qs, seed=0):
    x = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(x)
    mask[1, 12:] = 0
    with torch.no_grad():
        return qs(x, attention_mask=mask, generator=torch.Generator().manual_seed(seed))


def test_hf_export_loads_in_transformers_with_identical_logits(tiny_ckpt, tmp_path):
    qs, ckpt = tiny_ckpt
    out = export(ckpt, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "quietstar.safetensors", "quietstar.json"} <= {
        p.name for p in out.iterdir()}
    assert not any(k.startswith(("start_", "end_", "talk_")) for k in load_file(out / "model.safetensors"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(3, 250, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, qs.model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["hf", "safetensors"])
def test_reloaded_thinker_gives_identical_outputs(tiny_ckpt, tmp_path, fmt):
    qs, ckpt = tiny_ckpt
    main([f"ckpt={ckpt.parent.parent}", f"out={tmp_path / fmt}", f"format={fmt}"])  # a run dir works too
    back = load_thinker(tmp_path / fmt)
    assert isinstance(back.tokenizer, ByteTokenizer) and back.cfg == qs.cfg
    a, b = thinking_outputs(qs), thinking_outputs(back)
    assert torch.equal(a.thoughts, b.thoughts) and torch.equal(a.loss, b.loss)
    for k, v in qs.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert torch.equal(thinking_outputs(load_thinker(ckpt)).loss, a.loss)  # straight from the checkpoint


def test_bad_arguments(tiny_ckpt, tmp_path):
    _, ckpt = tiny_ckpt
    with pytest.raises(SystemExit, match="usage"):
        main([f"ckpt={ckpt}"])
    with pytest.raises(ValueError, match="format"):
        export(ckpt, tmp_path / "x", fmt="onnx")


@pytest.mark.slow
def test_smollm2_hf_export_with_tokenizer(smollm2, tmp_path):
    base, tok = smollm2
    qs = QuietStar(base, tok, ThoughtConfig(n_ahead=4, n_ahead_talk=2))
    out = export(checkpoint_of(qs, tmp_path / "checkpoints", tok), tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Compute 12 + 7 = 19."
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text, add_bos=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.tensor([tok.encode(text, add_bos=False)])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, base(x), rtol=0, atol=1e-4)
    back = load_thinker(out)
    assert back.tokenizer.encode(text) == tok.encode(text) and back.tokenizer.eos_id == tok.eos_id
