"""The fused relative-position attention kernel (kernels/rel_pos_attention.py) against the reference.

On CPU the Triton kernels run through the interpreter (TRITON_INTERPRET=1, set by conftest) with one small
config (BLOCK 16), so tiny shapes still cover several query/key blocks, partial blocks and padded head dims.
With a GPU the same small tests run on it (compiled kernels, fp32 products as 3xTF32).
Tolerances (fp32 kernel vs the reference in fp64, inputs O(1)): 2e-5 absolute + 1e-4 relative on the output
and on every gradient; measured errors are ~1e-6.  GPU tests (skipped without CUDA) check bf16/fp16 against
the reference's own rounding error at real shapes, including T ≡ 64 (mod 128), and torch.compile.
"""

import math

import pytest
import torch

import nest_fast
from nest_fast import backend
from nest_fast.encoder.attention import rel_pos_attention_reference

triton = pytest.importorskip("triton")
K = pytest.importorskip("nest_fast.kernels.rel_pos_attention")
rel_pos_attention_fast = K.rel_pos_attention_fast

# the interpreter warns (numpy) on every runtime loop bound; nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATOL, RTOL = 2e-5, 1e-4  # fp32 kernel vs fp64 reference
NAMES = ("q", "k", "v", "p", "pos_bias_u", "pos_bias_v")


