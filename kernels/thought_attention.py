"""Fused Triton attention over the Quiet-STaR thought grid: forward and backward.

References
----------
- Triton tutorial 06, "Fused Attention" (triton-lang.org/main/getting-started/tutorials/06-fused-attention):
  program layout, exp2 online softmax, the two-stage (unmasked / diagonal) causal loop, the
  delta = rowsum(dO * O) preprocess and the separate dq and dk/dv backward kernels.
- T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
  arXiv:2307.08691 (2023): Algorithms 1 and 2 (forward keeps only O and the log-sum-exp; backward
  recomputes P = exp(S - LSE), dS = P * (dP - delta)).
- E. Zelikman et al., "Quiet-STaR", arXiv:2403.09629 (2024): the thought attention pattern.
- The predicate and the grid layout: quietstar/masks.py; the PyTorch reference: kernels/reference.py.

The problem (docs/backends.md)
-----------------------
q (B, H, R, L, D); k, v (B, G, R, L, D), G dividing H (GQA, q head h reads kv head h // (H/G));
R = 1 + n (S - 1) grid rows: row 0 is the text, row 1 + p (S - 1) + (s - 1) is step s of copy p.

    query (step s, copy p, pos i) sees   key (row 0, pos j)              iff j <= i
                                         key (step r, copy p, pos i)     iff 1 <= r <= s
    and never a key at a padding position j >= lengths[b]; with packed documents (doc_ids), a text key
    only from the query's own document (documents are contiguous runs, so that is j >= start of i's
    document; the loops over text key tiles then start at the tile's earliest document start, all masked).

        keys ->   row 0 (text)          row 1 (s=1,p=0)  row 2 (s=2,p=0)      (n = 1, S = 3, L = 3)
    query s0 i2   1 1 1                 . . .            . . .
    query s2 i1   1 1 .                 . 1 .            . 1 .   <- own position only
                  ^ causal over L       ^ one key per earlier step, in registers

So every query does causal attention over the L text keys (shared by all n copies: they are
stored once, in row 0) plus at most S - 1 "own-branch" keys at its own position.

Kernel design
-------------
Forward, one program per (tile of BLOCK_R grid rows, tile of BLOCK_P positions, b * H + h). The
program's queries are the BLOCK_R x BLOCK_P grid cells flattened into one M = BLOCK_R * BLOCK_P
matrix. Every grid row has the same causal mask over row 0, so the rows stacked in M share each
row-0 K/V tile: it is loaded once and used by one tl.dot for all BLOCK_R rows. Key tiles above the
diagonal are skipped and only the diagonal tiles (and the one holding the padding boundary) are
masked. Then the own-branch keys r = 1..s are added in registers: for each step t one gathered
(M, D) load of K and V at (row - s + t, same position), an elementwise q.k over D and an
online-softmax update (O(S) work per query, nothing quadratic in L). A block-sparse kernel over the
flattened grid (FlexAttention) visits each of these keys as a mostly-masked diagonal block of
scores instead. Only o and the log-sum-exp ((B, H, R, L) fp32, kept in log2 units; the public
function returns the natural log) are written: memory is O(R L D), never O(L^2).

All R rows in one program would need R * BLOCK_P * D fp32 accumulators (R = 31 for S = 16, n = 2),
beyond the register file, so rows are tiled: BLOCK_R rows per program, autotuned, with the row
tiles of one position tile placed on consecutive program ids so that they read the same row-0
K/V tiles while these are still in L2. When R <= BLOCK_R one program holds every row.

Backward (FlashAttention-2): delta = rowsum(dO * O) (small kernel); dq with the same program
layout as the forward (row-0 tiles through tl.dot, branch keys elementwise); dk/dv of row 0, one
program per (key tile, b * G + g, split), which sums over every query head of the kv group and all
R rows of queries (so K/V are never repeated per q head); the work of a key tile is split over
`nsplit` programs when B * G * L / BLOCK_N alone would leave the GPU idle, and the fp32 partial
sums are added on the host; and dk/dv of the branch rows, one program per (branch row, position
tile, b * G + g), elementwise per position: key step t of copy p collects the queries of steps
s = t..S-1 of the same copy, over the group's q heads.

Precision: fp16/bf16 tiles go through tensor cores with fp32 accumulation; fp32 inputs use
tl.dot(..., input_precision="ieee") (no TF32), so that fp32 runs, in the interpreter and on GPU,
match a fp32 PyTorch computation. Head dims: powers of two >= 16 (64 for SmolLM2, 128 for Mistral).

CPU: runs under TRITON_INTERPRET=1 (tests/conftest.py sets it when there is no CUDA) with one fixed
small tile configuration; on CUDA every kernel is autotuned over tile shapes, warps and stages.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from quietstar.masks import grid_steps, subset_text_length

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LN2 = 0.6931471805599453  # the kernels keep the log-sum-exp in log2 units (exp2 softmax)

# --------------------------------------------------------------------------------------------------
# @triton.jit helpers


@triton.jit
def _grid_cells(r0, p0, R, L, S, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """The M = BLOCK_R * BLOCK_P grid cells of a tile, row-major: row, position, step, in-bounds."""
    offs_m = tl.arange(0, BLOCK_R * BLOCK_P)
    row = r0 + offs_m // BLOCK_P
    pos = p0 + offs_m % BLOCK_P
    in_grid = (row < R) & (pos < L)
    step = tl.where(row == 0, 0, (row - 1) % tl.maximum(S - 1, 1) + 1)
    return row, pos, step, in_grid


@triton.jit
def _text_key_range(p0, length, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row-0 keys for query positions [p0, p0 + BLOCK_P): [0, lo) needs no mask, [lo, hi) does."""
    hi = tl.minimum(p0 + BLOCK_P, length)  # causal and padding bound (length <= L)
    lo = (tl.minimum(p0, length) // BLOCK_N) * BLOCK_N  # whole tiles strictly below every query
    return lo, hi


@triton.jit
def _fwd_text(acc, l_i, m_i, q, K0, V0, s_kl, pos, dstart, lo, hi, qk_scale,
              D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr,
              DOCS: tl.constexpr):
    """Online softmax over row-0 key tiles [lo, hi) for all M queries of the program (log2 units).
    With DOCS, a query sees only keys from its document's first position dstart (M,) on."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_off = cols[:, None] * s_kl + offs_d[None, :]
        if MASKED:
            k = tl.load(K0 + kv_off, mask=(cols < hi)[:, None], other=0.0)
        else:
            k = tl.load(K0 + kv_off)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (M, BLOCK_N)
        if MASKED:
            seen = (cols[None, :] <= pos[:, None]) & (cols[None, :] < hi)
            if DOCS:
                seen = seen & (cols[None, :] >= dstart[:, None])
            qk = tl.where(seen, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # a query with no key yet
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(V0 + kv_off, mask=(cols < hi)[:, None], other=0.0)
        else:
            v = tl.load(V0 + kv_off)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _bwd_dq_text(dq, q, do, lse2, delta, K0, V0, s_kl, pos, dstart, lo, hi, qk_scale,
                 D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr,
                 DOCS: tl.constexpr):
    """dq += dS K over row-0 key tiles [lo, hi) (dS = P * (dP - delta), P recomputed from the lse)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_off = cols[:, None] * s_kl + offs_d[None, :]
        if MASKED:
            k = tl.load(K0 + kv_off, mask=(cols < hi)[:, None], other=0.0)
            v = tl.load(V0 + kv_off, mask=(cols < hi)[:, None], other=0.0)
        else:
            k = tl.load(K0 + kv_off)
            v = tl.load(V0 + kv_off)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse2[:, None])
        if MASKED:
            seen = (cols[None, :] <= pos[:, None]) & (cols[None, :] < hi)
            if DOCS:
                seen = seen & (cols[None, :] >= dstart[:, None])
            p = tl.where(seen, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _fwd_text_keys(acc, l_i, m_i, q, K0, V0, s_kl, pos, in_grid, lo, hi, DocStart, n_text, qk_scale,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, DOCS: tl.constexpr):
    """_fwd_text over the text keys [0, hi) of queries at text positions pos (M,): the tiles below lo need no
    mask; with DOCS (DocStart: the batch row's first position of each token's document, n_text long) every
    tile from the earliest document start of the queries on is masked."""
    if DOCS:
        dstart = tl.load(DocStart + pos, mask=in_grid, other=0)
        lo = (tl.min(tl.where(in_grid, dstart, n_text), axis=0) // BLOCK_N) * BLOCK_N
    else:
        dstart = pos
        acc, l_i, m_i = _fwd_text(acc, l_i, m_i, q, K0, V0, s_kl, pos, dstart, 0, lo, qk_scale,
                                  D, BLOCK_N, False, PREC, False)
    return _fwd_text(acc, l_i, m_i, q, K0, V0, s_kl, pos, dstart, lo, hi, qk_scale, D, BLOCK_N, True, PREC, DOCS)


@triton.jit
def _bwd_dq_text_keys(dq, q, do, lse2, delta, K0, V0, s_kl, pos, in_grid, lo, hi, DocStart, n_text, qk_scale,
                      D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, DOCS: tl.constexpr):
    """_bwd_dq_text over the text keys [0, hi), tiled as _fwd_text_keys."""
    if DOCS:
        dstart = tl.load(DocStart + pos, mask=in_grid, other=0)
        lo = (tl.min(tl.where(in_grid, dstart, n_text), axis=0) // BLOCK_N) * BLOCK_N
    else:
        dstart = pos
        dq = _bwd_dq_text(dq, q, do, lse2, delta, K0, V0, s_kl, pos, dstart, 0, lo, qk_scale, D, BLOCK_N,
                          False, PREC, False)
    return _bwd_dq_text(dq, q, do, lse2, delta, K0, V0, s_kl, pos, dstart, lo, hi, qk_scale, D, BLOCK_N,
                        True, PREC, DOCS)


@triton.jit
def _bwd_dkdv_text(dk, dv, k, v, Qh, dOh, Lh, Dh, s_qr, s_ql, cols, dend, length, r0, lo, hi, R, L, qk_scale,
                   D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                   MASKED: tl.constexpr, PREC: tl.constexpr, DOCS: tl.constexpr):
    """dk, dv of one row-0 key tile from the queries of rows [r0, r0 + BLOCK_R), positions [lo, hi).
    With DOCS, a key is seen only by queries before its document's end dend (BLOCK_N,)."""
    offs_d = tl.arange(0, D)
    offs_m = tl.arange(0, BLOCK_R * BLOCK_P)
    row = r0 + offs_m // BLOCK_P  # every row sees row 0 alike: only positions change along the loop
    for p0 in range(lo, hi, BLOCK_P):
        pos = p0 + offs_m % BLOCK_P
        in_grid = (row < R) & (pos < L)
        q_off = row[:, None] * s_qr + pos[:, None] * s_ql + offs_d[None, :]
        q = tl.load(Qh + q_off, mask=in_grid[:, None], other=0.0)
        do = tl.load(dOh + q_off, mask=in_grid[:, None], other=0.0)
        lse2 = tl.load(Lh + row * L + pos, mask=in_grid, other=0.0)
        delta = tl.load(Dh + row * L + pos, mask=in_grid, other=0.0)
        pT = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse2[None, :])  # (BLOCK_N, M)
        if MASKED:
            seen = (cols[:, None] <= pos[None, :]) & (cols[:, None] < length)
            if DOCS:
                seen = seen & (pos[None, :] < dend[:, None])
            pT = tl.where(seen, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        dsT = pT * (tl.dot(v, tl.trans(do), input_precision=PREC) - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _fwd_branch(acc, l_i, m_i, q, Kbg, Vbg, row, col, step, key_ok, s_kr, s_kl, qk_scale, D: tl.constexpr):
    """Online softmax over the own-branch keys: key step t of the query's copy sits in row (row - step + t),
    at the same column, for t = 1..step (key_ok: the column is a real token)."""
    offs_d = tl.arange(0, D)
    t_hi = tl.max(tl.where(key_ok, step, 0), axis=0)
    for t in range(1, t_hi + 1):
        ok = key_ok & (t <= step)
        kv_off = (row - step + t)[:, None] * s_kr + col[:, None] * s_kl + offs_d[None, :]
        kt = tl.load(Kbg + kv_off, mask=ok[:, None], other=0.0)
        qk = tl.sum(q.to(tl.float32) * kt.to(tl.float32), 1) * qk_scale
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, qk)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new)
        vt = tl.load(Vbg + kv_off, mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + p[:, None] * vt.to(tl.float32)
        l_i = l_i * alpha + p
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _bwd_dq_branch(dq, q, do, lse2, delta, Kbg, Vbg, row, col, step, key_ok, s_kr, s_kl, qk_scale,
                   D: tl.constexpr):
    """dq += dS K over the own-branch keys (as _fwd_branch)."""
    offs_d = tl.arange(0, D)
    t_hi = tl.max(tl.where(key_ok, step, 0), axis=0)
    for t in range(1, t_hi + 1):
        ok = key_ok & (t <= step)
        kv_off = (row - step + t)[:, None] * s_kr + col[:, None] * s_kl + offs_d[None, :]
        kt = tl.load(Kbg + kv_off, mask=ok[:, None], other=0.0).to(tl.float32)
        vt = tl.load(Vbg + kv_off, mask=ok[:, None], other=0.0).to(tl.float32)
        p = tl.math.exp2(tl.sum(q.to(tl.float32) * kt, 1) * qk_scale - lse2)
        p = tl.where(ok, p, 0.0)
        ds = p * (tl.sum(do.to(tl.float32) * vt, 1) - delta)
        dq += ds[:, None] * kt
    return dq


# --------------------------------------------------------------------------------------------------
# kernels (each a plain @triton.jit for the interpreter and forced tiles, plus an autotuned wrapper)


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse2, Lengths, DocStart,
              s_qb, s_qh, s_qr, s_ql, s_kb, s_kh, s_kr, s_kl,
              H, R, L, S, GROUP, sm_scale,
              D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
              PREC: tl.constexpr, DOCS: tl.constexpr):
    pid_r = tl.program_id(0)  # fastest: the row tiles of one position tile share row-0 K/V in L2
    pid_p = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    g = h // GROUP
    p0 = (tl.cdiv(L, BLOCK_P) - 1 - pid_p) * BLOCK_P  # longest (last) position tiles first
    row, pos, step, in_grid = _grid_cells(pid_r * BLOCK_R, p0, R, L, S, BLOCK_R, BLOCK_P)
    length = tl.load(Lengths + b)
    offs_d = tl.arange(0, D)
    Qbh = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    Kbg = K + b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kh
    Vbg = V + b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kh
    q_off = row[:, None] * s_qr + pos[:, None] * s_ql + offs_d[None, :]
    q = tl.load(Qbh + q_off, mask=in_grid[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634  # exp2 domain

    m_i = tl.full([BLOCK_R * BLOCK_P], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R * BLOCK_P], tl.float32)
    acc = tl.zeros([BLOCK_R * BLOCK_P, D], tl.float32)
    # row 0: causal over L text keys, shared by every grid row of the tile
    lo, hi = _text_key_range(p0, length, BLOCK_P, BLOCK_N)
    acc, l_i, m_i = _fwd_text_keys(acc, l_i, m_i, q, Kbg, Vbg, s_kl, pos, in_grid, lo, hi,
                                   DocStart + b.to(tl.int64) * L, L, qk_scale, D, BLOCK_N, PREC, DOCS)
    # own branch: key step t of the query's copy sits in row (row - step + t), at the same position
    acc, l_i, m_i = _fwd_branch(acc, l_i, m_i, q, Kbg, Vbg, row, pos, step, in_grid & (pos < length), s_kr, s_kl,
                                qk_scale, D)

    empty = l_i == 0.0  # no visible key at all (lengths[b] == 0): out = 0, lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))  # log2 units
    tl.store(Out + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + q_off, out.to(Out.dtype.element_ty),
             mask=in_grid[:, None])
    tl.store(Lse2 + pid_bh.to(tl.int64) * R * L + row * L + pos, lse2, mask=in_grid)


@triton.jit
def _attn_bwd_delta(O, dO, Delta, N_ROWS, D: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N_ROWS
    off = rows.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
    o = tl.load(O + off, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(dO + off, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + rows, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _attn_bwd_dq(Q, K, V, dO, dQ, Lse2, Delta, Lengths, DocStart,
                 s_qb, s_qh, s_qr, s_ql, s_kb, s_kh, s_kr, s_kl,
                 H, R, L, S, GROUP, sm_scale,
                 D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                 PREC: tl.constexpr, DOCS: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    g = h // GROUP
    p0 = (tl.cdiv(L, BLOCK_P) - 1 - pid_p) * BLOCK_P
    row, pos, step, in_grid = _grid_cells(pid_r * BLOCK_R, p0, R, L, S, BLOCK_R, BLOCK_P)
    length = tl.load(Lengths + b)
    offs_d = tl.arange(0, D)
    q_base = b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    Kbg = K + b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kh
    Vbg = V + b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kh
    q_off = row[:, None] * s_qr + pos[:, None] * s_ql + offs_d[None, :]
    q = tl.load(Q + q_base + q_off, mask=in_grid[:, None], other=0.0)
    do = tl.load(dO + q_base + q_off, mask=in_grid[:, None], other=0.0)
    l_off = pid_bh.to(tl.int64) * R * L + row * L + pos
    lse2 = tl.load(Lse2 + l_off, mask=in_grid, other=0.0)
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # a row with no key: P = 0
    delta = tl.load(Delta + l_off, mask=in_grid, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_R * BLOCK_P, D], tl.float32)
    lo, hi = _text_key_range(p0, length, BLOCK_P, BLOCK_N)
    dq = _bwd_dq_text_keys(dq, q, do, lse2, delta, Kbg, Vbg, s_kl, pos, in_grid, lo, hi,
                           DocStart + b.to(tl.int64) * L, L, qk_scale, D, BLOCK_N, PREC, DOCS)
    dq = _bwd_dq_branch(dq, q, do, lse2, delta, Kbg, Vbg, row, pos, step, in_grid & (pos < length), s_kr, s_kl,
                        qk_scale, D)
    dq = dq * sm_scale
    tl.store(dQ + q_base + q_off, dq.to(dQ.dtype.element_ty), mask=in_grid[:, None])


@triton.jit
def _attn_bwd_dkdv_text(Q, K, V, dO, dK, dV, PartK, PartV, Lse2, Delta, Lengths, DocEnd,
                        s_qb, s_qh, s_qr, s_ql, s_kb, s_kh, s_kr, s_kl,
                        B, H, R, L, S, GROUP, NSPLIT, sm_scale,
                        D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                        SPLIT: tl.constexpr, PREC: tl.constexpr, DOCS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    pid_s = tl.program_id(2)
    G = H // GROUP
    b = pid_bg // G
    g = pid_bg % G
    length = tl.load(Lengths + b)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kv_base = b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kh
    kv_off = cols[:, None] * s_kl + offs_d[None, :]  # row 0
    k = tl.load(K + kv_base + kv_off, mask=(cols < L)[:, None], other=0.0)
    v = tl.load(V + kv_base + kv_off, mask=(cols < L)[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634

    # query positions that see some key of the tile: [p_lo, L); from p_mid on, every key is visible
    p_lo = tl.where(n0 < length, (n0 // BLOCK_P) * BLOCK_P, L)
    p_mid = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_P) * BLOCK_P
    p_mid = tl.where(n0 + BLOCK_N <= length, tl.minimum(p_mid, L), L)
    p_mid = tl.maximum(p_mid, p_lo)
    if DOCS:  # packed documents: queries up to the latest document end of the tile, all masked
        dend = tl.load(DocEnd + b.to(tl.int64) * L + cols, mask=cols < L, other=0)
        p_hi = tl.max(tl.where(cols < length, dend, 0), axis=0)
        p_mid = tl.maximum(p_hi, p_lo)
    else:
        dend = cols
    # this program's share of the (q head of the group, row tile) work items
    n_rt = tl.cdiv(R, BLOCK_R)
    n_items = GROUP * n_rt
    per = tl.cdiv(n_items, NSPLIT)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for item in range(pid_s * per, tl.minimum(pid_s * per + per, n_items)):
        h = g * GROUP + item // n_rt
        r0 = (item % n_rt) * BLOCK_R
        bh = b * H + h
        q_base = b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
        l_base = bh.to(tl.int64) * R * L
        dk, dv = _bwd_dkdv_text(dk, dv, k, v, Q + q_base, dO + q_base, Lse2 + l_base, Delta + l_base,
                                s_qr, s_ql, cols, dend, length, r0, p_lo, p_mid, R, L, qk_scale,
                                D, BLOCK_R, BLOCK_P, True, PREC, DOCS)
        if not DOCS:
            dk, dv = _bwd_dkdv_text(dk, dv, k, v, Q + q_base, dO + q_base, Lse2 + l_base, Delta + l_base,
                                    s_qr, s_ql, cols, dend, length, r0, p_mid, L, R, L, qk_scale,
                                    D, BLOCK_R, BLOCK_P, False, PREC, False)
    dk = dk * sm_scale
    if SPLIT:  # fp32 partial sums (NSPLIT, B, G, L, D), added on the host
        p_off = (((pid_s * B + b) * G + g).to(tl.int64) * L) * D + cols[:, None] * D + offs_d[None, :]
        tl.store(PartK + p_off, dk, mask=(cols < L)[:, None])
        tl.store(PartV + p_off, dv, mask=(cols < L)[:, None])
    else:
        tl.store(dK + kv_base + kv_off, dk.to(dK.dtype.element_ty), mask=(cols < L)[:, None])
        tl.store(dV + kv_base + kv_off, dv.to(dV.dtype.element_ty), mask=(cols < L)[:, None])


@triton.jit
def _attn_bwd_dkdv_branch(Q, K, V, dO, dK, dV, Lse2, Delta, Lengths, QPos,
                          s_qb, s_qh, s_qr, s_ql, s_kb, s_kh, s_kr, s_kl,
                          H, R, L, S, GROUP, sm_scale,
                          D: tl.constexpr, BLOCK_P: tl.constexpr, SUBSET: tl.constexpr):
    """dk, dv of one branch row's keys: key step t collects the queries of steps t..S-1 of its copy at the same
    column. SUBSET: the rows are the subset grid's branch rows only (from row 0), column c at text position
    QPos[b, c]; otherwise the full grid's rows 1.. and column = position."""
    pid_k = tl.program_id(0)  # branch row - 1, fastest: neighbours read the same queries
    pid_p = tl.program_id(1)
    pid_bg = tl.program_id(2)
    G = H // GROUP
    b = pid_bg // G
    g = pid_bg % G
    kr = pid_k if SUBSET else 1 + pid_k
    t = pid_k % (S - 1) + 1  # the key's step
    length = tl.load(Lengths + b)
    pos = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, D)
    tpos = tl.load(QPos + b.to(tl.int64) * L + pos, mask=pos < L, other=0) if SUBSET else pos
    ok = (pos < L) & (tpos < length)
    kv_base = b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kh
    kv_off = kr * s_kr + pos[:, None] * s_kl + offs_d[None, :]
    k = tl.load(K + kv_base + kv_off, mask=ok[:, None], other=0.0).to(tl.float32)
    v = tl.load(V + kv_base + kv_off, mask=ok[:, None], other=0.0).to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_P, D], tl.float32)
    dv = tl.zeros([BLOCK_P, D], tl.float32)
    for hh in range(0, GROUP):
        h = g * GROUP + hh
        q_base = b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
        l_base = (b * H + h).to(tl.int64) * R * L
        for s in range(t, S):  # queries of steps t..S-1 of the same copy, same position
            qr = kr + s - t
            q_off = qr * s_qr + pos[:, None] * s_ql + offs_d[None, :]
            q = tl.load(Q + q_base + q_off, mask=ok[:, None], other=0.0).to(tl.float32)
            do = tl.load(dO + q_base + q_off, mask=ok[:, None], other=0.0).to(tl.float32)
            lse2 = tl.load(Lse2 + l_base + qr * L + pos, mask=ok, other=0.0)
            delta = tl.load(Delta + l_base + qr * L + pos, mask=ok, other=0.0)
            p = tl.where(ok, tl.math.exp2(tl.sum(q * k, 1) * qk_scale - lse2), 0.0)
            dv += p[:, None] * do
            ds = p * (tl.sum(do * v, 1) - delta)
            dk += ds[:, None] * q
    dk = dk * sm_scale
    st = pos < L  # padding positions get exact zeros
    tl.store(dK + kv_base + kv_off, dk.to(dK.dtype.element_ty), mask=st[:, None])
    tl.store(dV + kv_base + kv_off, dv.to(dV.dtype.element_ty), mask=st[:, None])


# --------------------------------------------------------------------------------------------------
# the subset grid (thought.where): the branch rows of P thinking positions, against the text's L keys
#
# Q, O (B, H, R, L, D) here hold only the R = n (S - 1) branch rows and L = P columns, column c sitting at
# text position QPos[b, c]; the text K/V (B, G, LT, D) come separately (K0, V0). The text row's own
# attention is the plain causal case, run by the kernels above as a one-row grid.


@triton.jit
def _subset_cells(r0, p0, b, QPos, R, L, S, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """The tile's cells: branch row, column, step, in-bounds and text position."""
    offs_m = tl.arange(0, BLOCK_R * BLOCK_P)
    row = r0 + offs_m // BLOCK_P
    col = p0 + offs_m % BLOCK_P
    in_grid = (row < R) & (col < L)
    step = row % (S - 1) + 1
    tpos = tl.load(QPos + b.to(tl.int64) * L + col, mask=in_grid, other=0)
    return row, col, step, in_grid, tpos


@triton.jit
def _subset_text_range(tpos, in_grid, length, BLOCK_N: tl.constexpr):
    """Text keys of a tile of queries at text positions tpos: [0, lo) visible to all, [lo, hi) masked."""
    hi = tl.minimum(tl.max(tl.where(in_grid, tpos, 0), axis=0) + 1, length)
    lo = (tl.minimum(tl.min(tl.where(in_grid, tpos, 1 << 30), axis=0), length) // BLOCK_N) * BLOCK_N
    return tl.minimum(lo, hi), hi


@triton.jit
def _subset_fwd(Q, K0, V0, K, V, Out, Lse2, Lengths, DocStart, QPos,
                s_qb, s_qh, s_qr, s_ql, s_kb, s_kh, s_kr, s_kl, s_tb, s_th, s_tl,
                H, R, L, LT, S, GROUP, sm_scale,
                D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                PREC: tl.constexpr, DOCS: tl.constexpr):
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    g = h // GROUP
    row, col, step, in_grid, tpos = _subset_cells(tl.program_id(0) * BLOCK_R, tl.program_id(1) * BLOCK_P, b, QPos,
                                                  R, L, S, BLOCK_R, BLOCK_P)
    length = tl.load(Lengths + b)
    offs_d = tl.arange(0, D)
    q_off = row[:, None] * s_qr + col[:, None] * s_ql + offs_d[None, :]
    q = tl.load(Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + q_off, mask=in_grid[:, None], other=0.0)
    Kbg = K + b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kh
    Vbg = V + b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kh
    K0bg = K0 + b.to(tl.int64) * s_tb + g.to(tl.int64) * s_th
    V0bg = V0 + b.to(tl.int64) * s_tb + g.to(tl.int64) * s_th
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_R * BLOCK_P], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R * BLOCK_P], tl.float32)
    acc = tl.zeros([BLOCK_R * BLOCK_P, D], tl.float32)
    lo, hi = _subset_text_range(tpos, in_grid, length, BLOCK_N)
    acc, l_i, m_i = _fwd_text_keys(acc, l_i, m_i, q, K0bg, V0bg, s_tl, tpos, in_grid, lo, hi,
                                   DocStart + b.to(tl.int64) * LT, LT, qk_scale, D, BLOCK_N, PREC, DOCS)
    acc, l_i, m_i = _fwd_branch(acc, l_i, m_i, q, Kbg, Vbg, row, col, step, in_grid & (tpos < length), s_kr, s_kl,
                                qk_scale, D)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    tl.store(Out + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + q_off, (acc / l_safe[:, None]).to(Out.dtype.element_ty),
             mask=in_grid[:, None])
    tl.store(Lse2 + pid_bh.to(tl.int64) * R * L + row * L + col, lse2, mask=in_grid)


@triton.jit
def _subset_bwd_dq(Q, K0, V0, K, V, dO, dQ, Lse2, Delta, Lengths, DocStart, QPos,
                   s_qb, s_qh, s_qr, s_ql, s_kb, s_kh, s_kr, s_kl, s_tb, s_th, s_tl,
                   H, R, L, LT, S, GROUP, sm_scale,
                   D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                   PREC: tl.constexpr, DOCS: tl.constexpr):
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    g = h // GROUP
    row, col, step, in_grid, tpos = _subset_cells(tl.program_id(0) * BLOCK_R, tl.program_id(1) * BLOCK_P, b, QPos,
                                                  R, L, S, BLOCK_R, BLOCK_P)
    length = tl.load(Lengths + b)
    offs_d = tl.arange(0, D)
    q_base = b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    q_off = row[:, None] * s_qr + col[:, None] * s_ql + offs_d[None, :]
    q = tl.load(Q + q_base + q_off, mask=in_grid[:, None], other=0.0)
    do = tl.load(dO + q_base + q_off, mask=in_grid[:, None], other=0.0)
    l_off = pid_bh.to(tl.int64) * R * L + row * L + col
    lse2 = tl.load(Lse2 + l_off, mask=in_grid, other=0.0)
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    delta = tl.load(Delta + l_off, mask=in_grid, other=0.0)
    Kbg = K + b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kh
    Vbg = V + b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kh
    K0bg = K0 + b.to(tl.int64) * s_tb + g.to(tl.int64) * s_th
    V0bg = V0 + b.to(tl.int64) * s_tb + g.to(tl.int64) * s_th
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_R * BLOCK_P, D], tl.float32)
    lo, hi = _subset_text_range(tpos, in_grid, length, BLOCK_N)
    dq = _bwd_dq_text_keys(dq, q, do, lse2, delta, K0bg, V0bg, s_tl, tpos, in_grid, lo, hi,
                           DocStart + b.to(tl.int64) * LT, LT, qk_scale, D, BLOCK_N, PREC, DOCS)
    dq = _bwd_dq_branch(dq, q, do, lse2, delta, Kbg, Vbg, row, col, step, in_grid & (tpos < length), s_kr, s_kl,
                        qk_scale, D)
    tl.store(dQ + q_base + q_off, (dq * sm_scale).to(dQ.dtype.element_ty), mask=in_grid[:, None])


@triton.jit
def _subset_bwd_dkdv_text(Q, K0, V0, dO, dK0, dV0, Lse2, Delta, Lengths, DocEnd, QPos,
                          s_qb, s_qh, s_qr, s_ql, s_tb, s_th, s_tl,
                          H, R, L, LT, S, GROUP, sm_scale,
                          D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                          PREC: tl.constexpr, DOCS: tl.constexpr):
    """dk, dv (fp32) of one text key tile from every branch query of the kv group (the text row's own
    queries are added on the host from the one-row grid's backward)."""
    pid_bg = tl.program_id(1)
    G = H // GROUP
    b = pid_bg // G
    g = pid_bg % G
    length = tl.load(Lengths + b)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    t_off = b.to(tl.int64) * s_tb + g.to(tl.int64) * s_th + cols[:, None] * s_tl + offs_d[None, :]
    k = tl.load(K0 + t_off, mask=(cols < LT)[:, None], other=0.0)
    v = tl.load(V0 + t_off, mask=(cols < LT)[:, None], other=0.0)
    dend = tl.load(DocEnd + b.to(tl.int64) * LT + cols, mask=cols < LT, other=0) if DOCS else cols
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    offs_m = tl.arange(0, BLOCK_R * BLOCK_P)
    for hh in range(0, GROUP):
        h = g * GROUP + hh
        q_base = b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
        l_base = (b * H + h).to(tl.int64) * R * L
        for r0 in range(0, R, BLOCK_R):
            row = r0 + offs_m // BLOCK_P
            for p0 in range(0, L, BLOCK_P):
                col = p0 + offs_m % BLOCK_P
                in_grid = (row < R) & (col < L)
                tpos = tl.load(QPos + b.to(tl.int64) * L + col, mask=in_grid, other=-1)
                q_off = row[:, None] * s_qr + col[:, None] * s_ql + offs_d[None, :]
                q = tl.load(Q + q_base + q_off, mask=in_grid[:, None], other=0.0)
                do = tl.load(dO + q_base + q_off, mask=in_grid[:, None], other=0.0)
                lse2 = tl.load(Lse2 + l_base + row * L + col, mask=in_grid, other=0.0)
                delta = tl.load(Delta + l_base + row * L + col, mask=in_grid, other=0.0)
                pT = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse2[None, :])
                seen = (cols[:, None] <= tpos[None, :]) & (cols[:, None] < length) & in_grid[None, :]
                if DOCS:
                    seen = seen & (tpos[None, :] < dend[:, None])
                pT = tl.where(seen, pT, 0.0)
                dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
                dsT = pT * (tl.dot(v, tl.trans(do), input_precision=PREC) - delta[None, :])
                dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    p_off = (pid_bg.to(tl.int64) * LT) * D + cols[:, None] * D + offs_d[None, :]
    tl.store(dK0 + p_off, dk * sm_scale, mask=(cols < LT)[:, None])
    tl.store(dV0 + p_off, dv, mask=(cols < LT)[:, None])


# autotuning (CUDA only). Tiles follow the tutorial's Hopper choices (M = 128 queries with 8 warps,
# 64 with 4, BLOCK_N 32..128, 2-4 pipeline stages), M here being BLOCK_R rows x BLOCK_P positions. Each
# kernel then drops the tiles that spill registers at the given head dim (sm_90, checked with ptxas):
# the budget is the number of elements of one (rows, D) tile held per thread.
def _cfg(num_warps, num_stages, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


def _per_thread(rows, D, c):
    return rows * D // (32 * c.num_warps)


def _fits(kind, c, D):
    kw = c.kwargs
    m = kw.get("BLOCK_R", 1) * kw.get("BLOCK_P", 16)
    if kind == "fwd":  # q, acc + a K/V tile (+ gathered branch K/V)
        e = _per_thread(m, D, c)
        return e <= 32 or (e <= 64 and c.num_warps == 8 and kw["BLOCK_N"] <= 64)
    if kind == "dq":  # q, dO, dq + a K/V tile (+ gathered branch K/V)
        return _per_thread(m, D, c) <= 32
    if kind == "dkdv":  # k, v, dk, dv + q, dO tiles
        return _per_thread(kw["BLOCK_N"], D, c) <= 32 and _per_thread(m, D, c) <= 16
    return _per_thread(kw["BLOCK_P"], D, c) <= 16  # branch: six (BLOCK_P, D) tiles, elementwise


def _pruner(kind):
    def prune(configs, named_args, **kwargs):
        """Keep tiles that fit in registers and are not much larger than the problem."""
        R, L, D = named_args["R"], named_args["L"], kwargs["D"]
        rmax, lmax = triton.next_power_of_2(R), max(16, triton.next_power_of_2(L))
        keep = [c for c in configs if _fits(kind, c, D) and c.kwargs.get("BLOCK_R", 1) <= rmax
                and c.kwargs.get("BLOCK_P", 16) <= lmax and c.kwargs.get("BLOCK_N", 16) <= lmax]
        return keep or [min(configs, key=lambda c: _per_thread(max(c.kwargs.values()), D, c))]
    return prune


_FWD_CONFIGS = [_cfg(w, s, BLOCK_R=r, BLOCK_P=p, BLOCK_N=n) for r, p, n, w, s in (
    (1, 128, 64, 8, 3), (2, 64, 64, 8, 3), (4, 32, 64, 8, 3), (2, 64, 128, 8, 3),
    (1, 64, 64, 4, 3), (2, 32, 64, 4, 3), (4, 16, 64, 4, 3), (2, 32, 32, 4, 4))]
_DQ_CONFIGS = [_cfg(w, s, BLOCK_R=r, BLOCK_P=p, BLOCK_N=n) for r, p, n, w, s in (
    (1, 128, 32, 8, 2), (2, 64, 32, 8, 3), (4, 32, 64, 8, 3), (2, 32, 32, 8, 2), (2, 32, 64, 8, 3),
    (1, 64, 32, 4, 2), (2, 32, 64, 4, 3), (2, 16, 32, 4, 2), (1, 32, 64, 4, 3))]
_DKDV_CONFIGS = [_cfg(w, s, BLOCK_N=n, BLOCK_R=r, BLOCK_P=p) for n, r, p, w, s in (
    (128, 1, 32, 8, 3), (128, 2, 32, 8, 3), (128, 1, 64, 8, 3), (64, 1, 32, 8, 3), (64, 2, 32, 8, 3),
    (64, 1, 32, 4, 3), (64, 2, 16, 4, 2), (64, 1, 64, 8, 2), (64, 1, 32, 8, 2), (64, 2, 16, 8, 3), (32, 1, 16, 4, 3))]
_BRANCH_CONFIGS = [_cfg(w, 2, BLOCK_P=p) for p, w in ((16, 4), (32, 4), (32, 8), (64, 8))]

def _tune(kind):
    return dict(prune_configs_by={"early_config_prune": _pruner(kind)})


_attn_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=["R", "L", "S", "D"], **_tune("fwd"))(_attn_fwd)
_attn_bwd_dq_tuned = triton.autotune(_DQ_CONFIGS, key=["R", "L", "S", "D"], **_tune("dq"))(_attn_bwd_dq)
_attn_bwd_dkdv_text_tuned = triton.autotune(_DKDV_CONFIGS, key=["R", "L", "S", "GROUP", "NSPLIT", "D"],
                                            **_tune("dkdv"))(_attn_bwd_dkdv_text)
_attn_bwd_dkdv_branch_tuned = triton.autotune(_BRANCH_CONFIGS, key=["R", "L", "S", "GROUP", "D"],
                                              **_tune("branch"))(_attn_bwd_dkdv_branch)

_subset_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=["R", "L", "S", "D"], **_tune("fwd"))(_subset_fwd)
_subset_bwd_dq_tuned = triton.autotune(_DQ_CONFIGS, key=["R", "L", "S", "D"], **_tune("dq"))(_subset_bwd_dq)
_subset_bwd_dkdv_text_tuned = triton.autotune(_DKDV_CONFIGS, key=["R", "L", "LT", "S", "GROUP", "D"],
                                              **_tune("dkdv"))(_subset_bwd_dkdv_text)

# one fixed small tiling under TRITON_INTERPRET=1 (each program is run op by op in numpy)
_INTERPRET_TILES = {
    "fwd": dict(BLOCK_R=4, BLOCK_P=16, BLOCK_N=16),
    "dq": dict(BLOCK_R=4, BLOCK_P=16, BLOCK_N=16),
    "dkdv": dict(BLOCK_N=16, BLOCK_R=4, BLOCK_P=16, nsplit=1),
    "branch": dict(BLOCK_P=16),
}
_fixed: dict = {}


@contextlib.contextmanager
def fixed_tiles(**per_kernel: dict):
    """Launch with these tiles instead of autotuning (tests: odd tilings, the split dk/dv path).

    Keys: "fwd", "dq" (BLOCK_R, BLOCK_P, BLOCK_N), "dkdv" (BLOCK_N, BLOCK_R, BLOCK_P, nsplit),
    "branch" (BLOCK_P); each may also give num_warps and num_stages.
    """
    global _fixed
    prev, _fixed = _fixed, {**_fixed, **per_kernel}
    try:
        yield
    finally:
        _fixed = prev


def _tiles(kind: str) -> Optional[dict]:
    if kind in _fixed:
        return dict(_fixed[kind])
    if INTERPRET:
        return dict(_INTERPRET_TILES[kind])
    return None


def _launch(kind, jit_fn, tuned_fn, grid, *args, **kwargs):
    meta = _tiles(kind)
    if meta is None:
        tuned_fn[grid](*args, **kwargs)
    else:
        meta.pop("nsplit", None)
        jit_fn[grid](*args, **kwargs, **meta)


def _dkdv_nsplit(device, B, G, L, GROUP, R) -> int:
    """Programs per row-0 key tile: enough for ~2 waves of the GPU when B * G * L / 64 is small."""
    meta = _tiles("dkdv")
    if meta is not None and "nsplit" in meta:
        return max(1, min(int(meta["nsplit"]), GROUP * R))
    if device.type != "cuda":
        return 1
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    base = triton.cdiv(L, 64) * B * G
    return max(1, min(16, GROUP * R, triton.cdiv(2 * n_sm, base)))


# --------------------------------------------------------------------------------------------------
# autograd Function


def _dot_precision(dtype):
    """fp32 tiles: exact fp32 products (no TF32); fp16/bf16: the default tensor-core path."""
    return "ieee" if dtype == torch.float32 else None


def _strides(q, k):
    return (*q.stride()[:4], *k.stride()[:4])


def _forward(q, k, v, lens, S, docs):
    B, H, R, L, D = q.shape
    G = k.shape[1]
    o = torch.empty_like(q)
    lse2 = torch.empty(B, H, R, L, device=q.device, dtype=torch.float32)
    grid = lambda META: (triton.cdiv(R, META["BLOCK_R"]), triton.cdiv(L, META["BLOCK_P"]), B * H)
    _launch("fwd", _attn_fwd, _attn_fwd_tuned, grid,
            q, k, v, o, lse2, lens, lens if docs is None else docs[0], *_strides(q, k), H, R, L, S, H // G,
            D ** -0.5, D=D, PREC=_dot_precision(q.dtype), DOCS=docs is not None)
    return o, lse2


def _backward(q, k, v, o, lse2, do, lens, S, docs):
    B, H, R, L, D = q.shape
    G = k.shape[1]
    GROUP = H // G
    scale = D ** -0.5
    prec = _dot_precision(q.dtype)
    strides = _strides(q, k)
    delta = torch.empty_like(lse2)
    n_rows = B * H * R * L
    _attn_bwd_delta[(triton.cdiv(n_rows, 64),)](o, do, delta, n_rows, D=D, BLOCK=64)

    dq = torch.empty_like(q)
    grid = lambda META: (triton.cdiv(R, META["BLOCK_R"]), triton.cdiv(L, META["BLOCK_P"]), B * H)
    _launch("dq", _attn_bwd_dq, _attn_bwd_dq_tuned, grid,
            q, k, v, do, dq, lse2, delta, lens, lens if docs is None else docs[0], *strides, H, R, L, S, GROUP,
            scale, D=D, PREC=prec, DOCS=docs is not None)

    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    nsplit = _dkdv_nsplit(q.device, B, G, L, GROUP, R)
    if nsplit > 1:
        part_k = torch.empty(nsplit, B, G, L, D, device=q.device, dtype=torch.float32)
        part_v = torch.empty_like(part_k)
    else:
        part_k = part_v = lse2  # unused
    grid = lambda META: (triton.cdiv(L, META["BLOCK_N"]), B * G, nsplit)
    _launch("dkdv", _attn_bwd_dkdv_text, _attn_bwd_dkdv_text_tuned, grid,
            q, k, v, do, dk, dv, part_k, part_v, lse2, delta, lens, lens if docs is None else docs[1], *strides,
            B, H, R, L, S, GROUP, nsplit, scale, D=D, SPLIT=nsplit > 1, PREC=prec, DOCS=docs is not None)
    if nsplit > 1:
        dk[:, :, 0] = part_k.sum(0).to(dk.dtype)
        dv[:, :, 0] = part_v.sum(0).to(dv.dtype)
    if R > 1:
        grid = lambda META: (R - 1, triton.cdiv(L, META["BLOCK_P"]), B * G)
        _launch("branch", _attn_bwd_dkdv_branch, _attn_bwd_dkdv_branch_tuned, grid,
                q, k, v, do, dk, dv, lse2, delta, lens, lens, *strides, H, R, L, S, GROUP, scale, D=D, SUBSET=False)
    return dq, dk, dv


def _subset_forward(q, k0, v0, k, v, lens, S, qpos, docs):
    """The branch rows of the subset grid: q (B, H, R, P, D), k, v (B, G, R, P, D), text k0, v0 (B, G, L, D)."""
    B, H, R, P, D = q.shape
    G, LT = k.shape[1], k0.shape[2]
    o = torch.empty_like(q)
    lse2 = torch.empty(B, H, R, P, device=q.device, dtype=torch.float32)
    grid = lambda META: (triton.cdiv(R, META["BLOCK_R"]), triton.cdiv(P, META["BLOCK_P"]), B * H)
    _launch("fwd", _subset_fwd, _subset_fwd_tuned, grid,
            q, k0, v0, k, v, o, lse2, lens, lens if docs is None else docs[0], qpos, *_strides(q, k), *k0.stride()[:3],
            H, R, P, LT, S, H // G, D ** -0.5, D=D, PREC=_dot_precision(q.dtype), DOCS=docs is not None)
    return o, lse2


def _subset_backward(q, k0, v0, k, v, o, lse2, do, lens, S, qpos, docs):
    """-> dq, the text keys' dk0, dv0 (fp32, from the branch queries only), and the branch keys' dk, dv."""
    B, H, R, P, D = q.shape
    G, LT = k.shape[1], k0.shape[2]
    GROUP, scale, prec = H // G, D ** -0.5, _dot_precision(q.dtype)
    delta = torch.empty_like(lse2)
    n_rows = B * H * R * P
    _attn_bwd_delta[(triton.cdiv(n_rows, 64),)](o, do, delta, n_rows, D=D, BLOCK=64)
    dq = torch.empty_like(q)
    grid = lambda META: (triton.cdiv(R, META["BLOCK_R"]), triton.cdiv(P, META["BLOCK_P"]), B * H)
    _launch("dq", _subset_bwd_dq, _subset_bwd_dq_tuned, grid,
            q, k0, v0, k, v, do, dq, lse2, delta, lens, lens if docs is None else docs[0], qpos, *_strides(q, k),
            *k0.stride()[:3], H, R, P, LT, S, GROUP, scale, D=D, PREC=prec, DOCS=docs is not None)
    dk0 = torch.empty(B, G, LT, D, device=q.device, dtype=torch.float32)
    dv0 = torch.empty_like(dk0)
    grid = lambda META: (triton.cdiv(LT, META["BLOCK_N"]), B * G)
    _launch("dkdv", _subset_bwd_dkdv_text, _subset_bwd_dkdv_text_tuned, grid,
            q, k0, v0, do, dk0, dv0, lse2, delta, lens, lens if docs is None else docs[1], qpos, *q.stride()[:4],
            *k0.stride()[:3], H, R, P, LT, S, GROUP, scale, D=D, PREC=prec, DOCS=docs is not None)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    grid = lambda META: (R, triton.cdiv(P, META["BLOCK_P"]), B * G)
    _launch("branch", _attn_bwd_dkdv_branch, _attn_bwd_dkdv_branch_tuned, grid,
            q, k, v, do, dk, dv, lse2, delta, lens, qpos, *_strides(q, k), H, R, P, S, GROUP, scale, D=D, SUBSET=True)
    return dq, dk0, dv0, dk, dv


class SubsetThoughtAttention(torch.autograd.Function):
    """o = SubsetThoughtAttention.apply(q, k, v, n, S, positions, lengths, doc_ids) on the flattened subset grid
    (B, heads, L + n (S - 1) P, D): the text row as a one-row grid (the kernels above), the branch rows of the
    P thinking positions through the _subset kernels; the text keys' gradients are the sum of both."""

    @staticmethod
    def forward(ctx, q, k, v, n, S, positions, lengths, doc_ids):
        B, H, N, D = q.shape
        P = positions.shape[1]
        L = subset_text_length(N, n, S, P)
        split = lambda t: (t[:, :, :L].unsqueeze(2).contiguous(), t[:, :, L:].unflatten(2, (n * (S - 1), P)).contiguous())
        (qt, qb), (kt, kb), (vt, vb) = split(q), split(k), split(v)
        lens = (torch.full((B,), L, dtype=torch.int32, device=q.device) if lengths is None
                else lengths.to(device=q.device, dtype=torch.int32).clamp(0, L).contiguous())
        docs = None if doc_ids is None else document_bounds(doc_ids.to(q.device))
        qpos = positions.to(device=q.device, dtype=torch.int32).contiguous()
        with _on_device(q):
            o_t, l_t = _forward(qt, kt, vt, lens, 1, docs)
            o_b, l_b = _subset_forward(qb, kt[:, :, 0], vt[:, :, 0], kb, vb, lens, S, qpos, docs)
        ctx.save_for_backward(qt, kt, vt, qb, kb, vb, o_t, l_t, o_b, l_b, lens, qpos, *(docs or ()))
        ctx.S = S
        return torch.cat([o_t.flatten(2, 3), o_b.flatten(2, 3)], 2)

    @staticmethod
    def backward(ctx, do):
        qt, kt, vt, qb, kb, vb, o_t, l_t, o_b, l_b, lens, qpos, *docs = ctx.saved_tensors
        docs = docs or None
        L = qt.shape[3]
        do_t, do_b = do[:, :, :L].unsqueeze(2).contiguous(), do[:, :, L:].reshape(qb.shape).contiguous()
        with _on_device(qt):
            dq_t, dk_t, dv_t = _backward(qt, kt, vt, o_t, l_t, do_t, lens, 1, docs)
            dq_b, dk0, dv0, dk_b, dv_b = _subset_backward(qb, kt[:, :, 0], vt[:, :, 0], kb, vb, o_b, l_b, do_b, lens,
                                                          ctx.S, qpos, docs)
        text = lambda d_t, d0: (d_t[:, :, 0].float() + d0).to(d_t.dtype)
        return (torch.cat([dq_t.flatten(2, 3), dq_b.flatten(2, 3)], 2),
                torch.cat([text(dk_t, dk0), dk_b.flatten(2, 3)], 2),
                torch.cat([text(dv_t, dv0), dv_b.flatten(2, 3)], 2), None, None, None, None, None)


class ThoughtAttention(torch.autograd.Function):
    """o, lse2 = ThoughtAttention.apply(q, k, v, n, lengths, doc_ids); lse2 (log2 units) is not
    differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, n, lengths, doc_ids=None):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, R, L, D = q.shape
        S = grid_steps(R, n)
        if lengths is None:
            lens = torch.full((B,), L, device=q.device, dtype=torch.int32)
        else:
            lens = lengths.to(device=q.device, dtype=torch.int32).clamp(0, L).contiguous()
        docs = None if doc_ids is None else document_bounds(doc_ids.to(q.device))
        with _on_device(q):
            o, lse2 = _forward(q, k, v, lens, S, docs)
        ctx.save_for_backward(q, k, v, o, lse2, lens, *(docs or ()))
        ctx.S = S
        ctx.mark_non_differentiable(lse2)
        return o, lse2

    @staticmethod
    def backward(ctx, do, _dlse2):
        q, k, v, o, lse2, lens, *docs = ctx.saved_tensors
        with _on_device(q):
            dq, dk, dv = _backward(q, k, v, o, lse2, do.contiguous(), lens, ctx.S, docs or None)
        return dq, dk, dv, None, None, None


def document_bounds(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_ids (B, L), documents as contiguous runs (as packing makes them) -> (start, end) (B, L) int32:
    the first position of each position's document and the position just past its end."""
    B, L = doc_ids.shape
    pos = torch.arange(L, device=doc_ids.device).expand(B, L)
    change = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.cat([torch.ones_like(change[:, :1]), change], 1)
    last = torch.cat([change, torch.ones_like(change[:, :1])], 1)
    start = torch.where(first, pos, 0).cummax(-1).values
    end = torch.where(last, pos + 1, L).flip(-1).cummin(-1).values.flip(-1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def _on_device(x):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# public function


def _check_cuda_dtype(q: torch.Tensor) -> None:
    """fp32 runs in the interpreter only: compiled, its tiles exceed sm_80's shared memory at head dim 128
    and spill at every head dim (bench/results/kernels_aot.json)."""
    if q.device.type == "cuda" and q.dtype == torch.float32:
        raise ValueError("the Triton kernel takes fp16/bf16 on CUDA (its fp32 tiles do not fit: "
                         "bench/results/kernels_aot.json); use train.precision=bf16 or attention.backend=split")


def thought_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int,
                      lengths: Optional[torch.Tensor] = None, return_lse: bool = False,
                      doc_ids: Optional[torch.Tensor] = None):
    """Attention over the thought grid (fused Triton, forward and backward).

    q (B, H, R, L, D); k, v (B, G, R, L, D) with H % G == 0 and R = 1 + n (S - 1); lengths (B,)
    real tokens per sequence (right padding) or None; doc_ids (B, L) the document of each position for
    packed sequences (contiguous runs), or None. Inputs may be non-contiguous views (they are
    made contiguous). fp16/bf16 on CUDA, fp32 on CPU under TRITON_INTERPRET=1.
    Returns o (B, H, R, L, D) in q's dtype, and with return_lse also lse (B, H, R, L) fp32
    (natural log, -inf for a query with no visible key; not differentiable).
    """
    if q.dim() != 5 or k.dim() != 5 or k.shape != v.shape:
        raise ValueError(f"expected q (B, H, R, L, D) and k, v (B, G, R, L, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, R, L, D = q.shape
    G = k.shape[1]
    if k.shape[0] != B or k.shape[2:] != (R, L, D) or H % G:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} (need H % G == 0)")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {D}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("thought_attention needs CUDA, or TRITON_INTERPRET=1 set before triton is imported")
    _check_cuda_dtype(q)
    grid_steps(R, n)  # validates R against n
    o, lse2 = ThoughtAttention.apply(q, k, v, n, lengths, doc_ids)
    return (o, lse2 * LN2) if return_lse else o


def subset_thought_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, S: int,
                             positions: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                             doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention over the subset grid of the thinking positions (B, P) (ascending, distinct; masks.grid_coords):
    q (B, H, L + n (S - 1) P, D); k, v (B, G, same, D) -> (B, H, same, D). Otherwise as thought_attention."""
    if q.dim() != 4 or k.shape != v.shape or k.shape[2:] != q.shape[2:] or q.shape[1] % k.shape[1]:
        raise ValueError(f"expected flattened q (B, H, N, D) and k, v (B, G, N, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    D = q.shape[-1]
    if D < 16 or D & (D - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {D}")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("subset_thought_attention needs CUDA, or TRITON_INTERPRET=1 set before triton is imported")
    _check_cuda_dtype(q)
    if S < 2 or subset_text_length(q.shape[2], n, S, positions.shape[1]) < 1:
        raise ValueError(f"{q.shape[2]} tokens do not hold a text row and n={n} x (S-1)={S - 1} rows of "
                         f"{positions.shape[1]} thinking positions")
    return SubsetThoughtAttention.apply(q, k, v, n, S, positions, lengths, doc_ids)
