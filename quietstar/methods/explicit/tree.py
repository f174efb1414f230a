"""Tree-of-thought search and its per-step preference pairs (Chain of Preference Optimization).

CPO (Zhang et al. 2024, "Chain of Preference Optimization: Improving Chain-of-Thought Reasoning in LLMs")
builds its training data from a Tree-of-Thought breadth-first search: at each step the model proposes
several candidate next thoughts for every state it kept, rates them itself, and keeps the best few. When
the search ends, the chosen reasoning path gives one preference pair per step: the thought on the path is
preferred and each sibling thought that the search pruned is dispreferred. Training is DPO on those
pairs, so the model learns the search's choices step by step, not only its final chain.

This module is the search and the pair extraction, with the model behind three callables:

    propose(prefixes, n) -> candidates   one list of next steps per prefix (n asked for; any count is kept)
    evaluate(paths) -> scores            one score per path (prefix + candidate step); higher is better;
                                         None or a non-finite value means the judge output did not parse
    is_final(step) -> bool               the step ends the chain (for example, it states the answer)

A prefix is the tuple of steps from the root (the question itself is bound into the callables). A step
is a string or a sequence of token ids (stored as a tuple so that it can be compared and hashed).

What is chosen here:

- Beam: each round ranks all the newly scored candidates of that round together and keeps the best
  `beam`; the rest are pruned. A kept final step is a finished chain and is not expanded; a kept step at
  `max_depth` is not expanded either. The search stops when nothing is left to expand.
- Ties: candidates are ranked by score, then by node id, lower first. Ids are given breadth-first: depth
  by depth, parents in id order, each parent's candidates in the order `propose` returned them. So on a
  tie the candidate proposed earlier wins, and the search is deterministic given the callables' outputs.
- Unparseable scores: the node is recorded with score None and status "unscored"; it is never kept and
  never used as a rejected side. `Tree.n_unscored` counts them.
- Winning path: the kept final node with the highest score (the judge saw the whole chain when scoring
  its last step), ties to the lower id, i.e. the shallower and earlier chain. With `require_final=False`,
  a tree with no kept final node falls back to the best kept node at the greatest depth reached.
- Pairs: for each node on the winning path, (prefix before it, its step, a pruned sibling's step). Pairs
  whose two sides are the same text (strings compared after stripping whitespace) are skipped, and so is
  a second copy of the same rejected text at the same step; unscored siblings are skipped too; each skip
  is counted under its reason. Kept siblings that are not on the path are neither preferred nor
  dispreferred (the search still thought them good), and are counted as "kept_sibling"; with
  `kept_below=True`, a kept sibling scored strictly below the path's step is dispreferred too (with a beam
  above 1, most alternatives are kept, not pruned, and would give no pair).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

Step = Union[str, tuple[int, ...]]
Prefix = tuple[Step, ...]
Proposer = Callable[[list[Prefix], int], Sequence[Sequence[Union[str, Sequence[int]]]]]
Evaluator = Callable[[list[Prefix]], Sequence[Optional[float]]]

ROOT, KEPT, PRUNED, UNSCORED = "root", "kept", "pruned", "unscored"


@dataclass
class Node:
    id: int
    parent: Optional[int]  # None for the root
    step: Optional[Step]  # None for the root
    depth: int  # the root is 0; a node's step is step number `depth` of its chain
    score: Optional[float] = None  # the evaluator's score; None for the root and unparseable scores
    status: str = ROOT  # root | kept | pruned | unscored
    final: bool = False  # is_final(step): a finished chain, never expanded
    children: list[int] = field(default_factory=list)


@dataclass
class Tree:
    nodes: list[Node]  # nodes[i].id == i; nodes[0] is the root
    n_unscored: int = 0  # evaluations that returned None or a non-finite value

    def path(self, node_id: int) -> list[Node]:
        """The nodes from the root's first step down to `node_id` (the root excluded)."""
        out = []
        while node_id != 0:
            node = self.nodes[node_id]
            out.append(node)
            node_id = node.parent
        return out[::-1]

    def prefix(self, node_id: int) -> Prefix:
        """The steps from the root down to and including `node_id`."""
        return tuple(n.step for n in self.path(node_id))


@dataclass(frozen=True)
class Pair:
    prefix: Prefix  # the steps before the pair's step
    chosen: Step  # the step on the winning path
    rejected: Step  # a pruned sibling of it
    depth: int  # the step number of both sides
    chosen_score: float
    rejected_score: float


