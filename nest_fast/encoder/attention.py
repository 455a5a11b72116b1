"""Relative positional encoding and Transformer-XL multi-head attention (SPEC §6.2–§6.4).

The attention core (everything between the q/k/v/pos projections and ``linear_out``) is the
``rel_pos_attention`` op: the reference below materialises the [B,H,T,2T-1] and [B,H,T,T]
tensors exactly as NeMo does; the fast backend replaces it with a fused Triton kernel.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import nn

from .. import backend


class RelPositionalEncoding(nn.Module):
    """Sinusoids for relative positions T-1 … -(T-1) (descending); xscale then dropout on x.

    Nothing is added to x. ``pe`` is a non-persistent buffer (not in the state dict), extended
    on demand exactly as NeMo's ``extend_pe`` does (values per position never change).
    """

    def __init__(self, d_model: int, dropout_rate: float, max_len: int = 5000, xscale: Optional[float] = None,
                 dropout_rate_emb: float = 0.0):
        super().__init__()
        self.d_model = d_model
        self.xscale = xscale
        self.dropout = nn.Dropout(p=dropout_rate)
        self.dropout_emb = nn.Dropout(dropout_rate_emb) if dropout_rate_emb > 0 else None
        self.max_len = max_len
        self.register_buffer("pe", torch.zeros(0), persistent=False)
        self.extend_pe(max_len, torch.device("cpu"), torch.float32)

    @staticmethod
    def _table(length: int, d_model: int, device, dtype) -> torch.Tensor:
        positions = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device=device)
                             * -(math.log(10000.0) / d_model))
        pe = torch.zeros(positions.size(0), d_model, device=device)
        pe[:, 0::2] = torch.sin(positions * div_term)
        pe[:, 1::2] = torch.cos(positions * div_term)
        return pe.unsqueeze(0).to(dtype)

    def extend_pe(self, length: int, device, dtype) -> None:
        needed = 2 * length - 1
        if self.pe.numel() > 0 and self.pe.size(1) >= needed:
            return
        self.pe = self._table(length, self.d_model, device, dtype)

    def forward(self, x: torch.Tensor, cache_len: int = 0):
        if self.xscale:
            x = x * self.xscale
        x = self.dropout(x)
        input_len = x.size(1) + cache_len
        center = self.pe.size(1) // 2 + 1
        start = center - input_len
        end = center + input_len - 1
        pos_emb = self.pe[:, start:end]
        if self.dropout_emb is not None:
            pos_emb = self.dropout_emb(pos_emb)
        return x, pos_emb


def _avoid_float16_autocast():
    """NeMo's ``avoid_float16_autocast_context``: inside a CUDA fp16 autocast, run in bf16 (fp32 if unsupported)."""
    if torch.is_autocast_enabled() and torch.get_autocast_dtype("cuda") == torch.float16:
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    return contextlib.nullcontext()


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """Transformer-XL relative shift of [b,h,T,P] scores (SPEC §6.4)."""
    b, h, qlen, pos_len = x.size()
    x = torch.nn.functional.pad(x, pad=(1, 0))
    x = x.view(b, h, -1, qlen)
    x = x[:, :, 1:].view(b, h, qlen, pos_len)
    return x


def lengths_to_att_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """[B,T,T] bool, True where attention is forbidden (full context)."""
    valid = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]
    return ~(valid[:, :, None] & valid[:, None, :])


