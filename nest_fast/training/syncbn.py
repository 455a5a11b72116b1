"""Synchronised BatchNorm that also works on CPU (gloo): torch's ``SyncBatchNorm`` refuses CPU tensors.

:func:`convert_sync_batchnorm` swaps every ``nn.BatchNorm1d`` for :class:`CPUSyncBatchNorm` (same parameters,
buffers and state-dict keys). In training with an initialised process group of more than one rank, the batch
mean/variance are computed over all ranks' batches (per-rank centred statistics gathered with an autograd-aware
all-gather and merged exactly, so gradients flow across ranks as with torch's SyncBatchNorm); otherwise it is plain BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn


class CPUSyncBatchNorm(nn.BatchNorm1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not self.training or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_gather

        C = x.size(1)
        dims = [0, 2] if x.dim() == 3 else [0]
        xf = x.float()
        n_local = xf.numel() // C
        # per-rank centred statistics (mean, M2, count) merged exactly (Chan et al.), as torch's SyncBatchNorm
        # does: no E[x^2] - mean^2 cancellation. all_gather is autograd-aware, so gradients flow across ranks.
        mean_l = xf.mean(dims)
        m2_l = (xf - mean_l.view((1, C, 1) if x.dim() == 3 else (1, C))).square().sum(dims)
        packed = torch.cat([mean_l, m2_l, xf.new_full((1,), float(n_local))])
        stats = torch.stack(all_gather(packed))  # [world, 2C+1]
        counts = stats[:, 2 * C:2 * C + 1]
        n = counts.sum()
        mean = (stats[:, :C] * counts).sum(0) / n
        m2 = (stats[:, C:2 * C] + counts * (stats[:, :C] - mean).square()).sum(0)
        var = m2 / n
        with torch.no_grad():
            if self.track_running_stats and self.running_mean is not None:
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        shape = (1, C, 1) if x.dim() == 3 else (1, C)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` child (recursively) by a :class:`CPUSyncBatchNorm` with its state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d) and not isinstance(child, CPUSyncBatchNorm):
            new = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child)
    return module