def make_inputs(B, T, H, D, seed=0, device=DEV, dtype=torch.float64, p_batch_dim=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    p = rnd(1, 2 * T - 1, H, D) if p_batch_dim else rnd(2 * T - 1, H, D)
    return [rnd(B, T, H, D), rnd(B, T, H, D), rnd(B, T, H, D), p, rnd(H, D, scale=0.5), rnd(H, D, scale=0.5)]


def run(fn, inputs, grad_out, **kw):
    """Output and the gradients of all six inputs."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves, **kw)
    out.backward(grad_out.to(out.device, out.dtype))
    return out.detach(), [x.grad for x in leaves]


def lens(*values):
    return torch.tensor(values, device=DEV)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).to(DEV)


def assert_close(actual, expected, name, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


CASES = [  # B, T, H, D, lengths
    (1, 16, 1, 16, None),          # exactly one block, no mask
    (2, 40, 2, 16, [40, 23]),      # T not a multiple of the block, padding in the second row
    (2, 37, 2, 44, [37, 0]),       # odd T, head dim 44 (padded to 64), an all-padded batch row
    (1, 5, 1, 8, [3]),             # T < block, D < 16
]


@pytest.mark.parametrize("B,T,H,D,lengths", CASES)
def test_matches_reference_fp32_vs_fp64(B, T, H, D, lengths):
    inputs = make_inputs(B, T, H, D, seed=B * 1000 + T)
    go = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEV)
    L = None if lengths is None else lens(*lengths)
    ref_out, ref_grads = run(rel_pos_attention_reference, inputs, go, lengths=L)
    out, grads = run(rel_pos_attention_fast, [x.float() for x in inputs], go, lengths=L)
    assert out.dtype == torch.float32 and out.shape == (B, T, H, D)
    assert_close(out, ref_out, "out")
    for name, g, rg in zip(NAMES, grads, ref_grads):
        assert g.dtype == torch.float32 and g.shape == rg.shape
        assert_close(g, rg, "grad " + name)
    # the fp32 reference is no closer to fp64 than the kernel is (same order of error)
    ref32_out, _ = run(rel_pos_attention_reference, [x.float() for x in inputs], go, lengths=L)
    assert (out.double() - ref_out).abs().max() <= 10 * (ref32_out.double() - ref_out).abs().max() + 1e-6


def test_fp16_within_reference_rounding():
    """fp16 inputs, fp32 accumulation: no further from the fp64 truth than the reference run in fp16 (2× + slack).
    (bf16 is checked on the GPU only: the Triton 3.6 interpreter's tl.dot multiplies bf16 bit patterns.)"""
    B, T, H, D = 2, 40, 2, 16
    inputs = make_inputs(B, T, H, D, seed=7)
    L = lens(40, 23)
    go = randn(B, T, H, D, dtype=torch.float64)
    gold_out, gold_grads = run(rel_pos_attention_reference, inputs, go, lengths=L)
    half = [x.half() for x in inputs]
    low_out, low_grads = run(rel_pos_attention_reference, half, go, lengths=L)
    out, grads = run(rel_pos_attention_fast, half, go, lengths=L)
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    err = lambda a, b: (a.double() - b).abs().max().item()  # noqa: E731
    assert err(out, gold_out) <= 2 * err(low_out, gold_out) + 1e-3
    for name, g, lg, gg in zip(NAMES, grads, low_grads, gold_grads):
        assert err(g, gg) <= 2 * err(lg, gg) + 1e-3 * gg.abs().max().item(), name


def test_padding_is_exact_zero():
    B, T, H, D = 2, 37, 2, 16
    lengths = lens(21, 0)
    inputs = [x.float() for x in make_inputs(B, T, H, D, seed=5)]
    go = randn(B, T, H, D)
    out, (dq, dk, dv, dp, du, dvb) = run(rel_pos_attention_fast, inputs, go, lengths=lengths)
    assert torch.all(out[0, 21:] == 0) and torch.all(out[1] == 0)  # NeMo then returns linear_out.bias
    for g in (dq, dk, dv):
        assert torch.all(g[0, 21:] == 0) and torch.all(g[1] == 0)
    assert torch.isfinite(dp).all() and torch.isfinite(du).all() and torch.isfinite(dvb).all()
    # everything at zero length: all outputs and gradients are zero
    out0, grads0 = run(rel_pos_attention_fast, inputs, go, lengths=lens(0, 0))
    assert torch.all(out0 == 0) and all(torch.all(g == 0) for g in grads0)


def test_p_with_batch_dim_and_lengths_as_att_mask_companion():
    """p given as [1, 2T-1, H, D] (the encoder's layout), att_mask passed along with lengths (ignored)."""
    B, T, H, D = 2, 19, 2, 8
    inputs = make_inputs(B, T, H, D, seed=3, p_batch_dim=True)
    L = lens(19, 11)
    mask = nest_fast.encoder.attention.lengths_to_att_mask(L, T)
    go = randn(B, T, H, D, dtype=torch.float64)
    ref_out, ref_grads = run(rel_pos_attention_reference, inputs, go, lengths=L, att_mask=mask)
    out, grads = run(rel_pos_attention_fast, [x.float() for x in inputs], go, lengths=L, att_mask=mask)
    assert grads[3].shape == (1, 2 * T - 1, H, D)
    assert_close(out, ref_out, "out")
    for name, g, rg in zip(NAMES, grads, ref_grads):
        assert_close(g, rg, "grad " + name)


def test_non_contiguous_inputs():
    B, T, H, D = 2, 24, 2, 16
    base = make_inputs(B, T, H, D, seed=9, dtype=torch.float32)
    # q, k, v as strided views of one fused projection (like a qkv linear), grad_out non-contiguous
    qkv = torch.stack(base[:3], dim=3).reshape(B, T, H, 3 * D)
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    go = randn(B, T, D, H).transpose(2, 3)
    L = lens(24, 17)
    ref_out, ref_grads = run(rel_pos_attention_reference, [q, k, v, *base[3:]], go, lengths=L)
    out, grads = run(rel_pos_attention_fast, [q, k, v, *base[3:]], go, lengths=L)
    assert_close(out, ref_out, "out", atol=1e-4, rtol=1e-4)
    for name, g, rg in zip(NAMES, grads, ref_grads):
        assert_close(g, rg, "grad " + name, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- dropout
def test_dropout_off_is_exactly_no_dropout():
    B, T, H, D = 2, 20, 2, 16
    inputs = [x.float() for x in make_inputs(B, T, H, D, seed=11)]
    L = lens(20, 13)
    base = rel_pos_attention_fast(*inputs, lengths=L)
    assert torch.equal(rel_pos_attention_fast(*inputs, lengths=L, dropout_p=0.0, training=True), base)
    assert torch.equal(rel_pos_attention_fast(*inputs, lengths=L, dropout_p=0.3, training=False), base)
    assert_close(base, rel_pos_attention_reference(*[x.double() for x in inputs], lengths=L), "out")


def test_dropout_same_seed_same_output_and_matches_reference_with_same_mask(monkeypatch):
    B, T, H, D, p_drop = 2, 24, 2, 16, 0.25
    inputs = [x.float() for x in make_inputs(B, T, H, D, seed=12)]
    L = lens(24, 15)
    go = randn(B, T, H, D)
    torch.manual_seed(1234)
    out1, grads1 = run(rel_pos_attention_fast, inputs, go, lengths=L, dropout_p=p_drop, training=True)
    torch.manual_seed(1234)
    out2, _ = run(rel_pos_attention_fast, inputs, go, lengths=L, dropout_p=p_drop, training=True)
    assert torch.equal(out1, out2)
    torch.manual_seed(4321)
    out3, _ = run(rel_pos_attention_fast, inputs, go, lengths=L, dropout_p=p_drop, training=True)
    assert not torch.equal(out1, out3)

    # the reference with the kernel's keep-mask gives the same output and gradients (backward regenerates it)
    torch.manual_seed(1234)
    keep = K.dropout_keep_mask(K.draw_seed(DEV), B, H, T, p_drop)
    monkeypatch.setattr(torch.nn.functional, "dropout",
                        lambda x, p, training=True: x * keep.to(x.dtype) / (1.0 - p))
    ref_out, ref_grads = run(rel_pos_attention_reference, [x.double() for x in inputs], go.double(), lengths=L,
                             dropout_p=p_drop, training=True)
    assert_close(out1, ref_out, "out")
    for name, g, rg in zip(NAMES, grads1, ref_grads):
        assert_close(g, rg, "grad " + name)


def test_dropout_keep_rate():
    B, H, T, p_drop = 2, 2, 40, 0.3
    torch.manual_seed(0)
    keep = K.dropout_keep_mask(K.draw_seed(DEV), B, H, T, p_drop)
    n = keep.numel()
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p_drop)) < 4 * math.sqrt(p_drop * (1 - p_drop) / n)
    # no visible structure: every (b, h) slice and both halves of the rows keep about the same fraction
    per = keep.float().mean(dim=(2, 3)).flatten()
    assert (per - (1 - p_drop)).abs().max() < 0.06
    # with v = 1 every valid output is sum_j attn_ij keep_ij / (1 - p): 1 on average
    q, k, _, p, u, vb = [x.float() for x in make_inputs(B, T, H, 16, seed=13)]
    v = torch.ones_like(q)
    out = rel_pos_attention_fast(q * 0.1, k * 0.1, v, p * 0.1, u, vb, dropout_p=p_drop, training=True)
    assert abs(out.mean().item() - 1.0) < 0.03


# ----------------------------------------------------------------------------------------------- dispatch
def test_supports_and_dispatch():
    B, T, H, D = 2, 10, 2, 8
    args = [x.float() for x in make_inputs(B, T, H, D)]
    L = lens(10, 4)
    assert K.supports(*args, lengths=L)
    assert K.supports(*args)  # no mask at all
    assert not K.supports(*args, att_mask=torch.zeros(B, T, T, dtype=torch.bool, device=DEV))  # arbitrary mask: decline
    assert not K.supports(*[x.double() for x in args], lengths=L)  # fp64: reference only
    assert not K.supports(*args[:3], args[3][:-1], *args[4:], lengths=L)  # wrong number of positions
    assert not K.supports(*args, lengths=L, dropout_p=1.0, training=True)
    with pytest.raises(ValueError):
        rel_pos_attention_fast(*args, att_mask=torch.zeros(B, T, T, dtype=torch.bool, device=DEV))
    with backend.use_backend("fast"):
        assert backend.will_use_fast("rel_pos_attention", *args, lengths=L, att_mask=None)
        assert not backend.will_use_fast("rel_pos_attention", *args, lengths=None,
                                         att_mask=torch.zeros(B, T, T, dtype=torch.bool, device=DEV))


def test_supports_cpu_only_under_interpreter(monkeypatch):
    args = [x.float() for x in make_inputs(1, 4, 1, 8, device="cpu")]
    monkeypatch.setattr(backend, "triton_interpret", lambda: False)
    assert not K.supports(*args)


def test_opcheck():
    B, T, H, D = 1, 9, 1, 8
    q, k, v, p, u, vb = [x.float().requires_grad_() for x in make_inputs(B, T, H, D, seed=21)]
    lengths = torch.tensor([7], dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.nest_fast.rel_pos_attention_fwd.default, (q, k, v, p, u, vb, lengths, None, 0.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph():
    """No graph break (fullgraph) and the same numbers, forward and backward (aot_eager: no C++ compiler)."""
    B, T, H, D = 2, 12, 2, 8
    inputs = [x.float() for x in make_inputs(B, T, H, D, seed=17)]
    L = lens(12, 7)
    go = randn(B, T, H, D)
    torch._dynamo.reset()
    compiled = torch.compile(rel_pos_attention_fast, backend="aot_eager", fullgraph=True)
    out_c, grads_c = run(compiled, inputs, go, lengths=L)
    out_e, grads_e = run(rel_pos_attention_fast, inputs, go, lengths=L)
    torch.testing.assert_close(out_c, out_e)
    for g, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(g, ge)


# ----------------------------------------------------------------------------------------------- encoder
def test_conformer_encoder_fast_backend_matches_reference():
    torch.manual_seed(0)
    enc = nest_fast.ConformerEncoder(feat_in=16, n_layers=2, d_model=32, n_heads=2, subsampling="dw_striding",
                                     subsampling_factor=4, subsampling_conv_channels=8, ff_expansion_factor=2,
                                     conv_kernel_size=5, dropout=0.0, dropout_pre_encoder=0.0, dropout_emb=0.0,
                                     dropout_att=0.0).to(DEV)
    with torch.no_grad():  # NeMo zero-inits the position biases; make them matter here
        for layer in enc.layers:
            layer.self_attn.pos_bias_u.normal_(0, 0.5)
            layer.self_attn.pos_bias_v.normal_(0, 0.5)
    enc.eval()
    x = randn(2, 16, 96)
    length = lens(96, 57)
    with backend.use_backend("reference"):
        ref, ref_len = enc(audio_signal=x, length=length)
    nest_fast.set_backend("fast")
    T = ref.shape[-1]
    assert backend.will_use_fast("rel_pos_attention", *make_inputs(2, T, 2, 16, dtype=torch.float32),
                                 lengths=ref_len, att_mask=None)
    out, out_len = enc(audio_signal=x, length=length)
    assert torch.equal(out_len, ref_len)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- GPU
def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H,D,lengths", [
    (2, 192, 8, 64, [192, 131]),   # T ≡ 64 (mod 128)
    (2, 320, 8, 64, [320, 320]),   # T ≡ 64 (mod 128)
    (3, 500, 8, 64, [500, 257, 1]),
    (1, 1000, 4, 128, None),
    (2, 150, 8, 44, [150, 77]),
])
def test_gpu_low_precision_matches_reference(dtype, B, T, H, D, lengths):
    """Error of the kernel (bf16/fp16 in, fp32 accumulation) vs the fp32 reference is at most 2× the error
    of the reference itself run in bf16/fp16, plus a small absolute slack."""
    inputs32 = [x.float() for x in make_inputs(B, T, H, D, seed=T, device="cuda", dtype=torch.float32)]
    inputs = [x.to(dtype) for x in inputs32]
    L = None if lengths is None else torch.tensor(lengths, device="cuda")
    go = torch.randn(B, T, H, D, device="cuda")
    gold_out, gold_grads = run(rel_pos_attention_reference, [x.float() for x in inputs], go, lengths=L)
    low_out, low_grads = run(rel_pos_attention_reference, inputs, go, lengths=L)
    out, grads = run(rel_pos_attention_fast, inputs, go, lengths=L)
    assert out.dtype == dtype
    assert _err(out, gold_out) <= 2 * _err(low_out, gold_out) + 1e-3
    for name, g, lg, gg in zip(NAMES, grads, low_grads, gold_grads):
        scale = gg.abs().max().item()
        assert _err(g, gg) <= 2 * _err(lg, gg) + 1e-3 * scale, name


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("T", [64, 192, 333])
def test_gpu_fp32_matches_reference(T):
    B, H, D = 2, 4, 64
    inputs = make_inputs(B, T, H, D, seed=T, device="cuda", dtype=torch.float32)
    L = torch.tensor([T, T // 2 + 1], device="cuda")
    go = torch.randn(B, T, H, D, device="cuda")
    ref_out, ref_grads = run(rel_pos_attention_reference, inputs, go, lengths=L)
    out, grads = run(rel_pos_attention_fast, inputs, go, lengths=L)
    assert_close(out, ref_out, "out", atol=1e-4, rtol=1e-4)
    for name, g, rg in zip(NAMES, grads, ref_grads):
        assert_close(g, rg, "grad " + name, atol=2e-4, rtol=2e-4)


@requires_cuda
@pytest.mark.gpu
def test_gpu_dropout_reproducible_and_rate():
    B, T, H, D, p_drop = 2, 256, 8, 64, 0.1
    inputs = [x.bfloat16() for x in make_inputs(B, T, H, D, seed=1, device="cuda", dtype=torch.float32)]
    torch.manual_seed(7)
    out1 = rel_pos_attention_fast(*inputs, dropout_p=p_drop, training=True)
    torch.manual_seed(7)
    out2 = rel_pos_attention_fast(*inputs, dropout_p=p_drop, training=True)
    assert torch.equal(out1, out2)
    keep = K.dropout_keep_mask(K.draw_seed("cuda"), B, H, T, p_drop)
    assert abs(keep.float().mean().item() - (1 - p_drop)) < 0.005


@requires_cuda
@pytest.mark.gpu
def test_gpu_torch_compile_encoder_block():
    """torch.compile (inductor, fullgraph) around projections + the op: no graph break, same numbers."""
    B, T, H, D = 2, 200, 8, 64
    lin = torch.nn.Linear(H * D, 3 * H * D, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(B, T, H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    p = torch.randn(1, 2 * T - 1, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn(H, D, device="cuda", requires_grad=True)
    vb = torch.randn(H, D, device="cuda", requires_grad=True)
    L = torch.tensor([200, 120], device="cuda")

    def block(x, p, u, vb):
        q, k, v = lin(x).view(B, T, 3, H, D).unbind(2)
        return rel_pos_attention_fast(q, k, v, p, u.to(q.dtype), vb.to(q.dtype), lengths=L).sum()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    outs = []
    for fn in (block, compiled):
        for t in (x, p, u, vb):
            t.grad = None
        loss = fn(x, p, u, vb)
        loss.backward()
        outs.append([loss.detach().float()] + [t.grad.float().clone() for t in (x, p, u, vb)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------------- sm_90 build
_COMPILE_SCRIPT = r"""
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import nest_fast.kernels.rel_pos_attention as K

PTR = {"Q", "K", "V", "P", "OUT", "DO", "DQ", "DK", "DV"}
F32 = {"LSE", "DELTA", "DBIAS", "DPBUF", "U", "Vb"}
dtype, D, drop = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
prec = "tf32x3" if dtype == "fp32" else "tf32"
for kern, configs in ((K._fwd_kernel, K.GPU_FWD_CONFIGS), (K._bwd_kv_kernel, K.GPU_BWD_CONFIGS),
                      (K._bwd_q_kernel, K.GPU_BWD_CONFIGS), (K._bwd_p_kernel, K.GPU_BWD_CONFIGS)):
    for cfg in K._prune(configs, {}, PREC=prec):
        consts = dict(cfg.kwargs, D=D, DP=K._head_pad(D), HAS_DROPOUT=drop, PREC=prec, POS_PAD=K.POS_PAD)
        consts = {k: v for k, v in consts.items() if k in kern.fn.arg_names}
        sig = {}
        for n in kern.fn.arg_names:
            sig[n] = ("constexpr" if n in consts else "*" + dtype if n in PTR else "*fp32" if n in F32
                      else "*i32" if n == "LEN" else "*i64" if n == "SEED"
                      else "fp32" if n in ("qk_scale", "sm_scale", "dropout_p") else "i32")
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kern.fn.arg_names)
                 if sig[n].startswith("*") or n.startswith("s_")}
        c = triton.compile(ASTSource(fn=kern.fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        assert c.asm["cubin"], kern.fn.__name__
        print(kern.fn.__name__, cfg.kwargs, "smem", c.metadata.shared, flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the real kernels")
@pytest.mark.parametrize("dtype,D,drop", [("bf16", 64, "1"), ("fp16", 44, "0")])
def test_kernels_compile_for_sm90_without_gpu(dtype, D, drop, tmp_path):
    """Every kernel and GPU autotune config compiles to an H100 (sm_90) cubin, here without a GPU
    (Triton's ptxas): catches what the interpreter cannot (layouts, tl.gather lowering, shared memory)."""
    import os
    import subprocess
    import sys

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this Triton ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, dtype, str(D), drop], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("smem") == len(K.GPU_FWD_CONFIGS) + 3 * len(K.GPU_BWD_CONFIGS)
