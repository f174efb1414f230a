"""Which positions move the thoughts? The RLP objective with its policy term kept at some positions only.

    python bench/policy_positions.py answers [train.py overrides ...]      # policy term before direct answers only
    python bench/policy_positions.py no_answers [train.py overrides ...]   # everywhere but there

A diagnosis for the reasoning corpus, not a method: it reads the text to find the direct answers (the token after
`=` when no chain opens there), which no objective may do. It registers the objective `rlp_<which>` (RLP with
the advantages zeroed at the other positions; the NLL and talk-head terms unchanged), selects it with
`thought.objective=rlp_<which>` and runs train.py with the other overrides, e.g.

    python bench/policy_positions.py answers experiment=policy_decoy recipe=null \\
        init_from=RUN/pretrain/checkpoints/step_0002000 train.seed=1 checkpoint.every=100 hydra.run.dir=OUT

then the same scoring as policy_diagnosis.py, with these objectives registered so their checkpoints load:

    python bench/policy_positions.py score --checkpoints OUT/checkpoints/step_... --out FILE
"""

from __future__ import annotations

import contextvars
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quietstar.methods.quietstar import scoring  # noqa: E402
from quietstar.methods.quietstar.objective import RLP, register_objective  # noqa: E402
from quietstar.tokenizer import ByteTokenizer  # noqa: E402

_IDS: contextvars.ContextVar = contextvars.ContextVar("input_ids")
EQ, OPEN = ByteTokenizer().encode("=-")  # the query's `=` and the chain's opening mark


def direct_answer_positions(ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: position i's next token is a direct answer (x_i is `=`, x_{i+1} is neither the chain's
    opening mark nor padding)."""
    nxt = torch.cat([ids[:, 1:], ids.new_full((ids.shape[0], 1), OPEN)], 1)
    return (ids == EQ) & (nxt != OPEN) & (nxt != 0)


def masked(keep_answers: bool):
    def advantages(reward, scope, cfg):
        adv = RLP.advantages(reward, scope, cfg)
        at = direct_answer_positions(_IDS.get())  # (B, L)
        if scope.positions is not None:
            at = at.gather(1, scope.positions)
        keep = at if keep_answers else ~at
        return adv * keep[:, None].to(adv.dtype)
    return advantages


def register() -> None:
    for which in ("answers", "no_answers"):
        register_objective(f"rlp_{which}", dataclasses.replace(RLP, advantages=masked(which == "answers")))


def main():
    which, overrides = sys.argv[1], sys.argv[2:]
    if which not in ("answers", "no_answers", "score"):
        raise SystemExit("policy_positions.py: the first argument is answers, no_answers or score")
    register()
    if which == "score":
        import runpy

        sys.argv = [str(Path(__file__).with_name("policy_diagnosis.py")), *overrides]
        runpy.run_path(sys.argv[0], run_name="__main__")
        return
    losses = scoring.Scoring.losses

    def losses_with_ids(self, hidden, input_ids, *args, **kwargs):
        token = _IDS.set(input_ids)
        try:
            return losses(self, hidden, input_ids, *args, **kwargs)
        finally:
            _IDS.reset(token)

    scoring.Scoring.losses = losses_with_ids
    from quietstar.train import main as train_main

    sys.argv = [sys.argv[0], *overrides, f"thought.objective=rlp_{which}"]
    train_main()


if __name__ == "__main__":
    main()
