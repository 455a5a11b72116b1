"""Fused Transformer-XL relative-position attention (NeMo ``rel_pos``, SPEC §6.4) in Triton.

Computes exactly ``rel_pos_attention_reference`` (nest_fast/encoder/attention.py) without ever writing an
O(T²) tensor: forward saves only the output and the per-row log-sum-exp.

Notation, per (batch b, head h), with qu = q + pos_bias_u, qv = q + pos_bias_v, P = p (2T-1 positions for the
relative distances T-1 … -(T-1), descending)::

    ac[i, j] = qu_i · k_j
    bd[i, j] = qv_i · P[T-1-i+j]          (the rel_shift of (qv Pᵀ), cut to T columns)
    s = (ac + bd) / sqrt(D);  keys j >= L (and rows i >= L) are masked;  out = dropout(softmax(s)) v

The rel_shift inside the kernel.  For a query block of rows [m0, m0+BLOCK) and a key block [n0, n0+BLOCK), the
positions used lie in a window of 2·BLOCK rows of P starting at r0 = T - m0 - BLOCK + n0:
``bd[i, j] = Z[i, j - i + BLOCK - 1]`` with ``Z = qv · P[r0 : r0 + 2·BLOCK]ᵀ``.  Z is computed as two halves
[BLOCK, BLOCK] and the skewed tile is taken with ``tl.gather`` (``_skew``).  While a program walks key blocks
for a fixed query block, the window moves by exactly BLOCK, so the upper half of one step is the lower half of
the next: the position term then costs one [BLOCK, D] x [D, BLOCK] product per tile, like the content term.

Backward (three reductions of the same recomputed tiles; no atomics, deterministic):

* ``_bwd_kv_kernel``  one program per key block, walking the query blocks: dK, dV (transposed [key, query]
  tiles, so P_dropᵀ and dSᵀ feed the products directly).
* ``_bwd_q_kernel``   one program per query block, walking the key blocks: dQ = dS·K + unskew(dS)·P_window and
  the column sums of both terms (the pos_bias_u / pos_bias_v gradients).
* ``_bwd_p_kernel``   one program per block diagonal (key block - query block = const), transposed tiles: every
  tile on a diagonal uses the same window of P, so dP for that window accumulates in registers.  Neighbouring
  diagonals' windows overlap by BLOCK rows; even and odd diagonals write to two fp32 buffers, summed after.

Masking (NeMo): masked keys get -10000 before the softmax and probability 0 after it.  The kernel leaves keys
j >= L out of the softmax (-inf), which is the same number whenever a valid score exceeds -9900 (the -10000
terms underflow to exactly 0 in fp32), and a fully padded query row gives exactly zero output (its stored
log-sum-exp is +inf, so its recomputed probabilities are 0 in backward).

Dropout: keep-mask from Philox keyed by a seed drawn from torch's generator (``torch.manual_seed`` makes it
reproducible) and counters (key j, query i, batch b, head h); backward regenerates the same mask.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from nest_fast import backend

_INTERPRET = backend.triton_interpret()

# -------------------------------------------------------------------------------------------------------------
# Autotune configs (BLOCK is both the query and the key block size).
# Keyed on the head dim and dropout (and, implicitly, the dtypes); under the interpreter one small config.
# -------------------------------------------------------------------------------------------------------------
# (chosen by compiling for sm_90: BLOCK 128 spills heavily; these keep spills at or near zero for D = 64)
GPU_FWD_CONFIGS = [
    triton.Config({"BLOCK": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK": 32}, num_warps=4, num_stages=3),
]
GPU_BWD_CONFIGS = [
    triton.Config({"BLOCK": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK": 32}, num_warps=4, num_stages=2),
]
if _INTERPRET:
    FWD_CONFIGS = BWD_CONFIGS = [triton.Config({"BLOCK": 16}, num_warps=1, num_stages=1)]
else:
    FWD_CONFIGS, BWD_CONFIGS = GPU_FWD_CONFIGS, GPU_BWD_CONFIGS


def _prune(configs, named_args, **kwargs):
    """fp32 inputs (3xTF32 products) need about twice the registers: only the 32-blocks keep spills small."""
    if kwargs.get("PREC", "tf32") == "tf32":
        return configs
    return [c for c in configs if c.kwargs["BLOCK"] <= 32] or configs


POS_PAD = 128  # the dP buffers hold positions r in [-POS_PAD, 2T + POS_PAD): every window for BLOCK <= 128


# -------------------------------------------------------------------------------------------------------------
# Shared device helpers
# -------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(ptr, rows, stride, n_rows, D: tl.constexpr, DP: tl.constexpr):
    """[len(rows), DP] tile of a row-major (last stride 1) matrix; zero outside rows [0, n_rows), cols [0, D)."""
    cols = tl.arange(0, DP)
    mask = (rows[:, None] >= 0) & (rows[:, None] < n_rows) & (cols[None, :] < D)
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, x, rows, stride, n_rows, D: tl.constexpr, DP: tl.constexpr):
    cols = tl.arange(0, DP)
    mask = (rows[:, None] >= 0) & (rows[:, None] < n_rows) & (cols[None, :] < D)
    tl.store(ptr + rows[:, None] * stride + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_q_biased(Q, U, Vb, rows, stride, T, D: tl.constexpr, DP: tl.constexpr):
    """(q + pos_bias_u, q + pos_bias_v) for the given rows, added in fp32 and rounded to q's dtype."""
    q = _load_rows(Q, rows, stride, T, D, DP).to(tl.float32)
    cols = tl.arange(0, DP)
    u = tl.load(U + cols, mask=cols < D, other=0.0).to(tl.float32)
    vb = tl.load(Vb + cols, mask=cols < D, other=0.0).to(tl.float32)
    dt = Q.dtype.element_ty
    return (q + u[None, :]).to(dt), (q + vb[None, :]).to(dt)


