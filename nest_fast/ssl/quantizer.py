"""BEST-RQ random-projection quantizer (SPEC §5.1): frozen projection + float64 codebooks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_tensor


class RandomProjectionVectorQuantizer(nn.Module):
    """``forward(input_signal=[B,feat_in,T])`` → ``(xq, xid)``; NEST uses ``xid`` [B,T/c,num_books] (int64)."""

    DIST_FN_LIST = ("l2", "cosine")

    def __init__(self, feat_in: int, code_dim: int, num_classes: int, num_books: int, dist_fn: str = "cosine",
                 time_ahead: bool = False, freeze: bool = True, squeeze_single: bool = False,
                 combine_time_steps: int = 1):
        super().__init__()
        if dist_fn not in self.DIST_FN_LIST:
            raise ValueError(f"RandomProjectionVectorQuantizer: dist_fn must be one of {self.DIST_FN_LIST}, "
                             f"got {dist_fn!r}")
        self.feat_in, self.code_dim, self.num_classes, self.num_books = feat_in, code_dim, num_classes, num_books
        self.dist_fn, self.time_ahead, self.squeeze_single = dist_fn, time_ahead, squeeze_single
        self.combine_time_steps = combine_time_steps
        self.proj = nn.Linear(feat_in * combine_time_steps, num_books * code_dim, bias=False)
        nn.init.xavier_normal_(self.proj.weight)
        codebooks = torch.randn(num_books, num_classes, code_dim).double()
        nn.init.normal_(codebooks, mean=0, std=1)
        self.codebooks = nn.Parameter(F.normalize(codebooks, dim=-1))
        if freeze:
            for p in self.parameters():
                p.requires_grad_(False)
            self.eval()

    def forward(self, input_signal: torch.Tensor):
        check_tensor(input_signal, "input_signal", ndim=3, floating=True)
        if not self.time_ahead:
            input_signal = input_signal.transpose(1, 2)
        B, T, D = input_signal.size()
        if D != self.feat_in:
            raise ValueError(f"RandomProjectionVectorQuantizer: expected {self.feat_in} features, got {D}")
        if self.combine_time_steps > 1:
            if T % self.combine_time_steps:
                raise ValueError(f"RandomProjectionVectorQuantizer: time axis ({T}) must be a multiple of "
                                 f"combine_time_steps ({self.combine_time_steps}); use pad_to=16 in the preprocessor")
            input_signal = input_signal.contiguous().reshape(B, T // self.combine_time_steps, -1)
            T = T // self.combine_time_steps
        x = self.proj(input_signal)
        x = F.normalize(x.view(B, T, self.num_books, self.code_dim), dim=-1)
        if self.dist_fn == "cosine":
            xid = torch.einsum("btdh,dch->btdc", x.to(self.codebooks.dtype), self.codebooks).max(dim=-1)[1]
        else:
            # float64 by type promotion: no expanded-form shortcut (near-ties would flip tokens)
            diff = x.unsqueeze(-1) - self.codebooks.transpose(1, 2).unsqueeze(0).unsqueeze(0)
            xid = diff.norm(dim=-2).argmin(dim=-1)
        xid2 = xid + self.num_classes * torch.arange(self.num_books, device=xid.device).unsqueeze(0).unsqueeze(0)
        xid2 = xid2.transpose(1, 2).contiguous().view(-1, T)
        xq = F.embedding(xid2.view(-1), self.codebooks.view(-1, self.code_dim)).view(B, T, self.code_dim,
                                                                                      self.num_books)
        if not self.time_ahead:
            xq = xq.transpose(1, 2)
        if self.num_books == 1 and self.squeeze_single:
            xq, xid = xq.squeeze(-1), xid.squeeze(-1)
        return xq, xid
