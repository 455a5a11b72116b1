"""Benchmarks run only with ``--benchmark``: ``pytest bench/ --benchmark``.

Every bench first checks its fast path against the reference (an assertion that can fail), then
times both with pytest-benchmark. Without ``--benchmark``, plain ``pytest`` skips them.
Results: ``pytest bench/ --benchmark --benchmark-json=bench/results-<device>.json``.
"""

import os

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the nest_fast benchmarks in bench/ (skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run only with --benchmark")
    for item in items:
        if "bench" in str(item.fspath):
            item.add_marker(skip)


def device_name() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name(0)
    return "cpu"


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def cuda_time_ms(fn, iters=20, warmup=3):
    """Median of ``iters`` CUDA-event timings of ``fn()`` after ``warmup`` calls, in ms."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def cuda_peak_mib(fn):
    """Peak CUDA memory (MiB) allocated by ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2 ** 20
