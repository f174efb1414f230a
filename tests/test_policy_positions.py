"""bench/policy_positions.py: the diagnosis that keeps RLP's policy term at some positions only. The direct
answers it finds in the text, and the advantages it keeps there (or everywhere else)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import policy_positions  # noqa: E402

from quietstar.methods.quietstar.objective import OBJECTIVES, RLP  # noqa: E402
from quietstar.tokenizer import ByteTokenizer  # noqa: E402


def test_direct_answers_are_the_positions_after_an_equals_sign_with_no_chain_opening():
    tok = ByteTokenizer()
    text = "a3=j h1=-hd.d f2=b"
    ids = torch.tensor([tok.encode(text) + [0, 0]])
    at = policy_positions.direct_answer_positions(ids)[0].tolist()
    assert [i for i, x in enumerate(at) if x] == [2, 16]  # `a3=` -> j and `f2=` -> b; `h1=` opens a chain
    ids = torch.tensor([tok.encode("c2=") + [0]])  # an `=` followed by padding is no answer
    assert not policy_positions.direct_answer_positions(ids).any()


@pytest.mark.parametrize("keep_answers", [True, False])
def test_the_advantages_are_kept_at_the_answers_or_everywhere_else(keep_answers):
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode("a3=j h1=-hd.d f2=b")])
    B, G, L = 1, 4, ids.shape[1]
    reward = torch.randn(B, G, L, generator=torch.Generator().manual_seed(0))
    cfg = SimpleNamespace(clamp_negative_advantage=False)
    scope = SimpleNamespace(scorable=torch.ones(B, L), positions=None)
    full = RLP.advantages(reward, scope, cfg)
    token = policy_positions._IDS.set(ids)
    try:
        adv = policy_positions.masked(keep_answers)(reward, scope, cfg)
    finally:
        policy_positions._IDS.reset(token)
    at = policy_positions.direct_answer_positions(ids)[:, None].expand(B, G, L)
    kept = at if keep_answers else ~at
    assert torch.equal(adv[kept], full[kept]) and not adv[~kept].any()


def test_the_objectives_register_under_their_names():
    policy_positions.register()
    try:
        assert {"rlp_answers", "rlp_no_answers"} <= set(OBJECTIVES)
        assert OBJECTIVES["rlp_answers"].reward_from == "unmixed"  # RLP's reward, only the advantages masked
    finally:
        OBJECTIVES.pop("rlp_answers", None)
        OBJECTIVES.pop("rlp_no_answers", None)
