"""Audio loading as NeMo's ``AudioSegment.from_file`` does it (SPEC §3.2 step 1).

soundfile reads WAV/FLAC/OGG/MP3 (libsndfile ≥ 1.1); the read starts at frame ``int(offset * sr)`` and takes
``int(duration * sr)`` frames (the whole rest when ``duration`` is ``None`` or ≤ 0), as float32; channels are
averaged to mono; a file at another rate is resampled with soxr at "HQ" quality and its length fixed to
``ceil(n * target/orig)``, which is exactly ``librosa.resample(..., res_type="soxr_hq")`` (librosa's default).

Anything that would poison training raises :class:`AudioLoadError` with the path: unreadable or truncated
headers, an empty read, NaN/inf samples.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np


class AudioLoadError(RuntimeError):
    """An audio file could not be used (unreadable, empty, truncated, non-finite samples); names the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def resample(samples: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """``librosa.resample(samples, orig_sr=, target_sr=)`` with its default ``res_type="soxr_hq"``."""
    if orig_sr == target_sr:
        return samples
    import soxr

    n_out = int(math.ceil(samples.shape[-1] * float(target_sr) / orig_sr))
    y = soxr.resample(samples, orig_sr, target_sr, quality="HQ")
    if y.shape[0] > n_out:  # librosa.util.fix_length
        y = y[:n_out]
    elif y.shape[0] < n_out:
        y = np.pad(y, (0, n_out - y.shape[0]))
    return np.ascontiguousarray(y, dtype=np.float32)


def load_audio(path: str, sample_rate: int = 16000, offset: Optional[float] = None,
               duration: Optional[float] = None, check_finite: bool = True) -> np.ndarray:
    """Mono float32 samples of ``path`` at ``sample_rate``; raises :class:`AudioLoadError`."""
    import soundfile as sf

    try:
        with sf.SoundFile(path, "r") as f:
            sr = f.samplerate
            if offset is not None and offset > 0:
                f.seek(int(offset * sr))
            if duration is not None and duration > 0:
                samples = f.read(int(duration * sr), dtype="float32", always_2d=True)
            else:
                samples = f.read(dtype="float32", always_2d=True)
    except FileNotFoundError:
        raise AudioLoadError(path, "file not found") from None
    except (RuntimeError, OSError, ValueError, TypeError) as e:  # sf.LibsndfileError is a RuntimeError
        raise AudioLoadError(path, f"unreadable or truncated audio ({e})") from None
    if samples.shape[0] == 0:
        raise AudioLoadError(path, "no samples (empty file, or offset past its end)")
    samples = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    samples = resample(np.ascontiguousarray(samples, dtype=np.float32), sr, sample_rate)
    if check_finite and not np.isfinite(samples).all():
        raise AudioLoadError(path, "samples contain NaN or inf")
    return samples


def audio_info(path: str):
    """``(frames, samplerate, channels)`` from the file header (raises :class:`AudioLoadError`)."""
    import soundfile as sf

    try:
        i = sf.info(path)
    except Exception as e:  # noqa: BLE001
        raise AudioLoadError(path, f"unreadable audio header ({e})") from None
    return i.frames, i.samplerate, i.channels
