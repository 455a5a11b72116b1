"""Softmax decoder over the codebook classes (SPEC §5.3)."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_tensor


class MultiSoftmaxDecoder(nn.Module):
    """1×1 conv 512 → num_classes·num_decoders; ``forward(encoder_output=[B,D,T])`` → log-probs [B,T,C,H]."""

    def __init__(self, feat_in: int, num_classes: int, num_decoders: int = 1, init_mode: str = "xavier_uniform",
                 use_bias: bool = False, squeeze_single: bool = False):
        super().__init__()
        if init_mode not in ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"):
            raise ValueError(f"MultiSoftmaxDecoder: unknown init_mode {init_mode!r}")
        self.feat_in, self.num_classes, self.num_decoders = feat_in, num_classes, num_decoders
        self.squeeze_single = squeeze_single
        self.decoder_layers = nn.Sequential(
            nn.Conv1d(feat_in, num_classes * num_decoders, kernel_size=1, bias=use_bias))
        w = self.decoder_layers[0].weight
        getattr(nn.init, init_mode + "_")(w)

    def forward(self, encoder_output: torch.Tensor) -> torch.Tensor:
        check_tensor(encoder_output, "encoder_output", ndim=3, floating=True)
        if encoder_output.size(1) != self.feat_in:
            raise ValueError(f"MultiSoftmaxDecoder: encoder_output must be [B, {self.feat_in}, T], "
                             f"got {tuple(encoder_output.shape)}")
        logits = self.decoder_layers(encoder_output).transpose(1, 2)
        logits = logits.reshape(logits.shape[0], logits.shape[1], self.num_classes, self.num_decoders)
        if self.squeeze_single and self.num_decoders == 1:
            logits = logits.squeeze(-1)
        return torch.log_softmax(logits, dim=2)
