"""Conv module middle at NEST-L shapes (PERF.md §2): fused Triton kernels vs eager torch vs torch.compile.

The part between the two pointwise GEMMs: GLU → pad mask → depthwise conv (k 9) → BatchNorm (train) → Swish,
C = 512, bf16 activations under autocast (fp32 parameters, as in training), B·T = 16 × 1024 (16k frames) and
32 × 2048 (64k frames), ~10 % padded frames. Forward and forward + backward (grads of the GLU input, depthwise
weight and bias, BN weight and bias) per variant:

* ``fast``     : ``conv_module_mid`` on h [B,T,2C] (kernels/conv_module.py).
* ``eager``    : glu(dim=1) → masked_fill → CausalConv1D (pad + depthwise Conv1d) → BatchNorm1d → SiLU on the
                 reference's [B,2C,T] layout (what ``conv_module_reference`` runs between the GEMMs).
* ``compiled`` : ``torch.compile`` (inductor, default mode) of ``eager``.

Bandwidth is reported against the *minimal* bytes of the op, with N = B·T frames, s = 2 bytes (bf16):
  forward   read h [N,2C] + write z [N,C]                          = 3·N·C·s
  backward  read dz [N,C] + read h [N,2C] + write dh [N,2C]        = 5·N·C·s
  fwd+bwd                                                          = 8·N·C·s
(parameters, masks and per-channel statistics are negligible). The fused path itself moves about 6·N·C·s
forward in training (h→g, stats pass over g, apply pass g→z) and 10·N·C·s backward (two passes over g and dz,
dy written once, dy and h read, dh written). ``copy_GBps`` is a measured device-to-device copy
(``dst.copy_(src)``, 1 GiB, read + write counted) for the ratio.

Run: ``pytest bench/bench_conv_module.py --benchmark -s`` (the table prints as the variants finish).
PERF.md target: forward ≥ 70 % of copy bandwidth, backward ≥ 50 %, fwd+bwd ≥ 3× faster than eager.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import cuda_peak_mib, cuda_time_ms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

C, K = 512, 9
DEV = "cuda"  # a CPU smoke run of the helpers (Triton interpreter, tiny SHAPES) may override DEV and SHAPES
SHAPES = {"16k": (16, 1024), "64k": (32, 2048)}
VARIANTS = ["eager", "compiled", "fast"]
RESULTS = {}


_time_ms = cuda_time_ms
_peak_mib = cuda_peak_mib


@pytest.fixture(scope="module")
def copy_gbps():
    src = torch.empty(2 ** 29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), iters=20, warmup=3)
    gbps = 2 * src.numel() * src.element_size() / ms / 1e6
    RESULTS["_copy"] = gbps
    del src, dst
    torch.cuda.empty_cache()
    return gbps


def _module():
    from nest_fast.encoder.conformer import ConformerConvolution

    torch.manual_seed(0)
    m = ConformerConvolution(C, K).to(DEV)
    with torch.no_grad():
        m.batch_norm.weight.uniform_(0.5, 1.5)
        m.batch_norm.bias.uniform_(-0.5, 0.5)
    return m


def _inputs(B, T, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    lengths = torch.randint(int(0.8 * T), T + 1, (B,), device=DEV, generator=gen)
    lengths[0] = T
    mask = torch.arange(T, device=DEV)[None, :] >= lengths[:, None]
    h = torch.randn(B, T, 2 * C, device=DEV, generator=gen).to(torch.bfloat16)
    dz = torch.randn(B, T, C, device=DEV, generator=gen).to(torch.bfloat16)
    return h, mask, dz


def _eager_mid(m, h_t, mask):
    """The reference's middle on [B,2C,T]: exactly conv_module_reference between its two GEMMs."""
    g = F.glu(h_t, dim=1).masked_fill(mask[:, None, :], 0.0)
    return m.activation(m.batch_norm(m.depthwise_conv(g)))


def _check_fast_against_reference():
    """fast == reference on the whole module at the 16k shape: the bf16/autocast fast path must be as close to
    the fp32 reference as the bf16/autocast reference is (≤ 2× its error + 1e-2 relative)."""
    from nest_fast.encoder.conformer import conv_module_reference
    from nest_fast.kernels.conv_module import conv_module_fast

    B, T = SHAPES["16k"]
    m = _module()
    h, mask, _ = _inputs(B, T, seed=1)
    x = h[..., :C].float()
    r = torch.randn(B, T, C, device=DEV)
    res = {}
    with torch.backends.cudnn.flags(allow_tf32=False):
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            for name, fn, ac in (("ref32", conv_module_reference, False), ("ref16", conv_module_reference, True),
                                 ("fast", conv_module_fast, True)):
                mm = copy.deepcopy(m)
                xi = x.clone().requires_grad_(True)
                with torch.autocast(DEV, dtype=torch.bfloat16, enabled=ac):
                    y = fn(mm, xi, mask)
                params = [xi, mm.depthwise_conv.weight, mm.batch_norm.weight, mm.pointwise_conv1.weight]
                grads = torch.autograd.grad((y.float() * r).sum(), params)
                res[name] = [y.float()] + [g.float() for g in grads] + [mm.batch_norm.running_var]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    for i, what in enumerate(["out", "dx", "d_dw", "d_gamma", "d_pw1", "running_var"]):
        ref = res["ref32"][i]
        scale = ref.abs().max().item()
        e_fast = (res["fast"][i] - ref).abs().max().item()
        e_ref = (res["ref16"][i] - ref).abs().max().item()
        assert e_fast <= 2 * e_ref + 1e-2 * scale, f"{what}: fast err {e_fast:.3e}, bf16 reference err {e_ref:.3e}"


