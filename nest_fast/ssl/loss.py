"""Masked-token NLL (SPEC §5.4) and the ``masked_token_loss`` op (decoder + loss on masked tokens)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import backend


class MLMLoss(nn.Module):
    """NLL over tokens whose ``combine_time_steps`` mel frames are masked with mean > ``mask_threshold``."""

    def __init__(self, combine_time_steps: int = 1, mask_threshold: float = 0.8):
        super().__init__()
        self.nll_loss = nn.NLLLoss()
        self.combine_time_steps = combine_time_steps
        self.mask_threshold = mask_threshold

    def token_mask(self, masks: torch.Tensor) -> torch.Tensor:
        """[B,F,T_mel] frame masks → [B,T_mel/c] bool token mask (≥ 7 of 8 frames for c=8, threshold 0.8)."""
        masks = masks.transpose(1, 2)
        masks = masks.reshape(masks.shape[0], masks.shape[1] // self.combine_time_steps, -1)
        return masks.mean(-1) > self.mask_threshold

    def forward(self, decoder_outputs, targets, decoder_lengths=None, target_lengths=None, spec_masks=None,
                masks=None):
        if masks is None:
            masks = spec_masks
        if masks is None:
            masks = torch.ones_like(decoder_outputs, dtype=torch.bool)
        else:
            masks = self.token_mask(masks)
        out_masked_only = decoder_outputs[masks]
        targets = F.pad(targets, (0, masks.shape[-1] - targets.shape[-1]))
        targets_masked_only = targets[masks]
        return torch.mean(self.nll_loss(out_masked_only, targets_masked_only))


class MultiMLMLoss(nn.Module):
    """Mean of :class:`MLMLoss` over ``num_decoders`` codebooks."""

    def __init__(self, combine_time_steps: int = 1, mask_threshold: float = 0.8, num_decoders: int = 1,
                 squeeze_single: bool = False):
        super().__init__()
        self.num_decoders = num_decoders
        self.squeeze_single = squeeze_single
        self.mlm_loss = MLMLoss(combine_time_steps, mask_threshold)

    def forward(self, masks, decoder_outputs, targets, decoder_lengths=None, target_lengths=None):
        if self.squeeze_single and self.num_decoders == 1:
            return self.mlm_loss(spec_masks=masks, decoder_outputs=decoder_outputs, targets=targets,
                                 decoder_lengths=decoder_lengths, target_lengths=target_lengths)
        loss = 0.0
        for i in range(self.num_decoders):
            loss += self.mlm_loss(spec_masks=masks, decoder_outputs=decoder_outputs[:, :, :, i],
                                  targets=targets[:, :, i], decoder_lengths=decoder_lengths,
                                  target_lengths=target_lengths)
        return loss / self.num_decoders


@backend.register_reference("masked_token_loss")
def masked_token_loss_reference(encoded: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                masks: torch.Tensor, tokens: torch.Tensor, num_classes: int, num_books: int = 1,
                                combine_time_steps: int = 8, mask_threshold: float = 0.8) -> torch.Tensor:
    """Decoder projection + log-softmax on every frame, then NLL on the masked tokens (NeMo's order).

    encoded [B,D,T]; weight [num_classes·num_books, D] (the decoder's 1×1 conv, squeezed); bias or None;
    masks [B,F,T·c] frame masks; tokens [B,T,num_books] int64.  Channel ``k·num_books + h`` is class k of
    book h, as in NeMo's reshape.  Returns the scalar mean over books of the masked-token NLL (NaN when
    nothing is masked, as NeMo).
    """
    logits = F.conv1d(encoded, weight.unsqueeze(-1), bias).transpose(1, 2)
    logits = logits.reshape(logits.shape[0], logits.shape[1], num_classes, num_books)
    logp = torch.log_softmax(logits, dim=2)
    m = masks.transpose(1, 2)
    m = m.reshape(m.shape[0], m.shape[1] // combine_time_steps, -1).mean(-1) > mask_threshold
    loss = 0.0
    for h in range(num_books):
        t = F.pad(tokens[:, :, h], (0, m.shape[-1] - tokens.shape[1]))
        loss = loss + F.nll_loss(logp[:, :, :, h][m], t[m])
    return loss / num_books
