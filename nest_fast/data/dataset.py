"""NeMo's ``AudioNoiseDataset`` and its collation (SPEC §3.2–3.3), plus a seeded batch-level dataset.

* :class:`AudioNoiseDataset` — map-style, ``ds[i]`` → :class:`AudioNoiseItem` (clean audio tiled to ≥ 1 s, a
  noise clip of the same length and its length), exactly NeMo's ``__getitem__``. NeMo draws noise with the global
  ``np.random``; :meth:`AudioNoiseDataset.get_item` takes an explicit ``np.random.RandomState`` instead.
* :func:`collate_audio_noise` — ``_audio_noise_collate_fn``: pad to the longest, stack, batch augmentation.
* :class:`AudioNoiseBatch` — the collated batch; it implements ``pin_memory()`` (DataLoader's ``pin_memory=True``
  calls it: NeMo's dataclass has no such method, so pinning silently does nothing there) and ``to(device)``.
* :class:`SeededBatchDataset` — what the training DataLoader iterates: its items are whole batches, keyed by
  ``(epoch, batch_index, indices)`` from a :mod:`~nest_fast.data.sampler` sampler; every batch seeds its own
  numpy and Python RNGs from ``(seed, epoch, batch_index)``, so a batch is the same whatever the worker count and
  after a resume. Unusable files are logged with their path, counted in ``batch.bad_files`` and replaced by
  another item (drawn from the batch's RNG) so the batch keeps its size (DDP ranks stay in step).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .audio import AudioLoadError, load_audio
from .manifest import ManifestEntry, ManifestIndex, PathList

log = logging.getLogger("nest_fast.data")
Tensor = torch.Tensor


@dataclass
class AudioNoiseItem:
    sample_id: Optional[str] = None
    audio: Optional[Tensor] = None
    audio_len: Optional[Tensor] = None
    noise: Optional[Tensor] = None
    noise_len: Optional[Tensor] = None


@dataclass
class AudioNoiseBatch:
    """NeMo's ``AudioNoiseBatch`` fields, plus bookkeeping: ``epoch``/``batch_index`` (the data position, used
    for exact resume) and ``bad_files`` (paths skipped while building this batch)."""

    sample_id: Optional[list] = None
    audio: Optional[Tensor] = None
    audio_len: Optional[Tensor] = None
    noise: Optional[Tensor] = None
    noise_len: Optional[Tensor] = None
    noisy_audio: Optional[Tensor] = None
    noisy_audio_len: Optional[Tensor] = None
    epoch: int = -1
    batch_index: int = -1
    bad_files: List[str] = field(default_factory=list)

    _TENSORS = ("audio", "audio_len", "noise", "noise_len", "noisy_audio", "noisy_audio_len")

    def replace(self, **changes) -> "AudioNoiseBatch":
        return dataclasses.replace(self, **changes)

    def _map(self, fn) -> "AudioNoiseBatch":
        return self.replace(**{k: fn(getattr(self, k)) for k in self._TENSORS if getattr(self, k) is not None})

    def pin_memory(self, device=None) -> "AudioNoiseBatch":
        """Page-locked copies of every tensor (called by ``DataLoader(pin_memory=True)``)."""
        return self._map(lambda t: t.pin_memory() if device is None else t.pin_memory(device))

    def to(self, device, non_blocking: bool = False) -> "AudioNoiseBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def is_pinned(self) -> bool:
        return all(getattr(self, k).is_pinned() for k in self._TENSORS if getattr(self, k) is not None)

    def __len__(self) -> int:
        return 0 if self.audio is None else int(self.audio.size(0))


def pad_audio(audio: Tensor, min_len: int, pad_audio_mode: str = "repeat") -> Tensor:
    """NeMo's ``pad_audio``: audio shorter than ``min_len`` is tiled ('repeat') or zero-padded ('zero')."""
    n = audio.size(0)
    if n >= min_len:
        return audio
    if pad_audio_mode == "repeat" and n > 0:
        return audio.repeat(int(math.ceil(min_len / n)))[:min_len]
    if pad_audio_mode == "zero" or n == 0:
        return torch.nn.functional.pad(audio, (0, min_len - n))
    raise ValueError(f"pad_audio_mode must be 'repeat' or 'zero', got {pad_audio_mode!r}")


