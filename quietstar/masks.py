"""The thought-grid attention predicate, and the dense boolean mask built from it (the test oracle).

Text x_0..x_{L-1}. Every position i grows a private branch, one token per grid step s (docs/thought-grid.md):
step 0 is the text itself, steps 1..S-1 are <start>, the thought, <end> and the teacher-forced
continuation. A query at (step s, position i) may attend the key at (step r, position j) iff

    (r == 0 and j <= i)  or  (1 <= r <= s and j == i)

and, in a batch, the key is not padding (j < length) and, for packed sequences, j and i lie in the
same document. Example, L = 3, steps 0..2 (rows = queries, columns = keys, 1 = allowed):

             step 0    step 1    step 2
             x0 x1 x2  b0 b1 b2  b0 b1 b2
    s0 i0    1  0  0   0  0  0   0  0  0
    s0 i1    1  1  0   0  0  0   0  0  0
    s0 i2    1  1  1   0  0  0   0  0  0
    s1 i0    1  0  0   1  0  0   0  0  0
    s1 i1    1  1  0   0  1  0   0  0  0
    s1 i2    1  1  1   0  0  1   0  0  0
    s2 i0    1  0  0   1  0  0   1  0  0
    s2 i1    1  1  0   0  1  0   0  1  0
    s2 i2    1  1  1   0  0  1   0  0  1

The grid layout. With n thoughts per position, the text row is shared by the n copies, so one
unique sequence lays out R = 1 + n (S - 1) rows of L tokens: row 0 is the text, and row
1 + p (S - 1) + (s - 1) is step s of copy p. A branch key is visible only to queries of its own copy.
All backends in attention.py take q, k, v in this layout, as (B, heads, R, L, D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from einops import rearrange


def grid_rows(n: int, S: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, copy) of each of the R = 1 + n (S - 1) grid rows; row 0 has step 0 and copy -1."""
    if n < 1 or S < 1:
        raise ValueError(f"grid needs n >= 1 and S >= 1, got n={n}, S={S}")
    row = torch.arange(n_grid_rows(n, S))
    step, copy = decode_rows(row, S)
    return step.to(device), copy.to(device)