@triton.jit
def _skew(z_lo, z_hi, BLOCK: tl.constexpr, AXIS: tl.constexpr):
    """rel_shift of one tile.  With AXIS=1 (tile [query i, key j]): out[i, j] = Z[i, j - i + BLOCK - 1] for the
    window Z = [z_lo | z_hi] (2·BLOCK positions along axis 1); AXIS=0 is the transposed tile ([key j, query i],
    window along axis 0).

    Row i needs window entries [BLOCK-1-i, 2·BLOCK-1-i): entries c >= BLOCK-1-i of z_lo and c < BLOCK-1-i of
    z_hi, disjoint, so one elementwise select packs them into one tile and one gather rotates row i by i + 1:
    out[i, j] = packed[i, (j - i - 1) mod BLOCK]."""
    r = tl.arange(0, BLOCK)
    if AXIS == 1:
        i, c = r[:, None], r[None, :]
    else:
        i, c = r[None, :], r[:, None]
    packed = tl.where(c + i >= BLOCK - 1, z_lo, z_hi)
    return tl.gather(packed, (c - i - 1) & (BLOCK - 1), AXIS)


@triton.jit
def _unskew(ds, BLOCK: tl.constexpr, AXIS: tl.constexpr):
    """Adjoint of ``_skew``: the window-form halves (lo, hi) of a score-gradient tile.  For AXIS=1,
    lo[i, w] = ds[i, w + i - BLOCK + 1] where w + i >= BLOCK - 1 and hi[i, w] = ds[i, w + i + 1] elsewhere:
    both are column (w + i + 1) mod BLOCK, so again one gather.  AXIS=0 is the transposed tile."""
    r = tl.arange(0, BLOCK)
    if AXIS == 1:
        i, w = r[:, None], r[None, :]
    else:
        i, w = r[None, :], r[:, None]
    g = tl.gather(ds, (w + i + 1) & (BLOCK - 1), AXIS)
    in_lo = w + i >= BLOCK - 1
    return tl.where(in_lo, g, 0.0), tl.where(in_lo, 0.0, g)


