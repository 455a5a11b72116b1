"""Datasets and DataLoaders from NeMo's ``model.train_ds`` / ``model.validation_ds`` sections.

NeMo keys used: ``manifest_filepath`` (path, comma-separated or list), ``noise_manifest``, ``sample_rate``,
``batch_size``, ``shuffle``, ``num_workers``, ``pin_memory``, ``min_duration``, ``max_duration``, ``drop_last``,
``batch_augmentor``, ``is_concat`` (NeMo quirk kept: concatenated datasets get no batch augmentation). Other NeMo
keys (``trim_silence``, ``bucketing_*``, ``shuffle_n``, ...) are accepted and have no effect; ``is_tarred: true``
is refused with a clear message. nest_fast's additions: ``batch_duration`` (seconds of audio per batch: duration
bucketing instead of a fixed batch size), ``max_batch_size`` (cap for bucketed batches), ``bucket_pool_size``,
``min_audio_len_secs``, ``pad_audio_mode`` and ``seed``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..data.augment import build_batch_augmentor
from ..data.dataset import AudioNoiseDataset, SeededBatchDataset, identity_collate
from ..data.manifest import ManifestError, split_manifest_paths
from ..data.sampler import BucketingBatchSampler, FixedBatchSampler

# keys nest_fast adds to NeMo's dataset sections (defaults; present so `key=value` overrides need no '+')
DATASET_EXTRA_DEFAULTS: Dict[str, Any] = {"batch_duration": None, "max_batch_size": None, "bucket_pool_size": 10000,
                                          "min_audio_len_secs": 1.0, "pad_audio_mode": "repeat", "seed": None,
                                          "loader": "torch", "dali_num_threads": None, "dali_device": "auto"}


def _missing(v) -> bool:
    return v is None or v == "???" or (isinstance(v, (list, str)) and len(split_manifest_paths(v)) == 0)


def build_dataset(ds_cfg: Mapping[str, Any], what: str) -> Optional[AudioNoiseDataset]:
    """An :class:`AudioNoiseDataset` for a dataset section (``None`` when its manifest is unset and ``what`` is
    'validation_ds'). Fails at start-up, with a clear message, for a missing manifest or an empty dataset."""
    if ds_cfg is None:
        ds_cfg = {}
    mf = ds_cfg.get("manifest_filepath")
    if _missing(mf):
        if what == "validation_ds":
            return None
        raise ManifestError(f"model.{what}.manifest_filepath is not set: give your NeMo manifest, e.g. "
                            f"model.{what}.manifest_filepath=/data/train_manifest.json (or run without arguments "
                            f"for the built-in demo)")
    if ds_cfg.get("is_tarred"):
        raise ValueError(f"model.{what}.is_tarred=true: tarred datasets are not supported by nest_fast.train; use "
                         f"plain manifests (or the DALI loader)")
    augment_cfg = None if ds_cfg.get("is_concat") else ds_cfg.get("batch_augmentor")
    ds = AudioNoiseDataset(mf, sample_rate=int(ds_cfg.get("sample_rate", 16000)),
                           noise_manifest=ds_cfg.get("noise_manifest"), min_duration=ds_cfg.get("min_duration"),
                           max_duration=ds_cfg.get("max_duration"),
                           batch_augmentor=build_batch_augmentor(augment_cfg),
                           min_audio_len_secs=float(ds_cfg.get("min_audio_len_secs") or 1.0),
                           pad_audio_mode=ds_cfg.get("pad_audio_mode") or "repeat")
    if len(ds) == 0:
        m = ds.manifest
        raise ManifestError(f"model.{what}: no usable items in {m.files} ({m.num_filtered} outside "
                            f"[min_duration={ds_cfg.get('min_duration')}, max_duration={ds_cfg.get('max_duration')}]"
                            f", {m.num_bad_lines} bad lines)")
    return ds


def build_loader(ds: AudioNoiseDataset, ds_cfg: Mapping[str, Any], seed: int, rank: int, world_size: int,
                 train: bool) -> Tuple[torch.utils.data.DataLoader, Any]:
    """``(DataLoader, sampler)``: batches are built whole in the workers, seeded per ``(seed, epoch, index)``.

    ``loader: dali`` in the dataset section switches to the NVIDIA DALI pipeline (nest_fast.data.dali), which
    reuses this function's sampler (``loader="torch"``) so order, sharding and resume are identical."""
    loader = str(ds_cfg.get("loader") or "torch").lower()
    if loader == "dali":
        from ..data.dali import build_dali_loader

        return build_dali_loader(ds, ds_cfg, seed, rank, world_size, train)
    if loader != "torch":
        raise ValueError(f"{'train_ds' if train else 'validation_ds'}.loader must be 'torch' or 'dali', got {loader!r}")
    seed = int(ds_cfg.get("seed") if ds_cfg.get("seed") is not None else seed)
    shuffle = bool(ds_cfg.get("shuffle", train))
    drop_last = bool(ds_cfg.get("drop_last", False))
    if ds_cfg.get("batch_duration"):
        sampler = BucketingBatchSampler(ds.manifest.durations, float(ds_cfg["batch_duration"]), shuffle=shuffle,
                                        seed=seed, rank=rank, world_size=world_size,
                                        max_batch_size=ds_cfg.get("max_batch_size"),
                                        pool_size=int(ds_cfg.get("bucket_pool_size") or 10000),
                                        drop_last=drop_last or train)
    else:
        sampler = FixedBatchSampler(len(ds), int(ds_cfg.get("batch_size", 8)), shuffle=shuffle, drop_last=drop_last,
                                    seed=seed, rank=rank, world_size=world_size)
    if len(sampler) == 0:
        raise ManifestError(f"{'train' if train else 'validation'} data: {len(ds)} items give no batch on rank "
                            f"{rank} of {world_size} (batch_size={ds_cfg.get('batch_size')}, drop_last={drop_last})")
    num_workers = int(ds_cfg.get("num_workers", 0) or 0)
    pin = bool(ds_cfg.get("pin_memory", False)) and torch.cuda.is_available()
    g = torch.Generator()  # the loader's own generator: creating an iterator must not touch the global RNG
    g.manual_seed(seed + 17 + rank)
    loader = torch.utils.data.DataLoader(
        SeededBatchDataset(ds, seed=seed + (0 if train else 1_000_003)), batch_size=None, sampler=sampler,
        collate_fn=identity_collate, num_workers=num_workers, pin_memory=pin, generator=g,
        persistent_workers=num_workers > 0, worker_init_fn=_worker_init if num_workers > 0 else None,
        prefetch_factor=2 if num_workers > 0 else None)
    return loader, sampler


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


def audio_seconds(batch, sample_rate: int) -> float:
    return float(batch.audio_len.sum()) / sample_rate if batch.audio_len is not None else math.nan
