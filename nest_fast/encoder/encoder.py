"""NeMo's ``ConformerEncoder`` (Fast-Conformer, rel_pos, full context) with the same names and outputs."""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn

from .._checks import check_features_and_lengths
from .attention import RelPositionalEncoding
from .conformer import ConformerLayer
from .subsampling import ConvSubsampling

# Every constructor argument of NeMo 3.0.0's ConformerEncoder (anything else is rejected).
NEMO_ENCODER_ARGS = (
    "feat_in", "n_layers", "d_model", "feat_out", "causal_downsampling", "subsampling", "subsampling_factor",
    "subsampling_conv_chunking_factor", "subsampling_conv_channels", "reduction", "reduction_position",
    "reduction_factor", "ff_expansion_factor", "self_attention_model", "n_heads", "att_context_size",
    "att_context_probs", "att_chunk_context_size", "att_context_style", "xscaling", "untie_biases",
    "pos_emb_max_len", "conv_kernel_size", "conv_norm_type", "conv_context_size", "conv_context_style", "use_bias",
    "dropout", "dropout_pre_encoder", "dropout_emb", "dropout_att", "stochastic_depth_drop_prob",
    "stochastic_depth_mode", "stochastic_depth_start_layer", "global_tokens", "global_tokens_spacing",
    "global_attn_separate", "use_pytorch_sdpa", "use_pytorch_sdpa_backends", "sync_max_audio_length",
)


def _unsupported(name, value, expected):
    raise ValueError(f"ConformerEncoder: {name}={value!r} is not supported by nest_fast (expected {expected})")


