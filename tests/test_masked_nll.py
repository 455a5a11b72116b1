"""Fused masked-token loss (kernels/masked_nll.py) against the reference op and the reference model.

CPU runs go through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA), so every
shape here is tiny.  Tolerances: fp32 kernel vs fp64 reference 1e-5 (loss and grads); fp16/bf16 inputs vs the fp32
reference on the same rounded values: one output rounding (eps relative) on the loss, 2·eps·max|grad| on grads.
"""

import pytest
import torch

import nest_fast
from nest_fast import backend
from nest_fast.kernels import masked_nll
from nest_fast.ssl.loss import masked_token_loss_reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _masks(B, T, c=8, F=16, p=0.55, seed=0, device="cpu"):
    """Frame masks [B, F, T·c]: each token gets 0..c masked frames (so both the 7/8 and 6/8 cases occur)."""
    g = torch.Generator().manual_seed(seed)
    n_masked = torch.where(torch.rand(B, T, generator=g) < p, torch.randint(6, c + 1, (B, T), generator=g),
                           torch.randint(0, c, (B, T), generator=g))
    frames = (torch.arange(c)[None, None, :] < n_masked[:, :, None]).float().reshape(B, T * c)
    return frames[:, None, :].expand(B, F, T * c).contiguous().to(device)


def _inputs(B=2, D=32, T=12, K=90, H=1, bias=True, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(B, D, T, generator=g, dtype=torch.float64)
    w = torch.randn(K * H, D, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(K * H, generator=g, dtype=torch.float64) * 0.2 if bias else None
    tokens = torch.randint(0, K, (B, T, H), generator=g)
    masks = _masks(B, T, seed=seed + 1)
    cast = [t.to(device=device, dtype=dtype) if t is not None else None for t in (enc, w, b)]
    return cast, masks.to(device), tokens.to(device)


def _loss_and_grads(fn, enc, w, b, masks, tokens, K, H, dtype=None):
    leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_() if t is not None else None
              for t in (enc, w, b)]
    loss = fn(leaves[0], leaves[1], leaves[2], masks, tokens, K, H)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return loss, grads


def _check(got, want, atol, rtol=1e-4):
    (l1, g1), (l0, g0) = got, want
    torch.testing.assert_close(l1.double(), l0.double(), atol=atol, rtol=rtol)
    assert len(g1) == len(g0)
    for a, b in zip(g1, g0):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


@pytest.fixture(params=["gemm", "triton"])
def impl(request, monkeypatch):
    monkeypatch.setattr(masked_nll, "BACKWARD_IMPL", request.param)
    return request.param


@pytest.mark.parametrize("H,bias", [(1, True), (2, True), (1, False), (2, False)])
def test_loss_and_grads_match_reference_fp32_fp64(impl, H, bias):
    K = 90  # not a multiple of the interpreter's BLOCK_N (32): ragged last class chunk
    (enc, w, b), masks, tokens = _inputs(K=K, H=H, bias=bias)
    assert 0 < int(((masks.transpose(1, 2).reshape(2, 12, -1).mean(-1)) > 0.8).sum()) < 24
    want64 = _loss_and_grads(masked_token_loss_reference, enc, w, b, masks, tokens, K, H)
    got = _loss_and_grads(masked_nll.masked_token_loss_fast, enc, w, b, masks, tokens, K, H, dtype=torch.float32)
    assert got[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[1])
    _check(got, want64, atol=1e-5)
    want32 = _loss_and_grads(masked_token_loss_reference, enc, w, b, masks, tokens, K, H, dtype=torch.float32)
    _check(got, want32, atol=1e-5)
    if b is None:
        assert len(got[1]) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(impl, dtype):
    """16-bit inputs, fp32 accumulation: only the output roundings differ from the fp32 reference."""
    K, H = 70, 2
    (enc, w, b), masks, tokens = _inputs(K=K, H=H, dtype=dtype)
    got = _loss_and_grads(masked_nll.masked_token_loss_fast, enc, w, b, masks, tokens, K, H)
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1])
    want = _loss_and_grads(masked_token_loss_reference, enc, w, b, masks, tokens, K, H, dtype=torch.float32)
    eps = torch.finfo(dtype).eps  # fp16 ~1e-3, bf16 ~8e-3
    torch.testing.assert_close(got[0].float(), want[0], atol=0, rtol=eps)
    for a, r in zip(got[1], want[1]):
        assert (a.float() - r).abs().max() <= 2 * eps * r.abs().max()


