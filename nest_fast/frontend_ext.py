"""Fast mel front end: the fused C++/CUDA op ``torch.ops.nest_fast.mel_frontend`` (SPEC.md §4, PERF.md §4).

``mel_frontend_fast(fe, x, seq_len, linear_spec=False)`` has the reference's signature
(:func:`nest_fast.frontend.mel_frontend_reference`) and returns the same layout and dtypes
(``[B, nfilt, T_mel]`` float32 features, ``[B]`` int64 frame lengths). ``supports(...)`` tells
:mod:`nest_fast.backend` whether the op implements the given configuration and device.

The compiled extension (``nest_fast._C``, plus ``nest_fast._C_cuda`` when CUDA is available) is loaded when
this module is imported, which ``nest_fast.backend`` does lazily (first "fast" dispatch), so ``import nest_fast``
never needs it; a missing extension just makes ``supports`` say no.
Under ``torch.compile`` the op is a single graph node (fake implementation registered below); in train mode
drawing the dither seed (``int(torch.randint(...))``) is a graph break before it.

Differences from the reference, by design:

* Dither (train mode) draws from a counter-based Philox stream keyed by a seed that this wrapper
  draws from torch's default generator (so ``torch.manual_seed`` makes it reproducible); it is not
  the stream ``torch.randn_like`` would give, and the caller's waveform is **not** modified in place
  (NeMo adds the dither to a float32 input tensor in place; the fast path leaves it untouched).
* The mel projection sums only the non-zero range of each filter (NaN/Inf in a bin outside a
  filter's support does not leak into that filter, unlike the dense matmul).
* Per-feature statistics accumulate in double: on an exactly constant row (digital silence without
  dither) the result is exactly 0 where the float32 reference gives rounding noise divided by 1e-5.
"""

from __future__ import annotations

import importlib
import threading

import torch

_lock = threading.Lock()
_loaded = {}
_fake_registered = False

LOG_MODES = {"add": 1, "clamp": 2}


def _load(device_type: str) -> bool:
    """Import the extension for ``device_type`` ("cpu" or "cuda"); False when it is not built."""
    key = "cuda" if device_type == "cuda" else "cpu"
    if key in _loaded or torch.compiler.is_compiling():  # (no imports or locks inside a traced region)
        return _loaded.get(key, False)
    with _lock:
        if key in _loaded:
            return _loaded[key]
        ok = True
        try:
            importlib.import_module("nest_fast._C")
            if key == "cuda":
                importlib.import_module("nest_fast._C_cuda")
            _register_fake()
        except (ImportError, OSError):
            ok = False
        _loaded[key] = ok
        return ok


def _register_fake() -> None:
    global _fake_registered
    if _fake_registered:
        return

    @torch.library.register_fake("nest_fast::mel_frontend")
    def _mel_frontend_fake(x, lengths, window, fb, hop, n_fft, preemph, dither, seed, offset, log_guard,
                           log_mode, normalize, pad_to, pad_value, mag_power, legacy):
        torch._check(x.dim() == 2, lambda: f"nest_fast::mel_frontend: x (audio) must be 2-D, got {tuple(x.shape)}")
        torch._check(x.dtype == torch.float32, lambda: f"nest_fast::mel_frontend: x (audio) must be float32, got {x.dtype}")
        torch._check(lengths.device == x.device,
                     lambda: f"nest_fast::mel_frontend: lengths is on {lengths.device} but x (audio) is on {x.device}")
        torch._check(lengths.dtype == torch.int64,
                     lambda: f"nest_fast::mel_frontend: lengths must be int64, got {lengths.dtype}")
        B, N = x.shape
        T = N // hop + 1
        if pad_to > 0:
            T = (T + pad_to - 1) // pad_to * pad_to
        return x.new_empty((B, fb.shape[-2], T)), lengths.new_empty((B,))

    _fake_registered = True


def op():
    """``torch.ops.nest_fast.mel_frontend`` (loads the CPU extension first)."""
    if not _load("cpu"):
        raise ImportError("nest_fast._C is not built; reinstall with `pip install --no-build-isolation -e .`")
    return torch.ops.nest_fast.mel_frontend


