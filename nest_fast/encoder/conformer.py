"""Conformer layer internals (SPEC §6.4): feed-forward, convolution module, layer."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import backend
from .attention import RelPositionMultiHeadAttention


class ConformerFeedForward(nn.Module):
    """linear2(dropout(Swish(linear1(x))))."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, use_bias: bool = True):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=use_bias)
        self.activation = nn.SiLU()
        self.dropout = nn.Dropout(p=dropout)
        self.linear2 = nn.Linear(d_ff, d_model, bias=use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class CausalConv1D(nn.Conv1d):
    """Depthwise Conv1d with explicit zero padding (NeMo's ``CausalConv1D`` for a symmetric context).

    ``padding`` is ``[left, right]``; the conv itself uses padding 0, as NeMo does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding=None, groups: int = 1, bias: bool = True):
        if padding is None:
            padding = [(kernel_size - 1) // 2, (kernel_size - 1) // 2]
        self._left_padding, self._right_padding = int(padding[0]), int(padding[1])
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x, pad=(self._left_padding, self._right_padding))
        return super().forward(x)


@backend.register_reference("conv_module")
def conv_module_reference(module: "ConformerConvolution", x: torch.Tensor,
                          pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """NeMo's ``ConformerConvolution.forward`` number for number. x: [B,T,C] -> [B,T,C]."""
    x = x.transpose(1, 2)
    x = module.pointwise_conv1(x)
    x = nn.functional.glu(x, dim=1)
    if pad_mask is not None:
        x = x.masked_fill(pad_mask.unsqueeze(1), 0.0)
    x = module.depthwise_conv(x)
    x = module.batch_norm(x)
    x = module.activation(x)
    x = module.pointwise_conv2(x)
    return x.transpose(1, 2)


class ConformerConvolution(nn.Module):
    """pointwise_conv1 (C->2C) → GLU → pad mask → depthwise conv (k) → BatchNorm → Swish → pointwise_conv2."""

    def __init__(self, d_model: int, kernel_size: int, norm_type: str = "batch_norm", conv_context_size=None,
                 pointwise_activation: str = "glu_", use_bias: bool = True):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"conv_kernel_size must be odd, got {kernel_size}")
        if norm_type != "batch_norm":
            raise ValueError(f"conv_norm_type {norm_type!r} is not supported (NEST uses 'batch_norm')")
        if pointwise_activation != "glu_":
            raise ValueError(f"pointwise_activation {pointwise_activation!r} is not supported (NEST uses 'glu_')")
        if conv_context_size is None:
            conv_context_size = [(kernel_size - 1) // 2, (kernel_size - 1) // 2]
        self.d_model = d_model
        self.kernel_size = kernel_size
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, kernel_size=1, bias=use_bias)
        self.depthwise_conv = CausalConv1D(d_model, d_model, kernel_size, padding=conv_context_size,
                                           groups=d_model, bias=use_bias)
        self.batch_norm = nn.BatchNorm1d(d_model)
        self.activation = nn.SiLU()
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, kernel_size=1, bias=use_bias)

    def forward(self, x: torch.Tensor, pad_mask: Optional[torch.Tensor] = None, cache=None) -> torch.Tensor:
        return backend.dispatch("conv_module", self, x, pad_mask)


class ConformerLayer(nn.Module):
    """FFN1 → MHSA → Conv → FFN2 → LayerNorm (registration order differs, as in NeMo)."""

    def __init__(self, d_model: int, d_ff: int, self_attention_model: str = "rel_pos", n_heads: int = 4,
                 conv_kernel_size: int = 31, conv_norm_type: str = "batch_norm", conv_context_size=None,
                 dropout: float = 0.1, dropout_att: float = 0.1, pos_bias_u=None, pos_bias_v=None,
                 use_bias: bool = True):
        super().__init__()
        if self_attention_model != "rel_pos":
            raise ValueError(f"self_attention_model {self_attention_model!r} is not supported (NEST uses 'rel_pos')")
        self.fc_factor = 0.5
        self.norm_feed_forward1 = nn.LayerNorm(d_model)
        self.feed_forward1 = ConformerFeedForward(d_model, d_ff, dropout, use_bias=use_bias)
        self.norm_conv = nn.LayerNorm(d_model)
        self.conv = ConformerConvolution(d_model, conv_kernel_size, norm_type=conv_norm_type,
                                         conv_context_size=conv_context_size, use_bias=use_bias)
        self.norm_self_att = nn.LayerNorm(d_model)
        self.self_attn = RelPositionMultiHeadAttention(n_heads, d_model, dropout_att, pos_bias_u, pos_bias_v,
                                                       use_bias=use_bias)
        self.norm_feed_forward2 = nn.LayerNorm(d_model)
        self.feed_forward2 = ConformerFeedForward(d_model, d_ff, dropout, use_bias=use_bias)
        self.dropout = nn.Dropout(dropout)
        self.norm_out = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, att_mask: Optional[torch.Tensor] = None, pos_emb: Optional[torch.Tensor] = None,
                pad_mask: Optional[torch.Tensor] = None, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        residual = x
        x = self.norm_feed_forward1(x)
        x = self.feed_forward1(x)
        residual = residual + self.dropout(x) * self.fc_factor

        x = self.norm_self_att(residual)
        x = self.self_attn(query=x, key=x, value=x, mask=att_mask, pos_emb=pos_emb, lengths=lengths)
        residual = residual + self.dropout(x)

        x = self.norm_conv(residual)
        x = self.conv(x, pad_mask=pad_mask)
        residual = residual + self.dropout(x)

        x = self.norm_feed_forward2(residual)
        x = self.feed_forward2(x)
        residual = residual + self.dropout(x) * self.fc_factor

        return self.norm_out(residual)
