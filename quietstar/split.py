"""The split attention backend: the grid's attention as two parts merged exactly by their log-sum-exp.

- the prefix part: every grid row's queries over the text row (row 0), causal. On CPU it runs on PyTorch's
  fused flash-attention kernels (one causal pass with every grid row as extra query heads of its kv head);
  elsewhere, or with `tile`, it is tiled PyTorch.
- the own-branch part: each query over its own branch's earlier steps at its own position (at most S - 1 keys).

Its backward works from the merged output and log-sum-exp (nothing O(L^2) is kept); GQA without repeated
heads. The learning pass reaches it through attention.py's dispatch (attention.backend=split, the CPU
default); the rollout's one grid step at a time (decode_step_attention) uses it under every backend.

Shapes as in attention.py: q (B, H, R, L, D), k and v (B, G, R, L, D), R = 1 + n (S - 1) grid rows; the
subset grid of the thinking positions (B, P) flattened to L + (R - 1) P tokens (masks.grid_coords).
"""

from __future__ import annotations

from typing import Optional

import torch

from quietstar.masks import grid_steps, subset_text_length


def split_attention(q, k, v, n, lengths=None, doc_ids=None, tile: Optional[int] = None, rows_only: bool = False):
    """Prefix part (row-0 keys, causal) + own-branch part (same copy, steps <= s, same position), LSE-merged.

    `tile` forces the pure-PyTorch prefix path, tiled over this many query positions (the path used
    off the CPU); by default the CPU runs the prefix through PyTorch's fused flash-attention kernels.
    With `rows_only`, q holds the thought rows' queries alone (attention.grid_rows_attention)."""
    return _SplitAttention.apply(q, k, v, n, _key_ok(q.shape[0], q.shape[3], lengths, q.device), doc_ids, tile,
                                 rows_only)


def subset_split_attention(q, k, v, n: int, S: int, positions: torch.Tensor, lengths=None, doc_ids=None,
                           rows_only: bool = False):
    """split_attention on the subset grid of the thinking positions (B, P): q (B, H, N, D), k, v (B, G, N, D),
    N = L + (R - 1) P. With `rows_only`, q holds the branch rows' queries alone
    (attention.subset_grid_rows_attention)."""
    L = subset_text_length(k.shape[2], n, S, positions.shape[1])
    return _SubsetSplitAttention.apply(q, k, v, n, S, positions, _key_ok(q.shape[0], L, lengths, q.device), doc_ids,
                                       None, rows_only)




