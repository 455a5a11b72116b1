"""The fused mel-frontend op (``torch.ops.nest_fast.mel_frontend``, nest_fast/frontend_ext.py, csrc/) against the
reference path (nest_fast/frontend.py) and NeMo 3.0.0's FilterbankFeatures (SPEC.md §4, PERF.md §4)."""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import pytest
import torch

import nest_fast
from nest_fast import backend
from nest_fast.frontend import AudioToMelSpectrogramPreprocessor, FilterbankFeatures, mel_frontend_reference

ext = pytest.importorskip("nest_fast.frontend_ext")

HAS_CUDA = torch.cuda.is_available()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
TOL = 1e-4


# --- nvcc compile check, started at import so it overlaps the other tests --------------------------------------
def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


NVCC = _nvcc()
_nvcc_jobs = []
if NVCC and CU_FILES and os.environ.get("PYTEST_XDIST_WORKER") is None:
    from torch.utils.cpp_extension import include_paths

    _incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    _tmp = tempfile.mkdtemp(prefix="nest_fast_nvcc_")
    for _cu in CU_FILES:
        _obj = os.path.join(_tmp, os.path.basename(_cu) + ".o")
        _log = open(os.path.join(_tmp, os.path.basename(_cu) + ".log"), "w+")
        _p = subprocess.Popen([NVCC, "-std=c++20", "-arch=sm_90", "-c", _cu, "-o", _obj, *_incs],
                              stdout=_log, stderr=subprocess.STDOUT)
        _nvcc_jobs.append((_cu, _p, _log))

    @atexit.register
    def _stop_nvcc():
        for _, p, _ in _nvcc_jobs:
            if p.poll() is None:
                p.kill()


# --- helpers -------------------------------------------------------------------------------------------------
def nest_fe(legacy=False, **kw):
    """FilterbankFeatures with the NEST preprocessor settings (nest_fast-conformer.yaml)."""
    args = dict(sample_rate=16000, n_window_size=400, n_window_stride=160, window="hann", normalize="per_feature",
                n_fft=512, preemph=0.97, nfilt=80, log=True, dither=1e-5, pad_to=16, pad_value=0.0,
                frame_splicing=1, legacy_stft=legacy)
    args.update(kw)
    return FilterbankFeatures(**args).eval()


def audio(B, N, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, generator=g) * scale


def assert_close_features(fast, ref, tol=TOL):
    assert fast.shape == ref.shape and fast.dtype == ref.dtype == torch.float32
    assert torch.equal(fast.isnan(), ref.isnan())
    diff = (fast - ref).nan_to_num(0.0).abs().max().item()
    assert diff <= tol, f"max abs diff {diff}"


def run_both(fe, x, lens):
    ref, ref_len = mel_frontend_reference(fe, x.clone(), lens)
    out, out_len = ext.mel_frontend_fast(fe, x.clone(), lens)
    assert out_len.dtype == torch.int64 and torch.equal(out_len, ref_len)
    return out, ref


# --- CPU op vs the reference ---------------------------------------------------------------------------------
def test_extension_loads():
    assert ext._load("cpu"), "nest_fast._C is not built: pip install --no-build-isolation -e ."
    assert hasattr(torch.ops.nest_fast, "mel_frontend")
    assert ext.supports(nest_fe(), audio(1, 1000), torch.tensor([1000]))


def test_random_lengths_match_reference():
    g = torch.Generator().manual_seed(1)
    N = 40_000
    lens = torch.randint(1, N + 1, (5,), generator=g)
    lens[0] = N
    out, ref = run_both(nest_fe(), audio(5, N, 1), lens)
    assert out.shape == (5, 80, 256)
    assert_close_features(out, ref)


@pytest.mark.parametrize("lens", [[160, 320, 5000], [159, 1, 0], [321, 479, 161]])
def test_short_utterances_match_reference(lens):
    # 160 samples = 1 valid frame (std NaN -> 0), 320 = 2 frames, < 160 = no frame
    out, ref = run_both(nest_fe(), audio(3, 5000, 2), torch.tensor(lens))
    assert_close_features(out, ref)


def test_batch_one_and_odd_length_match_reference():
    for N in (16_001, 3_333):
        out, ref = run_both(nest_fe(), audio(1, N, 3), torch.tensor([N]))
        assert_close_features(out, ref)


def test_other_settings_match_reference():
    fe = nest_fe(normalize=None, log_zero_guard_type="clamp", log_zero_guard_value="tiny", pad_to=0, pad_value=-1.0,
                 nfilt=64, n_window_size=320, mag_power=1.0)
    out, ref = run_both(fe, audio(2, 8000, 4), torch.tensor([8000, 4321]))
    assert_close_features(out, ref, tol=1e-4 * max(1.0, ref.abs().max().item()))
    fe = nest_fe(preemph=None, log=False)
    out, ref = run_both(fe, audio(2, 8000, 5), torch.tensor([7000, 1234]))
    assert_close_features(out, ref)


