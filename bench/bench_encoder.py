"""NEST-L encoder forward+backward: reference path vs the fast backend (vs torch.compile of it on CUDA).

GPU shapes: 8 utterances × 20 s (T_mel 2000 → T_enc 250), bf16 autocast. CPU shapes (a smoke run of the
same code): 1 × 4 s, fp32. Each fast variant is first checked against the reference in fp32.
"""

import pytest
import torch

import nest_fast
from nest_fast import ConformerEncoder, model_config

from conftest import HAS_CUDA, device_name, sync

DEV = "cuda" if HAS_CUDA else "cpu"
B, SECONDS = (8, 20.0) if HAS_CUDA else (1, 4.0)
# training FLOPs per audio-second of NEST-L (PERF.md: ~9.7 GFLOP at 20 s utterances)
TRAIN_GFLOP_PER_AUDIO_S = 9.7


def _encoder():
    cfg = model_config("large")["encoder"]
    cfg = {k: v for k, v in cfg.items() if k != "_target_"}
    torch.manual_seed(0)
    return ConformerEncoder(**cfg).to(DEV).train()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    T = int(SECONDS * 100)
    T = 16 * ((T + 15) // 16)
    x = torch.randn(B, 80, T, generator=g).to(DEV)
    lengths = torch.tensor([T - 37 * i for i in range(B)]).clamp(min=T // 2).to(DEV)
    return x, lengths


def _step(enc, x, lengths, autocast):
    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
        out, _ = enc(x, lengths)
        loss = out.float().square().mean()
    loss.backward()
    return loss


def _check_fast_matches_reference():
    enc = _encoder().eval()  # no dropout: the fast path must give the same function
    x, lengths = _inputs(1)
    x, lengths = x[:1, :, :400], torch.tensor([400], device=DEV)
    with torch.no_grad(), nest_fast.use_backend("reference"):
        ref, _ = enc(x, lengths)
    with torch.no_grad(), nest_fast.use_backend("fast"):
        fast, _ = enc(x, lengths)
    err = (fast - ref).abs().max().item() / ref.abs().max().item()
    assert err < 2e-3, f"fast encoder differs from reference: rel err {err:.2e}"
    return err


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_encoder_fwd_bwd(benchmark, backend):
    if backend == "fast" and not HAS_CUDA:
        pytest.skip("on CPU the fast kernels run in the Triton interpreter: correctness only, no timing")
    err = _check_fast_matches_reference() if HAS_CUDA else 0.0
    enc = _encoder()
    x, lengths = _inputs()
    autocast = HAS_CUDA
    with nest_fast.use_backend(backend):
        _step(enc, x, lengths, autocast)  # warm-up (and autotune)
        sync()
        if HAS_CUDA:
            torch.cuda.reset_peak_memory_stats()

        def run():
            enc.zero_grad(set_to_none=True)
            _step(enc, x, lengths, autocast)
            sync()

        benchmark.pedantic(run, rounds=5 if HAS_CUDA else 2, iterations=1, warmup_rounds=1)
    audio_s = float(lengths.sum()) / 100.0
    sec = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "device": device_name(), "backend": backend, "batch": B, "seconds_per_utt": SECONDS,
        "dtype": "bf16-autocast" if autocast else "fp32", "fast_vs_ref_rel_err": err,
        "audio_s_per_s": audio_s / sec,
        "approx_tflops": TRAIN_GFLOP_PER_AUDIO_S * audio_s / sec / 1e3,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if HAS_CUDA else None,
    })
    print(f"\nencoder fwd+bwd [{backend}] {device_name()}: {sec * 1e3:.1f} ms, {audio_s / sec:.1f} audio-s/s")


@pytest.mark.skipif(not HAS_CUDA, reason="torch.compile timing is for CUDA")
def test_encoder_fwd_bwd_compiled(benchmark):
    enc = _encoder()
    x, lengths = _inputs()
    with nest_fast.use_backend("fast"):
        cenc = torch.compile(enc, dynamic=False)
        _step(cenc, x, lengths, True)
        sync()

        def run():
            enc.zero_grad(set_to_none=True)
            _step(cenc, x, lengths, True)
            sync()

        benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    audio_s = float(lengths.sum()) / 100.0
    benchmark.extra_info.update({"device": device_name(), "backend": "fast+compile",
                                 "audio_s_per_s": audio_s / benchmark.stats.stats.median})