def _log_guard(fe, dtype=torch.float32) -> float:
    v = fe.log_zero_guard_value
    if isinstance(v, str):
        fi = torch.finfo(dtype)
        return float(fi.tiny if v == "tiny" else fi.eps)
    return float(v)


def unsupported_reason(fe, x, seq_len, linear_spec=False):
    """Why the op cannot run this call (None when it can). Covers configuration, dtype and device only;
    bad lengths and shapes are left to the op, which raises clear errors."""
    if linear_spec:
        return "linear_spec=True"
    if getattr(fe, "use_grads", False):
        return "use_grads=True"
    if getattr(fe, "stft_pad_amount", None) is not None or getattr(fe, "exact_pad", False):
        return "exact_pad=True"
    if getattr(fe, "frame_splicing", 1) != 1:
        return "frame_splicing > 1"
    if fe.normalize not in (None, "per_feature"):
        return f"normalize={fe.normalize!r}"
    if isinstance(fe.pad_to, bool) or not isinstance(fe.pad_to, int) or fe.pad_to < 0:
        return f"pad_to={fe.pad_to!r}"
    if getattr(fe, "window", None) is None:
        return "window=None"
    if fe.log and fe.log_zero_guard_type not in LOG_MODES:
        return f"log_zero_guard_type={fe.log_zero_guard_type!r}"
    if not isinstance(x, torch.Tensor) or not isinstance(seq_len, torch.Tensor):
        return "non-tensor input"
    if x.dtype != torch.float32:
        return f"audio dtype {x.dtype} (the op computes in float32)"
    if x.device.type not in ("cpu", "cuda"):
        return f"device {x.device.type}"
    if torch.is_grad_enabled() and x.requires_grad:
        return "audio requires grad"
    if x.device.type == "cuda" and fe.n_fft > 8192:
        return "n_fft > 8192 on CUDA"
    return None


def supports(fe, x, seq_len, linear_spec=False) -> bool:
    if unsupported_reason(fe, x, seq_len, linear_spec) is not None:
        return False
    return _load(x.device.type)


def mel_frontend_fast(fe, x: torch.Tensor, seq_len: torch.Tensor, linear_spec: bool = False):
    """The fused op with the reference's signature and outputs (see the module docstring for differences)."""
    why = unsupported_reason(fe, x, seq_len, linear_spec)
    if why is not None and isinstance(x, torch.Tensor) and x.dtype != torch.float32 and why.startswith("audio dtype"):
        why = None  # let the op raise its own dtype error
    if why is not None:
        raise ValueError(f"mel_frontend_fast: unsupported configuration ({why}); use the reference path")
    if not _load(x.device.type):
        raise ImportError(f"nest_fast: the mel-frontend extension for {x.device.type} is not built")
    if isinstance(seq_len, torch.Tensor) and not seq_len.is_floating_point() and seq_len.dtype not in (
            torch.int64, torch.bool) and not seq_len.is_complex():
        seq_len = seq_len.long()
    dither = float(fe.dither) if (fe.training and fe.dither and fe.dither > 0) else 0.0
    seed = int(torch.randint(-(2 ** 63), 2 ** 63 - 1, (), dtype=torch.int64)) if dither > 0 else 0
    fb = fe.fb.to(device=x.device, dtype=torch.float32)
    window = fe.window.to(device=x.device, dtype=torch.float32)
    preemph = float(fe.preemph) if fe.preemph is not None else 0.0
    log_mode = LOG_MODES[fe.log_zero_guard_type] if fe.log else 0
    return torch.ops.nest_fast.mel_frontend(
        x, seq_len, window, fb, int(fe.hop_length), int(fe.n_fft), preemph, dither, seed, 0,
        _log_guard(fe), log_mode, 1 if fe.normalize == "per_feature" else 0, int(fe.pad_to),
        float(fe.pad_value), float(fe.mag_power), bool(fe.legacy_stft))


mel_frontend_fast.supports = supports

# Load the extension(s) when this module is first imported (nest_fast.backend imports it lazily, on the first
# "fast" dispatch of mel_frontend), so that code traced by torch.compile later finds the op registered.
_load("cpu")
if torch.cuda.is_available():
    _load("cuda")
