"""Batch noise/speaker augmentation: NeMo's ``MultiSpeakerNoiseAugmentation`` and ``SpeakerNoiseAugmentation``
(SPEC §3.4), draw for draw.

Both take a collated batch of ``audio [B,N]``, ``audio_len [B]``, ``noise [B,N]``, ``noise_len [B]`` (float32 /
int64 CPU tensors) and return ``(noise, noise_len, noisy_audio, noisy_audio_len)``; calling the object on an
:class:`~nest_fast.data.dataset.AudioNoiseBatch` returns a new batch with those four fields set. Inputs are not
modified (NeMo writes into ``batch.noise`` in place; the values are the same).

RNG: NeMo draws from Python's global ``random`` module. Here every call takes an ``rng`` (a ``random.Random``;
the default is the ``random`` module itself, as in NeMo), so a data pipeline can seed one generator per batch and
stay reproducible whatever the worker count. Seeding ``random.seed(s)`` for NeMo and passing
``random.Random(s)`` here gives identical outputs (tests/test_data_augment.py checks it bit for bit).

The arithmetic mirrors NeMo's tensor ops on purpose (``int(len_tensor * rate)`` in float32, energies as float32
tensor sums, the scale through ``math.sqrt`` of a float32 ratio) so the outputs match to the last bit. NeMo quirks
kept and documented in place: skipped items keep their raw (unscaled) loaded noise; ``noisy_audio_len`` is
``noise_len`` (so a skipped item with a short noise file gets ``noisy_audio_len < audio_len``); the noise energy
is averaged over the whole utterance, not the mixed span; "noise" mode with all-zero noise is a no-op.
"""

from __future__ import annotations

import math
import random as _random_module
from collections import Counter
from typing import Any, List, Mapping, Optional, Tuple

import numpy as np
import torch

Tensor = torch.Tensor


