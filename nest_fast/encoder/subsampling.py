"""Fast-Conformer ``dw_striding`` convolutional subsampling with time masking (SPEC §6.1)."""

from __future__ import annotations

import math

import torch
from torch import nn


def conv_out_length(lengths: torch.Tensor, kernel_size: int = 3, stride: int = 2, padding: int = 1,
                    repeat: int = 1) -> torch.Tensor:
    """Valid output frames after ``repeat`` stride-``stride`` convs (floor mode), as int64."""
    lengths = lengths.to(torch.float)
    for _ in range(repeat):
        lengths = torch.floor((lengths + 2 * padding - kernel_size) / stride + 1.0)
    return lengths.to(torch.int64)


def _time_mask(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B,1,T,1] float mask (t < len) broadcast over channels and frequency."""
    t = torch.arange(x.size(2), device=x.device)
    return (t[None, :] < lengths[:, None]).to(x.dtype)[:, None, :, None]


class MaskedConvSequential(nn.Sequential):
    """Conv stack that zeroes frames t >= len before every layer (NeMo ≥ 2.5)."""

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        x = x.unsqueeze(1)  # [B,1,T,F]
        cur = lengths.clone().float()
        mask = _time_mask(x, cur.long())
        for layer in self:
            x = x * mask
            x = layer(x)
            stride = getattr(layer, "stride", None)
            if stride is not None and tuple(stride) != (1, 1):
                pad = layer.padding
                cur = (cur + pad[0] + pad[0] - layer.kernel_size[0]) // layer.stride[0] + 1
                mask = _time_mask(x, cur.long())
        x = x * mask
        return x, cur.long()


class ConvSubsampling(nn.Module):
    """``dw_striding`` subsampling: Conv2d(1→C,3,s2) ReLU [dwConv2d(3,s2) pwConv2d(1) ReLU]×(n-1) → Linear."""

    def __init__(self, subsampling: str, subsampling_factor: int, feat_in: int, feat_out: int, conv_channels: int,
                 subsampling_conv_chunking_factor: int = 1, activation: nn.Module | None = None,
                 is_causal: bool = False):
        super().__init__()
        if subsampling != "dw_striding":
            raise ValueError(f"subsampling {subsampling!r} is not supported (NEST uses 'dw_striding')")
        if is_causal:
            raise ValueError("causal_downsampling=True is not supported (NEST uses False)")
        if subsampling_factor < 2 or subsampling_factor & (subsampling_factor - 1):
            raise ValueError(f"subsampling_factor must be a power of 2 >= 2, got {subsampling_factor}")
        if subsampling_conv_chunking_factor != -1 and subsampling_conv_chunking_factor != 1 and (
                subsampling_conv_chunking_factor & (subsampling_conv_chunking_factor - 1)):
            raise ValueError("subsampling_conv_chunking_factor must be -1, 1 or a power of 2")
        activation = activation if activation is not None else nn.ReLU()
        self._sampling_num = int(math.log2(subsampling_factor))
        self.subsampling_factor = subsampling_factor
        self._conv_channels = conv_channels
        self.subsampling_conv_chunking_factor = subsampling_conv_chunking_factor
        layers = [nn.Conv2d(1, conv_channels, kernel_size=3, stride=2, padding=1), activation]
        for _ in range(self._sampling_num - 1):
            layers += [
                nn.Conv2d(conv_channels, conv_channels, kernel_size=3, stride=2, padding=1, groups=conv_channels),
                nn.Conv2d(conv_channels, conv_channels, kernel_size=1, stride=1, padding=0, groups=1),
                activation,
            ]
        out_freq = feat_in
        for _ in range(self._sampling_num):
            out_freq = (out_freq + 2 * 1 - 3) // 2 + 1
        self.out = nn.Linear(conv_channels * out_freq, feat_out)
        self.conv = MaskedConvSequential(*layers)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        """x: [B,T,F] features (time-major); returns ([B,T',feat_out], lengths int64)."""
        if self.subsampling_conv_chunking_factor != -1:
            if self.subsampling_conv_chunking_factor == 1:
                limit = 2 ** 31 / self._conv_channels * 2 * 2
                split = x.numel() > limit
                chunk = 2 ** math.ceil(math.log2(max(1.0, x.numel() / limit))) if split else 1
            else:
                split, chunk = True, self.subsampling_conv_chunking_factor
            if split and x.size(0) > 1:
                size = max(1, x.size(0) // chunk)
                outs = [self.conv(xc, lc) for xc, lc in zip(torch.split(x, size), torch.split(lengths, size))]
                x = torch.cat([o[0] for o in outs])
                lengths = torch.cat([o[1] for o in outs])
            else:
                x, lengths = self.conv(x, lengths)
        else:
            x, lengths = self.conv(x, lengths)
        b, c, t, f = x.size()
        x = self.out(x.transpose(1, 2).reshape(b, t, -1))
        return x, lengths