def load_noise_audio(entry: ManifestEntry, sample_rate: int, max_audio_len: Optional[int], rng,
                     min_white_noise_db: int = -90, max_white_noise_db: int = -46,
                     max_trial: int = 100) -> Tuple[Tensor, Tensor]:
    """NeMo's ``load_noise_audio`` (SPEC §3.2 step 4–5) with an explicit ``rng`` (``np.random.RandomState``).

    A noise file longer than needed is cut at a uniform random offset, re-drawn up to ``max_trial`` times while
    the *signed sum* of the segment is ≤ 0 (NeMo's test, kept). An all-zero result gets white noise at
    -90…-46 dB. The clip is zero-padded to ``max_audio_len`` but its returned length stays the loaded length.
    """
    max_dur = None if max_audio_len is None else max_audio_len / sample_rate
    duration = entry.duration
    offset = entry.offset if entry.offset is not None else 0.0
    if max_dur is not None and duration is not None and duration > max_dur:
        for _ in range(max_trial):
            offset = rng.uniform(0, duration - max_dur)
            samples = load_audio(entry.audio_filepath, sample_rate, offset=offset, duration=max_dur)
            # NeMo uses Python's sum() over float32 samples; a float64 numpy sum has the same sign in practice
            if np.sum(samples, dtype=np.float64) > 0:
                break
    else:
        samples = load_audio(entry.audio_filepath, sample_rate, offset=offset, duration=duration)
    if np.sum(samples, dtype=np.float64) == 0:
        level_db = rng.randint(min_white_noise_db, max_white_noise_db, dtype="int32")
        samples = samples + rng.randn(samples.shape[0]) * (10.0 ** (level_db / 20.0))
    noise = torch.tensor(samples, dtype=torch.float)
    noise_len = torch.tensor(noise.size(0)).long()
    if max_audio_len is not None:
        if noise.size(0) < max_audio_len:
            noise = torch.nn.functional.pad(noise, (0, max_audio_len - noise.size(0)))
        else:
            noise = noise[:max_audio_len]
            noise_len = torch.tensor(max_audio_len).long()
    return noise, noise_len


def sample_noise(noise_data: Sequence[ManifestEntry], sample_rate: int, max_audio_len: int, rng,
                 max_trial: int = 20, bad_files: Optional[List[str]] = None) -> Tuple[Tensor, Tensor]:
    """NeMo's ``sample_noise``: a uniformly chosen noise entry (``rng.randint``), retried up to ``max_trial``
    times on load errors (each failure logged and its path added to ``bad_files``), else zero noise."""
    if len(noise_data) == 0:
        return torch.zeros(max_audio_len).float(), torch.tensor(max_audio_len).long()
    for _ in range(max_trial):
        entry = noise_data[rng.randint(len(noise_data))]
        try:
            return load_noise_audio(entry, sample_rate, max_audio_len, rng)
        except AudioLoadError as e:
            log.warning("skipping unusable noise file %s", e)
            if bad_files is not None:
                bad_files.append(e.path)
    log.warning("no usable noise after %d attempts: using zero noise", max_trial)
    return torch.zeros(max_audio_len).float(), torch.tensor(max_audio_len).long()


def collate_audio_noise(items: Sequence[AudioNoiseItem], batch_augmentor: Any = None,
                        rng=None) -> AudioNoiseBatch:
    """NeMo's ``_audio_noise_collate_fn``: zero-pad audio to the longest, pad/cut noise to it, stack as
    float32 (lengths int64), then the batch augmentor (``rng`` is passed to it) or ``noisy = audio + noise``."""
    if len(items) == 0:
        raise ValueError("collate_audio_noise: empty batch")
    max_len = int(max(int(x.audio_len) for x in items))
    audio = torch.stack([torch.nn.functional.pad(x.audio, (0, max_len - x.audio.size(0))) for x in items]).float()
    noise = torch.stack([torch.nn.functional.pad(x.noise, (0, max(0, max_len - x.noise.size(0))))[:max_len]
                         for x in items]).float()
    batch = AudioNoiseBatch(sample_id=[x.sample_id for x in items], audio=audio,
                            audio_len=torch.stack([torch.as_tensor(x.audio_len) for x in items]).long(),
                            noise=noise,
                            noise_len=torch.stack([torch.as_tensor(x.noise_len) for x in items]).long())
    if batch_augmentor is not None:
        return batch_augmentor(batch, rng=rng)
    return batch.replace(noisy_audio=batch.audio + batch.noise, noisy_audio_len=batch.audio_len)


