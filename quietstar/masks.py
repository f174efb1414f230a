"""The thought-grid attention predicate, and the dense boolean mask built from it (the test oracle).

Text x_0..x_{L-1}. Every position i grows a private branch, one token per grid step s (DESIGN §3):
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

from typing import Optional

import torch


def grid_rows(n: int, S: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, copy) of each of the R = 1 + n (S - 1) grid rows; row 0 has step 0 and copy -1."""
    if n < 1 or S < 1:
        raise ValueError(f"grid needs n >= 1 and S >= 1, got n={n}, S={S}")
    step = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1, S).repeat(n)])
    copy = torch.cat([torch.full((1,), -1, dtype=torch.long), torch.arange(n).repeat_interleave(S - 1)])
    return step.to(device), copy.to(device)


def n_grid_rows(n: int, S: int) -> int:
    return 1 + n * (S - 1)


def grid_steps(R: int, n: int) -> int:
    """S from the number of grid rows R and copies n (inverse of n_grid_rows)."""
    if R < 1 or (R - 1) % n:
        raise ValueError(f"{R} grid rows do not form 1 + n (S - 1) rows for n={n}")
    return 1 + (R - 1) // n


def thought_predicate(q_step, q_copy, q_pos, k_step, k_copy, k_pos):
    """The grid rule on broadcastable integer tensors: True where the query may attend the key."""
    prefix = (k_step == 0) & (k_pos <= q_pos)
    own_branch = (k_step >= 1) & (k_step <= q_step) & (k_copy == q_copy) & (k_pos == q_pos)
    return prefix | own_branch


def dense_grid_mask(L: int, n: int, S: int, lengths: Optional[torch.Tensor] = None,
                    doc_ids: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """The oracle: a boolean (B or 1, R*L, R*L) mask over the flattened grid (row-major: row, then position).

    lengths (B,) = real tokens per sequence (right padding); doc_ids (B, L) = document index per
    position for packed sequences.
    """
    step, copy = grid_rows(n, S, device)
    R = step.numel()
    pos = torch.arange(L, device=device)
    f_step = step.repeat_interleave(L)  # (R*L,)
    f_copy = copy.repeat_interleave(L)
    f_pos = pos.repeat(R)
    mask = thought_predicate(f_step[:, None], f_copy[:, None], f_pos[:, None],
                             f_step[None, :], f_copy[None, :], f_pos[None, :])[None]  # (1, RL, RL)
    if lengths is not None:
        key_ok = f_pos[None, :] < lengths.to(device)[:, None]  # (B, RL)
        mask = mask & key_ok[:, None, :]
    if doc_ids is not None:
        d = doc_ids.to(device)[:, f_pos]  # (B, RL)
        mask = mask & (d[:, :, None] == d[:, None, :])
    return mask


def flex_mask_mod(L: int, n: int, S: int, lengths: Optional[torch.Tensor] = None,
                  doc_ids: Optional[torch.Tensor] = None):
    """The same predicate as a FlexAttention `mask_mod(b, h, q_idx, kv_idx)` over the flattened grid."""
    Sm1 = max(S - 1, 1)

    def decode(idx):
        row, pos = idx // L, idx % L
        step = torch.where(row == 0, 0, (row - 1) % Sm1 + 1)
        copy = torch.where(row == 0, -1, (row - 1) // Sm1)
        return step, copy, pos

    def mask_mod(b, h, q_idx, kv_idx):
        qs, qc, qp = decode(q_idx)
        ks, kc, kp = decode(kv_idx)
        ok = thought_predicate(qs, qc, qp, ks, kc, kp)
        if lengths is not None:
            ok = ok & (kp < lengths[b])
        if doc_ids is not None:
            ok = ok & (doc_ids[b, qp] == doc_ids[b, kp])
        return ok

    mask_mod.__name__ = f"thought_grid_L{L}_n{n}_S{S}"
    return mask_mod
