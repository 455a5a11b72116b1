"""Log-mel front end: NeMo's ``AudioToMelSpectrogramPreprocessor`` / ``FilterbankFeatures`` (SPEC §4).

The reference path below is plain PyTorch and mirrors NeMo 3.0.0 step for step (bit-exact on CPU).
The fast backend runs the fused C++/CUDA op ``torch.ops.nest_fast.mel_frontend`` instead
(``nest_fast.frontend_ext``), through the ``mel_frontend`` dispatch point.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import backend
from ._checks import check_audio_and_lengths

CONSTANT = 1e-5


def _hz_to_mel_slaney(f):
    f = np.asanyarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-300) / min_log_hz) / logstep, mels)


def _mel_to_hz_slaney(m):
    m = np.asanyarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * m
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), freqs)


def _hz_to_mel_htk(f):
    return 2595.0 * np.log10(1.0 + np.asanyarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(m):
    return 700.0 * (10.0 ** (np.asanyarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: Optional[float] = None,
                   htk: bool = False, norm: Optional[str] = "slaney") -> np.ndarray:
    """librosa.filters.mel (float32 output), re-derived: float64 triangles stored as float32, Slaney norm."""
    if fmax is None:
        fmax = sr / 2.0
    to_mel, to_hz = (_hz_to_mel_htk, _mel_to_hz_htk) if htk else (_hz_to_mel_slaney, _mel_to_hz_slaney)
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    fftfreqs = np.linspace(0, float(sr) / 2, 1 + n_fft // 2, endpoint=True)
    mel_pts = np.linspace(to_mel(fmin), to_mel(fmax), n_mels + 2)
    mel_f = to_hz(mel_pts)
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    if norm == "slaney":
        enorm = 2.0 / (mel_f[2: n_mels + 2] - mel_f[:n_mels])
        weights *= enorm[:, np.newaxis]
    elif norm is not None:
        raise ValueError(f"mel_norm must be 'slaney' or None, got {norm!r}")
    return weights


def normalize_batch(x: torch.Tensor, seq_len: torch.Tensor, normalize_type, legacy: bool = False):
    """Per-feature (or all-feature) normalisation over valid frames, NeMo 3.0.0 semantics.

    ``legacy=True`` (NeMo ≤ 2.4, per_feature): no NaN guard for one-frame utterances and padded frames are
    left for the caller's final pad mask."""
    if normalize_type == "per_feature":
        B, _, T = x.shape
        valid = torch.arange(T, device=x.device).unsqueeze(0).expand(B, T) < seq_len.unsqueeze(1)
        num = torch.where(valid.unsqueeze(1), x, 0.0).sum(axis=2)
        den = valid.sum(axis=1)
        mean = num / den.unsqueeze(1)
        std = torch.sqrt(torch.sum(torch.where(valid.unsqueeze(1), x - mean.unsqueeze(2), 0.0) ** 2, axis=2)
                         / (den.unsqueeze(1) - 1.0))
        if not legacy:
            std = std.masked_fill(std.isnan(), 0.0)
        std += CONSTANT
        out = (x - mean.unsqueeze(2)) / std.unsqueeze(2)
        if not legacy:
            out.masked_fill_(~valid.unsqueeze(1), 0.0)
        return out, mean, std
    if normalize_type == "all_features":
        mean = torch.zeros(seq_len.shape, dtype=x.dtype, device=x.device)
        std = torch.zeros(seq_len.shape, dtype=x.dtype, device=x.device)
        for i in range(x.shape[0]):
            mean[i] = x[i, :, : seq_len[i].item()].mean()
            std[i] = x[i, :, : seq_len[i].item()].std()
        std += CONSTANT
        return (x - mean.view(-1, 1, 1)) / std.view(-1, 1, 1), mean, std
    raise ValueError(f"normalize must be 'per_feature', 'all_features' or None, got {normalize_type!r}")


_WINDOWS = {
    "hann": torch.hann_window,
    "hamming": torch.hamming_window,
    "blackman": torch.blackman_window,
    "bartlett": torch.bartlett_window,
    "none": None,
}


