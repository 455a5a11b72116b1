"""Argument checks that turn bad input into clear errors instead of deep shape errors."""

from __future__ import annotations

from typing import Optional

import torch


def check_tensor(x, name: str, ndim: Optional[int] = None, floating: Optional[bool] = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if floating is True and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if floating is False and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")


def check_lengths(lengths, name: str, batch: int, max_len: int, ref_name: str, device=None) -> None:
    check_tensor(lengths, name, ndim=1, floating=False)
    if lengths.size(0) != batch:
        raise ValueError(f"{name} has {lengths.size(0)} entries but {ref_name} has batch size {batch}")
    if device is not None and lengths.device != device:
        raise ValueError(f"{name} is on {lengths.device} but {ref_name} is on {device}")
    if lengths.numel():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0:
            raise ValueError(f"{name} must be non-negative, got min {lo}")
        if hi > max_len:
            raise ValueError(f"{name} has a length {hi} longer than {ref_name}'s time axis ({max_len})")


def check_audio_and_lengths(x, lengths, x_name: str = "input_signal", len_name: str = "length") -> None:
    check_tensor(x, x_name, ndim=2, floating=True)
    if lengths is not None:
        check_lengths(lengths, len_name, x.size(0), x.size(1), x_name, device=x.device)


def check_features_and_lengths(x, lengths, feat_in: int, x_name: str, len_name: str) -> None:
    check_tensor(x, x_name, ndim=3, floating=True)
    if x.size(1) != feat_in:
        raise ValueError(f"{x_name} must be [batch, {feat_in}, time], got shape {tuple(x.shape)}")
    if lengths is not None:
        check_lengths(lengths, len_name, x.size(0), x.size(2), x_name, device=x.device)