def test_padding_short_tokens_and_garbage_frames():
    """Tokens shorter than T are right-padded with class 0 (NeMo's F.pad); unmasked frames never matter."""
    K, H, B, T = 40, 1, 2, 12
    (enc, w, b), masks, tokens = _inputs(K=K, H=H, T=T, seed=3)
    masks[1, :, 9 * 8:] = 1.0  # the last 3 tokens of item 1 are masked: their targets come from the padding
    tokens = tokens[:, :9]
    lens = [12, 9]
    enc[1, :, lens[1]:] = 1e4 * torch.randn(enc.shape[1], T - lens[1], dtype=enc.dtype)  # padded-frame garbage
    enc[0, :, masks[0].mean(0).reshape(T, 8).mean(-1) <= 0.8] = -3e3  # unmasked frames: huge values
    want = _loss_and_grads(masked_token_loss_reference, enc, w, b, masks, tokens, K, H)
    got = _loss_and_grads(masked_nll.masked_token_loss_fast, enc, w, b, masks, tokens, K, H, dtype=torch.float32)
    _check(got, want, atol=1e-5)
    assert torch.isfinite(want[0])


def test_no_masked_token_gives_zero_loss_and_counts(impl):
    K, H = 50, 2
    (enc, w, b), masks, tokens = _inputs(K=K, H=H, dtype=torch.float32)
    masks = torch.zeros_like(masks)
    masks[:, :, ::8] = 1.0  # 1/8 of the frames of every token: below the 7/8 rule
    ref = masked_token_loss_reference(enc, w, b, masks, tokens, K, H)
    assert torch.isnan(ref)  # NeMo's behaviour; the fast op deviates on purpose
    before = masked_nll.EMPTY_BATCHES
    loss, grads = _loss_and_grads(masked_nll.masked_token_loss_fast, enc, w, b, masks, tokens, K, H)
    assert masked_nll.EMPTY_BATCHES == before + 1
    assert loss.item() == 0.0 and loss.requires_grad
    for g in grads:
        assert torch.count_nonzero(g) == 0


def test_backend_dispatch_and_model_masked_loss_signature():
    K, H = 64, 1
    (enc, w, b), masks, tokens = _inputs(K=K, H=H, dtype=torch.float32)
    args = (enc, w, b, masks, tokens, K, H, 8, 0.8)
    assert not backend.will_use_fast("masked_token_loss", *args)
    with backend.use_backend("fast"):
        assert backend.will_use_fast("masked_token_loss", *args)
        fast = backend.dispatch("masked_token_loss", *args)
        # fp64 is not a kernel dtype: falls back to the reference
        assert not backend.will_use_fast("masked_token_loss", enc.double(), w.double(), b.double(), *args[3:])
    ref = backend.dispatch("masked_token_loss", *args)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_bad_shapes_raise():
    (enc, w, b), masks, tokens = _inputs(K=30, H=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        masked_nll.masked_token_loss_fast(enc, w[:-1], b, masks, tokens, 30, 1)
    with pytest.raises(ValueError, match="encoded has T"):
        masked_nll.masked_token_loss_fast(enc[:, :, :-1], w, b, masks, tokens, 30, 1)


def test_custom_op_opcheck():
    K, H = 40, 2
    (enc, w, b), masks, tokens = _inputs(K=K, H=H, dtype=torch.float32, seed=5)
    tm = masks.transpose(1, 2).reshape(2, 12, -1).mean(-1) > 0.8
    torch.library.opcheck(torch.ops.nest_fast.masked_nll_fwd.default,
                          (enc.requires_grad_(), w.requires_grad_(), b.requires_grad_(), tm, tokens, K, H))
    torch.library.opcheck(torch.ops.nest_fast.masked_nll_fwd.default, (enc, w, None, tm, tokens, K, H))


def test_torch_compile_fullgraph_matches_eager():
    K, H = 48, 2
    (enc, w, b), masks, tokens = _inputs(K=K, H=H, dtype=torch.float32, seed=7)
    compiled = torch.compile(masked_nll.masked_token_loss_fast, backend="aot_eager", fullgraph=True)
    got = _loss_and_grads(compiled, enc, w, b, masks, tokens, K, H)
    want = _loss_and_grads(masked_token_loss_reference, enc, w, b, masks, tokens, K, H)
    _check(got, want, atol=1e-5)


def _tiny_model_loss(seed_model, seed_step, fast):
    cfg = nest_fast.model_config("small", n_layers=1, d_model=32, n_heads=2)
    cfg["decoder"]["num_classes"] = cfg["quantizer"]["num_classes"] = 64
    torch.manual_seed(seed_model)
    model = nest_fast.NESTModel(cfg).train()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 32000, generator=g) * 0.1
    noisy = x + 0.05 * torch.randn(2, 32000, generator=g)
    n = torch.tensor([32000, 25000])
    torch.manual_seed(seed_step)
    with backend.use_backend("fast" if fast else "reference"):
        loss = model.training_loss(input_signal=x, input_signal_length=n, noisy_input_signal=noisy,
                                   noisy_input_signal_length=n, apply_mask=True)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return loss, dict(zip([k for k, p in model.named_parameters() if p.requires_grad], grads))