class FilterbankFeatures(nn.Module):
    """NeMo's ``FilterbankFeatures``: waveform [B,N] + lengths → log-mel [B,nfilt,T_mel] + frame lengths.

    ``legacy_stft=True`` reproduces NeMo ≤ 2.4 (reflect-padded STFT, ``n//hop + 1`` frames, no
    pre-emphasis zeroing, NaN std for one-frame utterances) for checkpoints trained then.
    """

    def __init__(self, sample_rate: int = 16000, n_window_size: int = 320, n_window_stride: int = 160,
                 window: str = "hann", normalize="per_feature", n_fft: Optional[int] = None, preemph=0.97,
                 nfilt: int = 64, lowfreq: float = 0, highfreq: Optional[float] = None, log: bool = True,
                 log_zero_guard_type: str = "add", log_zero_guard_value=2 ** -24, dither: float = CONSTANT,
                 pad_to: int = 16, max_duration: float = 16.7, frame_splicing: int = 1, exact_pad: bool = False,
                 pad_value: float = 0, mag_power: float = 2.0, use_grads: bool = False, mel_norm="slaney",
                 legacy_stft: bool = False):
        super().__init__()
        for name, val in (("n_window_size", n_window_size), ("n_window_stride", n_window_stride)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"FilterbankFeatures: {name} must be a positive int, got {val!r}")
        if exact_pad and n_window_stride % 2 == 1:
            raise ValueError("FilterbankFeatures: exact_pad=True needs an even hop size")
        if window not in _WINDOWS:
            raise ValueError(f"FilterbankFeatures: window must be one of {sorted(_WINDOWS)}, got {window!r}")
        if log_zero_guard_type not in ("add", "clamp"):
            raise ValueError(f"FilterbankFeatures: log_zero_guard_type must be 'add' or 'clamp', "
                             f"got {log_zero_guard_type!r}")
        if isinstance(log_zero_guard_value, str) and log_zero_guard_value not in ("tiny", "eps"):
            raise ValueError("FilterbankFeatures: log_zero_guard_value must be a number, 'tiny' or 'eps'")
        if normalize not in (None, "per_feature", "all_features", False, ""):
            raise ValueError(f"FilterbankFeatures: normalize must be 'per_feature', 'all_features' or None, "
                             f"got {normalize!r}")
        if legacy_stft and exact_pad:
            raise ValueError("FilterbankFeatures: legacy_stft and exact_pad cannot be combined")
        self.sample_rate = sample_rate
        self.win_length = n_window_size
        self.hop_length = n_window_stride
        self.n_fft = n_fft or 2 ** math.ceil(math.log2(self.win_length))
        if self.win_length > self.n_fft:
            raise ValueError(f"FilterbankFeatures: window ({self.win_length}) longer than n_fft ({self.n_fft})")
        self.stft_pad_amount = (self.n_fft - self.hop_length) // 2 if exact_pad else None
        self.exact_pad = exact_pad
        self.legacy_stft = legacy_stft
        fn = _WINDOWS[window]
        self.window_type = window
        self.register_buffer("window", fn(self.win_length, periodic=False) if fn else None)
        self.normalize = normalize or None
        self.log = log
        self.dither = dither
        self.frame_splicing = frame_splicing
        self.nfilt = nfilt
        self.preemph = preemph
        self.pad_to = pad_to
        self.lowfreq = lowfreq
        self.highfreq = highfreq or sample_rate / 2
        fb = mel_filterbank(sample_rate, self.n_fft, nfilt, lowfreq, self.highfreq, norm=mel_norm)
        self.register_buffer("fb", torch.tensor(fb, dtype=torch.float).unsqueeze(0))
        max_length = self.get_seq_len(torch.tensor(max_duration * sample_rate, dtype=torch.float, device="cpu"))
        max_pad = pad_to - (max_length % pad_to) if (isinstance(pad_to, int) and pad_to > 0) else 0
        self.max_length = max_length + max_pad
        self.pad_value = pad_value
        self.mag_power = mag_power
        self.use_grads = use_grads
        self.log_zero_guard_type = log_zero_guard_type
        self.log_zero_guard_value = log_zero_guard_value

    def log_zero_guard_value_fn(self, x: torch.Tensor):
        if isinstance(self.log_zero_guard_value, str):
            fi = torch.finfo(x.dtype)
            return fi.tiny if self.log_zero_guard_value == "tiny" else fi.eps
        return self.log_zero_guard_value

    def get_seq_len(self, seq_len: torch.Tensor) -> torch.Tensor:
        pad_amount = self.stft_pad_amount * 2 if self.stft_pad_amount is not None else self.n_fft // 2 * 2
        seq_len = torch.floor_divide(seq_len + pad_amount - self.n_fft, self.hop_length)
        if self.legacy_stft:
            seq_len = seq_len + 1
        return seq_len.to(dtype=torch.long)

    def stft(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stft(x, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                          center=not self.exact_pad,
                          window=None if self.window is None else self.window.to(dtype=torch.float, device=x.device),
                          return_complex=True, pad_mode="reflect" if self.legacy_stft else "constant")

    def forward(self, x: torch.Tensor, seq_len: torch.Tensor, linear_spec: bool = False):
        if self.use_grads:
            return backend.dispatch("mel_frontend", self, x, seq_len, linear_spec)
        with torch.no_grad():
            return backend.dispatch("mel_frontend", self, x, seq_len, linear_spec)


@backend.register_reference("mel_frontend")
def mel_frontend_reference(fe: FilterbankFeatures, x: torch.Tensor, seq_len: torch.Tensor,
                           linear_spec: bool = False):
    """NeMo 3.0.0's ``FilterbankFeatures.forward``, step for step."""
    seq_len_time = seq_len
    seq_len_unfixed = fe.get_seq_len(seq_len)
    seq_len = torch.where(seq_len == 0, torch.zeros_like(seq_len_unfixed), seq_len_unfixed)
    if fe.stft_pad_amount is not None:
        x = nn.functional.pad(x.unsqueeze(1), (fe.stft_pad_amount, fe.stft_pad_amount), "constant").squeeze(1)
    if fe.training and fe.dither > 0:
        x += fe.dither * torch.randn_like(x)  # in place, as NeMo (mutates a float32 caller tensor)
    if fe.preemph is not None:
        x = torch.cat((x[:, 0].unsqueeze(1), x[:, 1:] - fe.preemph * x[:, :-1]), dim=1)
        if not fe.legacy_stft:
            timemask = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < seq_len_time.unsqueeze(1)
            x = x.masked_fill(~timemask, 0.0)
    with torch.amp.autocast(x.device.type, enabled=False):
        x = fe.stft(x)
    guard = CONSTANT if fe.use_grads else 0
    x = torch.view_as_real(x)
    x = torch.sqrt(x.pow(2).sum(-1) + guard)
    if fe.mag_power != 1.0:
        x = x.pow(fe.mag_power)
    if linear_spec:
        return x, seq_len
    with torch.amp.autocast(x.device.type, enabled=False):
        x = torch.matmul(fe.fb.to(x.dtype), x)
    if fe.log:
        if fe.log_zero_guard_type == "add":
            x = torch.log(x + fe.log_zero_guard_value_fn(x))
        else:
            x = torch.log(torch.clamp(x, min=fe.log_zero_guard_value_fn(x)))
    if fe.frame_splicing > 1:
        seq = [x]
        for n in range(1, fe.frame_splicing):
            seq.append(torch.cat([x[:, :, :n], x[:, :, n:]], dim=2))
        x = torch.cat(seq, dim=1)
    if fe.normalize:
        x, _, _ = normalize_batch(x, seq_len, fe.normalize, legacy=fe.legacy_stft)
    max_len = x.size(-1)
    mask = torch.arange(max_len, device=x.device).repeat(x.size(0), 1) >= seq_len.unsqueeze(1)
    x = x.masked_fill(mask.unsqueeze(1), fe.pad_value)
    pad_to = fe.pad_to
    if pad_to == "max":
        x = nn.functional.pad(x, (0, fe.max_length - x.size(-1)), value=fe.pad_value)
    elif pad_to > 0:
        pad_amt = x.size(-1) % pad_to
        if pad_amt != 0:
            x = nn.functional.pad(x, (0, pad_to - pad_amt), value=fe.pad_value)
    return x, seq_len


class AudioToMelSpectrogramPreprocessor(nn.Module):
    """Drop-in for NeMo's preprocessor: ``forward(input_signal=[B,N], length=[B])`` →
    ``(processed_signal [B,features,T_mel] float32, processed_length [B] int64)``."""

    def __init__(self, sample_rate: int = 16000, window_size: float = 0.02, window_stride: float = 0.01,
                 n_window_size: Optional[int] = None, n_window_stride: Optional[int] = None, window: str = "hann",
                 normalize: str = "per_feature", n_fft: Optional[int] = None, preemph: float = 0.97,
                 features: int = 64, lowfreq: int = 0, highfreq: Optional[int] = None, log: bool = True,
                 log_zero_guard_type: str = "add", log_zero_guard_value=2 ** -24, dither: float = 1e-5,
                 pad_to: int = 16, frame_splicing: int = 1, exact_pad: bool = False, pad_value: float = 0,
                 mag_power: float = 2.0, rng=None, nb_augmentation_prob: float = 0.0, nb_max_freq: int = 4000,
                 mel_norm: str = "slaney", use_torchaudio: bool = False, stft_exact_pad: bool = False,
                 stft_conv: bool = False, legacy_stft: bool = False):
        super().__init__()
        if window_size and n_window_size:
            raise ValueError("AudioToMelSpectrogramPreprocessor: give window_size or n_window_size, not both")
        if window_stride and n_window_stride:
            raise ValueError("AudioToMelSpectrogramPreprocessor: give window_stride or n_window_stride, not both")
        if not isinstance(sample_rate, (int, float)) or sample_rate <= 0:
            raise ValueError(f"AudioToMelSpectrogramPreprocessor: sample_rate must be positive, got {sample_rate!r}")
        if nb_augmentation_prob:
            raise ValueError("AudioToMelSpectrogramPreprocessor: nb_augmentation_prob > 0 is not supported")
        if use_torchaudio:
            raise ValueError("AudioToMelSpectrogramPreprocessor: use_torchaudio=True is not supported")
        self._sample_rate = sample_rate
        if window_size:
            n_window_size = int(window_size * sample_rate)
        if window_stride:
            n_window_stride = int(window_stride * sample_rate)
        self.win_length = n_window_size
        self.hop_length = n_window_stride
        self.featurizer = FilterbankFeatures(
            sample_rate=sample_rate, n_window_size=n_window_size, n_window_stride=n_window_stride, window=window,
            normalize=normalize, n_fft=n_fft, preemph=preemph, nfilt=features, lowfreq=lowfreq, highfreq=highfreq,
            log=log, log_zero_guard_type=log_zero_guard_type, log_zero_guard_value=log_zero_guard_value,
            dither=dither, pad_to=pad_to, frame_splicing=frame_splicing, exact_pad=exact_pad, pad_value=pad_value,
            mag_power=mag_power, mel_norm=mel_norm, legacy_stft=legacy_stft)
        self.register_buffer("dtype_sentinel_tensor", torch.tensor((), dtype=torch.float32), persistent=False)

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    @property
    def filter_banks(self) -> torch.Tensor:
        return self.featurizer.fb

    def forward(self, input_signal: torch.Tensor, length: torch.Tensor):
        check_audio_and_lengths(input_signal, length, "input_signal", "length")
        with torch.no_grad():
            feats, feat_len = self.featurizer(input_signal.to(torch.float32), length)
        return feats.to(self.dtype_sentinel_tensor.dtype), feat_len
