"""An NVIDIA DALI loader for NEST pre-training: same batches as the torch loader, decoded in DALI's threads.

``build_dali_loader(ds, ds_cfg, seed, rank, world_size, train) -> (loader, sampler)`` has the signature of
:func:`nest_fast.training.data.build_loader` and yields the same :class:`~nest_fast.data.dataset.AudioNoiseBatch`
objects (``audio``, ``audio_len``, ``noise``, ``noise_len``, ``noisy_audio``, ``noisy_audio_len``, ``epoch``,
``batch_index``, ``bad_files``, ``sample_id``), so the trainer does not know which loader it has.

What runs where:

* **Python (main thread), per batch:** the batch's manifest indices come from the torch loader's own sampler
  (:class:`~nest_fast.data.sampler.FixedBatchSampler` or :class:`~nest_fast.data.sampler.BucketingBatchSampler`,
  built by ``build_loader``), so shuffling with a seed, sharding across DDP ranks, ``drop_last``/padding and epoch
  boundaries are exactly the torch loader's, batch for batch. Their lines are read from the lazy
  :class:`~nest_fast.data.manifest.ManifestIndex` (20 bytes an item in host memory, whatever the manifest's size),
  missing files are replaced (drawn from the batch's RNG, as the torch loader does), and the noise clip of each
  item is chosen (entry, and up to ``noise_trials`` random offsets).
* **DALI's worker threads:** file reads, decoding (WAV/FLAC/OGG through ``fn.decoders.audio``), down-mixing, the
  cut at ``offset``/``duration`` in the file's own frames (``int(offset*sr)``, ``int(duration*sr)``, float64, as
  soundfile does), resampling to 16 kHz (``fn.audio_resample``, windowed sinc), NeMo's "re-draw while the noise
  segment's sum is <= 0" choice among the candidate offsets, batch padding, and (with a GPU) the copy to the GPU.
* **torch, on the output device (the GPU when there is one), vectorised:** ``librosa.util.fix_length`` of every
  clip (lengths are exactly the torch loader's: ``ceil(n * 16000 / sr)``), tiling of clips shorter than
  ``min_audio_len_secs``, noise pad/cut to the utterance and ``noise_len`` (SPEC §3.2), and the batch augmentation
  of SPEC §3.4 (:func:`augment_batch`: the same Python ``random`` draws as
  :class:`~nest_fast.data.augment.MultiSpeakerNoiseAugmentation`, in the same order, seeded per batch exactly
  like the torch loader, then one gather/scatter for the whole batch instead of a Python loop of tensor ops).

Differences from the torch loader, all inside "same semantics": the audio of a resampled file differs by the
resampler (DALI's windowed sinc vs soxr HQ: ~1e-3 inside the clip, more on the first and last few samples);
the noise offsets come from their own RNG stream (the torch loader interleaves them with other draws), at most
``noise_trials`` (default 8) offsets are tried instead of 100, and the sign test runs on the file's own samples
before resampling; an utterance that decodes to nothing or to NaN/inf is replaced by a copy of another item of
its batch (the torch loader loads a new random item).

Bad input (the torch loader's behaviour: skip, log with the path, count): a missing or empty file is replaced
before DALI sees it; a file DALI cannot decode makes the pipeline fail, and then the loader rebuilds it, finds the
culprit(s) by decoding the batch's files one by one, logs them, remembers them (``loader.bad_paths``) and feeds
the same batches again with replacements. ``batch.bad_files`` lists the paths skipped for that batch and
``loader.num_bad_files`` counts them all.

DALI is optional: this module imports it only when a loader is built, and says how to install it when it is
missing. Pipelines run on the CPU (``device_id=None``) without a GPU; with one, outputs are copied to the GPU
inside the pipeline and prefetched (``prefetch_queue_depth``).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from .augment import MultiSpeakerNoiseAugmentation
from .dataset import AudioNoiseBatch, AudioNoiseDataset, batch_seed

log = logging.getLogger("nest_fast.data")
Tensor = torch.Tensor

DALI_REQUIREMENT = "nvidia-dali-cuda130"
DALI_INSTALL_HINT = (
    "model.train_ds.loader=dali needs NVIDIA DALI, which is not installed. Install it with\n"
    f"    python -m pip install {DALI_REQUIREMENT}      # CUDA 13 wheels; also runs CPU-only pipelines\n"
    "(nvidia-dali-cuda120 for a CUDA 12 driver), or use the torch loader: model.train_ds.loader=torch")

# nest_fast's DALI keys in a dataset section (defaults)
DALI_DEFAULTS: Dict[str, Any] = {"loader": "torch", "dali_num_threads": None, "dali_device": "auto",
                                 "dali_prefetch": 2, "dali_noise_trials": 8, "dali_resample_quality": 50.0}

_STREAM_NOISE, _STREAM_REPLACE, _STREAM_POST = 1, 2, 3


def dali_available() -> bool:
    """True when ``nvidia.dali`` can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001 (ImportError, or a broken install)
        return False
    return True


