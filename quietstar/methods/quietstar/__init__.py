"""Quiet-STaR (Zelikman et al. 2024): the model writes a thought after every token and learns from the thoughts
that help it predict the text that follows.

  config.py          ThoughtConfig (the `thought` section), its curriculum, the learning passes' names
  thinker.py         QuietStar: its parameters, the talk head's mix, forward (the step), the grid learning pass
  rollout.py         phase 1: the text row, the thinking positions, sampled thoughts; the attention adapters
  scoring.py         the step's loss: score -> objective -> metrics (ThoughtOutput)
  inference.py       the prediction after a thought, one thought on a KV cache (`think`), thoughts as text
  objective.py       the loss from the scored log-probabilities: official (NLL + REINFORCE), rlp, ... (a registry)
  where.py           selective thinking: which positions think (thought.where)
  sequential.py      thought.impl=sequential_dense, the official code's one-step-at-a-time pass (a reference)
  method.py          the method's registry entry: its model built for a run, its config checks
  load.py            a trained QuietStar back from a checkpoint or a state dict
  learn_to_think.py  experiment=learn_to_think: pretrain, Quiet-STaR, a FLOPs-matched baseline, scored
  math_web.py        experiment=policy_math_web: the objectives on math web text against continued pretraining
  report.py          the reasoning-corpus scores and plots the experiments share
"""
