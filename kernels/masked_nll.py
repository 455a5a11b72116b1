"""Fused masked-token loss: decoder projection + log-sum-exp + NLL on the masked tokens only (PERF.md §3).

The reference (``nest_fast.ssl.loss.masked_token_loss_reference``, NeMo's order) projects *every* encoder
frame to ``num_classes·num_books`` logits, takes a full log-softmax and only then keeps the ~30 % of frames
that are masked tokens.  Here:

1. **Select first.**  The token mask (same expression as the reference: mean of the ``c×F`` frame-mask values
   ``> mask_threshold``) picks the ``M`` masked tokens; their encoder rows are gathered into ``X [M, D]``.
2. **Forward (Triton, ``_fwd_kernel``).**  One program per (block of rows, class split, book) walks its class
   range in ``BLOCK_N`` chunks; each chunk's logits tile ``X·W_hᵀ + b`` lives only in registers and is folded
   into an online (max, sum-exp) pair and the target logit.  The class range is split ``S`` ways so that a small
   ``M`` still fills the GPU; the ``S`` partial log-sum-exps are merged on the host side (a tiny ``[H,S,M]``
   tensor).  Nothing of size ``[M, classes]`` is ever written.  Saved for backward: the per-row LSE (fp32).
3. **Backward (recompute per chunk).**  ``dlogit = g/(M·H)·(softmax − onehot)`` needs the logits again; they are
   recomputed tile by tile from ``X``, ``W`` and the saved LSE (``_bwd_kernel``).  Two variants, picked by the
   module-level ``BACKWARD_IMPL``:

   * ``"gemm"`` (default): rows are processed in chunks of ``≤ DL_CHUNK_ELEMENTS / classes`` rows.  The Triton
     kernel recomputes the logits of the chunk with an fp32 accumulator, applies the softmax-gradient epilogue
     and writes ``dlogit`` for that chunk only (compute dtype, e.g. bf16: 32 MiB at 2048 rows × 8192 classes);
     ``d_encoded = dlogit·W`` and ``d_weight += dlogitᵀ·X`` are then two cuBLAS GEMMs.  Why not pure Triton:
     without a materialised chunk, each logits tile must scatter its contributions to *both* ``d_encoded``
     (reduction over classes) and ``d_weight`` (reduction over rows), i.e. fp32 atomics on ``M·D·C/BN`` +
     ``C·D·M/BM`` elements (~170 M each at NEST-L shapes), or a second recompute pass.  cuBLAS runs the two
     reduction GEMMs near peak and the chunk buffer is small and L2-friendly, so this design costs the bare
     three GEMMs plus one recompute GEMM plus one pass over the chunk.
   * ``"triton"``: the same tile kernel instead accumulates ``dlogit·W_tile`` and ``dlogit_tileᵀ·X`` into fp32
     ``d_encoded``/``d_weight`` buffers with ``tl.atomic_add`` (no buffer at all, Cut-Cross-Entropy style).
     Kept for comparison in ``bench/bench_masked_nll.py``.

   ``d_bias`` is the column sum of ``dlogit``, accumulated per tile with fp32 atomics in both variants.

Numerics: fp32 / bf16 / fp16 inputs, fp32 accumulation everywhere (fp32 inputs use ``input_precision="ieee"``,
i.e. no TF32); the loss is computed in fp32 and returned in the compute dtype (the reference's dtype: the
promoted input dtype, or the autocast dtype under autocast).  Gradients come back in each input's dtype.

torch.compile: the selection (data-dependent ``M``) happens *inside* the ``nest_fast::masked_nll_fwd`` /
``nest_fast::masked_nll_bwd`` custom ops, whose inputs and outputs all have static shapes (the LSE is saved
scattered into a ``[B, T, H]`` buffer), so the ops have simple fake implementations and never graph-break.

**Deviation from NeMo (documented on purpose):** when a batch has *no* masked token NeMo's loss is NaN
(``NLLLoss`` of an empty selection), which poisons the weights on the next optimiser step.  The fast op returns
a zero loss instead, still attached to the graph (all gradients are zero), and counts the event in the
module-level ``EMPTY_BATCHES``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nest_fast import backend

# Number of batches that had no masked token (zero loss returned instead of NeMo's NaN).
EMPTY_BATCHES = 0
# "gemm": Triton recompute + softmax-grad epilogue into a chunk buffer, then cuBLAS for d_encoded / d_weight.
# "triton": Triton recompute + fp32 atomics, no chunk buffer.
BACKWARD_IMPL = "gemm"
# Upper bound on the elements of one dlogit chunk buffer [rows, classes·books] in the "gemm" backward.
DL_CHUNK_ELEMENTS = 1 << 24

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _logits_tile(X, W, Bias, rows, row_ok, cls, cls_ok, h, D, H, stride_xm, stride_wn,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_F32: tl.constexpr):
    """fp32 logits [BLOCK_M, BLOCK_N] of rows × classes ``cls`` of book ``h`` (weight row ``cls·H + h``)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    wrow = cls * H + h
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + wrow[None, :] * stride_wn + ks[:, None], mask=cls_ok[None, :] & k_ok[:, None], other=0.0)
        if DOT_F32:  # fp32 inputs (exact, no TF32), and every dtype under the interpreter (its bf16 dot is wrong)
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        b = tl.load(Bias + wrow, mask=cls_ok, other=0.0).to(tl.float32)
        acc += b[None, :]
    return acc


