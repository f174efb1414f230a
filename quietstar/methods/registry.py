"""The method registry: every thinking method (one folder each under quietstar/methods/) by name.

The core (the modules directly in quietstar/) knows no method: the decoder, the grid and its attention, data,
the checkpoint format, the optimiser, distribution, logging. A method is a folder here with its config
sections, its module, and its experiments, and one entry in METHODS below:

    Method(name, sections={"field": ConfigClass}, build=..., run=..., check=..., selects=...)

`sections` become fields of the root config `TrainConfig` (composed here from config.RunConfig's sections and
every method's) and config groups under configs/; `build(cfg, base, tok, device)` makes the module train.py
trains, for the first method whose `selects(cfg)` holds; `run(cfg, train_fn)` is a multi-stage experiment that
`recipe=<name>` runs in place of one training run. docs/architecture.md adds a toy method as a worked example.

    quietstar/  Quiet-STaR (thought.enabled=true, the default) and its experiments learn_to_think,
                policy_math_web
    plain/      the plain language model (thought.enabled=false)
    distill/    a thinking teacher distilled into a plain student (distill.teacher=<run>); distill_reasoning
    explicit/   rationales written out: STaR, RFT, V-STaR, TPO, CPO, Constitutional AI, System-2 distillation
"""

from __future__ import annotations

from quietstar import config
from quietstar.config import Method
from quietstar.methods.distill import distill, recipe as distill_recipe
from quietstar.methods.explicit import loop as explicit_loop
from quietstar.methods.explicit.config import ExplicitConfig
from quietstar.methods.plain import model as plain
from quietstar.methods.quietstar import learn_to_think, math_web, method as quiet_star
from quietstar.methods.quietstar.config import ThoughtConfig

METHODS = {m.name: m for m in (
    Method("distill", {"distill": distill.DistillConfig}, build=distill.build_student, check=distill.check,
           selects=lambda cfg: bool(cfg.distill.teacher)),
    Method("plain", build=plain.build, selects=lambda cfg: not cfg.thought.enabled),
    Method("quietstar", {"thought": ThoughtConfig}, build=quiet_star.build, check=quiet_star.check,
           selects=lambda cfg: cfg.thought.enabled),
    Method("learn_to_think", {"learn_to_think": learn_to_think.LearnToThinkConfig}, run=learn_to_think.run),
    Method("policy_math_web", {"policy_math_web": math_web.PolicyMathWebConfig}, run=math_web.run),
    Method("distill_reasoning", run=distill_recipe.run),
    Method("explicit", {"explicit": ExplicitConfig}, run=explicit_loop.run),
)}

TrainConfig = config.train_schema(METHODS.values())
RECIPES = TrainConfig.RECIPES


def method_for(cfg) -> Method:
    """The method whose `build` makes this run's model: the first in METHODS whose `selects(cfg)` holds."""
    return next(m for m in METHODS.values() if m.build is not None and m.selects(cfg))


def run_recipe(cfg, train_fn):
    """The experiment `cfg.recipe` names (a method's `run`), given the composed config and train()."""
    if cfg.recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {cfg.recipe!r}")
    return METHODS[cfg.recipe].run(cfg, train_fn)


def load_config(obj) -> TrainConfig:
    """A TrainConfig from a YAML file path, a dict or a DictConfig, checked against the schema."""
    return config.load_config(obj, TrainConfig)


def register_configs() -> None:
    """Register TrainConfig in Hydra's ConfigStore as `base_config` (configs/train.yaml's first default), and the
    resolvers configs/train.yaml's default output dirs use (imported lazily: only train.py needs Hydra)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from quietstar.elastic import launch_time, launcher_pid

    ConfigStore.instance().store(name="base_config", node=TrainConfig)
    # ${launched:} and ${pid:}: the launching process, torchrun's agent under torchrun, so that every rank and
    # every elastic restart name the same dir
    if not OmegaConf.has_resolver("pid"):
        OmegaConf.register_new_resolver("pid", launcher_pid)
    if not OmegaConf.has_resolver("launched"):
        OmegaConf.register_new_resolver("launched", launch_time)
