"""Fused Conformer convolution module (SPEC §6.4): GLU → pad mask → depthwise conv → BatchNorm → Swish.

``conv_module_fast(module, x, pad_mask)`` has the signature of ``conv_module_reference``. The two pointwise
convolutions stay GEMMs (``F.linear`` on the [B,T,C] layout, no transposes); everything between them runs in
Triton kernels on the [B,T,*] layout (channels contiguous, time shifts = row shifts):

forward (memory passes in units of one [B,T,C] tensor, ``C`` = d_model)
  1. ``_glu_mask_kernel``   h[B,T,2C] -> g = a*sigmoid(gate), zeroed at padded frames        (read 2, write 1)
  2. ``_conv_stats_kernel`` (training BN only) per-program Welford/Chan partials of u = dwconv(g)   (read 1)
     ``_bn_finalize_kernel`` combines the partials (Chan), folds BN into a per-channel scale/shift, updates
     the running stats in place (momentum or cumulative average, unbiased variance)
  3. ``_apply_kernel``      z = silu(u*A + B) with u = dwconv(g)                              (read 1, write 1)
  In eval mode step 2 is only ``_bn_finalize_kernel`` reading the running stats (BN folded into the conv).
backward
  4. ``_bwd_dy_kernel``     recompute u, o; do = dz*silu'(o); per-channel sums of do and do*(u-mean) and/or
                            dy = dL/du (BN backward needs the global sums first, so training BN runs it twice:
                            sums pass, then dy pass)                                           (read 2, write 1)
  5. ``_bwd_glu_kernel``    dg = dwconv^T(dy), masked; GLU backward -> dh; partial dW, db      (read 3, write 2)

BatchNorm statistics: per-program centred partials (mean, M2) in fp32 are merged with Chan's formula, so the
variance does not suffer from E[x^2]-E[x]^2 cancellation. With ``nn.SyncBatchNorm`` in training under an
initialised process group of size > 1, each rank's (mean, M2, count) is all-gathered and merged the same way
(what SyncBatchNorm computes); in backward the two per-channel gradient sums are all-reduced (as SyncBatchNorm
does), while the returned dgamma/dbeta stay rank-local (DDP averages them, exactly like SyncBatchNorm's).

Every kernel is wrapped in a ``torch.library.custom_op`` (namespace ``nest_fast``, prefix ``conv_module_``) with
a fake implementation, so ``torch.compile`` sees opaque ops; autograd is a ``torch.autograd.Function`` over
those ops. Accumulation is fp32 for fp32/fp16/bf16 inputs; g, z, dy and dh are stored in the input dtype.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import triton
import triton.language as tl

from nest_fast import backend as _backend

__all__ = ["conv_module_fast", "conv_module_mid"]


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _dwconv_tile(g_base, w_ptr, rows, cols, cmask, T, C, K: tl.constexpr, PL: tl.constexpr,
                 BT: tl.constexpr, BC: tl.constexpr):
    """u[t, c] = sum_j w[c, j] * g[t + j - PL, c] (zero outside [0, T)), fp32, for a [BT, BC] tile."""
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(K):
        src = rows + (j - PL)
        smask = (src >= 0) & (src < T)
        x = tl.load(g_base + src[:, None].to(tl.int64) * C + cols[None, :],
                    mask=smask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        wj = tl.load(w_ptr + cols * K + j, mask=cmask, other=0.0)
        acc += x * wj[None, :]
    return acc


@triton.jit
def _glu_mask_kernel(h_ptr, m_ptr, g_ptr, T, C, n_chunks, CHUNK,
                     HAS_MASK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // n_chunks
    t_begin = (pid % n_chunks) * CHUNK
    t_end = tl.minimum(t_begin + CHUNK, T)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < C
    h_base = h_ptr + b.to(tl.int64) * T * (2 * C)
    g_base = g_ptr + b.to(tl.int64) * T * C
    for t0 in range(t_begin, t_end, BT):
        rows = t0 + tl.arange(0, BT)
        rmask = rows < t_end
        mask2 = rmask[:, None] & cmask[None, :]
        hoff = rows[:, None].to(tl.int64) * (2 * C) + cols[None, :]
        a = tl.load(h_base + hoff, mask=mask2, other=0.0).to(tl.float32)
        gate = tl.load(h_base + hoff + C, mask=mask2, other=0.0).to(tl.float32)
        g = a * tl.sigmoid(gate)
        if HAS_MASK:
            pad = tl.load(m_ptr + b.to(tl.int64) * T + rows, mask=rmask, other=0)
            g = tl.where(pad[:, None] != 0, 0.0, g)
        tl.store(g_base + rows[:, None].to(tl.int64) * C + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _conv_stats_kernel(g_ptr, w_ptr, pmean_ptr, pm2_ptr, T, C, n_chunks, CHUNK,
                       K: tl.constexpr, PL: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Per program: mean and centred M2 of u = dwconv(g) over its rows, merged tile by tile (Chan)."""
    pid = tl.program_id(0)
    b = pid // n_chunks
    t_begin = (pid % n_chunks) * CHUNK
    t_end = tl.minimum(t_begin + CHUNK, T)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < C
    g_base = g_ptr + b.to(tl.int64) * T * C
    n = tl.zeros([BC], dtype=tl.float32)  # row count (same in every lane; a vector keeps loop types simple)
    mean = tl.zeros([BC], dtype=tl.float32)
    m2 = tl.zeros([BC], dtype=tl.float32)
    for t0 in range(t_begin, t_end, BT):
        rows = t0 + tl.arange(0, BT)
        rmask = rows < t_end
        u = _dwconv_tile(g_base, w_ptr, rows, cols, cmask, T, C, K, PL, BT, BC)
        nb = tl.sum(rmask.to(tl.float32), axis=0)
        mb = tl.sum(tl.where(rmask[:, None], u, 0.0), axis=0) / nb
        d = tl.where(rmask[:, None], u - mb[None, :], 0.0)
        m2b = tl.sum(d * d, axis=0)
        ntot = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / ntot)
        m2 = m2 + m2b + delta * delta * (n * nb / ntot)
        n = ntot
    out = pid.to(tl.int64) * C + cols
    tl.store(pmean_ptr + out, mean, mask=cmask)
    tl.store(pm2_ptr + out, m2, mask=cmask)


