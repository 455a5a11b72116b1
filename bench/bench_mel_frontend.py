"""Mel frontend (PERF.md §4): the fused op (``nest_fast.frontend_ext``) vs the reference torch path
(``mel_frontend_reference``) vs NeMo's FilterbankFeatures (only when NeMo is importable).

On CUDA, "fast" is the single fused kernel (power-of-two n_fft) and "fast_cufft" the framing + cuFFT + mel path
(NEST_FAST_MEL_CUFFT=1). Workloads: 64 utterances of 1–30 s (uniform, fixed seed; ≈ 0.28 audio-hours) and 8 × 60 s, NEST settings
(16 kHz, 25 ms / 10 ms, n_fft 512, 80 Slaney mels, per-feature norm, pad to 16), eval mode (no dither), plus the
train-mode (dithered) 64 × 1–30 s batch for the two nest_fast paths. Runs on CUDA when present, else CPU.
Reported: ms per batch, audio-hours per second, speedup over the reference, and on GPU the fraction of the
HBM roofline at 96 KB of traffic per audio-second (64 KB waveform in + 32 KB features out, fp32).

    pytest bench/bench_mel_frontend.py --benchmark
"""

import pytest
import torch

from nest_fast.frontend import FilterbankFeatures, mel_frontend_reference

from conftest import HAS_CUDA, device_name, sync

DEV = "cuda" if HAS_CUDA else "cpu"
SR = 16000
BYTES_PER_AUDIO_S = 96e3
HBM_BW = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, by device-name substring
WORKLOADS = {"64x1-30s": (64, 1.0, 30.0), "8x60s": (8, 60.0, 60.0)}

_ref_cache = {}
_times = {}


def _fe(train=False):
    fe = FilterbankFeatures(sample_rate=SR, n_window_size=400, n_window_stride=160, window="hann",
                            normalize="per_feature", n_fft=512, preemph=0.97, nfilt=80, log=True, dither=1e-5,
                            pad_to=16, pad_value=0.0, frame_splicing=1)
    return fe.to(DEV).train(train)


def _batch(name):
    B, lo, hi = WORKLOADS[name]
    g = torch.Generator().manual_seed(0)
    lens = (lo + (hi - lo) * torch.rand(B, generator=g)) * SR
    lens = lens.long()
    x = torch.randn(B, int(lens.max()), generator=g) * 0.1
    return x.to(DEV), lens.to(DEV)


def _reference_output(name):
    if name not in _ref_cache:
        x, lens = _batch(name)
        with torch.no_grad():
            _ref_cache[name] = mel_frontend_reference(_fe(), x.clone(), lens)
    return _ref_cache[name]


def _nemo_fe():
    try:
        from nemo.collections.asr.parts.preprocessing.features import FilterbankFeatures as NemoFB
    except Exception:
        return None
    return NemoFB(sample_rate=SR, n_window_size=400, n_window_stride=160, window="hann", normalize="per_feature",
                  n_fft=512, preemph=0.97, nfilt=80, log=True, log_zero_guard_type="add",
                  log_zero_guard_value=2 ** -24, dither=1e-5, pad_to=16, frame_splicing=1, pad_value=0.0,
                  mag_power=2.0).to(DEV).eval()


def _peak_bw():
    name = device_name()
    for key, bw in HBM_BW.items():
        if key in name:
            return bw
    return None


@pytest.mark.parametrize("impl,mode", [("reference", "eval"), ("fast", "eval"), ("fast_cufft", "eval"),
                                       ("nemo", "eval"), ("reference", "train"), ("fast", "train")])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_mel_frontend(benchmark, workload, impl, mode, monkeypatch):
    if mode == "train" and workload != "64x1-30s":
        pytest.skip("train mode is timed on the 64 x 1-30 s batch only")
    if impl == "fast_cufft":  # the CUDA framing + cuFFT + mel path instead of the single fused kernel
        if not HAS_CUDA:
            pytest.skip("the cuFFT path exists on CUDA only")
        monkeypatch.setenv("NEST_FAST_MEL_CUFFT", "1")
    x, lens = _batch(workload)
    train = mode == "train"
    if impl.startswith("fast"):
        from nest_fast import frontend_ext

        fe = _fe(train)
        assert frontend_ext.supports(fe, x, lens), "the mel-frontend extension is not built for " + DEV
        fn = frontend_ext.mel_frontend_fast
    elif impl == "nemo":
        nfe = _nemo_fe()
        if nfe is None:
            pytest.skip("NeMo not importable")

        def fn(fe, x, lens):
            return nfe(x, lens)

        fe = None
    else:
        fe = _fe(train)
        fn = mel_frontend_reference

    # correctness first (eval: against the reference output; train: dither changes features only slightly)
    with torch.no_grad():
        out, out_len = fn(fe, x.clone(), lens)
    ref, ref_len = _reference_output(workload)
    assert torch.equal(out_len, ref_len)
    err = (out - ref).abs().max().item()
    assert err <= (1e-4 if not train else 0.05), f"{impl} differs from the reference: max abs err {err:.2e}"
    # the reference (like NeMo) dithers its input in place: time it on a fresh copy each round
    inputs = [x.clone() for _ in range(2)] if not impl.startswith("fast") else [x]

    def run():
        with torch.no_grad():
            fn(fe, inputs[0], lens)
        sync()

    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
    rounds = 10 if HAS_CUDA else (3 if impl == "fast" else 2)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    sec = benchmark.stats.stats.median
    audio_s = float(lens.sum()) / SR
    hours_per_s = audio_s / 3600.0 / sec
    _times[(workload, impl, mode)] = sec
    info = {"device": device_name(), "workload": workload, "mode": mode, "impl": impl, "ms": sec * 1e3,
            "audio_s": audio_s, "audio_hours_per_s": hours_per_s, "max_abs_err_vs_ref": err}
    ref_t = _times.get((workload, "reference", mode))
    if ref_t is not None and impl != "reference":
        info["speedup_vs_reference"] = ref_t / sec
    if HAS_CUDA:
        info["peak_mem_MiB"] = torch.cuda.max_memory_allocated() / 2 ** 20
        bw = _peak_bw()
        if bw:
            info["hbm_roofline_fraction"] = audio_s * BYTES_PER_AUDIO_S / sec / bw
    benchmark.extra_info.update(info)
    print(f"\n[mel_frontend] {DEV} {workload} {mode} {impl}: {sec * 1e3:.1f} ms, {hours_per_s:.3f} audio-h/s"
          + (f", {info['speedup_vs_reference']:.2f}x reference" if "speedup_vs_reference" in info else "")
          + (f", {info['hbm_roofline_fraction'] * 100:.1f}% of HBM roofline" if "hbm_roofline_fraction" in info
             else ""))