def _dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
    except Exception as e:  # noqa: BLE001
        raise ImportError(f"{DALI_INSTALL_HINT}\n(import error: {e})") from None
    return dali, fn, types


# ================================================================================================ augmentation
def plan_augmentation(aug: MultiSpeakerNoiseAugmentation, audio_len: Sequence[int], noise_len: Sequence[int],
                      rng=None):
    """The random decisions of ``aug.augment`` for a batch, drawn from ``rng`` (a ``random.Random``) in exactly
    the order :class:`~nest_fast.data.augment.MultiSpeakerNoiseAugmentation` draws them.

    Returns ``(items, segments)``: ``items`` is a list of ``(i, L, ratio_db)`` for the augmented items;
    ``segments`` a list of ``(i, dest_start, length, src, src_row, base, period)``: write
    ``source[src][src_row, (base + j) % period]`` at ``noise_signal[i, dest_start + j]`` for ``j < length``
    (``src`` 0: audio, 1: noise).
    """
    rng = random if rng is None else rng
    B = len(audio_len)
    items: List[Tuple[int, int, float]] = []
    segs: List[Tuple[int, int, int, int, int, int, int]] = []
    for i in range(B):
        if rng.random() > aug.prob:
            continue
        L = int(audio_len[i])
        mix_len, seg_lens, num_speakers, mode, ratio = aug.draw_mix(L, B, rng)
        sources: List[Tuple[int, int, int, int]] = []  # (src, row, base, period) per segment
        if mode == "noise":
            nl = int(noise_len[i])
            start = 0
            for s in seg_lens:
                sources.append((1, i, start, nl))  # own noise tiled with period noise_len (0: silence)
                start += s
        else:
            candidates = rng.sample([x for x in range(B) if x != i], k=min(num_speakers, B - 1))
            sid = 0
            for s in seg_lens:
                b = candidates[sid]
                Lb = int(audio_len[b])
                if s > Lb:
                    sources.append((0, b, 0, Lb))  # tiled
                else:
                    start = rng.randint(0, Lb - s - 1) if Lb > s else 0
                    sources.append((0, b, start, Lb))  # start + j < Lb: the modulo is the identity
                sid += 1
                if sid >= len(candidates):
                    sid = rng.randint(0, len(candidates) - 1)
        lo, hi = 0, L - mix_len
        for s, (src, row, base, period) in zip(seg_lens, sources):
            start = rng.randint(lo, hi - 1) if lo < hi else lo
            if period > 0 and s > 0:
                segs.append((i, start, s, src, row, base, period))
            lo, hi = start + s, hi + s
        items.append((i, L, ratio))
    return items, segs


def _energy_scale(audio_i: Tensor, L: int, sig_L: Tensor, ratio_db: float) -> float:
    """The torch augmentor's mix scale, with the same float32 tensor arithmetic (bit-identical on the CPU)."""
    audio_energy = torch.sum(audio_i[:L] ** 2) / L
    if L <= 0:
        return 0
    noise_energy = torch.sum(sig_L ** 2) / L  # over the whole utterance length (NeMo quirk)
    if noise_energy > 0:
        return math.sqrt(audio_energy / (10 ** (ratio_db / 10) * noise_energy))
    return 0


def _segment(source: Tensor, row: int, base: int, period: int, length: int) -> Tensor:
    """``source[row, (base + j) % period]`` for ``j < length``."""
    if base + length <= period:
        return source[row, base:base + length]
    reps = (base + length + period - 1) // period
    return source[row, :period].repeat(reps)[base:base + length]