def repeat_noise(noise: Tensor, noise_len: int, max_audio_len: int) -> Tensor:
    """``noise[:noise_len]`` tiled (whole copies, then cut) to ``max_audio_len`` if shorter."""
    noise_len = int(noise_len)
    noise = noise[:noise_len]
    if noise_len <= 0:  # NeMo divides by zero here; we return silence
        return noise.new_zeros(max_audio_len)
    if noise_len < max_audio_len:
        noise = noise.repeat(max_audio_len // noise_len + 1)
    return noise[:max_audio_len]


def pad_or_trim(noise: Tensor, length: int) -> Tensor:
    """Zero-pad or cut a 1-D tensor to ``length``."""
    n = noise.size(0)
    if n < length:
        return torch.nn.functional.pad(noise, (0, length - n))
    return noise[:length]


def _check_batch(audio: Tensor, audio_len: Tensor, noise: Tensor, noise_len: Tensor) -> None:
    if audio.dim() != 2 or noise.shape != audio.shape:
        raise ValueError(f"batch augmentation: audio {tuple(audio.shape)} and noise {tuple(noise.shape)} must be "
                         f"the same [B, N] shape")
    if audio_len.shape != (audio.size(0),) or noise_len.shape != (audio.size(0),):
        raise ValueError(f"batch augmentation: audio_len {tuple(audio_len.shape)} / noise_len "
                         f"{tuple(noise_len.shape)} must be [B] with B={audio.size(0)}")


class SpeakerNoiseAugmentation:
    """NeMo's single-segment ``SpeakerNoiseAugmentation`` (one mixed span per item)."""

    def __init__(self, prob: float = 0.0, noise_ratio: float = 0.0, min_r_speech: float = -5.0,
                 max_r_speech: float = 5.0, min_r_noise: float = -5.0, max_r_noise: float = 20.0,
                 min_mix_rate: float = 0.0, max_mix_rate: float = 1.0):
        self.prob, self.noise_ratio = prob, noise_ratio
        self.min_r_speech, self.max_r_speech = min_r_speech, max_r_speech
        self.min_r_noise, self.max_r_noise = min_r_noise, max_r_noise
        self.min_mix_rate, self.max_mix_rate = min_mix_rate, max_mix_rate
        if not 0 <= prob <= 1:
            raise ValueError(f"prob must be in [0, 1], got: {prob}")
        if not 0 <= noise_ratio <= 1:
            raise ValueError(f"noise_ratio must be in [0, 1], got: {noise_ratio}")
        if not min_r_speech <= max_r_speech:
            raise ValueError(f"min_r_speech must be <= max_r_speech, got {min_r_speech} > {max_r_speech}")
        if not min_r_noise <= max_r_noise:
            raise ValueError(f"min_r_noise must be <= max_r_noise, got {min_r_noise} > {max_r_noise}")
        if not 0 <= min_mix_rate <= max_mix_rate <= 1:
            raise ValueError(f"need 0 <= min_mix_rate <= max_mix_rate <= 1, got {min_mix_rate}, {max_mix_rate}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in vars(self).items())})"

    # --------------------------------------------------------------------------------------------- helpers
    def _energy_scale(self, audio_i: Tensor, L: Tensor, noise_sig: Tensor, noise_den: Tensor, ratio_db: float):
        """NeMo's mix scale: ``sqrt(E_audio / (10^(r/10) * E_noise))`` with float32 tensor energies, or 0."""
        audio_energy = torch.sum(audio_i[:L] ** 2) / L
        if int(noise_den) <= 0:
            return 0
        noise_energy = torch.sum(noise_sig ** 2) / noise_den
        if noise_energy > 0:
            return math.sqrt(audio_energy / (10 ** (ratio_db / 10) * noise_energy))
        return 0

    def draw_mix(self, L: int, B: int, rng) -> Tuple[int, List[int], int, str, float]:
        """The per-item draws after the ``prob`` test, in NeMo's order: ``(mix_len, segment_lens, num_speakers,
        mode, ratio_db)``. Shared by the torch augmentation and the DALI loader's planner (same RNG stream)."""
        if 0 <= self.min_mix_rate < self.max_mix_rate <= 1:
            mix_rate = rng.uniform(self.min_mix_rate, self.max_mix_rate)
        else:
            mix_rate = self.min_mix_rate  # no draw
        # NeMo: max(1, int(L * mix_rate)) with L a 0-dim int64 tensor, i.e. a float32 product
        mix_len = max(1, int(np.float32(L) * np.float32(mix_rate)))
        num_segments = rng.randint(self.min_num_segments, self.max_num_segments)
        num_speakers = min(rng.randint(self.min_num_speakers, self.max_num_speakers), B)
        # mix_len draws even with one segment; lengths in order of first appearance (Counter is a dict)
        if num_segments == 1 and hasattr(rng, "getrandbits"):
            # same RNG advance as choices(range(1), k=mix_len) (each random() eats two 32-bit words),
            # without the Python loop over mix_len draws
            rng.getrandbits(64 * mix_len)
            segment_lens = [mix_len]
        else:
            segment_lens = list(Counter(rng.choices(range(num_segments), k=mix_len)).values())
        if rng.random() < self.noise_ratio or B == 1:
            return mix_len, segment_lens, num_speakers, "noise", rng.uniform(self.min_r_noise, self.max_r_noise)
        return mix_len, segment_lens, num_speakers, "speech", rng.uniform(self.min_r_speech, self.max_r_speech)

    def augment(self, audio: Tensor, audio_len: Tensor, noise: Tensor, noise_len: Tensor,
                rng=None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns ``(noise, noise_len, noisy_audio, noisy_audio_len)``."""
        rng = _random_module if rng is None else rng
        _check_batch(audio, audio_len, noise, noise_len)
        noise, noise_len = noise.clone(), noise_len.clone()
        B, N = audio.shape
        for i in range(B):
            if rng.random() > self.prob:
                continue
            L = audio_len[i]
            if 0 <= self.min_mix_rate < self.max_mix_rate <= 1:
                mix_len = rng.randint(int(L * self.min_mix_rate), int(L * self.max_mix_rate) - 1)
            else:
                mix_len = max(1, int(L * self.min_mix_rate))
            mix_start = rng.randint(0, int(L) - mix_len - 1)
            if rng.random() < self.noise_ratio or B == 1:
                ratio = rng.uniform(self.min_r_noise, self.max_r_noise)
            else:
                ratio = rng.uniform(self.min_r_speech, self.max_r_speech)
                j = rng.choice([x for x in range(B) if x != i])
                noise[i] = audio[j].clone()
                noise_len[i] = audio_len[j]
            if noise_len[i] <= mix_len:  # tile the (short) noise over the mixed span
                noise_start = 0
                noise[i] = pad_or_trim(repeat_noise(noise[i], noise_len[i], mix_len), N)
                noise_len[i] = mix_len
            else:
                noise_start = rng.randint(0, int(noise_len[i]) - mix_len - 1)
            scale = self._energy_scale(audio[i], L, noise[i, :noise_len[i]], noise_len[i], ratio)
            clip = noise[i, noise_start:noise_start + mix_len]
            sig = torch.zeros_like(audio[i])
            sig[mix_start:mix_start + mix_len] = scale * clip
            noise[i] = sig
            noise_len[i] = L
        return noise, noise_len, audio + noise, noise_len

    def __call__(self, batch, rng=None):
        """Augment an ``AudioNoiseBatch`` (or anything with audio/audio_len/noise/noise_len attributes)."""
        noise, noise_len, noisy, noisy_len = self.augment(batch.audio, batch.audio_len, batch.noise,
                                                          batch.noise_len, rng=rng)
        return batch.replace(noise=noise, noise_len=noise_len, noisy_audio=noisy, noisy_audio_len=noisy_len)


class MultiSpeakerNoiseAugmentation(SpeakerNoiseAugmentation):
    """NeMo's ``MultiSpeakerNoiseAugmentation``: per item, with probability ``prob``, mix ``mix_rate`` of its
    length from ``num_segments`` segments of either its own noise ("noise" mode, SNR in
    ``[min_r_noise, max_r_noise]`` dB) or other utterances of the batch ("speech" mode, up to ``num_speakers``
    other items, SNR in ``[min_r_speech, max_r_speech]`` dB). See SPEC §3.4 for the step-by-step algorithm.
    """

    def __init__(self, prob: float = 0.0, noise_ratio: float = 0.0, min_r_speech: float = -5.0,
                 max_r_speech: float = 5.0, min_r_noise: float = -5.0, max_r_noise: float = 20.0,
                 min_mix_rate: float = 0.0, max_mix_rate: float = 1.0, min_num_segments: int = 1,
                 max_num_segments: int = 5, min_num_speakers: int = 1, max_num_speakers: int = 4):
        super().__init__(prob, noise_ratio, min_r_speech, max_r_speech, min_r_noise, max_r_noise, min_mix_rate,
                         max_mix_rate)
        if not 1 <= min_num_segments <= max_num_segments:
            raise ValueError(f"need 1 <= min_num_segments <= max_num_segments, got {min_num_segments}, "
                             f"{max_num_segments}")
        if not 1 <= min_num_speakers <= max_num_speakers:
            raise ValueError(f"need 1 <= min_num_speakers <= max_num_speakers, got {min_num_speakers}, "
                             f"{max_num_speakers}")
        self.min_num_segments, self.max_num_segments = min_num_segments, max_num_segments
        self.min_num_speakers, self.max_num_speakers = min_num_speakers, max_num_speakers

    def noise_segments(self, i: int, audio: Tensor, audio_len: Tensor, noise: Tensor, noise_len: Tensor,
                       segment_lens: List[int], num_speakers: int, mode: str, rng) -> List[Tensor]:
        """The source segments for item ``i`` (SPEC §3.4 step 6)."""
        B, N = audio.shape
        segments: List[Tensor] = []
        if mode == "noise":
            padded = pad_or_trim(repeat_noise(noise[i], noise_len[i], N), N)
            start = 0
            for s in segment_lens:
                segments.append(padded[start:start + s])
                start += s
            return segments
        candidates = rng.sample([x for x in range(B) if x != i], k=min(num_speakers, B - 1))
        sid = 0
        for s in segment_lens:
            b = candidates[sid]
            Lb = int(audio_len[b])
            if s > Lb:
                seg = pad_or_trim(repeat_noise(audio[b], Lb, s), s)
            else:
                start = rng.randint(0, Lb - s - 1) if Lb > s else 0
                seg = audio[b][start:start + s].clone()
            segments.append(seg)
            sid += 1
            if sid >= len(candidates):  # NeMo: after the list is used up, jump to a random candidate
                sid = rng.randint(0, len(candidates) - 1)
        return segments

    def augment(self, audio: Tensor, audio_len: Tensor, noise: Tensor, noise_len: Tensor,
                rng=None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns ``(noise, noise_len, noisy_audio, noisy_audio_len)``."""
        rng = _random_module if rng is None else rng
        _check_batch(audio, audio_len, noise, noise_len)
        noise, noise_len = noise.clone(), noise_len.clone()
        B = audio.size(0)
        for i in range(B):
            if rng.random() > self.prob:  # quirk (a): a skipped item keeps its raw loaded noise
                continue
            L = audio_len[i]
            mix_len, segment_lens, num_speakers, mode, ratio = self.draw_mix(int(L), B, rng)
            segments = self.noise_segments(i, audio, audio_len, noise, noise_len, segment_lens, num_speakers,
                                           mode, rng)
            sig = torch.zeros_like(audio[i])
            lo, hi = 0, int(L) - mix_len
            # NeMo loops over range(num_segments) and fails with IndexError when a segment got no draw (only
            # possible when mix_len is tiny); we loop over the segments that exist.
            for s, seg in zip(segment_lens, segments):
                start = rng.randint(lo, hi - 1) if lo < hi else lo
                sig[start:start + s] = seg
                lo, hi = start + s, hi + s
            # quirk: the noise energy is averaged over the whole utterance length, not over the mixed span
            scale = self._energy_scale(audio[i], L, sig[:L], L, ratio)
            noise[i] = scale * sig
            noise_len[i] = L
        return noise, noise_len, audio + noise, noise_len  # quirk (b): noisy_audio_len is noise_len


_AUGMENTORS = {"MultiSpeakerNoiseAugmentation": MultiSpeakerNoiseAugmentation,
               "SpeakerNoiseAugmentation": SpeakerNoiseAugmentation}


def build_batch_augmentor(cfg: Optional[Mapping[str, Any]]) -> Optional[SpeakerNoiseAugmentation]:
    """An augmentor from a NeMo ``batch_augmentor:`` config (``_target_`` names the class; default Multi)."""
    if cfg is None or cfg is False:
        return None
    cfg = dict(cfg)
    target = str(cfg.pop("_target_", "MultiSpeakerNoiseAugmentation")).rsplit(".", 1)[-1]
    if target not in _AUGMENTORS:
        raise ValueError(f"batch_augmentor._target_ {target!r} is not supported; use one of {sorted(_AUGMENTORS)}")
    try:
        return _AUGMENTORS[target](**cfg)
    except TypeError as e:
        raise ValueError(f"batch_augmentor ({target}): {e}") from None
