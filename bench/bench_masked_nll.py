"""Masked-token loss at NEST-L shapes (PERF.md §3): fused kernel vs eager reference vs bare GEMM.

D 512, 8192 classes, B·T = 16 × 1024 encoder frames, ~30 % masked tokens, bf16.  Every variant runs forward +
backward (grads of encoded/selected rows, weight, bias):

* ``bare_gemm``        : ``X_sel @ Wᵀ`` and its backward on the selected rows (the floor: 3 GEMMs).
* ``eager_full_frame`` : the reference op (NeMo's order: decoder on every frame, log_softmax, select, NLL).
* ``eager_selected``   : the same eager decoder + log_softmax + NLL on pre-selected rows.
* ``fused_gemm_bwd``   : ``masked_token_loss_fast`` (Triton forward, Triton recompute + cuBLAS backward).
* ``fused_triton_bwd`` : the same with the all-Triton atomic backward.

Run: ``pytest bench/bench_masked_nll.py --benchmark -s`` (the table prints as the variants finish).
PERF.md targets: fused ≤ 1.2× bare_gemm; ≥ 1.5× faster and ≥ 5× less peak memory than eager_full_frame.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import cuda_peak_mib, cuda_time_ms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

B, T, D, K, H = 16, 1024, 512, 8192, 1
MASK_P = 0.3
RESULTS = {}
VARIANTS = ["bare_gemm", "eager_full_frame", "eager_selected", "fused_gemm_bwd", "fused_triton_bwd"]


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    dev = "cuda"
    enc = torch.randn(B, D, T, device=dev).to(torch.bfloat16)
    w = (torch.randn(K * H, D, device=dev) * (6 / (K * H + D)) ** 0.5).to(torch.bfloat16)
    b = (torch.rand(K * H, device=dev) * 2 - 1).mul(D ** -0.5).to(torch.bfloat16)
    tok_mask = torch.rand(B, T, device=dev) < MASK_P
    masks = tok_mask.float().repeat_interleave(8, dim=1)[:, None, :].expand(B, 80, T * 8).contiguous()
    tokens = torch.randint(0, K, (B, T, H), device=dev)
    b_idx, t_idx = tok_mask.nonzero(as_tuple=True)
    x_sel = enc[b_idx, :, t_idx].contiguous()
    tgt_sel = tokens[b_idx, t_idx, 0]
    return dict(enc=enc, w=w, b=b, masks=masks, tokens=tokens, x_sel=x_sel, tgt_sel=tgt_sel,
                gy=torch.randn(x_sel.shape[0], K * H, device=dev).to(torch.bfloat16) * 1e-4)


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _make(variant, d):
    from nest_fast.kernels import masked_nll
    from nest_fast.ssl.loss import masked_token_loss_reference

    enc, w, b, x_sel = _leaf(d["enc"]), _leaf(d["w"]), _leaf(d["b"]), _leaf(d["x_sel"])
    if variant == "bare_gemm":
        def run():
            y = x_sel @ w.t()
            return torch.autograd.grad(y, (x_sel, w), d["gy"])
    elif variant == "eager_full_frame":
        def run():
            loss = masked_token_loss_reference(enc, w, b, d["masks"], d["tokens"], K, H)
            return torch.autograd.grad(loss, (enc, w, b))
    elif variant == "eager_selected":
        def run():
            logp = torch.log_softmax(F.linear(x_sel, w, b), dim=-1)
            loss = F.nll_loss(logp, d["tgt_sel"])
            return torch.autograd.grad(loss, (x_sel, w, b))
    else:
        impl = "gemm" if variant == "fused_gemm_bwd" else "triton"

        def run():
            prev, masked_nll.BACKWARD_IMPL = masked_nll.BACKWARD_IMPL, impl
            try:
                loss = masked_nll.masked_token_loss_fast(enc, w, b, d["masks"], d["tokens"], K, H)
                return torch.autograd.grad(loss, (enc, w, b))
            finally:
                masked_nll.BACKWARD_IMPL = prev
    return run


def _check_fused_against_reference(d, variant):
    """fast == reference: bf16 fused result vs the fp32 reference on the same (bf16-rounded) inputs."""
    from nest_fast.kernels import masked_nll
    from nest_fast.ssl.loss import masked_token_loss_reference

    prev = masked_nll.BACKWARD_IMPL
    masked_nll.BACKWARD_IMPL = "gemm" if variant == "fused_gemm_bwd" else "triton"
    try:
        leaves = [_leaf(d[k]) for k in ("enc", "w", "b")]
        loss = masked_nll.masked_token_loss_fast(*leaves, d["masks"], d["tokens"], K, H)
        grads = torch.autograd.grad(loss, leaves)
    finally:
        masked_nll.BACKWARD_IMPL = prev
    leaves32 = [_leaf(d[k].float()) for k in ("enc", "w", "b")]
    with torch.backends.cudnn.flags(allow_tf32=False):
        ref = masked_token_loss_reference(*leaves32, d["masks"], d["tokens"], K, H)
        ref_grads = torch.autograd.grad(ref, leaves32)
    torch.testing.assert_close(loss.float(), ref, atol=0, rtol=1e-2)
    for g, r in zip(grads, ref_grads):
        assert (g.float() - r).abs().max() <= 2e-2 * r.abs().max()


_time_ms = cuda_time_ms
_peak_mib = cuda_peak_mib


def _table():
    lines = [f"\nmasked-token loss, {torch.cuda.get_device_name(0)}: B·T={B * T}, D={D}, classes={K}, "
             f"M={RESULTS.get('_M', '?')} masked, bf16, fwd+bwd",
             f"{'variant':<18}{'ms':>9}{'peak MiB':>11}{'TFLOP/s':>9}"]
    for v in VARIANTS:
        if v in RESULTS:
            r = RESULTS[v]
            lines.append(f"{v:<18}{r['ms']:>9.3f}{r['peak_mib']:>11.1f}{r['tflops']:>9.1f}")
    return "\n".join(lines)


@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_nll(benchmark, data, variant):
    M = data["x_sel"].shape[0]
    RESULTS["_M"] = M
    if variant.startswith("fused"):
        _check_fused_against_reference(data, variant)
    fn = _make(variant, data)

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    peak = _peak_mib(run)
    ms = _time_ms(run)
    flops = 6.0 * M * D * K * H  # the three GEMMs on the selected rows (useful work, same for every variant)
    RESULTS[variant] = dict(ms=ms, peak_mib=peak, tflops=flops / ms / 1e9)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(0), variant=variant, M=M, ms=ms,
                                peak_mib=peak, tflops=flops / ms / 1e9)
    if variant.startswith("fused"):
        for other in ("bare_gemm", "eager_full_frame", "eager_selected"):
            if other in RESULTS:
                benchmark.extra_info[f"time_vs_{other}"] = ms / RESULTS[other]["ms"]
                benchmark.extra_info[f"mem_vs_{other}"] = peak / max(RESULTS[other]["peak_mib"], 1e-9)
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    print(_table())