class ConformerEncoder(nn.Module):
    """Fast-Conformer encoder: dw_striding subsampling → xscale → rel-pos MHSA Conformer layers.

    ``forward(audio_signal=[B,feat_in,T], length=[B])`` returns ``(encoded [B,d_model,T'], lengths [B] int64)``,
    exactly as NeMo's does for the full-context, non-streaming configuration NEST uses.
    """

    def __init__(self, feat_in: int, n_layers: int, d_model: int, feat_out: int = -1,
                 causal_downsampling: bool = False, subsampling: str = "striding", subsampling_factor: int = 4,
                 subsampling_conv_chunking_factor: int = 1, subsampling_conv_channels: int = -1,
                 reduction=None, reduction_position=None, reduction_factor: int = 1, ff_expansion_factor: int = 4,
                 self_attention_model: str = "rel_pos", n_heads: int = 4, att_context_size=None,
                 att_context_probs=None, att_chunk_context_size=None, att_context_style: str = "regular",
                 xscaling: bool = True, untie_biases: bool = True, pos_emb_max_len: int = 5000,
                 conv_kernel_size: int = 31, conv_norm_type: str = "batch_norm", conv_context_size=None,
                 conv_context_style: str = "regular", use_bias: bool = True, dropout: float = 0.1,
                 dropout_pre_encoder: float = 0.1, dropout_emb: float = 0.1, dropout_att: float = 0.0,
                 stochastic_depth_drop_prob: float = 0.0, stochastic_depth_mode: str = "linear",
                 stochastic_depth_start_layer: int = 1, global_tokens: int = 0, global_tokens_spacing: int = 1,
                 global_attn_separate: bool = False, use_pytorch_sdpa: bool = False, use_pytorch_sdpa_backends=None,
                 sync_max_audio_length: bool = True):
        super().__init__()
        for name, val in (("feat_in", feat_in), ("n_layers", n_layers), ("d_model", d_model), ("n_heads", n_heads),
                          ("conv_kernel_size", conv_kernel_size), ("ff_expansion_factor", ff_expansion_factor)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"ConformerEncoder: {name} must be a positive int, got {val!r}")
        if d_model % n_heads:
            raise ValueError(f"ConformerEncoder: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if reduction is not None or reduction_position is not None:
            _unsupported("reduction", reduction, "None")
        if att_context_size not in (None, [-1, -1], (-1, -1)) and list(att_context_size) != [-1, -1]:
            _unsupported("att_context_size", att_context_size, "[-1, -1] (full context)")
        if att_context_style != "regular":
            _unsupported("att_context_style", att_context_style, "'regular'")
        if conv_context_style != "regular":
            _unsupported("conv_context_style", conv_context_style, "'regular'")
        if stochastic_depth_drop_prob:
            _unsupported("stochastic_depth_drop_prob", stochastic_depth_drop_prob, "0.0")
        if global_tokens:
            _unsupported("global_tokens", global_tokens, "0")
        if conv_context_size not in (None, "causal") and list(conv_context_size) != [
                (conv_kernel_size - 1) // 2, (conv_kernel_size - 1) // 2]:
            _unsupported("conv_context_size", conv_context_size, "null (symmetric)")
        if conv_context_size == "causal":
            _unsupported("conv_context_size", conv_context_size, "null (symmetric)")
        self.d_model = d_model
        self._feat_in = feat_in
        self._feat_out = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.subsampling_factor = subsampling_factor
        self.att_context_size = [-1, -1]
        self.use_pytorch_sdpa = use_pytorch_sdpa
        self.sync_max_audio_length = sync_max_audio_length
        self.xscale = math.sqrt(d_model) if xscaling else None
        if subsampling_conv_channels == -1:
            subsampling_conv_channels = d_model
        if not subsampling or subsampling_factor <= 1:
            _unsupported("subsampling", subsampling, "'dw_striding' with factor > 1")
        self.pre_encode = ConvSubsampling(subsampling, subsampling_factor, feat_in, d_model,
                                          subsampling_conv_channels, subsampling_conv_chunking_factor,
                                          nn.ReLU(True), is_causal=causal_downsampling)
        if not untie_biases:
            d_head = d_model // n_heads
            self.pos_bias_u = nn.Parameter(torch.zeros(n_heads, d_head))
            self.pos_bias_v = nn.Parameter(torch.zeros(n_heads, d_head))
            pos_bias_u, pos_bias_v = self.pos_bias_u, self.pos_bias_v
        else:
            pos_bias_u = pos_bias_v = None
        self.pos_emb_max_len = pos_emb_max_len
        self.pos_enc = RelPositionalEncoding(d_model, dropout_pre_encoder, pos_emb_max_len, self.xscale,
                                             dropout_emb)
        self.layers = nn.ModuleList([
            ConformerLayer(d_model, d_model * ff_expansion_factor, self_attention_model, n_heads, conv_kernel_size,
                           conv_norm_type, conv_context_size, dropout, dropout_att, pos_bias_u, pos_bias_v,
                           use_bias=use_bias)
            for _ in range(n_layers)
        ])
        if feat_out > 0 and feat_out != d_model:
            self.out_proj = nn.Linear(d_model, feat_out)
            self._feat_out = feat_out
        else:
            self.out_proj = None
        self.max_audio_length = pos_emb_max_len

    @property
    def feat_out(self) -> int:
        return self._feat_out

    def update_max_seq_length(self, seq_length: int, device) -> None:
        # DDP all-reduce of the max length (NeMo) changes no values: the table is position-indexed.
        if seq_length > self.max_audio_length:
            self.max_audio_length = seq_length
        self.pos_enc.extend_pe(self.max_audio_length, device, torch.float32)

    def forward(self, audio_signal: torch.Tensor, length: Optional[torch.Tensor] = None,
                cache_last_channel=None, cache_last_time=None, cache_last_channel_len=None,
                bypass_pre_encode: bool = False):
        if cache_last_channel is not None or bypass_pre_encode:
            raise ValueError("ConformerEncoder: streaming caches and bypass_pre_encode are not supported")
        if length is None:
            check_features_and_lengths(audio_signal, None, self._feat_in, "audio_signal", "length")
            length = audio_signal.new_full((audio_signal.size(0),), audio_signal.size(-1), dtype=torch.int64)
        check_features_and_lengths(audio_signal, length, self._feat_in, "audio_signal", "length")
        self.update_max_seq_length(audio_signal.size(2), audio_signal.device)
        if self.pos_enc.pe.device != audio_signal.device:
            self.pos_enc.pe = self.pos_enc.pe.to(audio_signal.device)

        x = audio_signal.transpose(1, 2)
        x, length = self.pre_encode(x, length)
        length = length.to(torch.int64)
        x, pos_emb = self.pos_enc(x)
        T = x.size(1)
        valid = torch.arange(T, device=x.device)[None, :] < length[:, None]
        pad_mask = ~valid
        # No [B,T,T] attention mask here: the layers get the lengths; the reference attention builds NeMo's mask
        # from them, the fused kernel never needs one (nothing O(T^2) on the fast path).
        for layer in self.layers:
            x = layer(x, att_mask=None, pos_emb=pos_emb, pad_mask=pad_mask, lengths=length)
        if self.out_proj is not None:
            x = self.out_proj(x)
        return x.transpose(1, 2), length