def _as_step(step: Union[str, Sequence[int]]) -> Step:
    return step if isinstance(step, str) else tuple(int(t) for t in step)


def _valid(score) -> bool:
    return score is not None and math.isfinite(score)


def _rank_key(node: Node) -> tuple[float, int]:
    return (-node.score, node.id)  # higher score first, then the lower id (proposed earlier)


def search(propose: Proposer, evaluate: Evaluator, is_final: Callable[[Step], bool], *,
           beam: int, n: int, max_depth: int) -> Tree:
    """Breadth-limited tree search: each round expands every kept unfinished node into `n` proposals,
    scores them all, keeps the best `beam` of the round and prunes the rest, up to `max_depth` steps."""
    if beam < 1 or n < 1 or max_depth < 1:
        raise ValueError(f"beam, n and max_depth must be >= 1, got {beam}, {n}, {max_depth}")
    tree = Tree(nodes=[Node(id=0, parent=None, step=None, depth=0)])
    frontier = [0]  # ids of the nodes to expand this round, ascending
    for depth in range(1, max_depth + 1):
        if not frontier:
            break
        prefixes = [tree.prefix(i) for i in frontier]
        proposals = propose(prefixes, n)
        if len(proposals) != len(frontier):
            raise ValueError(f"propose returned {len(proposals)} candidate lists for {len(frontier)} prefixes")
        new = []
        for parent, steps in zip(frontier, proposals):
            for step in steps:
                step = _as_step(step)
                node = Node(id=len(tree.nodes), parent=parent, step=step, depth=depth, final=bool(is_final(step)))
                tree.nodes.append(node)
                tree.nodes[parent].children.append(node.id)
                new.append(node)
        if not new:
            break
        scores = evaluate([tree.prefix(node.parent) + (node.step,) for node in new])
        if len(scores) != len(new):
            raise ValueError(f"evaluate returned {len(scores)} scores for {len(new)} paths")
        scored = []
        for node, score in zip(new, scores):
            if _valid(score):
                node.score = float(score)
                scored.append(node)
            else:
                node.status = UNSCORED
                tree.n_unscored += 1
        scored.sort(key=_rank_key)
        for rank, node in enumerate(scored):
            node.status = KEPT if rank < beam else PRUNED
        frontier = sorted(node.id for node in scored[:beam] if not node.final)
    return tree


def winning_path(tree: Tree, require_final: bool = True) -> Optional[list[Node]]:
    """The best-scored kept final chain (ties to the lower id), or None if the search finished none.
    With require_final=False and no finished chain, the best kept node at the greatest depth instead."""
    kept = [node for node in tree.nodes if node.status == KEPT]
    finals = [node for node in kept if node.final]
    if not finals and not require_final and kept:
        deepest = max(node.depth for node in kept)
        finals = [node for node in kept if node.depth == deepest]
    if not finals:
        return None
    return tree.path(min(finals, key=_rank_key).id)


def _same_text(a: Step, b: Step) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    return a == b


def preference_pairs(tree: Tree, path: Optional[list[Node]], kept_below: bool = False) -> tuple[list[Pair], Counter]:
    """Per-step pairs along `path`: (prefix, the path's step, each pruned sibling's step; with kept_below, each
    kept sibling's scored below it too), and a Counter of what was skipped: "identical", "duplicate",
    "unscored", "kept_sibling", "no_path"."""
    pairs, skipped = [], Counter()
    if path is None:
        skipped["no_path"] += 1
        return pairs, skipped
    for node in path:
        prefix = tree.prefix(node.parent)
        seen = []
        for sib_id in tree.nodes[node.parent].children:
            sib = tree.nodes[sib_id]
            if sib.id == node.id:
                continue
            if sib.status == UNSCORED:
                skipped["unscored"] += 1
            elif sib.status == KEPT and not (kept_below and sib.score < node.score):
                skipped["kept_sibling"] += 1
            elif _same_text(sib.step, node.step):
                skipped["identical"] += 1
            elif any(_same_text(sib.step, s) for s in seen):
                skipped["duplicate"] += 1
            else:
                seen.append(sib.step)
                pairs.append(Pair(prefix, node.step, sib.step, node.depth, node.score, sib.score))
    return pairs, skipped