def decode_rows(row: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, copy) of grid row indices (any integer tensor); the inverse of `ThoughtGrid.row`."""
    Sm1 = max(S - 1, 1)
    step = torch.where(row == 0, 0, (row - 1) % Sm1 + 1)
    copy = torch.where(row == 0, -1, (row - 1) // Sm1)
    return step, copy


def n_grid_rows(n: int, S: int) -> int:
    return 1 + n * (S - 1)


def grid_steps(R: int, n: int) -> int:
    """S from the number of grid rows R and copies n (inverse of n_grid_rows)."""
    if R < 1 or (R - 1) % n:
        raise ValueError(f"{R} grid rows do not form 1 + n (S - 1) rows for n={n}")
    return 1 + (R - 1) // n


@dataclass(frozen=True)
class ThoughtGrid:
    """The layout of the thought grid for T = n_ahead, K = n_ahead_talk and n copies: which token sits at
    grid step s of position i, its position id, which step predicts what, and how targets line up.

        step s:   0        1        2 .. T-2          T-1       T .. T+K-2
        input:    x_i      <start>  t_1 .. t_{T-3}    <end>     x_{i+1} .. x_{i+K-1}
        predicts: x_{i+1}  t_1      t_2 .. (unused)   x_{i+1}   x_{i+2} .. x_{i+K}       position id i + s

    Every consumer (the rollout, the learning pass, the losses, the official-way pass, generation and
    evaluation) takes its indices from here; `thought_predicate` above says who sees whom.
    """

    T: int
    K: int
    n: int = 1

    START_STEP = 1  # the step whose input is <start>

    @property
    def S(self) -> int:
        """Grid steps per copy, counting the text step 0."""
        return self.T + self.K - 1

    @property
    def R(self) -> int:
        """Rows of the grid layout: the shared text row and S - 1 rows per copy."""
        return n_grid_rows(self.n, self.S)

    @property
    def n_sampled(self) -> int:
        """Sampled thought tokens t_1..t_{T-3}; t_m is predicted at step m and fed at step m + 1."""
        return self.T - 3

    @property
    def end_step(self) -> int:
        """The step whose input is <end>; its output is the first talk prediction (of x_{i+1})."""
        return self.T - 1

    def talk_step(self, k: int) -> int:
        """The step whose output predicts x_{i+k+1} after the thought (talk step k = 0..K-1)."""
        return self.T - 1 + k

    def row(self, step: int, copy: int) -> int:
        """Row index of (step >= 1, copy) in the grid layout (step 0 is row 0, shared)."""
        return 0 if step == 0 else 1 + copy * (self.S - 1) + step - 1

    def rows(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return grid_rows(self.n, self.S, device)

    # ---- tokens and positions

    def tokens(self, input_ids: torch.Tensor, thoughts: torch.Tensor, start_id: int, end_id: int,
               pad_id: int, positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Text (B, L) and thoughts (B, n, P, T-3) -> ids and position ids of the grid: (B, R, L) each for the
        full grid (P = L); for the subset grid of the thinking positions (B, P), flat (B, L + (R - 1) P) in
        `grid_coords` order (the text row, then each branch row's P tokens)."""
        B, L = input_ids.shape
        n, K, P = self.n, self.K, thoughts.shape[2]
        start = input_ids.new_full((B, n, 1, P), start_id)
        end = input_ids.new_full((B, n, 1, P), end_id)
        future = torch.stack([at_positions(self.target(input_ids, k - 1, pad_id), positions) for k in range(1, K)], 1) \
            if K > 1 else input_ids[:, :0, None]  # x_{i+1}..x_{i+K-1}
        future = future.view(B, 1, K - 1, P).expand(B, n, K - 1, P)
        branch = torch.cat([start, rearrange(thoughts, "b n p t -> b n t p"), end, future], dim=2)  # (B, n, S-1, P)
        if positions is None:
            ids = torch.cat([input_ids[:, None], rearrange(branch, "b n s l -> b (n s) l")], dim=1)
            step, _ = self.rows(input_ids.device)
            return ids, self.position_ids(step[:, None], torch.arange(L, device=input_ids.device)).expand(B, -1, -1)
        ids = torch.cat([input_ids, rearrange(branch, "b n s p -> b (n s p)")], dim=1)
        f_step, _, f_pos = grid_coords(L, n, self.S, positions, input_ids.device)
        return ids, self.position_ids(f_step, f_pos)

    @staticmethod
    def position_ids(step, position):
        """The position id of the token at grid step `step` of position `position` (broadcasting)."""
        return step + position

    # ---- hidden states in the grid layout

    def states(self, h: torch.Tensor, L: int, positions: Optional[torch.Tensor] = None) -> "GridStates":
        """The model's output over the flattened grid (B, N, ...) -> GridStates (views, no copy)."""
        P = L if positions is None else positions.shape[1]
        return GridStates(h[:, :L], h[:, L:].unflatten(1, (self.R - 1, P)), positions)

    def branch(self, h) -> torch.Tensor:
        """(B, R, L, ...) or GridStates -> the copies' rows (B, n, S-1, P, ...); index s - 1 is step s."""
        rows = h.rows if isinstance(h, GridStates) else h[:, 1:]
        return rearrange(rows, "b (n s) p ... -> b n s p ...", n=self.n)

    def at_step(self, h, step: int) -> torch.Tensor:
        """(B, R, L, ...) or GridStates -> step `step` >= 1 of every copy (B, n, P, ...)."""
        return self.branch(h)[:, :, step - 1]

    def at_steps(self, h, steps: torch.Tensor) -> torch.Tensor:
        """(B, R, L, d) or GridStates, and one step >= 1 per copy and position (B, n, P) -> the states there
        (B, n, P, d): a thought's read step (`read_steps`) where it differs by thought."""
        branch = self.branch(h)  # (B, n, S - 1, P, d)
        idx = (steps - 1)[:, :, None, :, None].expand(-1, -1, 1, -1, branch.shape[-1])
        return branch.gather(2, idx).squeeze(2)

    def read_steps(self, thoughts: torch.Tensor, close_id: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each thought ends when a sampled `close_id` closes it (thought.close_token): (the step whose
        output predicts x_{i+1} after it (B, n, P): the step fed its first close token, or the <end> step when it
        has none; the sampled tokens that belong to it (B, n, P, T-3) bool: those up to its first close)."""
        B, n, P, M = thoughts.shape
        steps = thoughts.new_full((B, n, P), self.end_step)
        if close_id is None or M == 0:
            return steps, torch.ones_like(thoughts, dtype=torch.bool)
        is_close = thoughts == close_id
        first = torch.where(is_close.any(-1), is_close.long().argmax(-1), M)  # t_{first+1} closes (M: none)
        keep = torch.arange(M, device=thoughts.device) <= first[..., None]
        return torch.where(first < M, first + 2, steps), keep  # t_m is fed at step m + 1

    def sampled_rows(self, h) -> torch.Tensor:
        """(B, R, L, d) or GridStates -> the states predicting t_1..t_{T-3}, (B, n, P, T-3, d)."""
        return rearrange(self.branch(h)[:, :, :self.n_sampled], "b n t p ... -> b n p t ...")

    def per_copy(self, h: torch.Tensor) -> torch.Tensor:
        """(B, R, L, ...) -> (B, n, S, L, ...): each copy with its own view of the shared text row."""
        B = h.shape[0]
        text = h[:, None, :1].expand(B, self.n, 1, *h.shape[2:])
        return torch.cat([text, self.branch(h)], dim=2)

    def from_per_copy(self, h: torch.Tensor) -> torch.Tensor:
        """(B, n, S, L, ...) with identical text rows -> the grid layout (B, R, L, ...)."""
        return torch.cat([h[:, 0, :1], rearrange(h[:, :, 1:], "b n s l ... -> b (n s) l ...")], dim=1)

    # ---- targets and shifts along the positions

    @staticmethod
    def ahead(x: torch.Tensor, k: int, dim: int = 1) -> torch.Tensor:
        """x at position i + k, for every position i (the last position repeated past the end): h_base(i+k),
        CE_base(i+k)."""
        if k == 0:
            return x
        L = x.shape[dim]
        last = x.narrow(dim, L - 1, 1)
        return torch.cat([x.narrow(dim, k, L - k), last.expand(*x.shape[:dim], k, *x.shape[dim + 1:])], dim)

    @staticmethod
    def target(input_ids: torch.Tensor, k: int, pad_id: int = 0) -> torch.Tensor:
        """x_{i+k+1} for every position i (B, L): the token talk step k predicts (pad past the end)."""
        L = input_ids.shape[1]
        return F.pad(input_ids, (0, k + 1), value=pad_id)[:, k + 1:k + 1 + L]

    @staticmethod
    def target_ok(L: int, k: int, lengths: Optional[torch.Tensor], doc_ids: Optional[torch.Tensor],
                  device=None) -> torch.Tensor:
        """Whether x_{i+k+1} is a real token of position i's own document, (B or 1, L) bool."""
        pos = torch.arange(L, device=device)
        ok = (pos + k + 1)[None, :] < (L if lengths is None else lengths[:, None])
        if doc_ids is not None:
            ok = ok & (ThoughtGrid.ahead(doc_ids, k + 1) == doc_ids)
        return ok


class GridStates(NamedTuple):
    """Hidden states (or anything per grid token) of one learning pass, by part of the grid."""

    text: torch.Tensor  # (B, L, ...) row 0: the text itself, every position
    rows: torch.Tensor  # (B, R - 1, P, ...) the copies' branch rows (P = L for the full grid)
    positions: Optional[torch.Tensor]  # (B, P) the thinking positions; None: every position (the full grid)


def at_positions(x: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
    """x (B, L, ...) at the thinking positions (B, P) -> (B, P, ...); x itself when every position thinks."""
    if positions is None:
        return x
    idx = positions.reshape(*positions.shape, *(1,) * (x.dim() - 2)).expand(*positions.shape, *x.shape[2:])
    return x.gather(1, idx)


def thought_predicate(q_step, q_copy, q_pos, k_step, k_copy, k_pos):
    """The grid rule on broadcastable integer tensors: True where the query may attend the key."""
    prefix = (k_step == 0) & (k_pos <= q_pos)
    own_branch = (k_step >= 1) & (k_step <= q_step) & (k_copy == q_copy) & (k_pos == q_pos)
    return prefix | own_branch


def grid_coords(L: int, n: int, S: int, positions: Optional[torch.Tensor] = None, device=None):
    """(step (N,), copy (N,), text position (B|1, N)) of every token of the flattened grid.

    Full grid (positions None): N = R L, row-major (row, then position). Subset grid (positions (B, P), the
    thinking positions, distinct within a sequence): the text row's L tokens, then R - 1 branch rows of P
    tokens each, the p-th token of a branch row sitting at text position positions[:, p]."""
    step, copy = grid_rows(n, S, device)
    R = step.numel()
    pos = torch.arange(L, device=device)
    if positions is None:
        return step.repeat_interleave(L), copy.repeat_interleave(L), pos.repeat(R)[None]
    P = positions.shape[1]
    f_step = torch.cat([step[:1].expand(L), step[1:].repeat_interleave(P)])
    f_copy = torch.cat([copy[:1].expand(L), copy[1:].repeat_interleave(P)])
    f_pos = torch.cat([pos[None].expand(positions.shape[0], L), positions.to(device).repeat(1, R - 1)], 1)
    return f_step, f_copy, f_pos


def subset_text_length(N: int, n: int, S: int, P: int) -> int:
    """L, the text row's length, of a flattened subset grid of N = L + n (S - 1) P tokens (`grid_coords`)."""
    return N - n * (S - 1) * P


def dense_grid_mask(L: int, n: int, S: int, lengths: Optional[torch.Tensor] = None,
                    doc_ids: Optional[torch.Tensor] = None, device=None,
                    positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The oracle: a boolean (B or 1, N, N) mask over the flattened grid (`grid_coords`: N = R L, or
    L + (R - 1) P for the subset grid of the thinking positions (B, P)).

    lengths (B,) = real tokens per sequence (right padding); doc_ids (B, L) = document index per
    position for packed sequences.
    """
    f_step, f_copy, f_pos = grid_coords(L, n, S, positions, device)
    mask = thought_predicate(f_step[:, None], f_copy[:, None], f_pos[:, :, None],
                             f_step[None, :], f_copy[None, :], f_pos[:, None, :])  # (B|1, N, N)
    if lengths is not None:
        key_ok = f_pos < lengths.to(device)[:, None]  # (B, N)
        mask = mask & key_ok[:, None, :]
    if doc_ids is not None:
        d = doc_ids.to(device).gather(1, f_pos.expand(doc_ids.shape[0], -1))  # (B, N)
        mask = mask & (d[:, :, None] == d[:, None, :])
    return mask


def flex_mask_mod(L: int, n: int, S: int, lengths: Optional[torch.Tensor] = None,
                  doc_ids: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None):
    """The same predicate as a FlexAttention `mask_mod(b, h, q_idx, kv_idx)` over the flattened grid (the
    subset grid of `grid_coords` when the thinking positions (B, P) are given: its coordinates are looked up)."""
    if positions is None:
        def decode(b, idx):
            row, pos = idx // L, idx % L
            step, copy = decode_rows(row, S)
            return step, copy, pos
    else:
        f_step, f_copy, f_pos = grid_coords(L, n, S, positions, positions.device)

        def decode(b, idx):
            return f_step[idx], f_copy[idx], f_pos[b, idx]

    def mask_mod(b, h, q_idx, kv_idx):
        qs, qc, qp = decode(b, q_idx)
        ks, kc, kp = decode(b, kv_idx)
        ok = thought_predicate(qs, qc, qp, ks, kc, kp)
        if lengths is not None:
            ok = ok & (kp < lengths[b])
        if doc_ids is not None:
            ok = ok & (doc_ids[b, qp] == doc_ids[b, kp])
        return ok

    mask_mod.__name__ = f"thought_grid_L{L}_n{n}_S{S}" + ("" if positions is None else f"_P{positions.shape[1]}")
    return mask_mod