def augment_batch(aug, audio: Tensor, audio_len: Tensor, noise: Tensor, noise_len: Tensor, rng=None,
                  audio_len_cpu: Optional[Sequence[int]] = None, noise_len_cpu: Optional[Sequence[int]] = None,
                  vectorised: Optional[bool] = None):
    """SPEC §3.4 on a whole batch, on the tensors' device: returns ``(noise, noise_len, noisy_audio,
    noisy_audio_len)`` like ``aug.augment(...)`` with the same ``rng`` (a ``random.Random``).

    For :class:`~nest_fast.data.augment.MultiSpeakerNoiseAugmentation` the random decisions are drawn on the
    CPU (:func:`plan_augmentation`, the torch augmentor's draws in its order); then either one gather/scatter for
    the whole batch plus batched energies (``vectorised``, the default on CUDA: a fixed number of kernels
    whatever the batch) or, on the CPU, one slice copy per mixed segment with the torch augmentor's exact float32
    arithmetic (bit-identical to it). Any other augmentor runs its own ``augment``.
    ``audio_len_cpu``/``noise_len_cpu`` (lists) spare a device-to-host copy of the lengths.
    """
    if type(aug) is not MultiSpeakerNoiseAugmentation:
        return aug.augment(audio, audio_len, noise, noise_len, rng=rng)
    B, N = audio.shape
    al = list(audio_len_cpu) if audio_len_cpu is not None else audio_len.tolist()
    nl = list(noise_len_cpu) if noise_len_cpu is not None else noise_len.tolist()
    items, segs = plan_augmentation(aug, al, nl, rng)
    if not items:
        return noise, noise_len, audio + noise, noise_len
    if vectorised is None:
        vectorised = audio.is_cuda
    noise, noise_len = noise.clone(), noise_len.clone()
    dev = audio.device
    if not vectorised:
        by_item: Dict[int, list] = {}
        for sg in segs:
            by_item.setdefault(sg[0], []).append(sg)
        sig = torch.zeros(N, dtype=audio.dtype, device=dev)
        for i, L, ratio_db in items:
            sig.zero_()
            for _, start, length, src, row, base, period in by_item.get(i, ()):
                sig[start:start + length] = _segment(audio if src == 0 else noise, row, base, period, length)
            scale = _energy_scale(audio[i], L, sig[:L], ratio_db)
            noise[i] = scale * sig
            noise_len[i] = L
        return noise, noise_len, audio + noise, noise_len  # noisy_audio_len is noise_len (NeMo quirk (b))
    sig = torch.zeros_like(audio)
    if segs:
        t = torch.tensor(segs, dtype=torch.int64)  # [S, 7] on the CPU, one copy to the device
        total = int(t[:, 2].sum())
        t = t.to(dev, non_blocking=True)
        lens = t[:, 2]
        seg_of = torch.repeat_interleave(torch.arange(len(segs), device=dev), lens, output_size=total)
        j = torch.arange(total, device=dev) - (torch.cumsum(lens, 0) - lens)[seg_of]
        ts = t[seg_of]  # [total, 7]
        dest = ts[:, 0] * N + ts[:, 1] + j
        src_idx = ts[:, 4] * N + (ts[:, 5] + j) % ts[:, 6]
        from_audio = ts[:, 3] == 0
        flat = sig.view(-1)
        flat[dest] = torch.where(from_audio, audio.reshape(-1)[src_idx.clamp(max=B * N - 1)],
                                 noise.reshape(-1)[src_idx.clamp(max=B * N - 1)])
    rows = torch.tensor([it[0] for it in items], dtype=torch.int64).to(dev)
    Ls = torch.tensor([it[1] for it in items], dtype=torch.int64).to(dev)
    ratio = torch.tensor([10 ** (it[2] / 10) for it in items], dtype=torch.float64).to(dev)
    a, s = audio[rows], sig[rows]
    keep = torch.arange(N, device=dev)[None, :] < Ls[:, None]
    e_a = (a.double().square() * keep).sum(1) / Ls
    e_n = (s.double().square() * keep).sum(1) / Ls  # over the whole utterance length (NeMo quirk)
    scale = torch.where(e_n > 0, torch.sqrt(e_a / (ratio * e_n.clamp_min(1e-300))), torch.zeros_like(e_n))
    noise[rows] = s * scale[:, None].to(s.dtype)
    noise_len[rows] = Ls.to(noise_len.dtype)
    return noise, noise_len, audio + noise, noise_len  # noisy_audio_len is noise_len (NeMo quirk (b))


# ================================================================================================ the loader
@dataclass
class _Plan:
    key: Tuple[int, int, List[int]]
    indices: List[int]
    paths: List[str]
    offsets: np.ndarray          # float64 seconds
    durations: np.ndarray        # float64 seconds, <= 0: to the end
    noise_paths: List[str] = field(default_factory=list)
    noise_starts: Optional[np.ndarray] = None   # [B, K] int64 frames of the file
    noise_frames: Optional[np.ndarray] = None   # [B] int64 frames
    noise_ok: Optional[np.ndarray] = None       # [B] bool (False: zero noise)
    noise_idx: List[int] = field(default_factory=list)
    bad_files: List[str] = field(default_factory=list)
    attempts: int = 0

    def __len__(self) -> int:
        return len(self.indices)


class _Replan(Exception):
    """A batch has no usable item left after decoding: plan it again (its bad files are now known)."""


def _encode(path: str) -> np.ndarray:
    return np.frombuffer(os.fsencode(path), dtype=np.uint8)