def test_legacy_variant_matches_reference():
    # reflect padding, n//160 + 1 frames, no pre-emphasis zeroing, NaN std for one frame
    lens = torch.tensor([24_000, 10_001, 0, 1, 160])
    out, ref = run_both(nest_fe(legacy=True), audio(5, 24_000, 6), lens)
    assert out.isnan().any()  # the one-frame row (length 1 -> 1 frame) keeps its NaN
    assert_close_features(out, ref)


def test_dispatch_and_preprocessor_use_the_op():
    pre = AudioToMelSpectrogramPreprocessor(window_size=0.025, window_stride=0.01, features=80, n_fft=512).eval()
    x, lens = audio(2, 12_000, 7), torch.tensor([12_000, 9_000])
    ref = pre(x, lens)
    nest_fast.set_backend("fast")
    assert backend.will_use_fast("mel_frontend", pre.featurizer, x, lens)
    assert not backend.will_use_fast("mel_frontend", pre.featurizer, x, lens, True)  # linear_spec -> reference
    assert not backend.will_use_fast("mel_frontend", pre.featurizer, x.double(), lens)
    out = pre(x, lens)
    assert torch.equal(out[1], ref[1])
    assert_close_features(out[0], ref[0])


# --- NeMo oracle ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nemo_fe():
    feats = pytest.importorskip("nemo.collections.asr.parts.preprocessing.features")
    return feats.FilterbankFeatures(sample_rate=16000, n_window_size=400, n_window_stride=160, window="hann",
                                    normalize="per_feature", n_fft=512, preemph=0.97, nfilt=80, log=True,
                                    log_zero_guard_type="add", log_zero_guard_value=2 ** -24, dither=1e-5,
                                    pad_to=16, frame_splicing=1, pad_value=0.0, mag_power=2.0).eval()


@pytest.mark.parametrize("case", ["random", "short", "batch1"])
def test_matches_nemo(nemo_fe, case):
    fe = nest_fe()
    if case == "random":
        N = 48_000
        lens = torch.randint(1, N + 1, (4,), generator=torch.Generator().manual_seed(8))
        lens[1] = N
        x = audio(4, N, 8)
    elif case == "short":
        # NeMo raises on one-frame rows only when CUDA is available
        lens = torch.tensor([320, 481, 3000] + ([] if HAS_CUDA else [160]))
        x = audio(len(lens), 3000, 9)
    else:
        lens, x = torch.tensor([20_000]), audio(1, 20_000, 10)
    with torch.no_grad():
        ref, ref_len = nemo_fe(x.clone(), lens)
    out, out_len = ext.mel_frontend_fast(fe, x.clone(), lens)
    assert torch.equal(out_len, ref_len)
    assert_close_features(out, ref)


# --- dither --------------------------------------------------------------------------------------------------
def test_dither_reproducible_and_leaves_input_alone():
    fe = nest_fe().train()
    x, lens = audio(2, 9_000, 11, scale=1e-4), torch.tensor([9_000, 6_000])
    x0 = x.clone()
    torch.manual_seed(123)
    a, _ = ext.mel_frontend_fast(fe, x, lens)
    torch.manual_seed(123)
    b, _ = ext.mel_frontend_fast(fe, x, lens)
    c, _ = ext.mel_frontend_fast(fe, x, lens)
    assert torch.equal(x, x0)  # no in-place dither (unlike NeMo)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    e, _ = ext.mel_frontend_fast(fe.eval(), x, lens)
    assert not torch.equal(a, e)
    op = ext.op()
    args = (x, lens, fe.window, fe.fb, 160, 512, 0.97, 1e-5, 42, 7, 2 ** -24, 1, 1, 16, 0.0, 2.0, False)
    assert torch.equal(op(*args)[0], op(*args)[0])
    assert not torch.equal(op(*args)[0], op(*args[:9], 8, *args[10:])[0])  # another offset, another stream