class AudioNoiseDataset(torch.utils.data.Dataset):
    """NeMo's ``AudioNoiseDataset``: ``manifest_filepath`` (path, comma-separated paths or list),
    ``noise_manifest`` (same forms or ``None``), ``sample_rate``, ``min_duration``/``max_duration``,
    ``min_audio_len_secs`` (1.0) and ``pad_audio_mode`` ('repeat'). Manifests are read lazily."""

    def __init__(self, manifest_filepath: PathList, sample_rate: int = 16000, noise_manifest: PathList = None,
                 min_duration: Optional[float] = None, max_duration: Optional[float] = None,
                 batch_augmentor: Any = None, min_audio_len_secs: float = 1.0, pad_audio_mode: str = "repeat",
                 strict_manifest: bool = False):
        self.manifest = ManifestIndex(manifest_filepath, min_duration, max_duration, strict=strict_manifest)
        self.noise_data = ManifestIndex(noise_manifest, strict=strict_manifest, what="noise manifest")
        self.sample_rate = int(sample_rate)
        self.batch_augmentor = batch_augmentor
        self.min_audio_len_secs = min_audio_len_secs
        self.pad_audio_mode = pad_audio_mode

    def __len__(self) -> int:
        return len(self.manifest)

    def get_item(self, index: int, rng, bad_files: Optional[List[str]] = None) -> AudioNoiseItem:
        """Item ``index`` with noise drawn from ``rng``; raises :class:`AudioLoadError` for a bad file."""
        entry = self.manifest[index]
        audio = torch.from_numpy(load_audio(entry.audio_filepath, self.sample_rate, offset=entry.offset or 0,
                                            duration=entry.duration))
        audio = pad_audio(audio, int(self.min_audio_len_secs * self.sample_rate), self.pad_audio_mode)
        audio_len = torch.tensor(audio.shape[0]).long()
        noise, noise_len = sample_noise(self.noise_data, self.sample_rate, int(audio_len), rng,
                                        bad_files=bad_files)
        return AudioNoiseItem(sample_id=str(index), audio=audio, audio_len=audio_len, noise=noise,
                              noise_len=noise_len)

    def __getitem__(self, index: int) -> AudioNoiseItem:
        return self.get_item(index, np.random)  # NeMo's global numpy RNG

    def collate_fn(self, batch: Sequence[AudioNoiseItem]) -> AudioNoiseBatch:
        return collate_audio_noise(batch, self.batch_augmentor)


def batch_seed(seed: int, epoch: int, batch_index: int, stream: int = 0) -> int:
    """A 32-bit seed for one batch, mixing ``(seed, epoch, batch_index, stream)`` with numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, batch_index & 0xFFFFFFFF,
                                       stream]).generate_state(1)[0])


class SeededBatchDataset(torch.utils.data.Dataset):
    """Batches of an :class:`AudioNoiseDataset`, each built from its own seeded RNGs (see module doc).

    ``ds[(epoch, batch_index, indices)]`` → :class:`AudioNoiseBatch`. Use with ``DataLoader(batch_size=None,
    sampler=<sampler yielding such keys>, collate_fn=identity)``.
    """

    def __init__(self, dataset: AudioNoiseDataset, seed: int = 0, augment: bool = True,
                 max_replacements: int = 100):
        self.dataset, self.seed, self.augment = dataset, int(seed), augment
        self.max_replacements = max_replacements

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> AudioNoiseBatch:
        epoch, batch_index, indices = key
        s = batch_seed(self.seed, epoch, batch_index)
        np_rng, py_rng = np.random.RandomState(s), random.Random(s)
        bad: List[str] = []
        items = []
        replacements = 0
        for idx in indices:
            idx = int(idx)
            while True:
                try:
                    items.append(self.dataset.get_item(idx, np_rng, bad_files=bad))
                    break
                except AudioLoadError as e:
                    log.warning("skipping unusable audio file %s", e)
                    bad.append(e.path)
                    replacements += 1
                    if replacements > self.max_replacements:
                        raise RuntimeError(f"more than {self.max_replacements} unusable audio files in one batch "
                                           f"(last: {e}); check the manifest") from None
                    idx = int(np_rng.randint(len(self.dataset)))
        batch = collate_audio_noise(items, self.dataset.batch_augmentor if self.augment else None, rng=py_rng)
        return batch.replace(epoch=int(epoch), batch_index=int(batch_index), bad_files=bad)


def identity_collate(x):
    """The DataLoader collate for :class:`SeededBatchDataset` (batches come out already collated)."""
    return x
