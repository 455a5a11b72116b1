"""Random block masking of mel frames (SPEC §5.2), NeMo 3.0.0's vectorised algorithm."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_features_and_lengths


class RandomBlockMasking(nn.Module):
    """``forward(input_feats=[B,F,T], input_lengths=[B])`` → ``(masked_feats, masks)`` (masks [B,F,T] float)."""

    def __init__(self, feat_in: int, mask_prob: float = 0.5, block_size: int = 48, mask_value=None,
                 freeze: bool = True, allow_overlap: bool = False, max_mask_ratio: float = 0.8):
        super().__init__()
        if not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"RandomBlockMasking: mask_prob must be in [0, 1], got {mask_prob}")
        if block_size < 1:
            raise ValueError(f"RandomBlockMasking: block_size must be >= 1, got {block_size}")
        self.feat_in = feat_in
        self.block_size = block_size
        self.mask_prob = mask_prob
        self.allow_overlap = allow_overlap
        self.max_mask_ratio = max_mask_ratio
        if mask_value is None:
            self.mask_embedding = nn.Parameter(torch.empty(feat_in))
            nn.init.normal_(self.mask_embedding, mean=0.0, std=0.1)
        else:
            self.mask_embedding = nn.Parameter(torch.ones(feat_in) * mask_value, requires_grad=False)
        if freeze:
            for p in self.parameters():
                p.requires_grad_(False)
            self.eval()

    def forward(self, input_feats: torch.Tensor, input_lengths: torch.Tensor):
        check_features_and_lengths(input_feats, input_lengths, self.feat_in, "input_feats", "input_lengths")
        if self.allow_overlap:
            return self.forward_with_overlap(input_feats, input_lengths)
        return self.forward_without_overlap(input_feats, input_lengths)

    def _finish(self, input_feats: torch.Tensor, time_mask: torch.Tensor):
        masked = torch.where(time_mask, self.mask_embedding.view(1, -1, 1), input_feats)
        return masked, time_mask.to(input_feats.dtype).expand_as(input_feats)

    def forward_with_overlap(self, input_feats: torch.Tensor, input_lengths: torch.Tensor):
        B, _, T = input_feats.shape
        positions = torch.arange(T, device=input_feats.device)
        valid_starts = positions + self.block_size <= input_lengths.unsqueeze(1)
        starts = (torch.rand(B, T, device=input_feats.device) < self.mask_prob) & valid_starts
        time_mask = nn.functional.max_pool1d(
            nn.functional.pad(starts.unsqueeze(1).float(), (self.block_size - 1, 0)),
            kernel_size=self.block_size, stride=1).bool()
        return self._finish(input_feats, time_mask)

    def forward_without_overlap(self, input_feats: torch.Tensor, input_lengths: torch.Tensor):
        B, _, T = input_feats.shape
        dev = input_feats.device
        num_patches = torch.ceil(input_lengths * self.mask_prob / self.block_size).long()
        block = torch.full_like(input_lengths, self.block_size)
        block = torch.where((num_patches + 1) * block > input_lengths, input_lengths // (num_patches + 1),
                            block).clamp_min(1)
        num_slots = (input_lengths // block - 1).clamp_min(0)
        num_patches = torch.minimum(num_patches, num_slots)
        valid_slots = torch.arange(T, device=dev).unsqueeze(0) < num_slots.unsqueeze(1)
        scores = torch.rand(B, T, device=dev)
        scores.masked_fill_(~valid_slots, float("-inf"))
        max_patches = math.ceil(T * self.mask_prob / self.block_size)
        slots = scores.topk(max_patches, dim=1).indices
        selected = torch.arange(max_patches, device=dev).unsqueeze(0) < num_patches.unsqueeze(1)
        offsets = (torch.rand(B, device=dev) * block).long()
        starts = slots * block.unsqueeze(1) + offsets.unsqueeze(1)
        ends = starts + block.unsqueeze(1)
        starts = torch.where(selected, starts, 0)
        ends = torch.where(selected, ends, 0)
        deltas = selected.int()
        cov = torch.zeros(B, T + 1, dtype=torch.int32, device=dev)
        cov.scatter_add_(1, starts, deltas)
        cov.scatter_add_(1, ends, -deltas)
        time_mask = (cov[:, :T].cumsum(dim=1) > 0).unsqueeze(1)
        return self._finish(input_feats, time_mask)