_CHECKED = []


def _make(variant, shape):
    from nest_fast.kernels.conv_module import conv_module_mid

    B, T = SHAPES[shape]
    m = _module()
    h, mask, dz = _inputs(B, T)
    params = [m.depthwise_conv.weight, m.depthwise_conv.bias, m.batch_norm.weight, m.batch_norm.bias]
    if variant == "fast":
        hin, dzin = h.clone().requires_grad_(True), dz

        def fwd():
            with torch.autocast(DEV, dtype=torch.bfloat16):
                return conv_module_mid(hin, mask, m.depthwise_conv, m.batch_norm)
    else:
        hin = h.transpose(1, 2).contiguous().requires_grad_(True)
        dzin = dz.transpose(1, 2).contiguous()
        f = _eager_mid if variant == "eager" else torch.compile(_eager_mid)

        def fwd():
            with torch.autocast(DEV, dtype=torch.bfloat16):
                return f(m, hin, mask)

    def fwd_bwd():
        z = fwd()
        return torch.autograd.grad(z, [hin] + params, dzin)

    return fwd, fwd_bwd


def _table():
    copy_bw = RESULTS.get("_copy", float("nan"))
    lines = [f"\nconv module middle (GLU→mask→dwconv k{K}→BN train→SiLU), {torch.cuda.get_device_name(0)}, C={C}, "
             f"bf16 autocast; copy bandwidth {copy_bw:.0f} GB/s; GB/s = minimal bytes (3/5/8·N·C·2) / time",
             f"{'shape':<6}{'variant':<10}{'fwd ms':>9}{'bwd ms':>9}{'f+b ms':>9}{'fwd GB/s':>10}{'bwd GB/s':>10}"
             f"{'f+b GB/s':>10}{'f+b %copy':>10}{'peak MiB':>10}{'vs eager':>9}"]
    for shape in SHAPES:
        for v in VARIANTS:
            r = RESULTS.get((shape, v))
            if r is None:
                continue
            base = RESULTS.get((shape, "eager"))
            speed = base["fwd_bwd_ms"] / r["fwd_bwd_ms"] if base else float("nan")
            lines.append(f"{shape:<6}{v:<10}{r['fwd_ms']:>9.3f}{r['bwd_ms']:>9.3f}{r['fwd_bwd_ms']:>9.3f}"
                         f"{r['fwd_GBps']:>10.0f}{r['bwd_GBps']:>10.0f}{r['fwd_bwd_GBps']:>10.0f}"
                         f"{100 * r['fwd_bwd_GBps'] / copy_bw:>9.0f}%{r['peak_mib']:>10.0f}{speed:>8.2f}x")
    return "\n".join(lines)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_conv_module(benchmark, copy_gbps, variant, shape):
    if not _CHECKED:
        _check_fast_against_reference()
        _CHECKED.append(True)
    fwd, fwd_bwd = _make(variant, shape)

    def run():
        out = fwd_bwd()
        torch.cuda.synchronize()
        return out

    B, T = SHAPES[shape]
    N = B * T
    elt = 2  # bf16
    bytes_fwd, bytes_bwd = 3 * N * C * elt, 5 * N * C * elt
    ms_fb = _time_ms(run)
    ms_f = _time_ms(fwd)
    ms_b = max(ms_fb - ms_f, 1e-6)
    peak = _peak_mib(run)
    r = dict(fwd_ms=ms_f, bwd_ms=ms_b, fwd_bwd_ms=ms_fb, peak_mib=peak,
             fwd_GBps=bytes_fwd / ms_f / 1e6, bwd_GBps=bytes_bwd / ms_b / 1e6,
             fwd_bwd_GBps=(bytes_fwd + bytes_bwd) / ms_fb / 1e6)
    RESULTS[(shape, variant)] = r
    benchmark.extra_info.update(device=torch.cuda.get_device_name(0), variant=variant, shape=shape, frames=N, C=C,
                                kernel_size=K, dtype="bf16", copy_GBps=copy_gbps,
                                bytes_formula="fwd 3*N*C*2, bwd 5*N*C*2 (minimal: read h, write z; read dz, h, "
                                              "write dh)",
                                fwd_pct_copy=100 * r["fwd_GBps"] / copy_gbps,
                                bwd_pct_copy=100 * r["bwd_GBps"] / copy_gbps, **r)
    base = RESULTS.get((shape, "eager"))
    if base is not None and variant != "eager":
        benchmark.extra_info["speedup_vs_eager"] = base["fwd_bwd_ms"] / ms_fb
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    print(_table())