class DALIAudioNoiseLoader:
    """Iterable of :class:`AudioNoiseBatch` built by a DALI pipeline (see the module doc).

    ``DALIAudioNoiseLoader(dataset, sampler, seed, augment=True, num_threads=1, device="auto",
    prefetch_queue_depth=2, noise_trials=8, resample_quality=50.0)``. ``sampler`` yields
    ``(epoch, batch_index, indices)`` keys and has ``batches(epoch)``, ``set_epoch`` and ``epoch``
    (the samplers of :mod:`nest_fast.data.sampler`); ``seed`` is the per-batch seed base
    (:func:`~nest_fast.data.dataset.batch_seed`), the same as ``SeededBatchDataset.seed`` of the torch loader.
    ``device``: "auto" (the current CUDA device when there is one, else the CPU), "cpu", "gpu" or "cuda:N".
    """

    def __init__(self, dataset: AudioNoiseDataset, sampler, seed: int = 0, augment: bool = True,
                 num_threads: int = 1, device: str = "auto", prefetch_queue_depth: int = 2, noise_trials: int = 8,
                 resample_quality: float = 50.0, max_replacements: int = 100, noise_max_trial: int = 20,
                 post_threads: Optional[int] = 1):
        _dali()  # fail early, with the install hint
        self.dataset, self.sampler, self.seed = dataset, sampler, int(seed)
        self.augmentor = dataset.batch_augmentor if augment else None
        self.num_threads = max(1, int(num_threads))
        self.prefetch_queue_depth = max(1, int(prefetch_queue_depth))
        self.noise_trials = max(1, int(noise_trials))
        self.resample_quality = float(resample_quality)
        self.max_replacements, self.noise_max_trial = int(max_replacements), int(noise_max_trial)
        self.post_threads = None if post_threads is None else max(1, int(post_threads))
        self.sample_rate = int(dataset.sample_rate)
        self.min_len = int(dataset.min_audio_len_secs * self.sample_rate)
        self.pad_audio_mode = dataset.pad_audio_mode
        self.has_noise = len(dataset.noise_data) > 0
        dev = str(device or "auto").lower()
        if dev == "auto":
            dev = "gpu" if torch.cuda.is_available() else "cpu"
        if dev == "cpu":
            self.device_id, self.device = None, torch.device("cpu")
        else:
            if not torch.cuda.is_available():
                raise ValueError(f"dali_device={device!r} but CUDA is not available; use dali_device=cpu")
            idx = torch.device(dev.replace("gpu", "cuda")).index if dev != "gpu" else None
            idx = torch.cuda.current_device() if idx is None else idx
            self.device_id, self.device = idx, torch.device("cuda", idx)
        self.bad_paths: Set[str] = set()
        self.num_bad_files = 0
        self.num_recoveries = 0
        self._noise_info: Dict[int, Any] = {}
        self._pipe = None
        self._pipe_bs = 0
        self._probe = None
        self._keys: Iterator = iter(())
        self._retry: Deque[_Plan] = deque()
        self._inflight: Deque[_Plan] = deque()
        self._active = False

    # ------------------------------------------------------------------ sampler passthrough (Lightning calls these)
    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    # ------------------------------------------------------------------ pipeline
    def _build(self, batch_size: int):
        dali, fn, types = _dali()
        self._pipe = None
        K, q, has_noise, gpu = self.noise_trials, self.resample_quality, self.has_noise, self.device_id is not None
        f64, i64 = types.FLOAT64, types.INT64
        target = float(self.sample_rate)
        source = self._source

        # enable_conditionals: the per-sample ``if`` below splits the batch, so that files already at the target
        # rate skip fn.audio_resample (which runs its full sinc filter even at equal rates: 8x the decode time)
        @dali.pipeline_def(enable_conditionals=True)
        def graph():
            def cut_and_resample(audio, sr, start, nframes):
                """``audio[start:start+nframes]`` (trimmed to the clip), resampled to the target rate; returns the
                clip, the librosa length ``ceil(n * target / sr)`` and the clip's sum."""
                sr64 = fn.cast(sr, dtype=f64)
                n = audio.shape(dtype=i64)[0]
                start = dali.math.clamp(start, 0, n)
                nin = dali.math.clamp(nframes, 0, n - start)
                seg = fn.slice(audio, start, nin, axes=[0], out_of_bounds_policy="trim_to_shape")
                if sr != target:
                    out = fn.audio_resample(seg, in_rate=sr, out_rate=target, quality=q)
                else:
                    out = seg
                exp_len = fn.cast(dali.math.ceil(fn.cast(nin, dtype=f64) * target / sr64), dtype=i64)
                return out, exp_len, fn.reductions.sum(out)

            dtypes, ndims = [types.UINT8, f64, f64], [1, 0, 0]  # path, offset, duration
            if has_noise:
                dtypes, ndims = dtypes + [types.UINT8, i64], ndims + [1, 1]  # noise path, [starts..., frames]
            srcs = fn.external_source(source=source, num_outputs=len(dtypes), batch=True, dtype=dtypes, ndim=ndims)
            path, off, dur = srcs[0], srcs[1], srcs[2]
            audio, sr = fn.decoders.audio(fn.io.file.read(path), downmix=True, dtype=types.FLOAT)
            sr64 = fn.cast(sr, dtype=f64)
            n = audio.shape(dtype=i64)[0]
            start = fn.cast(dali.math.floor(off * sr64), dtype=i64)  # soundfile: seek(int(offset * sr))
            has_dur = fn.cast(dur > 0, dtype=i64)
            want = has_dur * fn.cast(dali.math.floor(dur * sr64), dtype=i64) + (1 - has_dur) * n
            a, a_exp, a_sum = cut_and_resample(audio, sr, start, want)
            outs = [a, a.shape(dtype=i64)[0], a_exp, a_sum]
            if has_noise:
                npath, nplan = srcs[3], srcs[4]  # nplan: [starts (K)..., frames]
                nz, nsr = fn.decoders.audio(fn.io.file.read(npath), downmix=True, dtype=types.FLOAT)
                nn = nz.shape(dtype=i64)[0]
                frames = nplan[K]
                chosen = dali.math.clamp(nplan[K - 1], 0, nn)
                for k in range(K - 2, -1, -1):  # the first candidate whose sum is > 0, else the last one
                    st = dali.math.clamp(nplan[k], 0, nn)
                    cnt = dali.math.clamp(frames, 0, nn - st)
                    ssum = fn.reductions.sum(fn.slice(nz, st, cnt, axes=[0], out_of_bounds_policy="trim_to_shape"))
                    ok = fn.cast(ssum > 0, dtype=i64)
                    chosen = ok * st + (1 - ok) * chosen
                z, z_exp, z_sum = cut_and_resample(nz, nsr, chosen, frames)
                outs += [z, z.shape(dtype=i64)[0], z_exp, z_sum]
            if gpu:
                outs[0] = outs[0].gpu()
            outs[0] = fn.pad(outs[0], axes=[0])
            if has_noise:
                if gpu:
                    outs[4] = outs[4].gpu()
                outs[4] = fn.pad(outs[4], axes=[0])
            return tuple(outs)

        pipe = graph(batch_size=batch_size, num_threads=self.num_threads, device_id=self.device_id,
                     prefetch_queue_depth=self.prefetch_queue_depth, seed=self.seed & 0x7FFFFFFF)
        pipe.build()
        self._pipe, self._pipe_bs = pipe, batch_size

    def _ensure_pipe(self, need: int) -> None:
        if self._pipe is None or need > self._pipe_bs:
            self._build(max(need, self._pipe_bs))

    # ------------------------------------------------------------------ planning (Python, per batch)
    def _mark_bad(self, path: str, reason: str, plan_bad: List[str]) -> None:
        if path not in self.bad_paths:
            log.warning("skipping unusable audio file %s: %s", path, reason)
            if len(self.bad_paths) < 1_000_000:
                self.bad_paths.add(path)
        plan_bad.append(path)
        self.num_bad_files += 1

    def _file_ok(self, path: str) -> Optional[str]:
        if path in self.bad_paths:
            return "failed to decode earlier"
        try:
            st = os.stat(path)
        except OSError as e:
            return f"file not found or unreadable ({e.strerror})"
        if st.st_size == 0:
            return "empty file"
        return None

    def _noise_header(self, k: int):
        info = self._noise_info.get(k)
        if info is None:
            entry = self.dataset.noise_data[k]
            reason = self._file_ok(entry.audio_filepath)
            if reason is None:
                try:
                    import soundfile as sf

                    h = sf.info(entry.audio_filepath)
                    info = (entry, int(h.samplerate), int(h.frames), None)
                except Exception as e:  # noqa: BLE001
                    reason = f"unreadable audio header ({e})"
            if reason is not None:
                info = (entry, 0, 0, reason)
            if len(self._noise_info) < 1_000_000:
                self._noise_info[k] = info
        return info

    def _speech_seconds(self, entry) -> Optional[float]:
        if entry.duration is not None and entry.duration > 0:
            return float(entry.duration)
        try:
            import soundfile as sf

            h = sf.info(entry.audio_filepath)
        except Exception:  # noqa: BLE001
            return None
        return max(0.0, h.frames / h.samplerate - float(entry.offset or 0.0))

    def _plan(self, key, bad: Optional[List[str]] = None, attempts: int = 0) -> _Plan:
        epoch, bidx, indices = key
        rep = np.random.RandomState(batch_seed(self.seed, epoch, bidx, _STREAM_REPLACE))
        nrng = np.random.RandomState(batch_seed(self.seed, epoch, bidx, _STREAM_NOISE))
        bad = list(bad or [])
        ds, man = self.dataset, self.dataset.manifest
        out_idx, paths, offs, durs, est = [], [], [], [], []
        replacements = 0
        for idx in indices:
            idx = int(idx)
            while True:
                entry = man[idx]
                reason = self._file_ok(entry.audio_filepath)
                secs = None
                if reason is None and self.has_noise:
                    secs = self._speech_seconds(entry)
                    if secs is None:
                        reason = "unreadable audio header"
                if reason is None:
                    break
                self._mark_bad(entry.audio_filepath, reason, bad)
                replacements += 1
                if replacements > self.max_replacements:
                    raise RuntimeError(f"more than {self.max_replacements} unusable audio files in one batch (last: "
                                       f"{entry.audio_filepath}: {reason}); check the manifest")
                idx = int(rep.randint(len(ds)))
            out_idx.append(idx)
            paths.append(entry.audio_filepath)
            offs.append(float(entry.offset or 0.0))
            durs.append(float(entry.duration) if entry.duration is not None and entry.duration > 0 else -1.0)
            est.append(secs)
        plan = _Plan(key=key, indices=out_idx, paths=paths, offsets=np.asarray(offs, np.float64),
                     durations=np.asarray(durs, np.float64), bad_files=bad, attempts=attempts)
        if self.has_noise:
            self._plan_noise(plan, est, nrng)
        return plan

    def _plan_noise(self, plan: _Plan, est: List[float], rng) -> None:
        """NeMo's ``sample_noise`` + ``load_noise_audio`` decisions (SPEC §3.2 steps 4-5) in file frames."""
        B, K, nd = len(plan), self.noise_trials, self.dataset.noise_data
        starts = np.zeros((B, K), np.int64)
        frames = np.zeros(B, np.int64)
        ok = np.zeros(B, bool)
        paths: List[str] = []
        for b in range(B):
            # the utterance's length after tiling, plus 1.5 samples so that rounding never makes the noise short
            max_dur = max(self.min_len / self.sample_rate, est[b]) + 1.5 / self.sample_rate
            chosen = None
            for _ in range(self.noise_max_trial):
                k = int(rng.randint(len(nd)))
                entry, sr, nfr, reason = self._noise_header(k)
                if reason is None and entry.audio_filepath in self.bad_paths:
                    reason = "failed to decode earlier"
                if reason is None:
                    D = entry.duration
                    if D is not None and D > max_dur:
                        st = [int(rng.uniform(0, D - max_dur) * sr) for _ in range(K)]
                        fr = int(max_dur * sr)
                    else:
                        off = float(entry.offset or 0.0)
                        s0 = int(off * sr) if off > 0 else 0
                        st = [s0] * K
                        fr = int(D * sr) if D is not None and D > 0 else nfr - s0
                    if min(st) >= nfr or fr <= 0:
                        reason = "no samples (empty file, or offset past its end)"
                    else:
                        chosen = (entry.audio_filepath, st, fr)
                        break
                log.warning("skipping unusable noise file %s: %s", entry.audio_filepath, reason)
                plan.bad_files.append(entry.audio_filepath)
                self.num_bad_files += 1
            if chosen is None:
                if self.noise_max_trial > 0:
                    log.warning("no usable noise after %d attempts: using zero noise", self.noise_max_trial)
                paths.append(plan.paths[b])  # decoded but unused (cheap and always valid)
                starts[b] = 0
                frames[b] = 1
                continue
            paths.append(chosen[0])
            starts[b] = chosen[1]
            frames[b] = chosen[2]
            ok[b] = True
        plan.noise_paths, plan.noise_starts, plan.noise_frames, plan.noise_ok = paths, starts, frames, ok

    # ------------------------------------------------------------------ the external source
    def _source(self):
        if self._retry:
            plan = self._retry.popleft()
        else:
            plan = self._plan(next(self._keys))  # StopIteration ends DALI's epoch
        self._inflight.append(plan)
        outs = [[_encode(p) for p in plan.paths], list(plan.offsets), list(plan.durations)]
        if self.has_noise:
            outs.append([_encode(p) for p in plan.noise_paths])
            outs.append(list(np.concatenate([plan.noise_starts, plan.noise_frames[:, None]], axis=1)))
        return outs

    # ------------------------------------------------------------------ recovery from decode errors
    def _probe_decode(self, path: str) -> Optional[str]:
        """None when DALI decodes ``path``, else the error."""
        dali, fn, types = _dali()
        feed: List[str] = [path]
        if self._probe is None:
            holder = {"path": path}

            p = dali.Pipeline(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1,
                              exec_async=False, exec_pipelined=False)
            with p:
                src = fn.external_source(source=lambda: [_encode(holder["path"])], batch=True, dtype=types.UINT8,
                                         ndim=1)
                a, _ = fn.decoders.audio(fn.io.file.read(src), downmix=True)
                p.set_outputs(a)
            p.build()
            self._probe = (p, holder)
        p, holder = self._probe
        holder["path"] = feed[0]
        try:
            p.run()
        except Exception as e:  # noqa: BLE001
            self._probe = None  # a failed pipeline is not reusable
            msg = str(e).split("encountered:", 1)[-1].strip().splitlines()
            return "DALI cannot decode it: " + (msg[0] if msg else type(e).__name__)
        return None

    def _restart(self, plans: List[_Plan]) -> None:
        """Plan ``plans`` again (known bad files are replaced now), feed them first, on a fresh pipeline."""
        self._inflight.clear()
        self._pipe = None
        new = [self._plan(p.key, bad=p.bad_files, attempts=p.attempts + 1) for p in plans]
        self._retry.extendleft(reversed(new))
        self._build(self._pipe_bs)

    def _recover(self, err: Exception) -> None:
        plans = list(self._inflight)
        self._inflight.clear()
        self.num_recoveries += 1
        self._pipe = None
        found = False
        for plan in plans:
            used_noise = [] if plan.noise_ok is None else [p for p, o in zip(plan.noise_paths, plan.noise_ok) if o]
            for path in dict.fromkeys(plan.paths + used_noise):
                if path in self.bad_paths:
                    continue
                reason = self._probe_decode(path)
                if reason is not None:
                    found = True
                    self._mark_bad(path, reason, plan.bad_files)
        if not found and any(p.attempts >= 1 for p in plans):
            raise RuntimeError(f"the DALI pipeline fails on batch {plans[0].key[:2] if plans else '?'} and no single "
                               f"file of it is to blame: {err}") from err
        if not found:
            log.warning("DALI pipeline error with no file to blame, retrying the batches once: %s", err)
        self._restart(plans)

    # ------------------------------------------------------------------ iteration
    def _drain(self) -> None:
        """Finish an abandoned epoch: stop feeding, drop what DALI already prefetched, reset."""
        if not self._active or self._pipe is None:
            self._active = False
            return
        self._keys, self._retry = iter(()), deque()
        try:
            while True:
                self._pipe.run()
        except StopIteration:
            pass
        except Exception:  # noqa: BLE001 (a failing prefetched batch: just start afresh)
            self._pipe = None
        if self._pipe is not None:
            self._pipe.reset()
        self._inflight.clear()
        self._active = False

    def __iter__(self) -> Iterator[AudioNoiseBatch]:
        self._drain()
        epoch = self.sampler.epoch
        batches = self.sampler.batches(epoch)
        if not batches:
            return
        self._ensure_pipe(max(len(b) for b in batches))
        self._keys = iter(self.sampler)
        self._retry, self._inflight = deque(), deque()
        self._active = True
        try:
            while True:
                try:
                    outs = self._pipe.run()
                except StopIteration:
                    break
                except RuntimeError as e:
                    self._recover(e)
                    continue
                plan = self._inflight.popleft()
                try:
                    batch = self._postprocess_with_threads(outs, plan)
                except _Replan:
                    if plan.attempts >= self.max_replacements:
                        raise RuntimeError(f"batch {plan.key[:2]}: no usable utterance after {plan.attempts} "
                                           f"attempts (last files: {plan.paths})") from None
                    self._restart([plan] + list(self._inflight))
                    continue
                yield batch
            self._pipe.reset()
            self._active = False
        finally:
            if self._active:
                self._drain()

    # ------------------------------------------------------------------ torch side
    def _tensor(self, tl) -> Tensor:
        dali, _, _ = _dali()
        if isinstance(tl, dali.backend.TensorListGPU):
            from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

            t = tl.as_tensor()
            out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=self.device)
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
            return out
        return torch.from_numpy(np.array(tl.as_tensor()))

    def _fix(self, x: Tensor, dali_len: np.ndarray, exp_len: np.ndarray, width: int) -> Tensor:
        """Pad/cut the padded clips to ``width`` and zero everything past ``min(dali_len, exp_len)``."""
        if x.size(1) < width:
            x = torch.nn.functional.pad(x, (0, width - x.size(1)))
        x = x[:, :width]
        valid = torch.from_numpy(np.minimum(dali_len, exp_len)).to(x.device)
        return x * (torch.arange(width, device=x.device)[None, :] < valid[:, None])

    def _postprocess_with_threads(self, outs, plan: _Plan) -> AudioNoiseBatch:
        # On the CPU, DALI's threads keep the cores busy with the next batches: torch ops with more than
        # ``post_threads`` intra-op threads then wait on descheduled threads at every parallel region (measured
        # 20x slower per op on 2 cores). The setting is restored before the batch is handed out.
        if self.device.type != "cpu" or self.post_threads is None:
            return self._postprocess(outs, plan)
        prev = torch.get_num_threads()
        torch.set_num_threads(self.post_threads)
        try:
            return self._postprocess(outs, plan)
        finally:
            torch.set_num_threads(prev)

    def _postprocess(self, outs, plan: _Plan) -> AudioNoiseBatch:
        B = len(plan)
        a_len = np.array(outs[1].as_tensor()).reshape(B).astype(np.int64)
        a_exp = np.array(outs[2].as_tensor()).reshape(B).astype(np.int64)
        a_sum = np.array(outs[3].as_tensor()).reshape(B)
        post = np.random.RandomState(batch_seed(self.seed, plan.key[0], plan.key[1], _STREAM_POST))
        bad = (a_exp <= 0) | (a_len <= 0) | ~np.isfinite(a_sum)
        rows = np.arange(B)
        sample_ids = [str(i) for i in plan.indices]
        if bad.any():
            good = np.flatnonzero(~bad)
            for b in np.flatnonzero(bad):
                reason = "no samples (empty file, or offset past its end)" if a_exp[b] <= 0 or a_len[b] <= 0 \
                    else "samples contain NaN or inf"
                self._mark_bad(plan.paths[b], reason, plan.bad_files)
                if good.size:
                    rows[b] = good[post.randint(good.size)]
            if good.size == 0:  # nothing to copy from: load the batch again, with replacements
                raise _Replan()
            for b in np.flatnonzero(bad):
                sample_ids[b] = sample_ids[rows[b]]
        raw_len = a_exp[rows]
        width_raw = int(raw_len.max())
        audio = self._tensor(outs[0])
        if bad.any():
            audio = audio[torch.from_numpy(rows).to(audio.device)]
        audio = self._fix(audio, a_len[rows], raw_len, width_raw)
        # tile (or zero-pad) clips shorter than min_audio_len_secs, as AudioNoiseDataset does
        audio_len = np.maximum(raw_len, self.min_len)
        N = int(audio_len.max())
        if (raw_len < self.min_len).any():
            t = torch.arange(N, device=audio.device)[None, :]
            rl = torch.from_numpy(raw_len).to(audio.device)[:, None]
            if self.pad_audio_mode == "repeat":
                audio = torch.gather(audio, 1, (t % rl).expand(B, N))
            elif audio.size(1) < N:
                audio = torch.nn.functional.pad(audio, (0, N - audio.size(1)))
            audio = audio * (t < torch.from_numpy(audio_len).to(audio.device)[:, None])
        # noise (SPEC §3.2 steps 4-5): pad/cut to the utterance; noise_len stays the loaded length when shorter
        if self.has_noise:
            z_len = np.array(outs[5].as_tensor()).reshape(B).astype(np.int64)
            z_exp = np.array(outs[6].as_tensor()).reshape(B).astype(np.int64)
            z_sum = np.array(outs[7].as_tensor()).reshape(B).astype(np.float64)
            ok = plan.noise_ok.copy()
            for b in np.flatnonzero(ok & ~np.isfinite(z_sum)):
                self._mark_bad(plan.noise_paths[b], "samples contain NaN or inf", plan.bad_files)
                ok[b] = False
            ok &= z_exp > 0
            noise = self._fix(self._tensor(outs[4]), z_len, z_exp, N)
            loaded = np.where(ok, z_exp, audio_len)
            for b in np.flatnonzero(ok & (z_sum == 0)):  # all-zero clip: white noise at -90...-46 dB
                level = post.randint(-90, -46, dtype="int32")
                w = torch.from_numpy(post.randn(int(z_exp[b])) * (10.0 ** (level / 20.0))).float()
                m = min(N, w.numel())
                noise[b, :m] += w[:m].to(noise.device)
            noise_len = np.minimum(loaded, audio_len)
            keep = torch.from_numpy(np.where(ok, noise_len, 0)).to(noise.device)
            noise = noise * (torch.arange(N, device=noise.device)[None, :] < keep[:, None])
        else:
            noise = torch.zeros_like(audio)
            noise_len = audio_len.copy()
        dev = audio.device
        audio_len_t = torch.from_numpy(audio_len).to(dev)
        noise_len_t = torch.from_numpy(noise_len).to(dev)
        batch = AudioNoiseBatch(sample_id=sample_ids, audio=audio, audio_len=audio_len_t, noise=noise,
                                noise_len=noise_len_t, epoch=int(plan.key[0]), batch_index=int(plan.key[1]),
                                bad_files=list(plan.bad_files))
        if self.augmentor is not None:
            py_rng = random.Random(batch_seed(self.seed, plan.key[0], plan.key[1]))  # the torch loader's stream
            nz, nzl, noisy, noisy_len = augment_batch(self.augmentor, audio, audio_len_t, noise, noise_len_t,
                                                      rng=py_rng, audio_len_cpu=audio_len.tolist(),
                                                      noise_len_cpu=noise_len.tolist())
            return batch.replace(noise=nz, noise_len=nzl, noisy_audio=noisy, noisy_audio_len=noisy_len)
        return batch.replace(noisy_audio=audio + noise, noisy_audio_len=noise_len_t.clone())

    def close(self) -> None:
        self._drain()
        self._pipe = None
        self._probe = None