@triton.jit
def _bn_finalize_kernel(pmean_ptr, pm2_ptr, pcnt_ptr, P, C, bias_ptr, gamma_ptr, beta_ptr, rm_ptr, rv_ptr,
                        nbt_ptr, coef_ptr, momentum, eps,
                        HAS_BIAS: tl.constexpr, HAS_AFFINE: tl.constexpr, EVAL: tl.constexpr,
                        LOCAL_ONLY: tl.constexpr, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr,
                        BP: tl.constexpr, BC: tl.constexpr):
    """Merge P partial (count, mean, M2) rows (Chan) and fold BN into coef = [A, B, c0, rstd, N] rows of [5, C].

    o = u*A + B, with u the bias-free conv output; c0 is the mean of u (0 in eval); N the global count.
    LOCAL_ONLY writes [mean_u, M2] into coef rows 0-1 instead (for the SyncBN all-gather).
    EVAL uses running stats instead of partials.
    """
    cols = tl.program_id(0) * BC + tl.arange(0, BC)
    cmask = cols < C
    if EVAL:
        rm = tl.load(rm_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        var = tl.load(rv_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
        n = tl.zeros([BC], dtype=tl.float32)
        c0 = tl.zeros([BC], dtype=tl.float32)
    else:
        n = tl.zeros([BC], dtype=tl.float32)
        mean = tl.zeros([BC], dtype=tl.float32)
        m2 = tl.zeros([BC], dtype=tl.float32)
        for p0 in range(0, P, BP):
            prow = p0 + tl.arange(0, BP)
            pmask = prow < P
            cnt = tl.load(pcnt_ptr + prow, mask=pmask, other=0.0)
            off = prow[:, None].to(tl.int64) * C + cols[None, :]
            lmask = pmask[:, None] & cmask[None, :]
            mu = tl.load(pmean_ptr + off, mask=lmask, other=0.0)
            q = tl.load(pm2_ptr + off, mask=lmask, other=0.0)
            nb = tl.sum(cnt, axis=0)
            mb = tl.sum(cnt[:, None] * mu, axis=0) / nb
            d = tl.where(lmask, mu - mb[None, :], 0.0)
            m2b = tl.sum(q + cnt[:, None] * d * d, axis=0)
            ntot = n + nb
            delta = mb - mean
            mean = mean + delta * (nb / ntot)
            m2 = m2 + m2b + delta * delta * (n * nb / ntot)
            n = ntot
        var = m2 / n
        c0 = mean
    if LOCAL_ONLY:
        tl.store(coef_ptr + cols, c0, mask=cmask)
        tl.store(coef_ptr + C + cols, m2, mask=cmask)
    else:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros([BC], dtype=tl.float32)
        if HAS_AFFINE:
            gamma = tl.load(gamma_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
            beta = tl.load(beta_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        else:
            gamma = tl.full([BC], 1.0, dtype=tl.float32)
            beta = tl.zeros([BC], dtype=tl.float32)
        rstd = 1.0 / tl.sqrt(var + eps)
        scale = gamma * rstd
        if EVAL:
            mean_y = rm
        else:
            mean_y = c0 + bias
        shift = beta - (mean_y - bias) * scale
        tl.store(coef_ptr + cols, scale, mask=cmask)
        tl.store(coef_ptr + C + cols, shift, mask=cmask)
        tl.store(coef_ptr + 2 * C + cols, c0, mask=cmask)
        tl.store(coef_ptr + 3 * C + cols, rstd, mask=cmask)
        tl.store(coef_ptr + 4 * C + cols, n, mask=cmask)
        if UPDATE:
            if CUMULATIVE:
                f = 1.0 / tl.load(nbt_ptr).to(tl.float32)
            else:
                f = momentum
            old_m = tl.load(rm_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            old_v = tl.load(rv_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            new_m = old_m * (1.0 - f) + mean_y * f
            new_v = old_v * (1.0 - f) + (m2 / (n - 1.0)) * f
            tl.store(rm_ptr + cols, new_m.to(rm_ptr.dtype.element_ty), mask=cmask)
            tl.store(rv_ptr + cols, new_v.to(rv_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _apply_kernel(g_ptr, w_ptr, coef_ptr, z_ptr, T, C, n_chunks, CHUNK,
                  K: tl.constexpr, PL: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // n_chunks
    t_begin = (pid % n_chunks) * CHUNK
    t_end = tl.minimum(t_begin + CHUNK, T)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < C
    scale = tl.load(coef_ptr + cols, mask=cmask, other=0.0)
    shift = tl.load(coef_ptr + C + cols, mask=cmask, other=0.0)
    g_base = g_ptr + b.to(tl.int64) * T * C
    z_base = z_ptr + b.to(tl.int64) * T * C
    for t0 in range(t_begin, t_end, BT):
        rows = t0 + tl.arange(0, BT)
        rmask = rows < t_end
        u = _dwconv_tile(g_base, w_ptr, rows, cols, cmask, T, C, K, PL, BT, BC)
        o = u * scale[None, :] + shift[None, :]
        z = o * tl.sigmoid(o)
        tl.store(z_base + rows[:, None].to(tl.int64) * C + cols[None, :], z.to(z_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _bwd_dy_kernel(g_ptr, w_ptr, dz_ptr, coef_ptr, sums_ptr, dy_ptr, part_ptr, T, C, n_chunks, CHUNK,
                   K: tl.constexpr, PL: tl.constexpr, BN_BATCH: tl.constexpr, WRITE_DY: tl.constexpr,
                   WRITE_SUMS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """do = dz * silu'(o), o = u*A + B.  WRITE_SUMS: partial [sum do, sum do*(u-c0)] per program.
    WRITE_DY: dy = A*do (+ BN batch-stat terms from the global sums in ``sums_ptr`` when BN_BATCH)."""
    pid = tl.program_id(0)
    b = pid // n_chunks
    t_begin = (pid % n_chunks) * CHUNK
    t_end = tl.minimum(t_begin + CHUNK, T)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < C
    scale = tl.load(coef_ptr + cols, mask=cmask, other=0.0)
    shift = tl.load(coef_ptr + C + cols, mask=cmask, other=0.0)
    c0 = tl.load(coef_ptr + 2 * C + cols, mask=cmask, other=0.0)
    if WRITE_DY and BN_BATCH:
        rstd = tl.load(coef_ptr + 3 * C + cols, mask=cmask, other=0.0)
        n = tl.load(coef_ptr + 4 * C + cols, mask=cmask, other=1.0)
        s1 = tl.load(sums_ptr + cols, mask=cmask, other=0.0)
        s2 = tl.load(sums_ptr + C + cols, mask=cmask, other=0.0)
        d1 = -scale * s1 / n
        d2 = -scale * rstd * rstd * s2 / n
    acc1 = tl.zeros([BC], dtype=tl.float32)
    acc2 = tl.zeros([BC], dtype=tl.float32)
    g_base = g_ptr + b.to(tl.int64) * T * C
    for t0 in range(t_begin, t_end, BT):
        rows = t0 + tl.arange(0, BT)
        rmask = rows < t_end
        mask2 = rmask[:, None] & cmask[None, :]
        off = (b.to(tl.int64) * T + rows[:, None]) * C + cols[None, :]
        u = _dwconv_tile(g_base, w_ptr, rows, cols, cmask, T, C, K, PL, BT, BC)
        o = u * scale[None, :] + shift[None, :]
        s = tl.sigmoid(o)
        dz = tl.load(dz_ptr + off, mask=mask2, other=0.0).to(tl.float32)
        do = dz * s * (1.0 + o * (1.0 - s))
        uc = u - c0[None, :]
        if WRITE_SUMS:
            acc1 += tl.sum(do, axis=0)
            acc2 += tl.sum(do * uc, axis=0)
        if WRITE_DY:
            dy = do * scale[None, :]
            if BN_BATCH:
                dy = dy + d1[None, :] + d2[None, :] * uc
            tl.store(dy_ptr + off, dy.to(dy_ptr.dtype.element_ty), mask=mask2)
    if WRITE_SUMS:
        out = pid.to(tl.int64) * (2 * C) + cols
        tl.store(part_ptr + out, acc1, mask=cmask)
        tl.store(part_ptr + out + C, acc2, mask=cmask)


@triton.jit
def _bwd_glu_kernel(h_ptr, m_ptr, w_ptr, dy_ptr, dh_ptr, part_ptr, T, C, n_chunks, CHUNK,
                    HAS_MASK: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, PL: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr):
    """dg[s] = sum_j w[j] dy[s - j + PL] (masked), GLU backward -> dh; partial dW[j] = sum_s g[s] dy[s-j+PL],
    db = sum_s dy[s], written as part[pid, 0:KP] (dW rows) and part[pid, KP] (db)."""
    pid = tl.program_id(0)
    b = pid // n_chunks
    t_begin = (pid % n_chunks) * CHUNK
    t_end = tl.minimum(t_begin + CHUNK, T)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < C
    kidx = tl.arange(0, KP)
    acc_w = tl.zeros([KP, BC], dtype=tl.float32)
    acc_b = tl.zeros([BC], dtype=tl.float32)
    h_base = h_ptr + b.to(tl.int64) * T * (2 * C)
    dh_base = dh_ptr + b.to(tl.int64) * T * (2 * C)
    dy_base = dy_ptr + b.to(tl.int64) * T * C
    for t0 in range(t_begin, t_end, BT):
        rows = t0 + tl.arange(0, BT)
        rmask = rows < t_end
        mask2 = rmask[:, None] & cmask[None, :]
        hoff = rows[:, None].to(tl.int64) * (2 * C) + cols[None, :]
        a = tl.load(h_base + hoff, mask=mask2, other=0.0).to(tl.float32)
        gate = tl.load(h_base + hoff + C, mask=mask2, other=0.0).to(tl.float32)
        sg = tl.sigmoid(gate)
        gl = a * sg
        if HAS_MASK:
            pad = tl.load(m_ptr + b.to(tl.int64) * T + rows, mask=rmask, other=0) != 0
            gl = tl.where(pad[:, None], 0.0, gl)
        dg = tl.zeros([BT, BC], dtype=tl.float32)
        for j in tl.static_range(K):
            src = rows + (PL - j)
            smask = (src >= 0) & (src < T)
            dyj = tl.load(dy_base + src[:, None].to(tl.int64) * C + cols[None, :],
                          mask=smask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            wj = tl.load(w_ptr + cols * K + j, mask=cmask, other=0.0)
            dg += dyj * wj[None, :]
            acc_w += tl.where(kidx[:, None] == j, tl.sum(gl * dyj, axis=0)[None, :], 0.0)
            if j == PL:
                acc_b += tl.sum(tl.where(rmask[:, None], dyj, 0.0), axis=0)
        if HAS_MASK:
            dg = tl.where(pad[:, None], 0.0, dg)
        da = dg * sg
        dgate = dg * a * sg * (1.0 - sg)
        tl.store(dh_base + hoff, da.to(dh_ptr.dtype.element_ty), mask=mask2)
        tl.store(dh_base + hoff + C, dgate.to(dh_ptr.dtype.element_ty), mask=mask2)
    pbase = part_ptr + pid.to(tl.int64) * (KP + 1) * C
    tl.store(pbase + kidx[:, None] * C + cols[None, :], acc_w, mask=cmask[None, :])
    tl.store(pbase + KP * C + cols, acc_b, mask=cmask)


# ----------------------------------------------------------------------------------------------------------------
# launch geometry
# ----------------------------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# tests set this to (BT, BC, tiles_per_program) to exercise multi-tile / multi-chunk / multi-block paths
_FORCE_GEOMETRY: Optional[Tuple[int, int, int]] = None


def _geometry(B: int, T: int, C: int, device: torch.device) -> Tuple[int, int, int, int, int]:
    """(BT, BC, CHUNK, n_chunks, num_warps): each program walks CHUNK rows of one sequence in BT-row tiles."""
    if _FORCE_GEOMETRY is not None:
        BT, BC, per_prog = _FORCE_GEOMETRY
        return BT, BC, BT * per_prog, triton.cdiv(T, BT * per_prog), 4
    if device.type != "cuda":  # interpreter: few, large programs run fastest
        BT = min(64, _next_pow2(T))
        BC = min(64, _next_pow2(C))
        chunk = triton.cdiv(T, BT) * BT
        return BT, BC, chunk, 1, 4
    BT = min(32, max(8, _next_pow2(T)))
    BC = min(128, max(16, _next_pow2(C)))
    n_c = triton.cdiv(C, BC)
    tiles = B * triton.cdiv(T, BT) * n_c
    per_prog = max(1, min(16, tiles // 1024))   # keep >= ~1000 programs, few partial rows
    chunk = BT * per_prog
    return BT, BC, chunk, triton.cdiv(T, chunk), 4


def _chunk_counts(B: int, T: int, chunk: int, n_chunks: int, device) -> Tensor:
    starts = torch.arange(n_chunks, device=device, dtype=torch.float32) * chunk
    cnt = torch.clamp(T - starts, max=float(chunk))
    return cnt.repeat(B)


# ----------------------------------------------------------------------------------------------------------------
# process-group handles (custom ops take an int, not a ProcessGroup)
# ----------------------------------------------------------------------------------------------------------------
_GROUPS: List[object] = []


def _group_handle(group) -> int:
    """-1: no sync; else an index into _GROUPS (the group object; None means WORLD)."""
    for i, g in enumerate(_GROUPS):
        if g is group:
            return i
    _GROUPS.append(group)
    return len(_GROUPS) - 1


def _group(handle: int):
    import torch.distributed as dist

    g = _GROUPS[handle]
    return dist.group.WORLD if g is None else g


# ----------------------------------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile) with fake implementations
# ----------------------------------------------------------------------------------------------------------------
def _u8(mask: Optional[Tensor], like: Tensor) -> Tensor:
    return like if mask is None else mask


@torch.library.custom_op("nest_fast::conv_module_glu", mutates_args=())
def _op_glu(h: Tensor, mask: Optional[Tensor]) -> Tensor:
    B, T, C2 = h.shape
    C = C2 // 2
    g = torch.empty((B, T, C), device=h.device, dtype=h.dtype)
    BT, BC, chunk, n_chunks, nw = _geometry(B, T, C, h.device)
    _glu_mask_kernel[(B * n_chunks, triton.cdiv(C, BC))](
        h, _u8(mask, h), g, T, C, n_chunks, chunk, HAS_MASK=mask is not None, BT=BT, BC=BC, num_warps=nw)
    return g


@_op_glu.register_fake
def _(h, mask):
    return h.new_empty((h.shape[0], h.shape[1], h.shape[2] // 2))


@torch.library.custom_op("nest_fast::conv_module_coef", mutates_args=("running_mean", "running_var"))
def _op_coef(g: Tensor, w: Tensor, bias: Optional[Tensor], gamma: Optional[Tensor], beta: Optional[Tensor],
             running_mean: Optional[Tensor], running_var: Optional[Tensor], nbt: Optional[Tensor],
             batch_stats: bool, momentum: float, eps: float, pl: int, group: int) -> Tensor:
    """Per-channel coefficients [5, C] fp32 (A, B, c0, rstd, N): training BN stats (+ running-stat update) or
    eval BN folded from running stats. ``momentum < 0`` means cumulative average (1/num_batches_tracked)."""
    B, T, C = g.shape
    K = w.shape[1]
    dev = g.device
    coef = torch.empty((5, C), device=dev, dtype=torch.float32)
    dummy = coef
    BCf = min(64, _next_pow2(C))
    flags = dict(HAS_BIAS=bias is not None, HAS_AFFINE=gamma is not None, CUMULATIVE=momentum < 0, BC=BCf)
    common = (bias if bias is not None else dummy, gamma if gamma is not None else dummy,
              beta if beta is not None else dummy)
    if not batch_stats:
        _bn_finalize_kernel[(triton.cdiv(C, BCf),)](
            dummy, dummy, dummy, 0, C, *common, running_mean, running_var, dummy, coef, 0.0, eps,
            EVAL=True, LOCAL_ONLY=False, UPDATE=False, BP=16, **flags)
        return coef
    BT, BC, chunk, n_chunks, nw = _geometry(B, T, C, dev)
    P = B * n_chunks
    pmean = torch.empty((P, C), device=dev, dtype=torch.float32)
    pm2 = torch.empty((P, C), device=dev, dtype=torch.float32)
    _conv_stats_kernel[(P, triton.cdiv(C, BC))](g, w, pmean, pm2, T, C, n_chunks, chunk,
                                                 K=K, PL=pl, BT=BT, BC=BC, num_warps=nw)
    pcnt = _chunk_counts(B, T, chunk, n_chunks, dev)
    if group >= 0:
        import torch.distributed as dist

        pg = _group(group)
        local = torch.empty((2, C), device=dev, dtype=torch.float32)
        _bn_finalize_kernel[(triton.cdiv(C, BCf),)](
            pmean, pm2, pcnt, P, C, *common, dummy, dummy, dummy, local, 0.0, eps,
            EVAL=False, LOCAL_ONLY=True, UPDATE=False, BP=32, **flags)
        packed = torch.cat([local.reshape(-1), torch.full((1,), float(B * T), device=dev, dtype=torch.float32)])
        world = dist.get_world_size(pg)
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed, group=pg)
        allp = torch.stack(gathered)
        pmean = allp[:, :C].contiguous()
        pm2 = allp[:, C:2 * C].contiguous()
        pcnt = allp[:, 2 * C].contiguous()
        P = world
    update = running_mean is not None
    _bn_finalize_kernel[(triton.cdiv(C, BCf),)](
        pmean, pm2, pcnt, P, C, *common, running_mean if update else dummy, running_var if update else dummy,
        nbt if nbt is not None else dummy, coef, float(max(momentum, 0.0)), eps,
        EVAL=False, LOCAL_ONLY=False, UPDATE=update, BP=32, **flags)
    return coef


@_op_coef.register_fake
def _(g, w, bias, gamma, beta, running_mean, running_var, nbt, batch_stats, momentum, eps, pl, group):
    return g.new_empty((5, g.shape[2]), dtype=torch.float32)


@torch.library.custom_op("nest_fast::conv_module_apply", mutates_args=())
def _op_apply(g: Tensor, w: Tensor, coef: Tensor, pl: int) -> Tensor:
    B, T, C = g.shape
    z = torch.empty_like(g)
    BT, BC, chunk, n_chunks, nw = _geometry(B, T, C, g.device)
    _apply_kernel[(B * n_chunks, triton.cdiv(C, BC))](g, w, coef, z, T, C, n_chunks, chunk,
                                                      K=w.shape[1], PL=pl, BT=BT, BC=BC, num_warps=nw)
    return z


@_op_apply.register_fake
def _(g, w, coef, pl):
    return torch.empty_like(g)


@torch.library.custom_op("nest_fast::conv_module_bwd_dy", mutates_args=())
def _op_bwd_dy(g: Tensor, w: Tensor, dz: Tensor, coef: Tensor, sums: Optional[Tensor], pl: int,
               bn_batch: bool, write_dy: bool, write_sums: bool) -> Tuple[Tensor, Tensor]:
    """(dy [B,T,C] or empty, local sums [2, C] (sum do, sum do*(u-c0)) or empty)."""
    B, T, C = g.shape
    BT, BC, chunk, n_chunks, nw = _geometry(B, T, C, g.device)
    P = B * n_chunks
    dy = torch.empty_like(g) if write_dy else g.new_empty((0,))
    part = torch.empty((P, 2, C), device=g.device, dtype=torch.float32) if write_sums else coef
    _bwd_dy_kernel[(P, triton.cdiv(C, BC))](
        g, w, dz, coef, sums if sums is not None else coef, dy if write_dy else g, part, T, C, n_chunks, chunk,
        K=w.shape[1], PL=pl, BN_BATCH=bn_batch, WRITE_DY=write_dy, WRITE_SUMS=write_sums, BT=BT, BC=BC,
        num_warps=nw)
    s = part.sum(0) if write_sums else coef.new_empty((0,))
    return dy, s


@_op_bwd_dy.register_fake
def _(g, w, dz, coef, sums, pl, bn_batch, write_dy, write_sums):
    dy = torch.empty_like(g) if write_dy else g.new_empty((0,))
    s = coef.new_empty((2, g.shape[2])) if write_sums else coef.new_empty((0,))
    return dy, s


@torch.library.custom_op("nest_fast::conv_module_bwd_glu", mutates_args=())
def _op_bwd_glu(h: Tensor, mask: Optional[Tensor], w: Tensor, dy: Tensor, pl: int) -> Tuple[Tensor, Tensor]:
    """(dh [B,T,2C] in h's dtype, dwb [K+1, C] fp32: rows 0..K-1 dW[:, j], row K db)."""
    B, T, C = dy.shape
    K = w.shape[1]
    KP = _next_pow2(K)
    BT, BC, chunk, n_chunks, nw = _geometry(B, T, C, h.device)
    P = B * n_chunks
    dh = torch.empty_like(h)
    part = torch.empty((P, KP + 1, C), device=h.device, dtype=torch.float32)
    _bwd_glu_kernel[(P, triton.cdiv(C, BC))](
        h, _u8(mask, h), w, dy, dh, part, T, C, n_chunks, chunk, HAS_MASK=mask is not None,
        K=K, KP=KP, PL=pl, BT=BT, BC=BC, num_warps=nw)
    red = part.sum(0)
    return dh, torch.cat([red[:K], red[KP:]], dim=0)


@_op_bwd_glu.register_fake
def _(h, mask, w, dy, pl):
    return torch.empty_like(h), dy.new_empty((w.shape[1] + 1, dy.shape[2]), dtype=torch.float32)


@torch.library.custom_op("nest_fast::conv_module_allreduce", mutates_args=())
def _op_allreduce(x: Tensor, group: int) -> Tensor:
    import torch.distributed as dist

    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM, group=_group(group))
    return y


@_op_allreduce.register_fake
def _(x, group):
    return torch.empty_like(x)


# ----------------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------------
class _ConvMid(torch.autograd.Function):
    """h [B,T,2C] -> z = silu(BN(dwconv(mask(glu(h))))) [B,T,C]."""

    @staticmethod
    def forward(ctx, h, dw_weight, dw_bias, gamma, beta, mask, running_mean, running_var, nbt,
                batch_stats: bool, momentum: float, eps: float, pl: int, group: int):
        C = h.shape[2] // 2
        K = dw_weight.shape[-1]
        w = dw_weight.detach().reshape(C, K).float().contiguous()
        bias = None if dw_bias is None else dw_bias.detach().float().contiguous()
        gam = None if gamma is None else gamma.detach().float().contiguous()
        bet = None if beta is None else beta.detach().float().contiguous()
        g = _op_glu(h, mask)
        coef = _op_coef(g, w, bias, gam, bet, running_mean, running_var, nbt, batch_stats, momentum, eps, pl,
                        group)
        z = _op_apply(g, w, coef, pl)
        extra = []
        if not batch_stats and gamma is not None:
            rm = running_mean.detach().float()
            extra = [bias - rm if bias is not None else -rm]
        ctx.save_for_backward(h, g, w, coef, mask, *extra)
        ctx.cfg = (batch_stats, pl, group, K, gamma is not None, dw_bias is not None)
        ctx.dtypes = (dw_weight.dtype, None if dw_bias is None else dw_bias.dtype,
                      None if gamma is None else gamma.dtype)
        return z

    @staticmethod
    def backward(ctx, dz):
        h, g, w, coef, mask, *extra = ctx.saved_tensors
        batch_stats, pl, group, K, affine, has_bias = ctx.cfg
        C = g.shape[2]
        dz = dz.contiguous()
        if batch_stats:
            _, s_loc = _op_bwd_dy(g, w, dz, coef, None, pl, True, False, True)
            s_glob = _op_allreduce(s_loc, group) if group >= 0 else s_loc
            dy, _ = _op_bwd_dy(g, w, dz, coef, s_glob, pl, True, True, False)
        else:
            dy, s_loc = _op_bwd_dy(g, w, dz, coef, None, pl, False, True, True)
        dh, dwb = _op_bwd_glu(h, mask, w, dy, pl)
        needs = ctx.needs_input_grad
        wdt, bdt, gdt = ctx.dtypes
        d_w = dwb[:K].t().reshape(C, 1, K).to(wdt) if needs[1] else None
        d_b = dwb[K].to(bdt) if (has_bias and needs[2]) else None
        d_gamma = d_beta = None
        if affine:
            if batch_stats:
                d_gamma = s_loc[1] * coef[3]
            else:
                d_gamma = coef[3] * (s_loc[1] + extra[0] * s_loc[0])
            d_beta = s_loc[0]
            d_gamma, d_beta = d_gamma.to(gdt), d_beta.to(gdt)
        return (dh if needs[0] else None, d_w, d_b, d_gamma, d_beta) + (None,) * 9


# ----------------------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------------------
def _padding(conv: nn.Conv1d) -> Optional[Tuple[int, int]]:
    if hasattr(conv, "_left_padding"):
        left, right = int(conv._left_padding), int(conv._right_padding)
        if conv.padding not in ((0,), 0):
            return None
    else:
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            return None
        left = right = int(conv.padding[0])
    return left, right


def conv_module_mid(h: Tensor, pad_mask: Optional[Tensor], depthwise_conv: nn.Conv1d,
                    batch_norm: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """The fused middle of the conv module on h = pointwise_conv1 output [B,T,2C] -> Swish(BN(dwconv)) [B,T,C]."""
    bn = batch_norm
    K = depthwise_conv.kernel_size[0]
    pl = _padding(depthwise_conv)[0]
    h = h.contiguous()
    mask = None
    if pad_mask is not None:
        mask = pad_mask.to(device=h.device, dtype=torch.bool).contiguous().view(torch.uint8)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    momentum = 0.0
    nbt = None
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        nbt = bn.num_batches_tracked
    if update:
        momentum = -1.0 if bn.momentum is None else float(bn.momentum)
    group = -1
    if batch_stats and bn.training and isinstance(bn, nn.SyncBatchNorm):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            pg = bn.process_group if bn.process_group else dist.group.WORLD
            if dist.get_world_size(pg) > 1:
                group = _group_handle(bn.process_group if bn.process_group else None)
    if batch_stats and group < 0 and h.shape[0] * h.shape[1] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{[h.shape[0], h.shape[2] // 2, h.shape[1]]}")
    rm = bn.running_mean if (update or not batch_stats) else None
    rv = bn.running_var if (update or not batch_stats) else None
    return _ConvMid.apply(h, depthwise_conv.weight, depthwise_conv.bias, bn.weight, bn.bias, mask, rm, rv, nbt,
                          batch_stats, momentum, float(bn.eps), pl, group)


def conv_module_fast(module, x: Tensor, pad_mask: Optional[Tensor] = None) -> Tensor:
    """Same contract as ``conv_module_reference``: x [B,T,C], pad_mask [B,T] (True = padded) -> [B,T,C]."""
    pw1, pw2 = module.pointwise_conv1, module.pointwise_conv2
    h = F.linear(x, pw1.weight.squeeze(-1), pw1.bias)
    z = conv_module_mid(h, pad_mask, module.depthwise_conv, module.batch_norm)
    return F.linear(z, pw2.weight.squeeze(-1), pw2.bias)


def _supports(module, x, pad_mask=None) -> bool:
    if not isinstance(x, Tensor) or x.dim() != 3 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if not (x.is_cuda or (x.device.type == "cpu" and _backend.triton_interpret())):
        return False
    try:
        pw1, dw, bn, act, pw2 = (module.pointwise_conv1, module.depthwise_conv, module.batch_norm,
                                 module.activation, module.pointwise_conv2)
    except AttributeError:
        return False
    C = x.shape[-1]
    if not isinstance(act, nn.SiLU) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return False
    if bn.num_features != C or (bn.running_mean is None) != (bn.running_var is None):
        return False
    for pw, cin, cout in ((pw1, C, 2 * C), (pw2, C, C)):
        if (not isinstance(pw, nn.Conv1d) or pw.kernel_size != (1,) or pw.groups != 1 or pw.stride != (1,)
                or pw.in_channels != cin or pw.out_channels != cout or pw.padding not in ((0,), 0)):
            return False
    if (not isinstance(dw, nn.Conv1d) or dw.groups != C or dw.in_channels != C or dw.out_channels != C
            or dw.stride != (1,) or dw.dilation != (1,)):
        return False
    pad = _padding(dw)
    if pad is None or pad[0] + pad[1] != dw.kernel_size[0] - 1 or pad[0] < 0 or pad[1] < 0:
        return False
    if pad_mask is not None and (pad_mask.shape != x.shape[:2] or pad_mask.device != x.device):
        return False
    return True


conv_module_fast.supports = _supports
