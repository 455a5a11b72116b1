"""Fused conv-module kernel (kernels/conv_module.py) vs ``conv_module_reference`` (SPEC §6.4).

CPU runs go through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA) on tiny
shapes. Tolerances (max abs error, scaled by max(1, max|reference|)):
  fp32: output 2e-5, every gradient 5e-5, running stats 1e-6 (exact formulas, only summation order differs).
  GPU bf16 / fp16 under autocast: fast and reference are both compared with an fp32 reference; the fast error
  must be at most 2x the reference's own low-precision error plus 2e-2 (bf16) / 4e-3 (fp16), relative.
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile

import pytest
import torch
from torch import nn

import nest_fast
from nest_fast import backend
from nest_fast.encoder.conformer import ConformerConvolution, conv_module_reference

cm = pytest.importorskip("nest_fast.kernels.conv_module")

# the Triton interpreter converts 1-element arrays to ints for loop bounds (a NumPy deprecation, harmless)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def make_module(C, k, use_bias=True, seed=0, device="cpu"):
    torch.manual_seed(seed)
    m = ConformerConvolution(C, k, use_bias=use_bias)
    bn = m.batch_norm
    with torch.no_grad():  # non-trivial BN parameters and running stats
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 1.5)
    return m.to(device)


def make_inputs(B, T, C, lengths=None, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=gen).to(device)
    mask = None
    if lengths is not None:
        mask = torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]
        mask = mask.to(device)
    r = torch.randn(B, T, C, generator=gen).to(device)  # upstream gradient / loss weights
    return x, mask, r


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def check(a, b, tol, what):
    scale = max(1.0, b.float().abs().max().item())
    err = max_err(a, b)
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol:.1e} * {scale:.3g}"


def run_both(m_fast, m_ref, x, mask, r):
    """Output and grads (input + every parameter) of the fast and the reference op."""
    out = {}
    for name, fn, m in (("fast", cm.conv_module_fast, m_fast), ("ref", conv_module_reference, m_ref)):
        xi = x.detach().clone().requires_grad_(True)
        y = fn(m, xi, mask)
        params = [p for p in m.parameters() if p.requires_grad]
        grads = torch.autograd.grad((y * r).sum(), [xi] + params)
        names = ["x"] + [n for n, p in m.named_parameters() if p.requires_grad]
        out[name] = (y.detach(), dict(zip(names, grads)))
    return out["fast"], out["ref"]


def compare(fast, ref, out_tol=2e-5, grad_tol=5e-5):
    check(fast[0], ref[0], out_tol, "output")
    assert fast[1].keys() == ref[1].keys()
    for n in ref[1]:
        if n == "depthwise_conv.bias":
            # with batch-statistics BN this grad is sum_t dy = 0 exactly; both sides hold rounding noise of a sum
            # of B*T terms, so it is scaled like the depthwise weight grad (sums of the same dy terms)
            scale = max(1.0, ref[1]["depthwise_conv.weight"].abs().max().item())
            err = max_err(fast[1][n], ref[1][n])
            assert err <= grad_tol * scale, f"grad {n}: max abs err {err:.3e} > {grad_tol:.1e} * {scale:.3g}"
        else:
            check(fast[1][n], ref[1][n], grad_tol, f"grad {n}")


def compare_bn_state(bn_fast, bn_ref, tol=1e-6):
    for name in ("running_mean", "running_var"):
        a, b = getattr(bn_fast, name), getattr(bn_ref, name)
        assert (a is None) == (b is None)
        if a is not None:
            check(a, b, tol, name)
    if bn_ref.num_batches_tracked is not None:
        assert int(bn_fast.num_batches_tracked) == int(bn_ref.num_batches_tracked)


@pytest.fixture
def small_tiles(monkeypatch):
    """Force 8x8 tiles, 2 tiles per program: several chunks per sequence, several tiles per chunk (the Chan
    merge across tiles and programs), several channel blocks, ragged edges in time and channels."""
    monkeypatch.setattr(cm, "_FORCE_GEOMETRY", (8, 8, 2))


# ----------------------------------------------------------------------------------------------------------------
# fp32 parity with the reference (interpreter on CPU, or CUDA)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,T,C,k,lengths,use_bias", [
    (2, 13, 8, 5, [13, 9], True),         # padding, odd length, k 5
    (3, 37, 16, 9, [37, 20, 0], True),    # k 9, one fully padded sequence
    (1, 7, 16, 9, None, False),           # T < k, no mask, use_bias=False
])
@pytest.mark.parametrize("train", [True, False])
def test_matches_reference(B, T, C, k, lengths, use_bias, train):
    m_fast = make_module(C, k, use_bias, device=DEV)
    m_ref = copy.deepcopy(m_fast)
    m_fast.train(train), m_ref.train(train)
    x, mask, r = make_inputs(B, T, C, lengths, device=DEV)
    fast, ref = run_both(m_fast, m_ref, x, mask, r)
    compare(fast, ref)
    compare_bn_state(m_fast.batch_norm, m_ref.batch_norm)
    if train:
        assert int(m_fast.batch_norm.num_batches_tracked) == 1
        assert not torch.equal(m_fast.batch_norm.running_mean, make_module(C, k, use_bias).batch_norm.running_mean.to(DEV))


@pytest.mark.parametrize("train", [True, False])
def test_multi_tile_multi_chunk(small_tiles, train):
    B, T, C, k = 2, 21, 12, 5
    m_fast = make_module(C, k, device=DEV)
    m_ref = copy.deepcopy(m_fast)
    m_fast.train(train), m_ref.train(train)
    x, mask, r = make_inputs(B, T, C, [21, 18], device=DEV)
    x = x * 3.0 + 5.0  # offset + scale: BN statistics far from zero mean (checks the centred merge)
    fast, ref = run_both(m_fast, m_ref, x, mask, r)
    compare(fast, ref)
    compare_bn_state(m_fast.batch_norm, m_ref.batch_norm)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_over_steps(momentum):
    B, T, C, k = 2, 11, 8, 5
    m_fast = make_module(C, k, device=DEV)
    m_fast.batch_norm.momentum = momentum
    m_ref = copy.deepcopy(m_fast)
    for step in range(2):
        x, mask, r = make_inputs(B, T, C, [11, 6], seed=10 + step, device=DEV)
        with torch.no_grad():
            y_fast = cm.conv_module_fast(m_fast, x, mask)
            y_ref = conv_module_reference(m_ref, x, mask)
        check(y_fast, y_ref, 2e-5, f"output step {step}")
        compare_bn_state(m_fast.batch_norm, m_ref.batch_norm)
        assert int(m_fast.batch_norm.num_batches_tracked) == step + 1
    # eval after training uses the updated running stats
    m_fast.eval(), m_ref.eval()
    x, mask, r = make_inputs(B, T, C, [11, 6], seed=99, device=DEV)
    compare(*run_both(m_fast, m_ref, x, mask, r))


@pytest.mark.parametrize("variant", ["no_tracking", "no_affine", "eval_no_tracking"])
def test_batchnorm_variants(variant):
    B, T, C, k = 2, 9, 8, 5
    m_fast = make_module(C, k, device=DEV)
    if variant in ("no_tracking", "eval_no_tracking"):
        m_fast.batch_norm = nn.BatchNorm1d(C, track_running_stats=False).to(DEV)
    else:
        m_fast.batch_norm = nn.BatchNorm1d(C, affine=False).to(DEV)
    if variant == "eval_no_tracking":
        m_fast.eval()  # no running stats -> batch statistics even in eval
    m_ref = copy.deepcopy(m_fast)
    x, mask, r = make_inputs(B, T, C, [9, 4], device=DEV)
    compare(*run_both(m_fast, m_ref, x, mask, r))
    compare_bn_state(m_fast.batch_norm, m_ref.batch_norm)


def test_single_value_per_channel_raises():
    m = make_module(8, 5, device=DEV)
    x, _, _ = make_inputs(1, 1, 8, device=DEV)
    with pytest.raises(ValueError, match="more than 1 value"):
        cm.conv_module_fast(m, x, None)


def test_dispatch_and_supports(monkeypatch):
    m = make_module(8, 5, device=DEV)
    x, mask, _ = make_inputs(2, 9, 8, [9, 4], device=DEV)
    assert cm.conv_module_fast.supports(m, x, mask)
    calls = []
    real = cm.conv_module_fast

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    spy.supports = real.supports
    monkeypatch.setitem(backend._fast_cache, "conv_module", spy)
    nest_fast.set_backend("fast")
    m(x, pad_mask=mask)
    assert calls == [1]
    # unsupported configurations fall back to the reference
    m2 = copy.deepcopy(m)
    m2.activation = nn.ReLU()
    assert not real.supports(m2, x, mask)
    m3 = copy.deepcopy(m)
    m3.depthwise_conv._right_padding += 1  # output length would change
    assert not real.supports(m3, x, mask)
    assert not real.supports(m, x.double(), mask)
    assert not real.supports(m, x[..., :4], None)
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not real.supports(m, x, mask)


def test_torch_compile_fullgraph():
    """The op traces without graph breaks (custom ops + autograd.Function) and matches the reference."""
    torch._dynamo.reset()
    B, T, C, k = 2, 10, 8, 9
    m_fast = make_module(C, k, device=DEV)
    m_fast.batch_norm.momentum = None  # cumulative average path as well
    m_ref = copy.deepcopy(m_fast)
    x, mask, r = make_inputs(B, T, C, [10, 7], device=DEV)
    fn = torch.compile(cm.conv_module_fast, backend="aot_eager", fullgraph=True)
    for step in range(2):
        xf = x.clone().requires_grad_(True)
        xr = x.clone().requires_grad_(True)
        yf, yr = fn(m_fast, xf, mask), conv_module_reference(m_ref, xr, mask)
        check(yf, yr, 2e-5, "compiled output")
        gf = torch.autograd.grad((yf * r).sum(), [xf, m_fast.depthwise_conv.weight, m_fast.batch_norm.weight])
        gr = torch.autograd.grad((yr * r).sum(), [xr, m_ref.depthwise_conv.weight, m_ref.batch_norm.weight])
        for a, b, n in zip(gf, gr, ("x", "dw", "gamma")):
            check(a, b, 5e-5, f"compiled grad {n}")
        compare_bn_state(m_fast.batch_norm, m_ref.batch_norm)
    torch._dynamo.reset()


def test_custom_ops_opcheck():
    """Schemas, fake (meta) implementations and dispatch of every custom op agree with the real kernels."""
    B, T, C, k = 2, 7, 8, 5
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, 2 * C, generator=gen).to(DEV)
    mask = (torch.arange(T)[None] >= torch.tensor([7, 3])[:, None]).to(DEV).view(torch.uint8)
    w = torch.randn(C, k, generator=gen).to(DEV)
    vec = lambda: torch.rand(C, generator=gen).to(DEV) + 0.5  # noqa: E731
    ops = torch.ops.nest_fast
    g = ops.conv_module_glu(h, mask)
    torch.library.opcheck(ops.conv_module_glu, (h, mask))
    torch.library.opcheck(ops.conv_module_glu, (h, None))
    rm, rv, nbt = vec(), vec(), torch.ones((), dtype=torch.long, device=DEV)
    coef = ops.conv_module_coef(g, w, vec(), vec(), vec(), rm.clone(), rv.clone(), nbt, True, 0.1, 1e-5, 2, -1)
    # the coef op mutates the running stats: opcheck checks its mutation annotations too
    torch.library.opcheck(ops.conv_module_coef, (g, w, vec(), vec(), vec(), rm, rv, nbt, True, 0.1, 1e-5, 2, -1),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.conv_module_coef, (g, w, None, None, None, rm, rv, None, False, 0.0, 1e-5, 2, -1))
    torch.library.opcheck(ops.conv_module_apply, (g, w, coef, 2))
    dz = torch.randn(B, T, C, generator=gen).to(DEV)
    s = torch.randn(2, C, generator=gen).to(DEV)
    torch.library.opcheck(ops.conv_module_bwd_dy, (g, w, dz, coef, None, 2, True, False, True))
    torch.library.opcheck(ops.conv_module_bwd_dy, (g, w, dz, coef, s, 2, True, True, False))
    dy = torch.randn(B, T, C, generator=gen).to(DEV)
    torch.library.opcheck(ops.conv_module_bwd_glu, (h, mask, w, dy, 2))


# ----------------------------------------------------------------------------------------------------------------
# a small ConformerEncoder with set_backend("fast")
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
def test_conformer_encoder_fast_backend(monkeypatch, train):
    # only conv_module goes fast here: other ops' kernels are tested in their own files
    for op in backend.OPS:
        if op != "conv_module":
            monkeypatch.setitem(backend._fast_cache, op, None)
    torch.manual_seed(0)
    kw = dict(feat_in=16, n_layers=2, d_model=32, n_heads=2, conv_kernel_size=9, subsampling="dw_striding", subsampling_factor=4,
              subsampling_conv_channels=8, ff_expansion_factor=2)
    kw.update(dropout=0.0, dropout_pre_encoder=0.0, dropout_emb=0.0, dropout_att=0.0)
    enc = nest_fast.ConformerEncoder(**kw).to(DEV)
    for mod in enc.modules():
        if isinstance(mod, nn.BatchNorm1d):
            with torch.no_grad():
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 1.5)
    enc_ref = copy.deepcopy(enc)
    enc.train(train), enc_ref.train(train)
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 16, 64, generator=gen).to(DEV)
    lengths = torch.tensor([64, 41]).to(DEV)
    results = {}
    for name, e in (("fast", enc), ("reference", enc_ref)):
        nest_fast.set_backend(name)
        out, out_len = e(audio_signal=feats, length=lengths)
        r = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(DEV)
        loss = (out * r).sum()
        grads = torch.autograd.grad(loss, list(e.parameters()))
        results[name] = (out.detach(), loss.detach(), grads, out_len)
    nest_fast.set_backend("fast")
    assert backend.will_use_fast("conv_module", enc.layers[0].conv, torch.zeros(2, 16, 32, device=DEV), None)
    fo, fl, fg, flen = results["fast"]
    ro, rl, rg, rlen = results["reference"]
    assert torch.equal(flen, rlen)
    check(fo, ro, 5e-5, "encoder output")
    check(fl, rl, 5e-5, "encoder loss")
    for (n, _), a, b in zip(enc.named_parameters(), fg, rg):
        check(a, b, 2e-4, f"encoder grad {n}")
    for (n, a), (_, b) in zip(enc.named_buffers(), enc_ref.named_buffers()):
        if "running" in n:
            check(a, b, 1e-6, n)
        elif "num_batches" in n:
            assert int(a) == int(b)


# ----------------------------------------------------------------------------------------------------------------
# 2-process CPU DDP: SyncBatchNorm statistics through the fast kernel
# ----------------------------------------------------------------------------------------------------------------
DDP_B = (2, 3)  # different local batch sizes: the merge must weight by count
DDP_T, DDP_C, DDP_K = 11, 8, 5
DDP_LENGTHS = [11, 7, 11, 4, 9]


def _ddp_global_data():
    x, mask, r = make_inputs(sum(DDP_B), DDP_T, DDP_C, DDP_LENGTHS, seed=5)
    return x * 2.0 + 1.0, mask, r


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        m = nn.SyncBatchNorm.convert_sync_batchnorm(make_module(DDP_C, DDP_K))
        assert isinstance(m.batch_norm, nn.SyncBatchNorm)
        x, mask, r = _ddp_global_data()
        lo = sum(DDP_B[:rank])
        sl = slice(lo, lo + DDP_B[rank])
        xl = x[sl].clone().requires_grad_(True)
        # PyTorch's own SyncBatchNorm refuses CPU tensors under an initialised process group
        refused = False
        try:
            conv_module_reference(copy.deepcopy(m), xl.detach(), mask[sl])
        except ValueError:
            refused = True
        nest_fast.set_backend("fast")
        assert backend.will_use_fast("conv_module", m, xl, mask[sl])
        y = m(xl, pad_mask=mask[sl])
        (y * r[sl]).sum().backward()
        torch.save({
            "y": y.detach(), "dx": xl.grad, "refused": refused,
            "grads": {n: p.grad for n, p in m.named_parameters()},
            "buffers": {n: b.clone() for n, b in m.named_buffers()},
        }, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_sync_batchnorm_two_process_ddp():
    import torch.multiprocessing as mp

    world = 2
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(world, _free_port(), d), nprocs=world, join=True)
        res = [torch.load(os.path.join(d, f"rank{i}.pt")) for i in range(world)]
    # explicit reference: what SyncBatchNorm computes = BatchNorm1d over the concatenated global batch
    m_ref = make_module(DDP_C, DDP_K)
    x, mask, r = _ddp_global_data()
    xr = x.clone().requires_grad_(True)
    y = conv_module_reference(m_ref, xr, mask)
    (y * r).sum().backward()
    lo = 0
    for rank, out in enumerate(res):
        sl = slice(lo, lo + DDP_B[rank])
        lo += DDP_B[rank]
        check(out["y"], y[sl].detach(), 2e-5, f"rank {rank} output")
        check(out["dx"], xr.grad[sl], 5e-5, f"rank {rank} input grad")
        for n, b in m_ref.named_buffers():
            if "running" in n:  # synced (global) statistics on every rank
                check(out["buffers"][n], b, 1e-6, f"rank {rank} {n}")
            else:
                assert int(out["buffers"][n]) == int(b)
    # rank-local parameter grads sum (DDP all-reduce) to the global-batch grads
    for n, p in m_ref.named_parameters():
        check(sum(o["grads"][n] for o in res), p.grad, 5e-5, f"summed grad {n}")
    # local statistics alone would differ: the sync really happened
    m_loc = make_module(DDP_C, DDP_K)
    conv_module_reference(m_loc, x[:DDP_B[0]], mask[:DDP_B[0]])
    assert max_err(m_loc.batch_norm.running_var, res[0]["buffers"]["batch_norm.running_var"]) > 1e-4
    assert all(o["refused"] for o in res) or HAS_CUDA


# ----------------------------------------------------------------------------------------------------------------
# GPU: low precision under autocast, larger shapes (multi-program chunks)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("train", [True, False])
def test_gpu_low_precision(dtype, tol, train):
    B, T, C, k = 8, 301, 256, 9
    lengths = [301, 250, 17, 301, 120, 299, 1, 200]
    m32 = make_module(C, k, device="cuda").train(train)
    m_fast, m_ref = copy.deepcopy(m32), copy.deepcopy(m32)
    x, mask, r = make_inputs(B, T, C, lengths, device="cuda")
    ref32 = run_both(m32, copy.deepcopy(m32), x, mask, r)[1]
    with torch.autocast("cuda", dtype=dtype):
        fast, ref_lp = run_both(m_fast, m_ref, x, mask, r)
    for what, a, b, c in [("output", fast[0], ref_lp[0], ref32[0])] + [
            (f"grad {n}", fast[1][n], ref_lp[1][n], ref32[1][n]) for n in ref32[1]]:
        scale = max(1.0, c.float().abs().max().item())
        e_fast, e_ref = max_err(a, c), max_err(b, c)
        assert e_fast <= 2 * e_ref + tol * scale, f"{dtype} {what}: fast {e_fast:.3e} vs ref {e_ref:.3e}"
    compare_bn_state(m_fast.batch_norm, m_ref.batch_norm, tol=1e-3)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("train", [True, False])
def test_gpu_fp32_large(train):
    B, T, C, k = 16, 1000, 512, 9  # several tiles per program on the GPU geometry
    m_fast = make_module(C, k, device="cuda").train(train)
    m_ref = copy.deepcopy(m_fast)
    lengths = [1000 - 37 * i for i in range(B)]
    x, mask, r = make_inputs(B, T, C, lengths, device="cuda")
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        fast, ref = run_both(m_fast, m_ref, x, mask, r)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev
    compare(fast, ref, out_tol=1e-4, grad_tol=2e-4)
    compare_bn_state(m_fast.batch_norm, m_ref.batch_norm, tol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_bf16_module_against_fp32(train):
    """A module cast to bf16 (bf16 params, grads and running stats): the fast path is at least as close to the
    fp32 reference as the bf16 reference is (≤ 2x its error + 2e-2 relative). Runs on CPU (interpreter) too."""
    B, T, C, k = 2, 13, 16, 9
    m0 = make_module(C, k, device=DEV).train(train)
    x, mask, r = make_inputs(B, T, C, [13, 8], device=DEV)
    m32 = copy.deepcopy(m0)
    ref32 = run_both(copy.deepcopy(m0), m32, x, mask, r)[1]
    m16 = copy.deepcopy(m0).to(torch.bfloat16)
    fast, ref16 = run_both(m16, copy.deepcopy(m16), x.bfloat16(), mask, r.bfloat16())
    for what, a, b, c in [("output", fast[0], ref16[0], ref32[0])] + [
            (f"grad {n}", fast[1][n], ref16[1][n], ref32[1][n]) for n in ref32[1]]:
        assert a.dtype == torch.bfloat16
        if what == "grad depthwise_conv.bias" and train:
            continue  # zero up to rounding noise (see compare)
        scale = max(1.0, c.float().abs().max().item())
        e_fast, e_ref = max_err(a, c), max_err(b, c)
        assert e_fast <= 2 * e_ref + 2e-2 * scale, f"bf16 {what}: fast {e_fast:.3e} vs ref {e_ref:.3e}"
    if train:
        assert int(m16.batch_norm.num_batches_tracked) == 1
        assert m16.batch_norm.running_var.dtype == torch.bfloat16
        check(m16.batch_norm.running_var, m32.batch_norm.running_var, 1e-2, "bf16 running_var")