def _dali_cfg(ds_cfg: Mapping[str, Any], key: str):
    v = ds_cfg.get(key) if ds_cfg is not None else None
    return DALI_DEFAULTS[key] if v is None else v


def build_dali_loader(ds: AudioNoiseDataset, ds_cfg: Mapping[str, Any], seed: int, rank: int, world_size: int,
                      train: bool):
    """``(loader, sampler)`` like :func:`nest_fast.training.data.build_loader`, with a DALI pipeline.

    The sampler (and the per-batch seed) are the torch loader's own: ``build_loader`` builds them (its DataLoader
    is discarded unstarted). Keys read from ``ds_cfg`` besides NeMo's: ``dali_num_threads`` (default:
    ``num_workers``, at least 1), ``dali_device`` (auto|cpu|gpu), ``dali_prefetch`` (2), ``dali_noise_trials``
    (8) and ``dali_resample_quality`` (50).
    """
    from ..training.data import build_loader

    _dali()
    # loader=torch: build_loader may dispatch on this key to us
    torch_loader, sampler = build_loader(ds, dict(ds_cfg, loader="torch"), seed, rank, world_size, train)
    seeded = torch_loader.dataset
    threads = ds_cfg.get("dali_num_threads") or max(1, int(ds_cfg.get("num_workers", 0) or 0))
    loader = DALIAudioNoiseLoader(ds, sampler, seed=seeded.seed, augment=seeded.augment, num_threads=int(threads),
                                  device=str(_dali_cfg(ds_cfg, "dali_device")),
                                  prefetch_queue_depth=int(_dali_cfg(ds_cfg, "dali_prefetch")),
                                  noise_trials=int(_dali_cfg(ds_cfg, "dali_noise_trials")),
                                  resample_quality=float(_dali_cfg(ds_cfg, "dali_resample_quality")))
    return loader, sampler