@triton.jit
def _fwd_kernel(X, W, Bias, Tgt, PMax, PSum, PTgt, M, D, K, H, classes_per_split, stride_xm, stride_wn,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_F32: tl.constexpr):
    """Partial online log-sum-exp and target logit over one class split: grid (row blocks, splits, books)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    h = tl.program_id(2)
    n_split = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    tgt = tl.load(Tgt + rows * H + h, mask=row_ok, other=-1).to(tl.int32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    t_i = tl.zeros((BLOCK_M,), tl.float32)
    c_lo = pid_s * classes_per_split
    c_hi = tl.minimum(c_lo + classes_per_split, K)
    for c0 in range(c_lo, c_hi, BLOCK_N):
        cls = c0 + tl.arange(0, BLOCK_N)
        cls_ok = cls < c_hi
        logits = _logits_tile(X, W, Bias, rows, row_ok, cls, cls_ok, h, D, H, stride_xm, stride_wn,
                              HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32)
        logits = tl.where(cls_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, 1))  # finite: every chunk holds >= 1 valid class
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m_i = m_new
        t_i += tl.sum(tl.where(cls[None, :] == tgt[:, None], logits, 0.0), 1)
    out = (h * n_split + pid_s) * M + rows
    tl.store(PMax + out, m_i, mask=row_ok)
    tl.store(PSum + out, l_i, mask=row_ok)
    tl.store(PTgt + out, t_i, mask=row_ok)


@triton.jit
def _bwd_kernel(X, W, Bias, Tgt, Lse, Scale, DL, DX, DW, DB, M, D, K, H, stride_xm, stride_wn, stride_dlm,
                HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    """Recomputed logits tile → dlogit = scale·(softmax − onehot); grid (row blocks, class blocks, books).

    ATOMIC=False: store dlogit into DL [M, K·H] (column cls·H + h, the weight's channel layout).
    ATOMIC=True: DX[M, D] += dlogit·W_tile and DW[K·H, D] += dlogitᵀ·X_tile with fp32 atomics.
    Both: DB[K·H] += column sums (fp32 atomics).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    h = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cls = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cls_ok = cls < K
    logits = _logits_tile(X, W, Bias, rows, row_ok, cls, cls_ok, h, D, H, stride_xm, stride_wn,
                          HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32)
    lse = tl.load(Lse + rows * H + h, mask=row_ok, other=0.0)
    tgt = tl.load(Tgt + rows * H + h, mask=row_ok, other=-1).to(tl.int32)
    scale = tl.load(Scale)
    p = tl.exp(logits - lse[:, None])
    dl = (p - tl.where(cls[None, :] == tgt[:, None], 1.0, 0.0)) * scale
    dl = tl.where(row_ok[:, None] & cls_ok[None, :], dl, 0.0)
    wrow = cls * H + h
    if HAS_BIAS:
        tl.atomic_add(DB + wrow, tl.sum(dl, 0), mask=cls_ok)
    if ATOMIC:
        if DOT_F32:
            dlc = dl
        else:
            dlc = dl.to(X.dtype.element_ty)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            w = tl.load(W + wrow[:, None] * stride_wn + ks[None, :], mask=cls_ok[:, None] & k_ok[None, :],
                        other=0.0)
            x = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if DOT_F32:
                dx = tl.dot(dlc, w.to(tl.float32), input_precision="ieee")
                dw = tl.dot(tl.trans(dlc), x.to(tl.float32), input_precision="ieee")
            else:
                dx = tl.dot(dlc, w)
                dw = tl.dot(tl.trans(dlc), x)
            tl.atomic_add(DX + rows[:, None] * D + ks[None, :], dx, mask=row_ok[:, None] & k_ok[None, :])
            tl.atomic_add(DW + wrow[:, None] * D + ks[None, :], dw, mask=cls_ok[:, None] & k_ok[None, :])
    else:
        tl.store(DL + rows[:, None] * stride_dlm + wrow[None, :], dl.to(DL.dtype.element_ty),
                 mask=row_ok[:, None] & cls_ok[None, :])


# ----------------------------------------------------------------------------------------------- launch helpers
def _interpret() -> bool:
    return backend.triton_interpret()


def _config(dtype: torch.dtype, on_cuda: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, DOT_F32).

    The CUDA tiles were chosen by compiling for sm_90 ahead of time (no register spills at BLOCK_K=32 for the
    16-bit forward and "gemm" backward kernels); they have not been tuned on a GPU yet.
    """
    if not on_cuda:  # interpreter: small tiles, fp32 dots
        return 16, 32, 16, 4, 1, True
    if dtype == torch.float32:
        return 64, 64, 32, 4, 2, True
    return 128, 128, 32, 8, 3, False


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: still exercise several class splits


def _select(encoded: torch.Tensor, token_mask: torch.Tensor):
    b_idx, t_idx = token_mask.nonzero(as_tuple=True)
    x = encoded[b_idx, :, t_idx].contiguous()  # [M, D]
    return b_idx, t_idx, x


def _fwd_rows(x, weight, bias, tgt, num_classes, num_books):
    """(lse [M, H] fp32, nll [M, H] fp32) of the selected rows."""
    M, D = x.shape
    H, K = num_books, num_classes
    on_cuda = x.device.type == "cuda"
    BM, BN, BK, warps, stages, dot_f32 = _config(x.dtype, on_cuda)
    n_mblk = triton.cdiv(M, BM)
    # split the class range so that (row blocks × splits × books) gives ~2 waves of programs
    want = max(1, triton.cdiv(2 * _num_sms(x.device), n_mblk * H))
    cps = triton.cdiv(triton.cdiv(K, min(want, triton.cdiv(K, BN))), BN) * BN
    n_split = triton.cdiv(K, cps)
    pmax = torch.empty((H, n_split, M), device=x.device, dtype=torch.float32)
    psum = torch.empty_like(pmax)
    ptgt = torch.empty_like(pmax)
    b = bias if bias is not None else x  # dummy pointer, never read
    _fwd_kernel[(n_mblk, n_split, H)](
        x, weight, b, tgt, pmax, psum, ptgt, M, D, K, H, cps, x.stride(0), weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, DOT_F32=dot_f32,
        num_warps=warps, num_stages=stages)
    lse = torch.logsumexp(pmax + psum.log(), dim=1).t()  # [M, H]
    nll = lse - ptgt.sum(1).t()
    return lse.contiguous(), nll


def _bwd_rows(scale, x, weight, bias, tgt, lse, num_classes, num_books, impl):
    """(dx [M, D] compute dtype, dw [K·H, D], db [K·H] fp32 or None) for the selected rows."""
    M, D = x.shape
    H, K = num_books, num_classes
    V = K * H
    dev = x.device
    on_cuda = dev.type == "cuda"
    BM, BN, BK, warps, stages, dot_f32 = _config(x.dtype, on_cuda)
    db = torch.zeros(V, device=dev, dtype=torch.float32) if bias is not None else None
    b = bias if bias is not None else x
    db_arg = db if db is not None else scale
    if impl == "triton":
        dx = torch.zeros((M, D), device=dev, dtype=torch.float32)
        dw = torch.zeros((V, D), device=dev, dtype=torch.float32)
        _bwd_kernel[(triton.cdiv(M, BM), triton.cdiv(K, BN), H)](
            x, weight, b, tgt, lse, scale, x, dx, dw, db_arg, M, D, K, H, x.stride(0), weight.stride(0), 0,
            HAS_BIAS=bias is not None, ATOMIC=True, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, DOT_F32=dot_f32,
            num_warps=warps, num_stages=stages)
        return dx, dw, db
    if impl != "gemm":
        raise ValueError(f"masked_nll.BACKWARD_IMPL must be 'gemm' or 'triton', got {impl!r}")
    chunk = max(BM, (DL_CHUNK_ELEMENTS // V) // BM * BM)
    chunk = min(chunk, triton.cdiv(M, BM) * BM)
    dl = torch.empty((min(chunk, M), V), device=dev, dtype=x.dtype)
    dx = torch.empty((M, D), device=dev, dtype=x.dtype)
    dw = None
    for r0 in range(0, M, chunk):
        r1 = min(M, r0 + chunk)
        rows = r1 - r0
        xc, dlc = x[r0:r1], dl[:rows]
        _bwd_kernel[(triton.cdiv(rows, BM), triton.cdiv(K, BN), H)](
            xc, weight, b, tgt[r0:r1], lse[r0:r1], scale, dlc, x, x, db_arg, rows, D, K, H, xc.stride(0),
            weight.stride(0), dlc.stride(0),
            HAS_BIAS=bias is not None, ATOMIC=False, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, DOT_F32=dot_f32,
            num_warps=warps, num_stages=stages)
        torch.mm(dlc, weight, out=dx[r0:r1])
        part = dlc.t().mm(xc)  # [V, D]
        if r0 == 0 and r1 == M:
            dw = part
        elif dw is None:
            dw = part.float()
        else:
            dw += part
    return dx, dw, db


# ----------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("nest_fast::masked_nll_fwd", mutates_args=())
def _masked_nll_fwd(encoded: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    token_mask: torch.Tensor, targets: torch.Tensor, num_classes: int,
                    num_books: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss fp32 scalar, lse [B, T, H] fp32, zero where not selected)."""
    global EMPTY_BATCHES
    B, D, T = encoded.shape
    lse_full = torch.zeros((B, T, num_books), device=encoded.device, dtype=torch.float32)
    b_idx, t_idx, x = _select(encoded, token_mask)
    M = x.shape[0]
    if M == 0:
        EMPTY_BATCHES += 1
        return torch.zeros((), device=encoded.device, dtype=torch.float32), lse_full
    tgt = targets[b_idx, t_idx].contiguous()  # [M, H]
    lse, nll = _fwd_rows(x, weight, bias, tgt, num_classes, num_books)
    lse_full[b_idx, t_idx] = lse
    return nll.sum() / (M * num_books), lse_full


@_masked_nll_fwd.register_fake
def _(encoded, weight, bias, token_mask, targets, num_classes, num_books):
    B, D, T = encoded.shape
    return (encoded.new_empty((), dtype=torch.float32),
            encoded.new_empty((B, T, num_books), dtype=torch.float32))


@torch.library.custom_op("nest_fast::masked_nll_bwd", mutates_args=())
def _masked_nll_bwd(grad: torch.Tensor, encoded: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    token_mask: torch.Tensor, targets: torch.Tensor, lse_full: torch.Tensor, num_classes: int,
                    num_books: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_encoded, d_weight, d_bias); d_bias is an empty tensor when bias is None."""
    d_enc = torch.zeros_like(encoded)
    d_b = torch.zeros_like(bias) if bias is not None else encoded.new_empty((0,))
    b_idx, t_idx, x = _select(encoded, token_mask)
    M = x.shape[0]
    if M == 0:
        return d_enc, torch.zeros_like(weight), d_b
    tgt = targets[b_idx, t_idx].contiguous()
    lse = lse_full[b_idx, t_idx].contiguous()
    scale = (grad.detach().float() / (M * num_books)).reshape(1)
    dx, dw, db = _bwd_rows(scale, x, weight, bias, tgt, lse, num_classes, num_books, BACKWARD_IMPL)
    d_enc[b_idx, :, t_idx] = dx.to(encoded.dtype)
    if db is not None:
        d_b = db.to(bias.dtype)
    return d_enc, dw.to(weight.dtype), d_b


@_masked_nll_bwd.register_fake
def _(grad, encoded, weight, bias, token_mask, targets, lse_full, num_classes, num_books):
    d_b = torch.empty_like(bias) if bias is not None else encoded.new_empty((0,))
    return torch.empty_like(encoded), torch.empty_like(weight), d_b


def _setup_context(ctx, inputs, output):
    encoded, weight, bias, token_mask, targets, num_classes, num_books = inputs
    ctx.save_for_backward(encoded, weight, bias, token_mask, targets, output[1])
    ctx.num_classes, ctx.num_books = num_classes, num_books
    ctx.has_bias = bias is not None


def _backward(ctx, grad_loss, grad_lse):
    encoded, weight, bias, token_mask, targets, lse_full = ctx.saved_tensors
    d_enc, d_w, d_b = _masked_nll_bwd(grad_loss, encoded, weight, bias, token_mask, targets, lse_full,
                                      ctx.num_classes, ctx.num_books)
    return d_enc, d_w, (d_b if ctx.has_bias else None), None, None, None, None


_masked_nll_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------- entry point
def masked_token_loss_fast(encoded: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           masks: torch.Tensor, tokens: torch.Tensor, num_classes: int, num_books: int = 1,
                           combine_time_steps: int = 8, mask_threshold: float = 0.8) -> torch.Tensor:
    """Fast twin of ``masked_token_loss_reference`` (same signature, same value): fused decoder + NLL.

    encoded [B,D,T]; weight [num_classes·num_books, D]; bias [num_classes·num_books] or None; masks [B,F,T·c];
    tokens [B,T',num_books] int64 (right-padded with class 0 to T, as NeMo).  Returns the mean over books of the
    NLL averaged over masked tokens, in the compute dtype.

    Deviation from NeMo: a batch with no masked token gives a zero loss (attached to the graph, zero gradients)
    instead of NaN, and increments ``nest_fast.kernels.masked_nll.EMPTY_BATCHES``.
    """
    if encoded.dim() != 3:
        raise ValueError(f"masked_token_loss: encoded must be [B, D, T], got shape {tuple(encoded.shape)}")
    B, D, T = encoded.shape
    V = num_classes * num_books
    if weight.shape != (V, D):
        raise ValueError(f"masked_token_loss: weight must be [num_classes·num_books={V}, D={D}], got "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"masked_token_loss: bias must be [{V}], got {tuple(bias.shape)}")
    if tokens.dim() != 3 or tokens.shape[0] != B or tokens.shape[2] != num_books:
        raise ValueError(f"masked_token_loss: tokens must be [B={B}, T, num_books={num_books}], got "
                         f"{tuple(tokens.shape)}")
    m = masks.transpose(1, 2)
    m = m.reshape(m.shape[0], m.shape[1] // combine_time_steps, -1).mean(-1) > mask_threshold  # as the reference
    if m.shape != (B, T):
        raise ValueError(f"masked_token_loss: masks {tuple(masks.shape)} give {m.shape[1]} tokens of "
                         f"{combine_time_steps} frames, but encoded has T={T}")
    if encoded.numel() >= 2 ** 31 or weight.numel() >= 2 ** 31:
        raise ValueError("masked_token_loss: the fast kernel indexes with int32; encoded and weight must have "
                         "fewer than 2^31 elements (split the batch)")
    targets = F.pad(tokens, (0, 0, 0, T - tokens.shape[1])).long()

    dev_type = encoded.device.type
    if torch.is_autocast_enabled(dev_type):
        dtype = torch.get_autocast_dtype(dev_type)
    else:
        dtype = torch.promote_types(encoded.dtype, weight.dtype)
        if bias is not None:
            dtype = torch.promote_types(dtype, bias.dtype)
    encoded, weight = encoded.to(dtype), weight.to(dtype).contiguous()
    bias = bias.to(dtype).contiguous() if bias is not None else None
    loss, _ = _masked_nll_fwd(encoded, weight, bias, m, targets, num_classes, num_books)
    return loss.to(dtype)


def _supports(encoded, weight, bias, masks, tokens, *args, **kwargs) -> bool:
    tensors = [encoded, weight, masks, tokens] + ([bias] if bias is not None else [])
    dev = encoded.device
    if any(t.device != dev for t in tensors):
        return False
    if dev.type != "cuda" and not (dev.type == "cpu" and backend.triton_interpret()):
        return False
    if not torch.is_autocast_enabled(dev.type):
        if encoded.dtype not in _DTYPES or weight.dtype not in _DTYPES:
            return False
        if bias is not None and bias.dtype not in _DTYPES:
            return False
    return True


masked_token_loss_fast.supports = _supports