@triton.jit
def _keep(seed, b, h, i, j, dropout_p):
    """Dropout keep-mask for score entries (query i, key j) of (b, h), i and j broadcastable index tensors:
    uniform(Philox(seed; j, i, b, h)) >= p, the same in either tile orientation."""
    zero = i * 0 + j * 0
    r, _, _, _ = tl.philox(seed, zero + j, zero + i, zero + b, zero + h)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _dropout_mask_kernel(SEED, KEEP, H, T, dropout_p, BLOCK: tl.constexpr):
    """Writes the [B, H, T, T] keep-mask (tests only: lets the reference reproduce the kernel's dropout)."""
    pid_m, pid_n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i = (pid_m * BLOCK + tl.arange(0, BLOCK))[:, None]
    j = (pid_n * BLOCK + tl.arange(0, BLOCK))[None, :]
    keep = _keep(tl.load(SEED), bh // H, bh % H, i, j, dropout_p)
    tl.store(KEEP + bh.to(tl.int64) * T * T + i * T + j, keep.to(tl.int8), mask=(i < T) & (j < T))


# -------------------------------------------------------------------------------------------------------------
# Forward
# -------------------------------------------------------------------------------------------------------------
@triton.autotune(configs=FWD_CONFIGS, key=["D", "HAS_DROPOUT"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _fwd_kernel(Q, K, V, P, U, Vb, LEN, SEED, OUT, LSE,
                s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_pt, s_ph, s_ob, s_ot, s_oh,
                H, T, qk_scale, dropout_p,
                D: tl.constexpr, DP: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (query block, b·h): online softmax over the key blocks < L."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    L = tl.load(LEN + b)
    K += b.to(tl.int64) * s_kb + h * s_kh
    V += b.to(tl.int64) * s_vb + h * s_vh
    P += h * s_ph
    m0 = pid_m * BLOCK
    blk = tl.arange(0, BLOCK)
    rows = m0 + blk
    qu, qv = _load_q_biased(Q + b.to(tl.int64) * s_qb + h * s_qh, U + h * D, Vb + h * D, rows, s_qt, T, D, DP)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, DP], tl.float32)
    r0 = T - m0 - BLOCK  # the window of key block n0 is P[r0 + n0 : r0 + n0 + 2·BLOCK]
    z_prev = tl.dot(qv, tl.trans(_load_rows(P, r0 + blk, s_pt, 2 * T - 1, D, DP)), input_precision=PREC)
    n_end = tl.where(m0 < L, L, 0)  # a fully padded query block visits no keys
    for n0 in range(0, n_end, BLOCK):
        cols = n0 + blk
        k = _load_rows(K, cols, s_kt, T, D, DP)
        v = _load_rows(V, cols, s_vt, T, D, DP)
        # the window slides by BLOCK: its lower half is the previous step's upper half
        z_next = tl.dot(qv, tl.trans(_load_rows(P, r0 + n0 + BLOCK + blk, s_pt, 2 * T - 1, D, DP)),
                        input_precision=PREC)
        s = tl.dot(qu, tl.trans(k), _skew(z_prev, z_next, BLOCK, 1), input_precision=PREC)  # ac + bd
        s = tl.where(cols[None, :] < L, s * qk_scale, float("-inf"))  # log2 domain
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        if HAS_DROPOUT:
            pr = tl.where(_keep(seed, b, h, rows[:, None], cols[None, :], dropout_p), pr / (1.0 - dropout_p), 0.0)
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
        z_prev = z_next
    valid = rows < L
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    _store_rows(OUT + b.to(tl.int64) * s_ob + h * s_oh, tl.where(valid[:, None], acc / l_safe[:, None], 0.0),
                rows, s_ot, T, D, DP)
    lse = tl.where(valid, m_i + tl.log2(l_safe), float("inf"))  # +inf: padded rows recompute to p = 0
    tl.store(LSE + bh.to(tl.int64) * T + rows, lse, mask=rows < T)


# -------------------------------------------------------------------------------------------------------------
# Backward
# -------------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess(OUT, DO, DELTA, s_ob, s_ot, s_oh, s_db, s_dt, s_dh, H, T,
                    D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr):
    """delta_i = rowsum(dO_i * O_i) (= sum_j P_ij dP_ij, also with dropout)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    o = _load_rows(OUT + b.to(tl.int64) * s_ob + h * s_oh, rows, s_ot, T, D, DP).to(tl.float32)
    do = _load_rows(DO + b.to(tl.int64) * s_db + h * s_dh, rows, s_dt, T, D, DP).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + rows, tl.sum(o * do, 1), mask=rows < T)


@triton.jit
def _load_row_stats(DO, LSE, DELTA, rows, s_dt, bh, T, D: tl.constexpr, DP: tl.constexpr):
    do = _load_rows(DO, rows, s_dt, T, D, DP)
    lse = tl.load(LSE + bh.to(tl.int64) * T + rows, mask=rows < T, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    return do, lse, delta


@triton.jit
def _bwd_tile(qu, do, lse, delta, k, v, bd, rows, cols, L, seed, b, h, qk_scale, sm_scale, dropout_p,
              HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr, TRANS: tl.constexpr):
    """Recomputes one tile from its skewed position term ``bd``: returns (p_drop, ds), p_drop the (dropped)
    probabilities that multiply V and ds = dL/d(ac) = dL/d(bd) (softmax scale included).
    TRANS=False: tiles are [query, key]; TRANS=True: [key, query] (what dK/dV and dP consume directly)."""
    if TRANS:
        i, j = rows[None, :], cols[:, None]
        s = tl.dot(k, tl.trans(qu), bd, input_precision=PREC)
        dp = tl.dot(v, tl.trans(do), input_precision=PREC)
        lse, delta = lse[None, :], delta[None, :]
    else:
        i, j = rows[:, None], cols[None, :]
        s = tl.dot(qu, tl.trans(k), bd, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        lse, delta = lse[:, None], delta[:, None]
    pr = tl.exp2(tl.where(j < L, s * qk_scale, float("-inf")) - lse)
    if HAS_DROPOUT:
        keep = _keep(seed, b, h, i, j, dropout_p)
        p_drop = tl.where(keep, pr / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    else:
        p_drop = pr
    return p_drop, pr * (dp - delta) * sm_scale


@triton.autotune(configs=BWD_CONFIGS, key=["D", "HAS_DROPOUT"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_kv_kernel(Q, K, V, P, U, Vb, DO, LSE, DELTA, LEN, SEED, DK, DV,
                   s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_pt, s_ph, s_db, s_dt, s_dh,
                   H, T, qk_scale, sm_scale, dropout_p,
                   D: tl.constexpr, DP: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
                   BLOCK: tl.constexpr):
    """One program per key block (transposed [key, query] tiles): walks the query blocks < L,
    dV += P_dropᵀ·dO and dK += dSᵀ·qu."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    L = tl.load(LEN + b)
    Q += b.to(tl.int64) * s_qb + h * s_qh
    DO += b.to(tl.int64) * s_db + h * s_dh
    P += h * s_ph
    n0 = pid_n * BLOCK
    blk = tl.arange(0, BLOCK)
    cols = n0 + blk
    k = _load_rows(K + b.to(tl.int64) * s_kb + h * s_kh, cols, s_kt, T, D, DP)
    v = _load_rows(V + b.to(tl.int64) * s_vb + h * s_vh, cols, s_vt, T, D, DP)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    dk = tl.zeros([BLOCK, DP], tl.float32)
    dv = tl.zeros([BLOCK, DP], tl.float32)
    m_end = tl.where(n0 < L, L, 0)  # padded keys get zero gradient
    for m0 in range(0, m_end, BLOCK):
        rows = m0 + blk
        qu, qv = _load_q_biased(Q, U + h * D, Vb + h * D, rows, s_qt, T, D, DP)
        do, lse, delta = _load_row_stats(DO, LSE, DELTA, rows, s_dt, bh, T, D, DP)
        r0 = T - m0 - BLOCK + n0
        zt_lo = tl.dot(_load_rows(P, r0 + blk, s_pt, 2 * T - 1, D, DP), tl.trans(qv), input_precision=PREC)
        zt_hi = tl.dot(_load_rows(P, r0 + BLOCK + blk, s_pt, 2 * T - 1, D, DP), tl.trans(qv), input_precision=PREC)
        pt_drop, dst = _bwd_tile(qu, do, lse, delta, k, v, _skew(zt_lo, zt_hi, BLOCK, 0), rows, cols, L, seed, b,
                                 h, qk_scale, sm_scale, dropout_p, HAS_DROPOUT, PREC, True)
        dv += tl.dot(pt_drop.to(do.dtype), do, input_precision=PREC)
        dk += tl.dot(dst.to(qu.dtype), qu, input_precision=PREC)
    _store_rows(DK + b.to(tl.int64) * s_kb + h * s_kh, dk, cols, s_kt, T, D, DP)
    _store_rows(DV + b.to(tl.int64) * s_vb + h * s_vh, dv, cols, s_vt, T, D, DP)


@triton.autotune(configs=BWD_CONFIGS, key=["D", "HAS_DROPOUT"], reset_to_zero=["DBIAS"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_q_kernel(Q, K, V, P, U, Vb, DO, LSE, DELTA, LEN, SEED, DQ, DBIAS,
                  s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_pt, s_ph, s_db, s_dt, s_dh,
                  H, T, qk_scale, sm_scale, dropout_p,
                  D: tl.constexpr, DP: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
                  BLOCK: tl.constexpr):
    """One program per query block: walks the key blocks < L, dQ = dS·K + unskew(dS)·P_window; writes the
    block's column sums of both terms to DBIAS[2, B, n_blocks, H, D] (the pos_bias_u / pos_bias_v gradients).
    (Carrying the window's upper half to the next step, as the forward does, would save two of the seven
    products per tile but costs 64 more live fp32 registers per thread: it spilled.)"""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    L = tl.load(LEN + b)
    K += b.to(tl.int64) * s_kb + h * s_kh
    V += b.to(tl.int64) * s_vb + h * s_vh
    P += h * s_ph
    m0 = pid_m * BLOCK
    blk = tl.arange(0, BLOCK)
    rows = m0 + blk
    qu, qv = _load_q_biased(Q + b.to(tl.int64) * s_qb + h * s_qh, U + h * D, Vb + h * D, rows, s_qt, T, D, DP)
    do, lse, delta = _load_row_stats(DO + b.to(tl.int64) * s_db + h * s_dh, LSE, DELTA, rows, s_dt, bh, T, D, DP)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    dq_u = tl.zeros([BLOCK, DP], tl.float32)
    dq_v = tl.zeros([BLOCK, DP], tl.float32)
    r0 = T - m0 - BLOCK
    n_end = tl.where(m0 < L, L, 0)
    for n0 in range(0, n_end, BLOCK):
        cols = n0 + blk
        k = _load_rows(K, cols, s_kt, T, D, DP)
        v = _load_rows(V, cols, s_vt, T, D, DP)
        p_lo = _load_rows(P, r0 + n0 + blk, s_pt, 2 * T - 1, D, DP)
        p_hi = _load_rows(P, r0 + n0 + BLOCK + blk, s_pt, 2 * T - 1, D, DP)
        z_lo = tl.dot(qv, tl.trans(p_lo), input_precision=PREC)
        z_hi = tl.dot(qv, tl.trans(p_hi), input_precision=PREC)
        _, ds = _bwd_tile(qu, do, lse, delta, k, v, _skew(z_lo, z_hi, BLOCK, 1), rows, cols, L, seed, b, h,
                          qk_scale, sm_scale, dropout_p, HAS_DROPOUT, PREC, False)
        dq_u += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        w_lo, w_hi = _unskew(ds, BLOCK, 1)
        dq_v += tl.dot(w_lo.to(p_lo.dtype), p_lo, input_precision=PREC)
        dq_v += tl.dot(w_hi.to(p_hi.dtype), p_hi, input_precision=PREC)
    _store_rows(DQ + b.to(tl.int64) * s_qb + h * s_qh, dq_u + dq_v, rows, s_qt, T, D, DP)
    d = tl.arange(0, DP)
    n_blocks = tl.num_programs(0)
    part = DBIAS + ((b.to(tl.int64) * n_blocks + pid_m) * H + h) * D + d
    tl.store(part, tl.sum(dq_u, 0), mask=d < D)
    tl.store(part + tl.num_programs(1) * n_blocks * D, tl.sum(dq_v, 0), mask=d < D)


@triton.autotune(configs=BWD_CONFIGS, key=["D", "HAS_DROPOUT"], reset_to_zero=["DPBUF"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_p_kernel(Q, K, V, P, U, Vb, DO, LSE, DELTA, LEN, SEED, DPBUF,
                  s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_pt, s_ph, s_db, s_dt, s_dh,
                  s_buf_par, s_buf_chunk, s_buf_r,
                  B, H, T, B_PER_PROG, qk_scale, sm_scale, dropout_p,
                  D: tl.constexpr, DP: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
                  POS_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per (block diagonal, head, batch chunk), transposed tiles: all tiles (m0, m0 + d·BLOCK) of
    a diagonal share the window P[r0 : r0 + 2·BLOCK], r0 = T - BLOCK + d·BLOCK, so
    dP_window = Σ unskew(dS)ᵀ·qv stays in registers.  Written to DPBUF[diagonal parity, chunk, r + POS_PAD, h]
    (fp32; neighbouring diagonals' windows overlap by BLOCK rows); the caller sums parities and chunks."""
    pid_d, h, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    diag = pid_d - (tl.cdiv(T, BLOCK) - 1)  # key block - query block
    blk = tl.arange(0, BLOCK)
    r0 = T - BLOCK + diag * BLOCK
    P += h * s_ph
    p_lo = _load_rows(P, r0 + blk, s_pt, 2 * T - 1, D, DP)
    p_hi = _load_rows(P, r0 + BLOCK + blk, s_pt, 2 * T - 1, D, DP)
    acc_lo = tl.zeros([BLOCK, DP], tl.float32)
    acc_hi = tl.zeros([BLOCK, DP], tl.float32)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    for b in range(chunk * B_PER_PROG, tl.minimum(chunk * B_PER_PROG + B_PER_PROG, B)):
        L = tl.load(LEN + b)
        bh = b * H + h
        b64 = tl.cast(b, tl.int64)
        # tiles with 0 <= m0 < L and 0 <= m0 + diag·BLOCK < L
        for mb in range(tl.maximum(-diag, 0), tl.cdiv(L - tl.maximum(diag, 0) * BLOCK, BLOCK)):
            rows = mb * BLOCK + blk
            cols = rows + diag * BLOCK
            qu, qv = _load_q_biased(Q + b64 * s_qb + h * s_qh, U + h * D, Vb + h * D, rows, s_qt, T, D, DP)
            do, lse, delta = _load_row_stats(DO + b64 * s_db + h * s_dh, LSE, DELTA, rows, s_dt, bh, T, D, DP)
            k = _load_rows(K + b64 * s_kb + h * s_kh, cols, s_kt, T, D, DP)
            v = _load_rows(V + b64 * s_vb + h * s_vh, cols, s_vt, T, D, DP)
            zt_lo = tl.dot(p_lo, tl.trans(qv), input_precision=PREC)
            zt_hi = tl.dot(p_hi, tl.trans(qv), input_precision=PREC)
            _, dst = _bwd_tile(qu, do, lse, delta, k, v, _skew(zt_lo, zt_hi, BLOCK, 0), rows, cols, L, seed, b, h,
                               qk_scale, sm_scale, dropout_p, HAS_DROPOUT, PREC, True)
            wt_lo, wt_hi = _unskew(dst, BLOCK, 0)
            acc_lo += tl.dot(wt_lo.to(qv.dtype), qv, input_precision=PREC)
            acc_hi += tl.dot(wt_hi.to(qv.dtype), qv, input_precision=PREC)
    out = DPBUF + (pid_d % 2) * s_buf_par + chunk * s_buf_chunk + h * D
    pos = r0 + POS_PAD + blk
    _store_rows(out, acc_lo, pos, s_buf_r, 2 * T + 2 * POS_PAD, D, DP)
    _store_rows(out, acc_hi, pos + BLOCK, s_buf_r, 2 * T + 2 * POS_PAD, D, DP)


# -------------------------------------------------------------------------------------------------------------
# Host side: launchers
# -------------------------------------------------------------------------------------------------------------
_MIN_BLOCK = min(c.kwargs["BLOCK"] for c in FWD_CONFIGS + BWD_CONFIGS)


def _head_pad(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())


def _prec(dtype: torch.dtype) -> str:
    """Products of 16-bit inputs are exact on tensor cores.  fp32 inputs: 3xTF32 on the GPU (fp32-level error,
    like the reference's fp32 matmul; plain FMA "ieee" products spilled kilobytes of registers), exact
    "ieee" under the interpreter."""
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit inputs
    return "ieee" if _INTERPRET else "tf32x3"


def _rows_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _bth(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _forward(q, k, v, p, u, vb, lengths, seed, dropout_p):
    B, T, H, D = q.shape
    q, k, v, p = (_rows_contig(x) for x in (q, k, v, p))
    u, vb = u.contiguous(), vb.contiguous()
    out = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    has_dropout = seed is not None and dropout_p > 0.0
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK"]), B * H)  # noqa: E731
    _fwd_kernel[grid](q, k, v, p, u, vb, lengths, seed if has_dropout else lengths, out, lse,
                      *_bth(q), *_bth(k), *_bth(v), p.stride(0), p.stride(1), *_bth(out),
                      H, T, math.log2(math.e) / math.sqrt(D), float(dropout_p),
                      D=D, DP=_head_pad(D), HAS_DROPOUT=has_dropout, PREC=_prec(q.dtype))
    return out, lse


def _backward(do, q, k, v, p, u, vb, out, lse, lengths, seed, dropout_p):
    B, T, H, D = q.shape
    dev = q.device
    q, k, v, p, do = (_rows_contig(x) for x in (q, k, v, p, do))
    u, vb = u.contiguous(), vb.contiguous()
    dq = torch.empty((B, T, H, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, T, H, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, T, H, D), dtype=v.dtype, device=dev)
    if dq.numel() == 0:
        return dq, dk, dv, torch.zeros_like(p), torch.zeros_like(u), torch.zeros_like(vb)
    DP = _head_pad(D)
    has_dropout = seed is not None and dropout_p > 0.0
    seed = seed if has_dropout else lengths
    prec = _prec(q.dtype)
    qk_scale, sm_scale = math.log2(math.e) / math.sqrt(D), 1.0 / math.sqrt(D)
    strides = (*_bth(q), *_bth(k), *_bth(v), p.stride(0), p.stride(1), *_bth(do))

    delta = torch.empty((B, H, T), dtype=torch.float32, device=dev)
    _bwd_preprocess[(triton.cdiv(T, _MIN_BLOCK), B * H)](out, do, delta, *_bth(out), *_bth(do), H, T,
                                                          D=D, DP=DP, BLOCK=_MIN_BLOCK)
    common = (H, T, qk_scale, sm_scale, float(dropout_p))
    meta = dict(D=D, DP=DP, HAS_DROPOUT=has_dropout, PREC=prec)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK"]), B * H)  # noqa: E731
    _bwd_kv_kernel[grid](q, k, v, p, u, vb, do, lse, delta, lengths, seed, dk, dv, *strides, *common, **meta)

    dbias = torch.zeros((2, B, triton.cdiv(T, _MIN_BLOCK), H, D), dtype=torch.float32, device=dev)
    _bwd_q_kernel[grid](q, k, v, p, u, vb, do, lse, delta, lengths, seed, dq, dbias, *strides, *common, **meta)

    # dP: one program per (block diagonal, head, batch chunk); enough chunks to fill the GPU at small T
    chunks = max(1, min(B, triton.cdiv(2 * _num_sms(dev), (2 * triton.cdiv(T, 64) - 1) * H)))
    b_per_prog = triton.cdiv(B, chunks)
    chunks = triton.cdiv(B, b_per_prog)
    dpbuf = torch.zeros((2, chunks, 2 * T + 2 * POS_PAD, H, D), dtype=torch.float32, device=dev)
    grid_p = lambda meta: (2 * triton.cdiv(T, meta["BLOCK"]) - 1, H, chunks)  # noqa: E731
    _bwd_p_kernel[grid_p](q, k, v, p, u, vb, do, lse, delta, lengths, seed, dpbuf, *strides,
                          dpbuf.stride(0), dpbuf.stride(1), dpbuf.stride(2),
                          B, H, T, b_per_prog, qk_scale, sm_scale, float(dropout_p), POS_PAD=POS_PAD, **meta)
    dp = dpbuf.sum((0, 1))[POS_PAD: POS_PAD + 2 * T - 1].to(p.dtype)
    du, dvb = dbias[0].sum((0, 1)).to(u.dtype), dbias[1].sum((0, 1)).to(vb.dtype)
    return dq, dk, dv, dp, du, dvb


def draw_seed(device) -> torch.Tensor:
    """The dropout seed: one draw from torch's generator of ``device`` (so ``torch.manual_seed`` reproduces
    it), kept on the device (no host sync) and read by the kernels."""
    return torch.randint(0, 2 ** 62, (1,), device=device, dtype=torch.int64)


def dropout_keep_mask(seed: torch.Tensor, B: int, H: int, T: int, dropout_p: float) -> torch.Tensor:
    """The [B, H, T, T] bool keep-mask the kernels use for ``seed`` (for tests: reproduce it in the reference)."""
    keep = torch.empty((B, H, T, T), dtype=torch.int8, device=seed.device)
    blk = _MIN_BLOCK
    _dropout_mask_kernel[(triton.cdiv(T, blk), triton.cdiv(T, blk), B * H)](seed, keep, H, T, float(dropout_p),
                                                                           BLOCK=blk)
    return keep.bool()


# -------------------------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile: no graph break) + autograd
# -------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("nest_fast::rel_pos_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor, pos_bias_u: torch.Tensor,
            pos_bias_v: torch.Tensor, lengths: torch.Tensor, seed: Optional[torch.Tensor],
            dropout_p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, p, pos_bias_u, pos_bias_v, lengths, seed, dropout_p)


@_fwd_op.register_fake
def _(q, k, v, p, pos_bias_u, pos_bias_v, lengths, seed, dropout_p):
    B, T, H, D = q.shape
    return q.new_empty((B, T, H, D)), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("nest_fast::rel_pos_attention_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor,
            pos_bias_u: torch.Tensor, pos_bias_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
            lengths: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, q, k, v, p, pos_bias_u, pos_bias_v, out, lse, lengths, seed, dropout_p)


@_bwd_op.register_fake
def _(grad_out, q, k, v, p, pos_bias_u, pos_bias_v, out, lse, lengths, seed, dropout_p):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), p.new_empty(p.shape),
            pos_bias_u.new_empty(pos_bias_u.shape), pos_bias_v.new_empty(pos_bias_v.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, p, pos_bias_u, pos_bias_v, lengths, seed, dropout_p = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, p, pos_bias_u, pos_bias_v, out, lse, lengths, seed)
    ctx.dropout_p = dropout_p


def _autograd_backward(ctx, grad_out, grad_lse):
    q, k, v, p, pos_bias_u, pos_bias_v, out, lse, lengths, seed = ctx.saved_tensors
    grads = torch.ops.nest_fast.rel_pos_attention_bwd(grad_out, q, k, v, p, pos_bias_u, pos_bias_v, out, lse,
                                                      lengths, seed, ctx.dropout_p)
    return (*grads, None, None, None)


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# -------------------------------------------------------------------------------------------------------------
# Entry point (nest_fast.backend maps "rel_pos_attention" here)
# -------------------------------------------------------------------------------------------------------------
def rel_pos_attention_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor,
                           pos_bias_u: torch.Tensor, pos_bias_v: torch.Tensor,
                           lengths: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                           training: bool = False, att_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Same signature and result as ``rel_pos_attention_reference``; the mask comes from ``lengths`` (an
    ``att_mask`` passed alongside is assumed to be derived from them, as the encoder does)."""
    if lengths is None and att_mask is not None:
        raise ValueError("rel_pos_attention_fast needs `lengths`; an arbitrary att_mask is not supported "
                         "(use the reference backend)")
    B, T, H, D = q.shape
    if p.dim() == 4:
        p = p.squeeze(0)
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.int32, device=q.device)
    else:
        lengths = lengths.to(device=q.device).clamp(0, T).to(torch.int32)
    seed = draw_seed(q.device) if training and dropout_p > 0.0 else None
    out, _ = torch.ops.nest_fast.rel_pos_attention_fwd(q, k, v, p, pos_bias_u, pos_bias_v, lengths, seed,
                                                       float(dropout_p) if seed is not None else 0.0)
    return out


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(q, k, v, p, pos_bias_u, pos_bias_v, lengths=None, dropout_p: float = 0.0, training: bool = False,
             att_mask=None) -> bool:
    """Whether the kernel handles these arguments (else the backend runs the reference)."""
    tensors = (q, k, v, p, pos_bias_u, pos_bias_v)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    if lengths is None and att_mask is not None:
        return False  # an arbitrary mask: only the reference handles it
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        return False
    B, T, H, D = q.shape
    if tuple(p.shape[-3:]) != (2 * T - 1, H, D) or p.dim() not in (3, 4) or (p.dim() == 4 and p.size(0) != 1):
        return False
    if tuple(pos_bias_u.shape) != (H, D) or tuple(pos_bias_v.shape) != (H, D):
        return False
    if q.dtype not in _DTYPES or any(t.dtype != q.dtype for t in (k, v, p)):
        return False
    if not (pos_bias_u.is_floating_point() and pos_bias_v.is_floating_point()):
        return False
    if D > 128 or T < 1 or B < 1:
        return False
    # in-kernel row offsets are int32 (batch offsets int64): row index x row stride must fit
    if max(q.stride(1), k.stride(1), v.stride(1), p.stride(-3), H * D) * (2 * T + 2 * POS_PAD) >= 2 ** 31:
        return False
    if training and not (0.0 <= dropout_p < 1.0):
        return False
    if lengths is not None and (not isinstance(lengths, torch.Tensor) or lengths.dim() != 1
                                or lengths.size(0) != B or lengths.is_floating_point()):
        return False
    device = q.device
    if any(t.device != device for t in tensors):
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and backend.triton_interpret()


rel_pos_attention_fast.supports = supports
