"""Model selection over explicit runs (quietstar/methods/explicit/select.py): the run with the best validation accuracy is
chosen, never by the held-out split; and the loop's iterate_from=best builds each round on the best validation
model so far."""

import json

import pytest

from quietstar.errors import UserError
from quietstar.methods.explicit import select


def _result(val_by_round, held_out_by_round, best_round, beta, lr, method="tpo", seed=0):
    rounds = [{"round": r, "eval": {"val": v, "cot": {"acc": h}}}
              for r, (v, h) in enumerate(zip(val_by_round, held_out_by_round))]
    return {"method": method, "eval_mode": "cot", "best_round": best_round, "rounds": rounds, "seed": seed,
            "settings": {"method": method, "beta": beta, "steps": 50}, "optim": {"lr": lr, "weight_decay": 0.0}}


def test_the_run_with_the_best_validation_score_is_chosen_never_by_held_out(tmp_path):
    runs = [_result([0.5, 0.6], [0.5, 0.9], 1, beta=0.1, lr=1e-3),  # the best held-out, not the best validation
            _result([0.5, 0.7, 0.65], [0.5, 0.6, 0.95], 1, beta=0.3, lr=1e-3),  # best validation at its round 1
            _result([0.5, 0.7], [0.5, 0.4], 1, beta=0.3, lr=1e-4)]  # ties with run 1: the earlier run wins
    assert [select.validation_score(r) for r in runs] == [0.6, 0.7, 0.7]
    assert select.choose(runs) == 1
    dirs = []
    for i, r in enumerate(runs):
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(r))
        dirs.append(str(d))
    out = tmp_path / "selection.json"
    summary = select.main([*dirs, "--out", str(out)])
    assert summary["chosen"] == dirs[1] and summary["chosen_settings"] == {"explicit.beta": 0.3, "optim.lr": 1e-3}
    row = summary["runs"][1]
    assert row["val"] == 0.7 and row["held_out_acc"] == 0.6 and row["base_held_out_acc"] == 0.5  # of its round 1
    written = json.loads(out.read_text())
    assert written["chosen"] == dirs[1] and written["provenance"]["seeds"] == [0]
    with pytest.raises(UserError, match="different methods"):
        select.summarise([runs[0], _result([0.5], [0.5], 0, 0.1, 1e-3, method="cpo")], ["a", "b"])
    with pytest.raises(UserError, match="results.json not found"):
        select.load([str(tmp_path / "missing")])


@pytest.mark.parametrize("iterate_from", ["latest", "best"])
def test_each_round_builds_on_the_latest_or_the_best_validation_model(iterate_from):
    from quietstar.methods.explicit.loop import Rounds

    track = Rounds("base", 0.5, iterate_from)
    built_on = []
    for r, val in enumerate([0.6, 0.4, 0.7, 0.65, 0.65], 1):  # round 2 and rounds 4, 5 are worse on validation
        built_on.append(track.latest_round)
        assert track.latest == ("base" if track.latest_round == 0 else f"m{track.latest_round}")
        track.update(r, f"m{r}", val)
    assert (track.best_round, track.best_model, track.best_val, track.since_best) == (3, "m3", 0.7, 2)
    if iterate_from == "latest":
        assert built_on == [0, 1, 2, 3, 4]
    else:  # never on a round that did not beat the best so far
        assert built_on == [0, 1, 1, 3, 3]