@backend.register_reference("rel_pos_attention")
def rel_pos_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor,
                                pos_bias_u: torch.Tensor, pos_bias_v: torch.Tensor,
                                lengths: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                training: bool = False, att_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference Transformer-XL attention core, NeMo's manual path number for number.

    q, k, v: [B,T,H,D] (q before the u/v biases); p: [2T-1,H,D] or [1,2T-1,H,D] (``linear_pos``
    output); pos_bias_u/v: [H,D]; lengths: [B] valid frames (or an explicit ``att_mask`` [B,T,T],
    True = forbidden).  Returns [B,T,H,D] (before ``linear_out``).
    """
    B, T, H, D = q.shape
    if att_mask is None and lengths is not None:
        att_mask = lengths_to_att_mask(lengths, T)
    if p.dim() == 3:
        p = p.unsqueeze(0)
    k = k.transpose(1, 2)
    v = v.transpose(1, 2)
    p = p.transpose(1, 2)  # [1,H,2T-1,D]
    q_with_bias_u = (q + pos_bias_u).transpose(1, 2)
    q_with_bias_v = (q + pos_bias_v).transpose(1, 2)
    matrix_bd = torch.matmul(q_with_bias_v, p.transpose(-2, -1))
    matrix_bd = rel_shift(matrix_bd)
    matrix_ac = torch.matmul(q_with_bias_u, k.transpose(-2, -1))
    matrix_bd = matrix_bd[:, :, :, : matrix_ac.size(-1)]
    scores = (matrix_ac + matrix_bd) / math.sqrt(D)
    if att_mask is not None:
        mask = att_mask.unsqueeze(1)
        scores = scores.masked_fill(mask, -10000.0)
        attn = torch.softmax(scores, dim=-1).masked_fill(mask, 0.0)
    else:
        attn = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0 and training:
        attn = torch.nn.functional.dropout(attn, p=dropout_p, training=True)
    x = torch.matmul(attn, v)  # [B,H,T,D]
    return x.transpose(1, 2)


class RelPositionMultiHeadAttention(nn.Module):
    """NeMo's ``RelPositionMultiHeadAttention`` (rel_pos, untied per-layer biases)."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float, pos_bias_u: Optional[torch.Tensor] = None,
                 pos_bias_v: Optional[torch.Tensor] = None, use_bias: bool = True):
        super().__init__()
        if n_feat % n_head != 0:
            raise ValueError(f"d_model ({n_feat}) must be divisible by n_heads ({n_head})")
        self.d_k = n_feat // n_head
        self.s_d_k = math.sqrt(self.d_k)
        self.h = n_head
        self.linear_q = nn.Linear(n_feat, n_feat, bias=use_bias)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=use_bias)
        self.linear_v = nn.Linear(n_feat, n_feat, bias=use_bias)
        self.linear_out = nn.Linear(n_feat, n_feat, bias=use_bias)
        self.dropout = nn.Dropout(p=dropout_rate)
        self.dropout_rate = dropout_rate
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        if pos_bias_u is None or pos_bias_v is None:
            self.pos_bias_u = nn.Parameter(torch.zeros(self.h, self.d_k))
            self.pos_bias_v = nn.Parameter(torch.zeros(self.h, self.d_k))
        else:
            self.pos_bias_u = pos_bias_u
            self.pos_bias_v = pos_bias_v

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                pos_emb: torch.Tensor, cache=None, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mask``: [B,T,T] True = forbidden (NeMo's att_mask); ``lengths`` (optional) lets the fast
        kernel skip building it. Returns [B,T,d_model]."""
        B, T, _ = query.shape
        if torch.is_autocast_enabled():  # as NeMo: q/k/v inputs in fp32 under autocast ...
            query, key, value = query.float(), key.float(), value.float()
        with _avoid_float16_autocast():  # ... and an fp16 autocast becomes bf16 (or fp32) for this block
            q = self.linear_q(query).view(B, -1, self.h, self.d_k)
            k = self.linear_k(key).view(B, -1, self.h, self.d_k)
            v = self.linear_v(value).view(B, -1, self.h, self.d_k)
            p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k)
            out = backend.dispatch("rel_pos_attention", q, k, v, p, self.pos_bias_u, self.pos_bias_v,
                                   lengths=lengths, dropout_p=self.dropout_rate, training=self.training,
                                   att_mask=mask)
            return self.linear_out(out.reshape(B, T, self.h * self.d_k))