def test_tiny_nest_model_training_loss_fast_equals_reference(monkeypatch):
    # only this op goes fast: the other ops' fast kernels are tested (and toleranced) in their own files
    for op in backend.OPS:
        if op != "masked_token_loss":
            monkeypatch.setitem(backend._fast_cache, op, None)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return masked_nll.masked_token_loss_fast(*args, **kwargs)

    counted.supports = masked_nll.masked_token_loss_fast.supports
    monkeypatch.setitem(backend._fast_cache, "masked_token_loss", counted)
    loss_r, grads_r = _tiny_model_loss(0, 1, fast=False)
    assert not calls
    loss_f, grads_f = _tiny_model_loss(0, 1, fast=True)
    assert len(calls) == 1
    assert torch.isfinite(loss_r)
    torch.testing.assert_close(loss_f, loss_r, atol=1e-5, rtol=1e-5)
    assert grads_f.keys() == grads_r.keys()
    for k in grads_r:
        torch.testing.assert_close(grads_f[k], grads_r[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert grads_r["decoder.decoder_layers.0.weight"].abs().max() > 0


# --------------------------------------------------------------------------------------------------- GPU
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("H", [1, 2])
def test_gpu_nest_shapes_vs_fp32_reference(impl, dtype, H):
    K = 8192 // H + 3  # ragged class count
    B, D, T = 4, 512, 300
    (enc, w, b), masks, tokens = _inputs(B=B, D=D, T=T, K=K, H=H, dtype=dtype, device="cuda")
    masks = _masks(B, T, F=80, seed=2, device="cuda")
    with torch.backends.cudnn.flags(allow_tf32=False):
        want = _loss_and_grads(masked_token_loss_reference, enc, w, b, masks, tokens, K, H, dtype=torch.float32)
    got = _loss_and_grads(masked_nll.masked_token_loss_fast, enc, w, b, masks, tokens, K, H)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[0].float(), want[0], atol=tol, rtol=tol)
    for a, r in zip(got[1], want[1]):
        scale = r.abs().max().item()
        assert (a.float() - r).abs().max().item() <= (1e-4 if dtype == torch.float32 else 2e-2) * scale


@requires_cuda
def test_gpu_inductor_compile_and_empty_batch():
    K, H = 1000, 1
    (enc, w, b), masks, tokens = _inputs(B=2, D=128, T=64, K=K, H=H, dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(masked_nll.masked_token_loss_fast, fullgraph=True)
    got = _loss_and_grads(compiled, enc, w, b, masks, tokens, K, H)
    want = _loss_and_grads(masked_nll.masked_token_loss_fast, enc, w, b, masks, tokens, K, H)
    _check(got, want, atol=1e-3, rtol=1e-2)
    before = masked_nll.EMPTY_BATCHES
    loss, grads = _loss_and_grads(compiled, enc, w, b, torch.zeros_like(masks), tokens, K, H)
    assert masked_nll.EMPTY_BATCHES == before + 1 and loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)
