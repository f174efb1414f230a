"""The CPO tree search and its preference pairs (scripted proposer and judge), and the exact best-of-k,
majority-vote and pass@k curves (against brute-force enumeration of every subset)."""

import itertools
import math
import random
from collections import Counter

import pytest

from quietstar.methods.explicit.bestofk import accuracy_vs_k, best_of_k, majority_vote, pass_at_k
from quietstar.methods.explicit.tree import KEPT, PRUNED, UNSCORED, preference_pairs, search, winning_path

# ---------------------------------------------------------------------------------------------------
# Tree search

# prefix -> [(candidate step, score)]; a score of None or NaN is a judge output that did not parse.
SCRIPT = {
    (): [("a", 0.9), ("b", 0.5), ("c", 0.5), ("d", 0.1), ("c ", 0.05)],  # b ties c: b was proposed first
    ("a",): [("a1", 0.8), ("a2 ANSWER", 0.7), ("a3", None)],
    ("b",): [("b1", 0.95), ("b2", 0.2), ("b3", float("nan"))],
    ("a", "a1"): [("a1x ANSWER", 0.6), ("a1y", 0.6)],
    ("b", "b1"): [("b1x ANSWER", 0.9), ("b1x ANSWER ", 0.3), ("b1z", 0.2)],
}
SCORES = {prefix + (step,): score for prefix, cands in SCRIPT.items() for step, score in cands}


def is_final(step):
    return "ANSWER" in step


def scripted(script=SCRIPT, scores=SCORES):
    calls = []

    def propose(prefixes, n):
        calls.append(list(prefixes))
        return [[step for step, _ in script.get(p, [])][:n] for p in prefixes]

    def evaluate(paths):
        return [scores[p] for p in paths]  # KeyError if a path is not prefix + its own step

    return propose, evaluate, calls


def run(beam=2, n=5, max_depth=5):
    propose, evaluate, calls = scripted()
    return search(propose, evaluate, is_final, beam=beam, n=n, max_depth=max_depth), calls


def test_pruning_keeps_the_top_beam_of_each_round_ties_to_the_earlier_proposal():
    tree, _ = run(beam=2)
    for depth in (1, 2, 3):
        new = [nd for nd in tree.nodes if nd.depth == depth]
        scored = [nd for nd in new if nd.score is not None]
        expect = sorted(scored, key=lambda nd: (-nd.score, nd.id))[:2]  # independent of search's order
        assert {nd.id for nd in new if nd.status == KEPT} == {nd.id for nd in expect}
        assert all(nd.status == PRUNED for nd in scored if nd not in expect)
    steps = lambda status: [nd.step for nd in tree.nodes if nd.status == status]
    assert steps(KEPT) == ["a", "b", "a1", "b1", "a1x ANSWER", "b1x ANSWER"]
    assert "c" in steps(PRUNED)  # the tie with b went to b, proposed first
    assert steps(UNSCORED) == ["a3", "b3"] and tree.n_unscored == 2
    # the tie a1x / a1y at 0.6: a1x was proposed first and takes the last slot of round 3
    assert [nd.step for nd in tree.nodes if nd.depth == 3 and nd.status == KEPT] == ["a1x ANSWER", "b1x ANSWER"]


def test_all_tied_keeps_the_first_proposed():
    script = {(): [(s, 1.0) for s in "pqrst"]}
    scores = {(s,): 1.0 for s in "pqrst"}
    propose, evaluate, _ = scripted(script, scores)
    tree = search(propose, evaluate, lambda s: True, beam=3, n=5, max_depth=1)
    assert [nd.step for nd in tree.nodes if nd.status == KEPT] == ["p", "q", "r"]


def test_tree_records_parent_depth_score_status():
    tree, _ = run()
    root = tree.nodes[0]
    assert root.parent is None and root.step is None and root.depth == 0
    for nd in tree.nodes[1:]:
        parent = tree.nodes[nd.parent]
        assert nd.depth == parent.depth + 1 and nd.id in parent.children and parent.status != PRUNED
        want = SCORES[tree.prefix(nd.id)]
        if nd.status == UNSCORED:
            assert nd.score is None and (want is None or math.isnan(want))
        else:
            assert nd.score == want
        assert nd.final == is_final(nd.step)
    assert [nd.id for nd in tree.nodes] == list(range(len(tree.nodes)))


def test_terminal_nodes_stop_expanding_and_search_ends_when_nothing_is_left():
    tree, calls = run(max_depth=10)
    for nd in tree.nodes[1:]:
        if nd.final or nd.status != KEPT:
            assert nd.children == []
    assert not any(is_final(p[-1]) for batch in calls for p in batch if p)
    assert len(calls) == 3 and max(nd.depth for nd in tree.nodes) == 3  # round 3 kept only final steps


def test_winning_path_is_the_best_kept_final_chain():
    tree, _ = run()
    path = winning_path(tree)
    assert [nd.step for nd in path] == ["b", "b1", "b1x ANSWER"]
    # "a2 ANSWER" (0.7) was final but pruned, so it cannot win; "a1x ANSWER" (0.6) lost to 0.9.


