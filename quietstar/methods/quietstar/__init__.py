"""Quiet-STaR (Zelikman et al. 2024): the model writes a thought after every token and learns from the thoughts
that help it predict the text that follows.

  thinker.py         ThoughtConfig and QuietStar: the rollout of a thought at every position, the learning pass
                     over the thought grid, the talk head's mix, inference (think, next_token_logits_at)
  objective.py       the loss from the scored log-probabilities: official (NLL + REINFORCE), rlp, ... (a registry)
  where.py           selective thinking: which positions think (thought.where)
  sequential.py      thought.impl=sequential_dense, the official code's one-step-at-a-time pass (a reference)
  method.py          the method's registry entry: its model built for a run, its config checks
  load.py            a trained QuietStar back from a checkpoint or a state dict
  learn_to_think.py  experiment=learn_to_think: pretrain, Quiet-STaR, a FLOPs-matched baseline, scored
  math_web.py        experiment=policy_math_web: the objectives on math web text against continued pretraining
  report.py          the reasoning-corpus scores and plots the experiments share
"""

from quietstar.methods.quietstar import sequential  # noqa: F401  (registers thought.impl=sequential_dense)
from quietstar.methods.quietstar.thinker import QuietStar, ThoughtConfig

__all__ = ["QuietStar", "ThoughtConfig"]
