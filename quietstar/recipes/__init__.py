"""Multi-stage experiments, each a short function over `train()` runs (TrainConfig.recipe, set by an
experiment preset): `python train.py experiment=learn_to_think`, `experiment=policy_math_web`,
`experiment=distill_reasoning`; and the explicit-thinking methods (quietstar/explicit/loop.py):
`python train.py explicit=star` (rft, system2).

A recipe gets the composed TrainConfig and the training function, and writes its stages into
subfolders of the run dir, so every stage has its own config.yaml, metrics.jsonl, checkpoints and plot.
"""

from __future__ import annotations

RECIPES = ("learn_to_think", "policy_math_web", "distill_reasoning", "explicit")


def run_recipe(cfg, train_fn):
    if cfg.recipe == "learn_to_think":
        from quietstar.recipes.learn_to_think import run

        return run(cfg, train_fn)
    if cfg.recipe == "policy_math_web":
        from quietstar.recipes.math_web import run

        return run(cfg, train_fn)
    if cfg.recipe == "distill_reasoning":
        from quietstar.recipes.distill import run

        return run(cfg, train_fn)
    if cfg.recipe == "explicit":
        from quietstar.explicit.loop import run

        return run(cfg, train_fn)
    raise ValueError(f"recipe must be one of {RECIPES}, got {cfg.recipe!r}")