def test_preference_pairs_chosen_on_path_rejected_pruned_siblings_none_identical():
    tree, _ = run()
    path = winning_path(tree)
    pairs, skipped = preference_pairs(tree, path)
    assert [(p.prefix, p.chosen, p.rejected) for p in pairs] == [
        ((), "b", "c"), ((), "b", "d"),  # "c " is the same text as "c": one pair only
        (("b",), "b1", "b2"),  # b3 did not parse
        (("b", "b1"), "b1x ANSWER", "b1z"),  # "b1x ANSWER " is the chosen step again
    ]
    assert skipped == Counter(kept_sibling=1, duplicate=1, unscored=1, identical=1)
    on_path = {nd.id: nd for nd in path}
    by_step = {(tree.prefix(nd.parent), nd.step): nd for nd in tree.nodes[1:]}
    for p in pairs:
        chosen, rejected = by_step[(p.prefix, p.chosen)], by_step[(p.prefix, p.rejected)]
        assert chosen.id in on_path and rejected.status == PRUNED and rejected.parent == chosen.parent
        assert p.rejected.strip() != p.chosen.strip() and p.chosen_score >= p.rejected_score


def test_kept_siblings_scored_below_the_path_step_are_rejected_with_kept_below():
    script = {(): [("p", 0.9), ("q", 0.8), ("r", 0.1)], ("p",): [("p1 ANSWER", 0.95)], ("q",): [("q1 ANSWER", 0.3)]}
    scores = {prefix + (step,): score for prefix, cands in script.items() for step, score in cands}
    propose, evaluate, _ = scripted(script, scores)
    tree = search(propose, evaluate, is_final, beam=2, n=3, max_depth=3)
    path = winning_path(tree)
    assert [nd.step for nd in path] == ["p", "p1 ANSWER"]
    pairs, skipped = preference_pairs(tree, path)  # q was kept (beam 2): no pair from it
    assert [(p.chosen, p.rejected) for p in pairs] == [("p", "r")] and skipped == Counter(kept_sibling=1)
    pairs, skipped = preference_pairs(tree, path, kept_below=True)
    assert [(p.chosen, p.rejected, p.rejected_score) for p in pairs] == [("p", "q", 0.8), ("p", "r", 0.1)]
    assert skipped == Counter()
    # a kept sibling scored above the path's step is never rejected: "a" (0.9) against the path's "b" (0.5)
    tree, _ = run(beam=2)
    path = winning_path(tree)
    assert preference_pairs(tree, path, kept_below=True) == preference_pairs(tree, path)


def test_depth_limit_and_fallback_path():
    def propose(prefixes, n):  # an endless chain of non-final steps
        return [[f"{len(p)}.{i}" for i in range(n)] for p in prefixes]

    def evaluate(paths):
        return [float(p[-1].split(".")[1]) for p in paths]  # the last candidate is always best

    tree = search(propose, evaluate, lambda s: False, beam=2, n=3, max_depth=3)
    assert max(nd.depth for nd in tree.nodes) == 3
    assert all(nd.children == [] for nd in tree.nodes if nd.depth == 3)
    assert len(tree.nodes) == 1 + 3 + 2 * 3 + 2 * 3
    assert winning_path(tree) is None
    assert preference_pairs(tree, None) == ([], Counter(no_path=1))
    path = winning_path(tree, require_final=False)
    # both kept depth-3 nodes score 2: the lower id wins, the one under "0.1" (expanded first)
    assert [nd.step for nd in path] == ["0.1", "1.2", "2.2"]
    pairs, skipped = preference_pairs(tree, path)
    assert [p.rejected for p in pairs] == ["0.0", "1.0", "1.1", "2.0", "2.1"]
    assert skipped == Counter(kept_sibling=1)  # "0.2" was kept at depth 1


def test_token_id_steps_and_determinism():
    script = {(): [([1, 2], 0.5), ([3], 0.9), ([1, 2], 0.1)], ((3,),): [([7, 0], 0.4)]}
    scores = {tuple(tuple(s) for s in prefix) + (tuple(step),): sc for prefix, c in script.items() for step, sc in c}
    script = {tuple(tuple(s) for s in k): v for k, v in script.items()}
    runs = []
    for _ in range(2):
        propose, evaluate, _ = scripted(script, scores)
        runs.append(search(propose, evaluate, lambda s: 0 in s, beam=1, n=3, max_depth=4))
    assert runs[0] == runs[1]
    path = winning_path(runs[0])
    assert [nd.step for nd in path] == [(3,), (7, 0)]
    pairs, skipped = preference_pairs(runs[0], path)
    assert [(p.chosen, p.rejected) for p in pairs] == [((3,), (1, 2))] and skipped == Counter(duplicate=1)


def test_callable_output_lengths_are_checked():
    with pytest.raises(ValueError, match="candidate lists"):
        search(lambda ps, n: [], lambda ps: [], is_final, beam=1, n=1, max_depth=1)
    with pytest.raises(ValueError, match="scores"):
        search(lambda ps, n: [["x"]], lambda ps: [], is_final, beam=1, n=1, max_depth=1)