def test_dither_statistics():
    # white noise of std d through a rectangular window: E|X_k|^2 = n_fft * d^2 on interior bins
    d, n_fft, N = 0.5, 256, 64_000
    x, lens = torch.zeros(1, N), torch.tensor([N])
    fb = torch.zeros(1, 1, n_fft // 2 + 1)
    fb[0, 0, 1:n_fft // 2] = 1.0 / (n_fft // 2 - 1)
    out, _ = ext.op()(x, lens, torch.ones(n_fft), fb, 160, n_fft, 0.0, d, 5, 0, 0.0, 0, 0, 0, 0.0, 2.0, False)
    power = out[0, 0, 1:-1]
    assert abs(power.mean().item() / (n_fft * d * d) - 1.0) < 0.03
    # per-frame the power averages 127 roughly exponential bins: relative std ~ 1/sqrt(127)
    assert 0.05 < (power.std() / power.mean()).item() < 0.15
    # silence through the NEST settings in train mode: same log-mel statistics as the reference's randn dither
    fe = nest_fe(normalize=None).train()
    torch.manual_seed(0)
    ref, _ = mel_frontend_reference(fe, torch.zeros(1, 32_000), torch.tensor([32_000]))
    out, _ = ext.mel_frontend_fast(fe, torch.zeros(1, 32_000), torch.tensor([32_000]))
    v_ref, v_out = ref[0, :, 2:198], out[0, :, 2:198]
    assert abs(v_ref.mean().item() - v_out.mean().item()) < 0.05
    assert abs(v_ref.std().item() - v_out.std().item()) < 0.05


# --- errors --------------------------------------------------------------------------------------------------
def test_bad_input_errors():
    op = ext.op()
    fe = nest_fe()
    x, lens = audio(2, 4_000, 12), torch.tensor([4_000, 100])

    def call(x=x, lens=lens, window=fe.window, fb=fe.fb, hop=160, n_fft=512, legacy=False, log_mode=1, norm=1):
        return op(x, lens, window, fb, hop, n_fft, 0.97, 0.0, 0, 0, 2 ** -24, log_mode, norm, 16, 0.0, 2.0, legacy)

    with pytest.raises(RuntimeError, match=r"x \(audio\) must be float32"):
        call(x=(x * 1000).to(torch.int16))
    with pytest.raises(RuntimeError, match=r"x \(audio\) must be float32"):
        call(x=x.double())
    with pytest.raises(RuntimeError, match=r"x \(audio\) must be 2-D"):
        call(x=x[None])
    with pytest.raises(RuntimeError, match="lengths is on meta"):
        call(lens=lens.to("meta"))
    with pytest.raises(RuntimeError, match="lengths must be int64"):
        call(lens=lens.float())
    with pytest.raises(RuntimeError, match="lengths must be 1-D"):
        call(lens=lens[:1])
    with pytest.raises(RuntimeError, match="lengths must be non-negative"):
        call(lens=torch.tensor([-1, 5]))
    with pytest.raises(RuntimeError, match="longer than x"):
        call(lens=torch.tensor([4_001, 5]))
    with pytest.raises(RuntimeError, match="frequency bins"):
        call(n_fft=1024)
    with pytest.raises(RuntimeError, match="window"):
        call(window=torch.ones(600))
    with pytest.raises(RuntimeError, match="hop must be positive"):
        call(hop=0)
    with pytest.raises(RuntimeError, match="log_mode"):
        call(log_mode=3)
    with pytest.raises(RuntimeError, match="normalize"):
        call(norm=2)
    with pytest.raises(RuntimeError, match="reflect"):
        call(x=x[:, :200], lens=torch.tensor([200, 100]), legacy=True)
    with pytest.raises(ValueError, match="linear_spec"):
        ext.mel_frontend_fast(fe, x, lens, True)
    with pytest.raises(RuntimeError, match=r"x \(audio\) must be float32"):
        ext.mel_frontend_fast(fe, x.double(), lens)


# --- torch.compile sees one node -----------------------------------------------------------------------------
def test_compile_single_node():
    fe = nest_fe()
    x, lens = audio(2, 6_000, 13), torch.tensor([6_000, 3_000])
    ext.op()  # loads the extension (lazy)
    graphs = []

    def count_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, lens):
        return torch.ops.nest_fast.mel_frontend(x, lens, fe.window, fe.fb, 160, 512, 0.97, 0.0, 0, 0, 2 ** -24, 1, 1,
                                                16, 0.0, 2.0, False)

    torch._dynamo.reset()
    out = torch.compile(f, backend=count_backend, fullgraph=True, dynamic=False)(x, lens)
    ops = [n for g in graphs for n in g.graph.nodes if n.op == "call_function" and "nest_fast" in str(n.target)]
    assert len(graphs) == 1 and len(ops) == 1
    ref = mel_frontend_reference(fe, x.clone(), lens)
    assert torch.equal(out[1], ref[1])
    assert_close_features(out[0], ref[0])
    # through the Python wrapper (eval mode: no dither seed to draw) it is still one graph, one op node
    graphs.clear()
    torch._dynamo.reset()
    out2 = torch.compile(lambda x, lens: ext.mel_frontend_fast(fe, x, lens), backend=count_backend,
                         fullgraph=True, dynamic=False)(x, lens)
    ops = [n for g in graphs for n in g.graph.nodes if n.op == "call_function" and "nest_fast" in str(n.target)]
    assert len(graphs) == 1 and len(ops) == 1
    assert torch.equal(out2[0], out[0])
    # the fake implementation gives the real shapes and dtypes
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fo, fl = f(mode.from_tensor(x), mode.from_tensor(lens))
    assert fo.shape == out[0].shape and fl.shape == out[1].shape and fo.dtype == torch.float32


# --- CUDA ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L", [4, 16, 512, 1024])
def test_fused_kernel_fft_emulated_on_cpu(L):
    # the fused CUDA kernel's FFT functions (pack, Stockham passes, real split, power), index for index on the CPU
    ext.op()
    x = audio(6, L, 16, scale=1.0)
    x[0] = 0.0
    x[1] = 1.0
    ref = torch.fft.rfft(x.double()).abs() ** 2
    for mag_power, r in ((2.0, ref), (1.0, ref.sqrt())):
        out = torch.ops.nest_fast._rfft_power_emulate(x, mag_power)
        assert out.shape == (6, L // 2 + 1) and out.dtype == torch.float32
        err = ((out.double() - r).abs().max() / r.max()).item()
        assert err < 2e-6, f"L={L} p={mag_power}: rel err {err}"


def test_cuda_sources_compile_with_nvcc():
    assert CU_FILES, "csrc/cuda/*.cu missing"
    if not NVCC:
        pytest.skip("nvcc not found")
    assert _nvcc_jobs, "nvcc jobs were not started"
    for cu, p, log in _nvcc_jobs:
        rc = p.wait(timeout=600)
        log.seek(0)
        assert rc == 0, f"nvcc failed on {cu}:\n{log.read()[-4000:]}"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("path", ["fused", "cufft"])
@pytest.mark.parametrize("legacy", [False, True])
def test_cuda_matches_reference(legacy, path, monkeypatch):
    assert ext._load("cuda"), "nest_fast._C_cuda is not built"
    if path == "cufft":
        monkeypatch.setenv("NEST_FAST_MEL_CUFFT", "1")
    fe = nest_fe(legacy=legacy)
    N = 96_000
    lens = torch.tensor([N, 50_001, 480, 320, 160, 0, 1, 12_345])
    x = audio(len(lens), N, 14)
    ref, ref_len = mel_frontend_reference(fe, x.clone(), lens)
    fe.cuda()
    assert ext.supports(fe, x.cuda(), lens.cuda())
    out, out_len = ext.mel_frontend_fast(fe, x.cuda(), lens.cuda())
    assert out.is_cuda and torch.equal(out_len.cpu(), ref_len)
    assert_close_features(out.cpu(), ref, tol=2e-4)
    rg, _ = mel_frontend_reference(fe, x.cuda(), lens.cuda())  # the torch path on the GPU too
    assert_close_features(out.cpu(), rg.cpu(), tol=2e-4)
    # a non-power-of-two n_fft always takes the cuFFT path
    fe2 = nest_fe(legacy=legacy, n_fft=480, n_window_size=400)
    ref2, _ = mel_frontend_reference(fe2, x.clone(), lens)
    out2, _ = ext.mel_frontend_fast(fe2.cuda(), x.cuda(), lens.cuda())
    assert_close_features(out2.cpu(), ref2, tol=2e-4)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_dither_matches_cpu_stream():
    assert ext._load("cuda")
    fe = nest_fe().train()
    x, lens = audio(3, 20_000, 15, scale=1e-3), torch.tensor([20_000, 7_000, 330])
    args = (fe.window, fe.fb, 160, 512, 0.97, 1e-5, 99, 3, 2 ** -24, 1, 1, 16, 0.0, 2.0, False)
    cpu = ext.op()(x, lens, *args)[0]
    gpu = torch.ops.nest_fast.mel_frontend(x.cuda(), lens.cuda(), *(a.cuda() if torch.is_tensor(a) else a
                                                                   for a in args))[0]
    assert_close_features(gpu.cpu(), cpu, tol=2e-3)  # same Philox stream; fast-math sin/log differ by ulps
    torch.manual_seed(5)
    a = ext.mel_frontend_fast(fe.cuda(), x.cuda(), lens.cuda())[0]
    torch.manual_seed(5)
    b = ext.mel_frontend_fast(fe, x.cuda(), lens.cuda())[0]
    assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="lengths is on cpu"):
        ext.mel_frontend_fast(fe, x.cuda(), lens)
