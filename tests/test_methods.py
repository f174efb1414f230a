"""The method registry: adding a method is a module and one registry line (docs/architecture.md's worked
example, a label-smoothed plain LM, trained here for two steps), the root config is composed from the methods'
sections, and each method builds the model a run selects."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from quietstar import config
from quietstar.methods import registry
from quietstar.config import ConfigError, Method, ModelSpec
from quietstar.methods.distill.distill import Distiller
from quietstar.methods.plain.model import PlainLM
from quietstar.methods.quietstar.thinker import QuietStar
from quietstar.methods.quietstar.scoring import ThoughtOutput
from quietstar.train import build_thinker, train


@dataclass
class SmoothConfig:
    enabled: bool = False
    epsilon: float = 0.1

    def __post_init__(self):
        if not 0 <= self.epsilon < 1:
            raise ConfigError(f"smooth.epsilon must be in [0, 1), got {self.epsilon!r}")


class SmoothLM(PlainLM):
    """The plain LM's parameters and checkpoints; next-token NLL with label smoothing."""

    def __init__(self, base, tok, thought, smooth: SmoothConfig):
        super().__init__(base, tok, thought)
        self.epsilon = smooth.epsilon

    def forward(self, input_ids, attention_mask=None, generator=None, doc_ids=None, thoughts=None) -> ThoughtOutput:
        logits = self.model(input_ids, attention_mask=attention_mask)[:, :-1].float()
        loss = F.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten(), label_smoothing=self.epsilon)
        zero = loss.new_zeros(())
        v = loss.detach()
        empty = torch.zeros(input_ids.shape[0], 1, input_ids.shape[1], 0, dtype=torch.long)
        return ThoughtOutput(loss=loss, nll=v, policy_loss=zero, reward=zero, mix_weight=zero, thoughts=empty,
                             metrics={"train/loss": v, "train/nll": v})


def build_smooth(cfg, base, tok, device):
    return SmoothLM(base, tok, cfg.thought, cfg.smooth).to(device)


SMOOTH = Method("smooth", {"smooth": SmoothConfig}, build=build_smooth, selects=lambda cfg: cfg.smooth.enabled)


@pytest.fixture
def with_smooth(monkeypatch):
    """The registry with the toy method added before `plain`, and the root config composed from it."""
    entries = list(registry.METHODS.values())
    entries.insert(1, SMOOTH)
    monkeypatch.setattr(registry, "METHODS", {m.name: m for m in entries})
    return config.train_schema(entries)


def tiny(schema, tmp_path, **sections):
    return schema(model=ModelSpec(preset="tiny"), output_dir=str(tmp_path),
                  data=config.DataConfig(seq_len=24, batch_size=2),
                  train=config.LoopConfig(max_steps=2, device="cpu", progress=False),
                  logger=config.LoggerConfig(backend="none"), **sections)


def test_a_new_method_is_a_module_and_one_registry_line(with_smooth, tmp_path):
    schema = with_smooth
    core = len(dataclasses.fields(config.RunConfig))
    assert [f.name for f in dataclasses.fields(schema)][core:] == ["distill", "smooth", "thought", "learn_to_think",
                                                                  "policy_math_web", "explicit"]
    cfg = tiny(schema, tmp_path, smooth=SmoothConfig(enabled=True, epsilon=0.2))
    assert registry.method_for(cfg).name == "smooth"
    model, _ = build_thinker(cfg, torch.device("cpu"))
    assert type(model) is SmoothLM and model.epsilon == 0.2
    result = train(cfg)
    assert result.status == "done" and result.step == 2
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.smooth.enabled is True and saved.smooth.epsilon == 0.2  # the run's config says which method ran
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in logged if "train/loss" in r] == [1, 2]
    # the smoothed loss: the loop trained the toy's objective, not the plain LM's NLL
    assert all(abs(r["train/loss"] - r["train/nll"]) < 1e-6 for r in logged if "train/loss" in r)


def test_the_new_sections_config_is_checked_by_its_class(with_smooth):
    with pytest.raises(ConfigError, match=r"smooth.epsilon must be in \[0, 1\)"):
        config.load_config({"smooth": {"epsilon": 1.5}}, with_smooth)
    with pytest.raises(ConfigError, match="smooth"):
        config.load_config({"smooth": {"no_such_field": 1}}, with_smooth)


def test_the_registry_composes_every_methods_sections_and_recipes():
    fields = [f.name for f in dataclasses.fields(registry.TrainConfig)]
    core = [f.name for f in dataclasses.fields(config.RunConfig)]
    assert fields[:len(core)] == core
    assert set(fields[len(core):]) == {s for m in registry.METHODS.values() for s in m.sections}
    assert registry.RECIPES == tuple(m.name for m in registry.METHODS.values() if m.run is not None)
    with pytest.raises(ConfigError, match="recipe must be one of"):
        registry.TrainConfig(recipe="no_such_experiment")


@pytest.mark.parametrize("overrides, kind", [({}, QuietStar), ({"thought": {"enabled": False}}, PlainLM)])
def test_each_run_builds_its_methods_model(tmp_path, overrides, kind):
    cfg = registry.load_config({"model": {"preset": "tiny"}, "data": {"seq_len": 24}, **overrides})
    model, _ = build_thinker(cfg, torch.device("cpu"))
    assert type(model) is kind
    assert registry.method_for(cfg).name == ("quietstar" if kind is QuietStar else "plain")


def test_a_distillation_run_selects_the_student_and_turns_thinking_off():
    cfg = registry.load_config({"model": {"preset": "tiny"}, "data": {"seq_len": 24}, "distill": {"teacher": "x"}})
    assert registry.method_for(cfg).name == "distill" and registry.METHODS["distill"].build.__name__ == "build_student"
    assert cfg.thought.enabled is False  # distill.check: the student never thinks
    assert issubclass(Distiller, PlainLM)