class _SplitAttention(torch.autograd.Function):
    """The split backend with its own backward. Both parts are differentiated from the merged output o
    and log-sum-exp lse (the split-KV rule of FlashAttention): with P_j = exp(S_j - lse) over part j's
    keys, dS_j = P_j (dO V_j^T - rowsum(dO o)), so neither part's own output or lse is kept. With
    `rows_only`, q holds the thought rows alone (R - 1 of them: grid_rows_attention)."""

    @staticmethod
    def forward(ctx, q, k, v, n, key_ok, doc_ids, tile, rows_only):
        B, H, Rq, L, D = q.shape
        G, R = k.shape[1], k.shape[2]
        S = grid_steps(R, n)
        first = 0 if rows_only else 1  # q's first thought row
        qg = q.view(B, G, H // G, Rq, L, D)  # query heads grouped by their kv head: no repeated K/V
        o, lse = _prefix_forward(qg, k[:, :, 0], v[:, :, 0], key_ok, doc_ids, tile)  # (B,G,h,Rq,L,D), (B,G,h,Rq,L)
        if S > 1:
            qb, kb, vb = _branch(qg, n, S, 3, first), _branch(k, n, S, 2), _branch(v, n, S, 2)
            o2, lse2 = branch_attention(qb, kb, vb, key_ok, steps_causal=True)
            ob, lse_b = _branch(o, n, S, 3, first), _branch(lse, n, S, 3, first)
            lse_m = torch.logaddexp(lse_b, lse2)
            ob.copy_(torch.exp(lse_b - lse_m)[..., None] * _up(ob) + torch.exp(lse2 - lse_m)[..., None] * o2)
            lse_b.copy_(lse_m)
        ctx.save_for_backward(q, k, v, o, lse, key_ok, doc_ids)
        ctx.n, ctx.tile, ctx.first = n, tile, first
        return o.view(B, H, Rq, L, D)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_ok, doc_ids = ctx.saved_tensors
        n, first = ctx.n, ctx.first
        B, H, Rq, L, D = q.shape
        G = k.shape[1]
        S = grid_steps(k.shape[2], n)
        qg, do = q.view(B, G, H // G, Rq, L, D), do.contiguous().view(B, G, H // G, Rq, L, D)
        dq, dk0, dv0 = _prefix_backward(do, qg, k[:, :, 0], v[:, :, 0], o, lse, key_ok, doc_ids, ctx.tile)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dk[:, :, 0], dv[:, :, 0] = dk0, dv0
        if S > 1:
            _own_branch_backward(*(_branch(t, n, S, 3, first) for t in (qg, do, o, lse, dq)),
                                 *(_branch(t, n, S, 2) for t in (k, v, dk, dv)), key_ok)
        return dq.view(B, H, Rq, L, D).to(q.dtype), dk, dv, None, None, None, None, None


def _own_branch_backward(qb, dob, ob, lse_b, dqb, kb, vb, dkb, dvb, key_ok):
    """The own-branch part's gradients from the merged output and lse, P2 = exp(S2 - lse) recomputed (at most
    S - 1 keys per query): adds to dqb, writes dkb, dvb. qb, dob, ob, dqb (B, G, h, n, S-1, P, D), lse_b
    (B, G, h, n, S-1, P); kb, vb, dkb, dvb (B, G, n, S-1, P, D); key_ok (B, P) or None."""
    scale = qb.shape[-1] ** -0.5
    p2 = torch.exp(_branch_scores(qb, kb, key_ok, steps_causal=True) - lse_b[..., None])  # (B,G,h,n,S-1,P,S-1)
    delta = (_up(dob) * _up(ob)).sum(-1, keepdim=True)  # (..., P, 1)
    ds = p2 * (torch.einsum("bghnsld,bgnrld->bghnslr", _up(dob), _up(vb)) - delta)
    dqb.add_(torch.einsum("bghnslr,bgnrld->bghnsld", ds, _up(kb)) * scale)
    dkb.copy_(torch.einsum("bghnslr,bghnsld->bgnrld", ds, _up(qb)) * scale)
    dvb.copy_(torch.einsum("bghnslr,bghnsld->bgnrld", p2, _up(dob)))


class _SubsetSplitAttention(torch.autograd.Function):
    """The split backend on the subset grid (flattened: the text row's L tokens, then R - 1 branch rows of P
    tokens). The text row is plain causal attention; the branch rows attend the text prefix of their position
    (the prefix part at query positions `positions`) and their own branch, LSE-merged as in _SplitAttention.
    With `rows_only`, q holds the branch rows' queries alone (subset_grid_rows_attention)."""

    @staticmethod
    def forward(ctx, q, k, v, n, S, positions, key_ok, doc_ids, tile, rows_only):
        B, H, Nq, D = q.shape
        G, P = k.shape[1], positions.shape[1]
        L = subset_text_length(k.shape[2], n, S, P)
        first = 0 if rows_only else L  # q's first branch-row token
        rows = lambda t, heads: t[:, :, first:].reshape(B, G, heads // G, n * (S - 1), P, D)
        o = q.new_empty(B, G, H // G, Nq, D, dtype=_up(q).dtype)
        lse = q.new_empty(B, G, H // G, Nq, dtype=_up(q).dtype)
        k0, v0 = k[:, :, :L], v[:, :, :L]
        if not rows_only:
            o_t, lse_t = _prefix_forward(q[:, :, :L].reshape(B, G, H // G, 1, L, D), k0, v0, key_ok, doc_ids, tile)
            o[:, :, :, :L], lse[:, :, :, :L] = o_t[:, :, :, 0], lse_t[:, :, :, 0]
        o_b, lse_b = _prefix_forward(rows(q, H), k0, v0, key_ok, doc_ids, tile, qpos=positions)
        if S > 1:
            key_ok_b = None if key_ok is None else key_ok.gather(1, positions)  # a branch at a padding position
            qb = rows(q, H).unflatten(3, (n, S - 1))
            kb, vb = (t[:, :, L:].reshape(B, G, n, S - 1, P, D) for t in (k, v))
            o2, lse2 = branch_attention(qb, kb, vb, key_ok_b, steps_causal=True)
            ob1, lb1 = o_b.unflatten(3, (n, S - 1)), lse_b.unflatten(3, (n, S - 1))
            lse_m = torch.logaddexp(lb1, lse2)
            o_b = (torch.exp(lb1 - lse_m)[..., None] * ob1 + torch.exp(lse2 - lse_m)[..., None] * o2).flatten(3, 4)
            lse_b = lse_m.flatten(3, 4)
        o[:, :, :, first:], lse[:, :, :, first:] = o_b.flatten(3, 4), lse_b.flatten(3, 4)
        ctx.save_for_backward(q, k, v, o, lse, positions, key_ok, doc_ids)
        ctx.n, ctx.S, ctx.tile, ctx.first = n, S, tile, first
        return o.view(B, H, Nq, D).to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, positions, key_ok, doc_ids = ctx.saved_tensors
        n, S, tile, first = ctx.n, ctx.S, ctx.tile, ctx.first
        B, H, Nq, D = q.shape
        G, P = k.shape[1], positions.shape[1]
        L = subset_text_length(k.shape[2], n, S, P)
        h = H // G
        do = do.contiguous().view(B, G, h, Nq, D)
        qg = q.view(B, G, h, Nq, D)
        text = lambda t: t[:, :, :, :L].unsqueeze(3)  # (B, G, h, 1, L, ...)
        rows = lambda t: t[:, :, :, first:].unflatten(3, (n * (S - 1), P))
        k0, v0 = k[:, :, :L], v[:, :, :L]
        dq = torch.empty(qg.shape, dtype=_up(q).dtype, device=q.device)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dq_b, dk0, dv0 = _prefix_backward(rows(do), rows(qg), k0, v0, rows(o), rows(lse), key_ok, doc_ids, tile,
                                          qpos=positions)
        if first:  # the text row's queries too
            dq_t, dk0_t, dv0_t = _prefix_backward(text(do), text(qg), k0, v0, text(o), text(lse), key_ok, doc_ids, tile)
            dq[:, :, :, :L], dk0, dv0 = dq_t[:, :, :, 0], dk0 + dk0_t, dv0 + dv0_t
        dk[:, :, :L], dv[:, :, :L] = dk0, dv0
        if S > 1:
            key_ok_b = None if key_ok is None else key_ok.gather(1, positions)
            per_step = lambda t: rows(t).unflatten(3, (n, S - 1))
            kv_rows = lambda t: t[:, :, L:].unflatten(2, (n, S - 1, P))
            _own_branch_backward(per_step(qg), per_step(do), per_step(o), per_step(lse), dq_b.unflatten(3, (n, S - 1)),
                                 kv_rows(k), kv_rows(v), kv_rows(dk), kv_rows(dv), key_ok_b)
        dq[:, :, :, first:] = dq_b.flatten(3, 4)
        return dq.view(B, H, Nq, D).to(q.dtype), dk, dv, None, None, None, None, None, None, None


def _branch(t: torch.Tensor, n: int, S: int, dim: int, first: int = 1) -> torch.Tensor:
    """The thought rows of grid dim `dim` (rows first.., 1.. when the text row is there), split per copy and
    step: (..., R, ...) -> (..., n, S-1, ...). A view."""
    return t.narrow(dim, first, t.shape[dim] - first).unflatten(dim, (n, S - 1))


# --------------------------------------------------------------------------------------------------
# the rollout: one grid step's queries against the text K/V and a preallocated branch K/V buffer


def decode_step_attention(q, k0, v0, kb, vb, lengths: Optional[torch.Tensor] = None,
                          doc_ids: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Queries of grid step s (all copies) against the text and their own branch so far.

    q (B, H, n, P, D); k0, v0 (B, G, L, D) the text row; kb, vb (B, G, n, s, P, D) branch rows 1..s
    (the last one being the queries' own); positions (B, P) the thinking positions (None: all, P = L).
    Every backend shares this PyTorch path: it is no-grad rollout work whose cost is one causal pass over
    L keys per copy and thinking position. -> (B, H, n, P, D)
    """
    B, H, n, P, D = q.shape
    G, L = k0.shape[1], k0.shape[2]
    qg = q.view(B, G, H // G, n, P, D)
    key_ok = _key_ok(B, L, lengths, q.device)
    o1, lse1 = prefix_attention(qg, k0, v0, key_ok, doc_ids, qpos=positions)
    key_ok_b = key_ok if key_ok is None or positions is None else key_ok.gather(1, positions)
    o2, lse2 = branch_attention(qg.unsqueeze(4), kb, vb, key_ok_b, steps_causal=False)
    return merge(o1, lse1, o2.squeeze(4), lse2.squeeze(4)).to(q.dtype).view(B, H, n, P, D)


# --------------------------------------------------------------------------------------------------
# the two parts and their exact merge (fp32 inside)


def _key_ok(B, L, lengths, device):
    if lengths is None:
        return None
    return torch.arange(L, device=device)[None, :] < lengths.to(device)[:, None]  # (B, L)


def _up(x: torch.Tensor) -> torch.Tensor:
    """Accumulate in fp32, or fp64 when given fp64."""
    return x if x.dtype == torch.float64 else x.float()


def _safe_lse(scores: torch.Tensor):
    """Row log-sum-exp and probabilities that stay finite (and give finite gradients) for empty rows."""
    m = scores.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(scores - m)
    s = e.sum(-1, keepdim=True)
    p = e / s.clamp_min(1e-30)
    lse = (m + torch.log(s.clamp_min(1e-30))).squeeze(-1)
    return p, lse


def _prefix_allowed(qpos, n_keys, key_ok, doc_ids):
    """(B|1, queries, n_keys) bool: queries at text positions qpos (B|1, queries) against text keys [0, n_keys)."""
    allowed = torch.arange(n_keys, device=qpos.device)[None, None, :] <= qpos[:, :, None]
    if key_ok is not None:
        allowed = allowed & key_ok[:, None, :n_keys]
    if doc_ids is not None:
        q_doc = doc_ids.gather(1, qpos.expand(doc_ids.shape[0], -1))
        allowed = allowed & (q_doc[:, :, None] == doc_ids[:, None, :n_keys])
    return allowed


def _query_positions(L, qpos, device):
    """The text positions of the queries: qpos (B, P) for a subset, else 0..L-1 as (1, L)."""
    return torch.arange(L, device=device)[None] if qpos is None else qpos


def _flash_cpu(q, L, key_ok, doc_ids, qpos=None):
    """Whether PyTorch's fused CPU flash-attention kernels take the prefix part, and the additive mask they need
    (None: plain causal)."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        return False, None
    if key_ok is None and doc_ids is None and qpos is None:
        return True, None
    allowed = _prefix_allowed(_query_positions(L, qpos, q.device), L, key_ok, doc_ids)  # (B|1, Lq, L)
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    return True, mask[:, None]


def _tiles(q, tile):
    B, G, h, R, L, D = q.shape
    if tile is None:  # about 2^24 scores per tile
        tile = max(16, min(L, (1 << 24) // max(1, B * G * h * R * L)))
    return [(i0, min(L, i0 + tile)) for i0 in range(0, L, tile)]


def _tile_keys(qpos, i0, i1, L):
    """Text keys a query tile can see: up to its last position for the whole grid, all L for a subset."""
    return i1 if qpos is None else L


def _prefix_forward(q, k0, v0, key_ok=None, doc_ids=None, tile: Optional[int] = None, qpos=None):
    """Causal attention of every row's queries over the text row, no autograd.
    q (B, G, h, R, Lq, D); k0, v0 (B, G, L, D); qpos (B, Lq) the queries' text positions (None: Lq = L, 0..L-1)
    -> out (B, G, h, R, Lq, D) fp32 and lse (B, G, h, R, Lq) fp32."""
    B, G, h, R, Lq, D = q.shape
    L = k0.shape[2]
    flash, mask = _flash_cpu(q, L, key_ok, doc_ids, qpos)
    if flash and tile is None:  # heads (g, h, r) in that order: query head j uses kv head j // (h R)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.reshape(B, G * h * R, Lq, D), k0, v0, is_causal=mask is None, attn_mask=mask)
        return _up(out).view(B, G, h, R, Lq, D), _up(lse).view(B, G, h, R, Lq)
    scale = D ** -0.5
    out = q.new_empty(q.shape, dtype=_up(q).dtype)
    lse = q.new_empty(q.shape[:-1], dtype=_up(q).dtype)
    qpos_all = _query_positions(L, qpos, q.device)
    for i0, i1 in _tiles(q, tile):
        nk = _tile_keys(qpos, i0, i1, L)
        s = torch.einsum("bghrtd,bgjd->bghrtj", _up(q[..., i0:i1, :]), _up(k0[:, :, :nk])) * scale
        s = s.masked_fill(~_prefix_allowed(qpos_all[:, i0:i1], nk, key_ok, doc_ids)[:, None, None, None], float("-inf"))
        p, lse[..., i0:i1] = _safe_lse(s)
        out[..., i0:i1, :] = torch.einsum("bghrtj,bgjd->bghrtd", p, _up(v0[:, :, :nk]))
    return out, lse


def _prefix_backward(do, q, k0, v0, o, lse, key_ok=None, doc_ids=None, tile: Optional[int] = None, qpos=None):
    """Gradients of the prefix part from the (merged) output o and lse: -> dq (like q, fp32), dk0, dv0."""
    B, G, h, R, Lq, D = q.shape
    L = k0.shape[2]
    flash, mask = _flash_cpu(q, L, key_ok, doc_ids, qpos)
    if flash and tile is None:
        flat = lambda t: t.reshape(B, G * h * R, Lq, *t.shape[5:])
        dq, dk0, dv0 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            flat(do.to(q.dtype)), flat(q), k0, v0, flat(o.to(q.dtype)), flat(lse).to(_up(q).dtype), 0.0,
            mask is None, attn_mask=mask)  # do arrives in the output's dtype (fp32): the kernel wants q's
        return _up(dq).view(q.shape), dk0, dv0
    scale = D ** -0.5
    dq = torch.empty(q.shape, dtype=_up(q).dtype, device=q.device)
    dk0, dv0 = torch.zeros_like(_up(k0)), torch.zeros_like(_up(v0))
    delta = (_up(do) * _up(o)).sum(-1)  # (B, G, h, R, Lq)
    qpos_all = _query_positions(L, qpos, q.device)
    for i0, i1 in _tiles(q, tile):
        nk = _tile_keys(qpos, i0, i1, L)
        qt, dot = _up(q[..., i0:i1, :]), _up(do[..., i0:i1, :])
        s = torch.einsum("bghrtd,bgjd->bghrtj", qt, _up(k0[:, :, :nk])) * scale
        s = s.masked_fill(~_prefix_allowed(qpos_all[:, i0:i1], nk, key_ok, doc_ids)[:, None, None, None], float("-inf"))
        p = torch.exp(s - lse[..., i0:i1, None])
        dv0[:, :, :nk] += torch.einsum("bghrtj,bghrtd->bgjd", p, dot)
        ds = p * (torch.einsum("bghrtd,bgjd->bghrtj", dot, _up(v0[:, :, :nk])) - delta[..., i0:i1, None])
        dq[..., i0:i1, :] = torch.einsum("bghrtj,bgjd->bghrtd", ds, _up(k0[:, :, :nk])) * scale
        dk0[:, :, :nk] += torch.einsum("bghrtj,bghrtd->bgjd", ds, qt) * scale
    return dq, dk0.to(k0.dtype), dv0.to(v0.dtype)


def prefix_attention(q, k0, v0, key_ok=None, doc_ids=None, qpos=None):
    """Causal attention of every row's queries over the text row (no gradient: the rollout).
    q (B, G, h, R, Lq, D); k0, v0 (B, G, L, D); qpos (B, Lq) the queries' positions (None: 0..L-1)
    -> out (B, G, h, R, Lq, D) and lse (B, G, h, R, Lq), fp32."""
    return _prefix_forward(q, k0, v0, key_ok, doc_ids, qpos=qpos)


def _branch_scores(q, kb, key_ok, steps_causal):
    """Scaled scores of each query against its own branch keys, -inf where not visible: (..., Sq, L, Sk)."""
    D = q.shape[-1]
    s = torch.einsum("bghnsld,bgnrld->bghnslr", _up(q), _up(kb)) * D ** -0.5
    Sq, Sk = s.shape[4], s.shape[6]
    allowed = torch.ones(Sq, 1, Sk, dtype=torch.bool, device=q.device)
    if steps_causal:
        allowed = torch.arange(Sk, device=q.device)[None, None, :] <= torch.arange(Sq, device=q.device)[:, None, None]
    allowed = allowed[None]  # (1, Sq, 1|L, Sk)
    if key_ok is not None:
        allowed = allowed & key_ok[:, None, :, None]  # (B, Sq, L, Sk)
    return s.masked_fill(~allowed[:, None, None, None], float("-inf"))


def branch_attention(q, kb, vb, key_ok=None, steps_causal: bool = True):
    """Each query against its own branch keys at its own position.

    q (B, G, h, n, Sq, L, D); kb, vb (B, G, n, Sk, L, D). steps_causal: query step s (1-based) sees
    key steps r <= s (needs Sq == Sk); otherwise every key step is visible. A key at a padding
    position is masked. Returns out (B, G, h, n, Sq, L, D) and lse (B, G, h, n, Sq, L), fp32.
    """
    p, lse = _safe_lse(_branch_scores(q, kb, key_ok, steps_causal))
    return torch.einsum("bghnslr,bgnrld->bghnsld", p, _up(vb)), lse


def merge(o1, lse1, o2, lse2):
    """Exact combination of two attention parts over disjoint key sets, from their outputs and LSEs."""
    lse = torch.logaddexp(lse1, lse2)
    return torch.exp(lse1 - lse)[..., None] * o1 + torch.exp(lse2 - lse)[..., None] * o2
