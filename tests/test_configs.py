"""Every YAML under configs/ composes with Hydra and converts to the typed TrainConfig; bad values name
their field; the YAML presets mirror the dataclasses they stand for."""

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError, ValidationError

from quietstar.config import ModelSpec, OptimConfig, config_to_dict
from quietstar.methods.registry import TrainConfig, load_config, register_configs
from quietstar.model import ModelConfig
from quietstar.methods.quietstar.config import ThoughtConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# what a group option leaves mandatory (???), filled in so that it can be converted
REQUIRED = {("data", "jsonl"): ["data.path=x.jsonl"], ("data", "parquet"): ["data.path=x.parquet"],
            ("data", "text"): ["data.path=docs/"], ("experiment", "paper_mistral7b"): ["model.name=/models/mistral"]}


@pytest.fixture(scope="module")
def hydra_ctx():
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def typed(overrides=()):
    return OmegaConf.to_object(compose(config_name="train", overrides=list(overrides)))


def group_options():
    return sorted((p.parent.name, p.stem) for p in CONFIGS.glob("*/*.yaml"))


def test_there_are_the_expected_groups():
    opts = set(group_options())
    for want in [("model", "tiny"), ("model", "bench_small"), ("model", "smollm2_135m"), ("model", "mistral_7b"),
                 ("thought", "default"), ("thought", "reference"), ("data", "synthetic"), ("data", "jsonl"),
                 ("optim", "default"), ("logger", "none"), ("logger", "wandb"), ("dist", "none"), ("dist", "ddp"),
                 ("dist", "fsdp"), ("experiment", "paper_mistral7b"), ("experiment", "gpu")]:
        assert want in opts


@pytest.mark.parametrize("group,option", group_options())
def test_every_yaml_composes_into_the_typed_config(hydra_ctx, group, option):
    cfg = typed([f"{group}={option}", *REQUIRED.get((group, option), [])])
    assert isinstance(cfg, TrainConfig)
    assert isinstance(cfg.thought, ThoughtConfig) and isinstance(cfg.model, ModelSpec)


def test_the_default_is_smollm2_on_the_synthetic_corpus(hydra_ctx):
    cfg = typed()
    assert cfg.model.name == "smollm2-135m" and cfg.data.source == "synthetic"
    assert cfg.logger.backend == "wandb" and cfg.logger.mode == "offline"
    assert cfg.dist.kind == "none" and cfg.resume is None


def test_group_yaml_values_mirror_the_dataclasses(hydra_ctx):
    assert typed(["thought=reference"]).thought == ThoughtConfig.reference()
    assert typed(["thought=default"]).thought == ThoughtConfig()
    assert typed(["optim=default"]).optim == OptimConfig()
    for preset in ["tiny", "bench_small", "mistral_7b"]:
        spec = typed([f"model={preset}"]).model
        assert spec.name is None and spec.architecture() == ModelConfig.from_preset(preset)


def test_model_spec_mirrors_every_model_config_field():
    spec_fields = {f.name for f in dataclasses.fields(ModelSpec)}
    assert {f.name for f in dataclasses.fields(ModelConfig)} <= spec_fields


def test_overrides_and_experiments(hydra_ctx):
    cfg = typed(["model=tiny", "model.n_layers=3", "thought.n_ahead=6", "data=jsonl", "data.path=a.jsonl",
                 "train.max_steps=7", "train.seed=3", "train.device=cpu", "checkpoint.every=2", "logger=none",
                 "resume=/tmp/x"])
    assert cfg.model.architecture().n_layers == 3 and cfg.thought.n_ahead == 6
    assert (cfg.data.source, cfg.data.path, cfg.train.max_steps, cfg.train.seed) == ("jsonl", "a.jsonl", 7, 3)
    assert cfg.checkpoint.every == 2 and cfg.logger.backend == "none" and cfg.resume == "/tmp/x"
    paper = typed(["experiment=paper_mistral7b", "model.name=/m"])
    assert paper.thought == ThoughtConfig.reference() and paper.optim.lr == 1e-6
    assert (paper.data.seq_len, paper.data.batch_size * paper.optim.grad_accum, paper.train.max_steps) == (256, 8, 100)
    gpu = typed(["experiment=gpu"])
    assert gpu.train.device == "cuda" and gpu.thought.n_ahead == 12
    # a group choice overrides train.yaml's own values; an explicit key overrides the group
    assert typed(["thought=reference", "thought.n_thoughts=4"]).thought.n_thoughts == 4


@pytest.mark.parametrize("override,field", [
    ("optim.lr=-1", "optim.lr"), ("optim.schedule=step", "optim.schedule"), ("optim.grad_accum=0", "optim.grad_accum"),
    ("optim.beta2=1.5", "optim.beta2"), ("thought.n_ahead=2", "n_ahead"), ("thought.impl=loop", "impl"),
    ("data.mode=slice", "data.mode"), ("data.seq_len=2", "data.seq_len"), ("data.batch_size=0", "data.batch_size"),
    ("data.source=csv", "data.source"), ("model.preset=gpt9", "model.preset"), ("model.dtype=int8", "model.dtype"),
    ("train.device=tpu", "train.device"), ("train.max_steps=0", "train.max_steps"), ("dist.kind=zero", "dist.kind"),
    ("logger.backend=mlflow", "logger.backend"), ("logger.mode=sync", "logger.mode"),
    ("checkpoint.every=-1", "checkpoint.every"), ("attention.backend=fast", "attention.backend"),
])
def test_bad_values_name_the_field(hydra_ctx, override, field):
    base = ["model=tiny"]
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        typed([*base, override])


def test_cross_field_and_type_errors_name_fields(hydra_ctx):
    with pytest.raises(ValueError, match=r"model: ModelConfig: dim=60 is not divisible by n_heads=7"):
        typed(["model=tiny", "model.dim=60", "model.n_heads=7"])
    with pytest.raises(ValueError, match=r"data\.seq_len.*n_ahead_talk"):
        typed(["model=tiny", "data.seq_len=4", "thought.n_ahead_talk=4"])
    with pytest.raises(ConfigCompositionException, match=r"train\.max_steps") as err:
        typed(["train.max_steps=many"])
    assert isinstance(err.value.__cause__, ValidationError)
    with pytest.raises(ValueError, match=r"data\.path is required"):
        typed(["data=jsonl"])


def test_the_paper_experiment_needs_the_model_path(hydra_ctx, monkeypatch):
    monkeypatch.delenv("MISTRAL_7B_DIR", raising=False)
    with pytest.raises(InterpolationResolutionError, match=r"MISTRAL_7B_DIR[\s\S]*full_key: model\.name"):
        typed(["experiment=paper_mistral7b"])
    monkeypatch.setenv("MISTRAL_7B_DIR", "/models/mistral-7b")
    assert typed(["experiment=paper_mistral7b"]).model.name == "/models/mistral-7b"


def test_resolved_config_round_trips(hydra_ctx, tmp_path):
    cfg = typed(["model=tiny", "thought=reference", "data=jsonl", "data.path=a.jsonl", "logger.tags=[a,b]"])
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    back = load_config(str(path))
    assert back == cfg and config_to_dict(back) == config_to_dict(cfg)