# ---------------------------------------------------------------------------------------------------
# Best-of-k, majority vote, pass@k: brute force over every k-subset

def brute(values):
    """Mean of values(subset) over every k-subset of range(N), k = 1..N."""
    def curve(n):
        return [sum(values(s) for s in itertools.combinations(range(n), k)) / math.comb(n, k)
                for k in range(1, n + 1)]
    return curve


def brute_best(correct, scores):
    def top_correct(sub):
        top = max(scores[i] for i in sub)
        tied = [correct[i] for i in sub if scores[i] == top]
        return sum(tied) / len(tied)
    return brute(top_correct)(len(correct))


def brute_majority(answers, correct):
    right = {a: c for a, c in zip(answers, correct)}

    def vote(sub):
        votes = Counter(answers[i] for i in sub if answers[i] is not None)
        if not votes:
            return 0.0
        most = max(votes.values())
        tied = [a for a, v in votes.items() if v == most]
        return sum(right[a] for a in tied) / len(tied)
    return brute(vote)(len(answers))


def brute_pass(correct):
    return brute(lambda sub: float(any(correct[i] for i in sub)))(len(correct))


def random_case(rng):
    n = rng.randint(1, 8)
    answers = [rng.choice([None, "x", "y", "z", "w"]) for _ in range(n)]
    right = {a: rng.random() < 0.4 for a in answers}
    correct = [a is not None and right[a] for a in answers]
    scores = [rng.choice([0.1, 0.5, 0.5, 0.9, rng.random()]) for _ in range(n)]  # many ties
    return answers, correct, scores


def test_exact_curves_match_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        answers, correct, scores = random_case(rng)
        for got, want in [(best_of_k(correct, scores), brute_best(correct, scores)),
                          (majority_vote(answers, correct), brute_majority(answers, correct)),
                          (pass_at_k(correct), brute_pass(correct))]:
            assert len(got) == len(want) == len(correct)
            assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-12, (answers, correct, scores)


def test_best_of_k_without_ties_is_the_ranked_sum():
    rng = random.Random(1)
    n = 9
    scores = rng.sample(range(100), n)
    correct = [rng.random() < 0.5 for _ in range(n)]
    alpha = [c for _, c in sorted(zip(scores, correct), reverse=True)]  # best first
    want = [sum(math.comb(n - i - 1, k - 1) * alpha[i] for i in range(n - k + 1)) / math.comb(n, k)
            for k in range(1, n + 1)]
    assert max(abs(g - w) for g, w in zip(best_of_k(correct, scores), want)) <= 1e-12


def test_edge_cases():
    n = 6
    answers = ["x", "x", "y", None, "x", "y"]
    assert best_of_k([True] * n, [0.3] * n) == [1.0] * n
    assert best_of_k([False] * n, list(range(n))) == [0.0] * n
    assert pass_at_k([True] * n) == [1.0] * n and pass_at_k([False] * n) == [0.0] * n
    assert majority_vote([None] * n, [False] * n) == [0.0] * n
    # k = N: the whole pool, no randomness left
    correct = [True, False, False, False, True, False]
    assert best_of_k(correct, [0.1, 0.9, 0.2, 0.3, 0.9, 0.0])[-1] == 0.5  # the two tied at 0.9, one right
    assert best_of_k(correct, [0.1, 0.2, 0.3, 0.4, 0.9, 0.5])[-1] == 1.0
    assert majority_vote(answers, [a == "x" for a in answers])[-1] == 1.0  # x has 3 votes
    assert majority_vote(answers, [a == "y" for a in answers])[-1] == 0.0
    assert pass_at_k(correct)[-1] == 1.0
    # k = 1 is plain accuracy (majority vote: among the solutions that gave an answer, counting None wrong)
    assert best_of_k(correct, [0.0] * n)[0] == pytest.approx(2 / 6)
    assert majority_vote(answers, [a == "x" for a in answers])[0] == pytest.approx(3 / 6)


def test_input_checks():
    with pytest.raises(ValueError, match="NaN"):
        best_of_k([True, False], [0.1, float("nan")])
    with pytest.raises(ValueError, match="both correct and wrong"):
        majority_vote(["x", "x"], [True, False])


def test_accuracy_vs_k_averages_questions_up_to_the_smallest_n():
    correct = [[True, False, False], [False, True]]
    scores = [[0.9, 0.1, 0.2], [0.3, 0.4]]
    answers = [["a", "b", "b"], ["c", "d"]]
    curves = accuracy_vs_k(correct, scores, answers)
    assert set(curves) == {"best_of_k", "pass_at_k", "majority_vote"}
    assert all(len(c) == 2 for c in curves.values())
    per_q = {"best_of_k": [best_of_k(c, s) for c, s in zip(correct, scores)],
             "pass_at_k": [pass_at_k(c) for c in correct],
             "majority_vote": [majority_vote(a, c) for a, c in zip(answers, correct)]}
    for name, (q0, q1) in per_q.items():
        assert curves[name] == pytest.approx([(q0[k] + q1[k]) / 2 for k in range(2)], abs=1e-15)
