"""Two-process DDP (gloo, synced BatchNorm via nest_fast's CPU SyncBN) gives the gradients of one process on the
whole batch: the tight check behind the looser multi-step loss comparison in test_train_run.py."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nest_fast
from nest_fast.training.syncbn import convert_sync_batchnorm


def _cfg():
    c = nest_fast.model_config("small", n_layers=2, d_model=32, n_heads=2, subsampling_conv_channels=16)
    c["num_classes"] = c["quantizer"]["num_classes"] = c["decoder"]["num_classes"] = 32
    for k in ("dropout", "dropout_pre_encoder", "dropout_emb", "dropout_att"):
        c["encoder"][k] = 0.0
    c["preprocessor"]["dither"] = 0.0
    return c


def _data():
    """Four equal-length but very different utterances (so each rank's half-batch has other BN statistics):
    noise, a low tone, a high tone, a chirp."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(19200) / 16000.0
    x = 0.01 * torch.randn(4, 19200, generator=g)
    x[1] += 0.5 * torch.sin(2 * torch.pi * 180 * t)
    x[2] += 0.5 * torch.sin(2 * torch.pi * 3100 * t)
    x[3] += 0.5 * torch.sin(2 * torch.pi * (200 + 2500 * t) * t)
    return x, torch.full((4,), 19200)


def _model():
    torch.manual_seed(0)
    return nest_fast.NESTModel(_cfg()).train()


class _Loss(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, n):
        """The training loss with a fixed mask (random masks would differ between 1 and 2 processes): the
        encoder sees real features on 3 of every 4 blocks of 20 frames, the loss covers the masked tokens."""
        feats, flen = self.m.preprocessor(input_signal=x, length=n)
        _, tokens = self.m.quantizer(input_signal=feats)
        t = torch.arange(feats.size(2))
        frame_mask = ((t // 20) % 4 == 1) & (t[None, :] < flen[:, None])  # [B, T_mel]
        masked = torch.where(frame_mask[:, None, :], self.m.mask_processor.mask_embedding.view(1, -1, 1), feats)
        enc, _ = self.m.encoder(audio_signal=masked, length=flen)
        masks = frame_mask[:, None, :].float().expand_as(feats)
        return self.m.masked_loss(enc, masks, tokens)


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        m = convert_sync_batchnorm(_model())
        ddp = torch.nn.parallel.DistributedDataParallel(_Loss(m))
        x, n = _data()
        idx = [rank, rank + 2]  # DistributedSampler's interleaving
        ddp(x[idx], n[idx]).backward()
        if rank == 0:
            torch.save({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    m = _model()
    x, n = _data()
    _Loss(m)(x, n).backward()
    ref = {k: p.grad for k, p in m.named_parameters() if p.grad is not None}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    got = torch.load(out)
    assert sorted(got) == sorted(ref)
    top = max(g.abs().max().item() for g in ref.values())
    for k, g in ref.items():
        scale = g.abs().max().item()
        if scale < 1e-4 * top:  # ~0 in exact arithmetic (depthwise bias under batch-stat BN, key biases): noise
            assert (got[k] - g).abs().max().item() <= 1e-4 * top, k
            continue
        err = (got[k] - g).abs().max().item() / scale
        assert err <= 3e-4, f"{k}: relative gradient error {err:.2e}"
