"""Data: NeMo manifests (lazy), audio loading, ``AudioNoiseDataset``, collation, batch augmentation, samplers,
and the demo corpus. Importing this package needs only numpy and torch; soundfile/soxr are imported on use."""

from .audio import AudioLoadError, load_audio, resample
from .augment import MultiSpeakerNoiseAugmentation, SpeakerNoiseAugmentation, build_batch_augmentor
from .dataset import (AudioNoiseBatch, AudioNoiseDataset, AudioNoiseItem, SeededBatchDataset, collate_audio_noise,
                      identity_collate, load_noise_audio, pad_audio, sample_noise)
from .manifest import ManifestEntry, ManifestError, ManifestIndex, parse_manifest_line, write_manifest
from .sampler import BucketingBatchSampler, FixedBatchSampler

__all__ = [
    "AudioLoadError", "load_audio", "resample", "MultiSpeakerNoiseAugmentation", "SpeakerNoiseAugmentation",
    "build_batch_augmentor", "AudioNoiseBatch", "AudioNoiseDataset", "AudioNoiseItem", "SeededBatchDataset",
    "collate_audio_noise", "identity_collate", "load_noise_audio", "pad_audio", "sample_noise", "ManifestEntry",
    "ManifestError", "ManifestIndex", "parse_manifest_line", "write_manifest", "BucketingBatchSampler",
    "FixedBatchSampler",
]
