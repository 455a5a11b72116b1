"""Manifests, audio loading, AudioNoiseDataset, pin_memory and samplers (SPEC §3.1–3.3)."""

import json
import os
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import torch

from nest_fast.data import (AudioLoadError, AudioNoiseBatch, AudioNoiseDataset, BucketingBatchSampler,
                            FixedBatchSampler, ManifestError, ManifestIndex, SeededBatchDataset, load_audio)


def _wav(path, n, sr=16000, ch=1, seed=0, subtype="PCM_16"):
    y = np.random.default_rng(seed).uniform(-0.5, 0.5, (n, ch) if ch > 1 else n).astype(np.float32)
    sf.write(path, y, sr, subtype=subtype)
    return y


def _manifest(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture()
def corpus(tmp_path):
    d = tmp_path / "audio"
    d.mkdir()
    rows = []
    for i, n in enumerate([24000, 8000, 40000, 32000, 17000, 20000]):
        _wav(d / f"a{i}.wav", n, seed=i)
        rows.append({"audio_filepath": f"audio/a{i}.wav", "duration": n / 16000, "text": "ignored"})
    _wav(d / "n0.wav", 80000, seed=99)
    train = _manifest(tmp_path / "train.json", rows)
    noise = _manifest(tmp_path / "noise.json", [{"audio_filepath": "audio/n0.wav", "duration": 5.0}])
    return tmp_path, train, noise


# --------------------------------------------------------------------------------------------- manifests
def test_manifest_parsing_filters_and_paths(tmp_path, corpus):
    root, train, _ = corpus
    m = ManifestIndex(train, min_duration=1.0, max_duration=2.2)
    assert [round(d, 4) for d in m.durations] == [1.5, 2.0, 1.0625, 1.25]
    assert m.num_filtered == 2
    e = m[0]
    assert e.audio_filepath == os.path.join(str(root), "audio", "a0.wav") and e.line == 1
    # audio_filename, offset, list and comma-separated forms
    other = _manifest(tmp_path / "other.json", [{"audio_filename": "audio/a1.wav", "duration": 0.5, "offset": 0.1}])
    both = ManifestIndex([train, other])
    assert len(both) == 7 and both[6].offset == 0.1 and both[6].audio_filepath.endswith("a1.wav")
    assert len(ManifestIndex(f"{train},{other}")) == 7


def test_bad_manifest_lines_name_file_and_line(tmp_path, caplog):
    p = _manifest(tmp_path / "bad.json", [{"audio_filepath": "x.wav", "duration": 1.5}, "{not json",
                                          {"duration": 2.0}, "", {"audio_filepath": "y.wav", "duration": "abc"}])
    m = ManifestIndex(p)
    assert len(m) == 1 and m.num_bad_lines == 3
    assert f"{p}:2" in m.bad_lines[0] and "not valid JSON" in m.bad_lines[0]
    assert f"{p}:3" in m.bad_lines[1] and "audio_filepath" in m.bad_lines[1]
    assert f"{p}:5" in m.bad_lines[2]
    with pytest.raises(ManifestError, match=r"bad\.json:2"):
        ManifestIndex(p, strict=True)
    with pytest.raises(ManifestError, match="not found"):
        ManifestIndex(str(tmp_path / "missing.json"))


def test_manifest_is_lazy(tmp_path):
    """Host memory per item is a few numpy scalars, not a Python dict per line."""
    p = tmp_path / "big.json"
    with open(p, "w") as f:
        for i in range(20000):
            f.write(json.dumps({"audio_filepath": f"/data/some/long/folder/name/utt_{i:08d}.wav", "duration": 3.5,
                                "text": "a fairly long transcript that NeMo would keep in memory " * 3}) + "\n")
    tracemalloc.start()
    m = ManifestIndex(str(p))
    cur, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(m) == 20000 and cur / 20000 < 64  # bytes per item (the text alone is ~200 bytes a line)
    assert m[12345].audio_filepath.endswith("utt_00012345.wav") and m[12345].line == 12346


# --------------------------------------------------------------------------------------------- audio
def test_load_audio_resample_downmix_offset(tmp_path):
    import librosa

    y = _wav(tmp_path / "s.wav", 22050, sr=22050, ch=2, subtype="FLOAT")
    out = load_audio(str(tmp_path / "s.wav"), 16000)
    ref = librosa.resample(y.mean(axis=1), orig_sr=22050, target_sr=16000)  # librosa default: soxr_hq
    assert out.dtype == np.float32 and out.shape == ref.shape == (16000,)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    y = _wav(tmp_path / "m.flac", 32000, subtype="PCM_24")
    seg = load_audio(str(tmp_path / "m.flac"), 16000, offset=0.25, duration=0.5)
    np.testing.assert_allclose(seg, y[4000:12000], atol=1e-6)


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "nan", "garbage"])
def test_bad_audio_raises_with_path(tmp_path, kind):
    p = tmp_path / f"{kind}.wav"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncated":
        _wav(p, 16000)
        p.write_bytes(p.read_bytes()[:30])  # cut inside the header
    elif kind == "nan":
        y = np.zeros(16000, np.float32)
        y[100] = np.nan
        sf.write(p, y, 16000, subtype="FLOAT")
    elif kind == "garbage":
        p.write_bytes(os.urandom(5000))
    with pytest.raises(AudioLoadError) as ei:
        load_audio(str(p), 16000)
    assert str(p) in str(ei.value)


# --------------------------------------------------------------------------------------------- dataset
@pytest.mark.nemo
def test_dataset_items_match_nemo(corpus):
    from nemo.collections.asr.data.ssl_dataset import AudioNoiseDataset as NemoDS

    _, train, noise = corpus
    ref = NemoDS(manifest_filepath=train, labels=[], sample_rate=16000, noise_manifest=noise)
    ours = AudioNoiseDataset(train, noise_manifest=noise)
    assert len(ref) == len(ours)
    for i in range(len(ours)):
        np.random.seed(i)
        r = ref[i]
        o = ours.get_item(i, np.random.RandomState(i))
        for k in ("audio", "audio_len", "noise", "noise_len"):
            assert torch.equal(getattr(r, k), getattr(o, k)), (i, k)
    assert int(ours.get_item(1, np.random.RandomState(0)).audio_len) == 16000  # 0.5 s tiled to 1 s


def test_tiling_and_no_noise(corpus):
    _, train, _ = corpus
    ds = AudioNoiseDataset(train)
    it = ds.get_item(1, np.random.RandomState(0))  # 8000 samples -> tiled to 16000
    assert torch.equal(it.audio[:8000], it.audio[8000:]) and int(it.noise_len) == 16000 and not it.noise.any()


def test_seeded_batches_skip_bad_files(corpus, tmp_path):
    root, train, noise = corpus
    (root / "audio" / "a2.wav").write_bytes(b"RIFF0000WAVEjunk")  # corrupt one file
    ds = AudioNoiseDataset(train, noise_manifest=noise)
    sb = SeededBatchDataset(ds, seed=3)
    key = (0, 0, [0, 2, 3])
    b1, b2 = sb[key], sb[key]
    assert len(b1) == 3 and b1.bad_files == [str(root / "audio" / "a2.wav")]
    assert torch.equal(b1.noisy_audio, b2.noisy_audio)  # reproducible
    assert not torch.equal(sb[(1, 0, [0, 2, 3])].noise, b1.noise)  # a new epoch draws new noise


def test_pin_memory_really_pins(monkeypatch):
    """DataLoader(pin_memory=True) calls batch.pin_memory(): every tensor is pinned (NeMo's batch has no such
    method, so its pin_memory was a silent no-op)."""
    from torch.utils.data._utils.pin_memory import pin_memory as dl_pin

    calls = []

    def fake_pin(self, *a, **k):
        calls.append(tuple(self.shape))
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    b = AudioNoiseBatch(audio=torch.zeros(2, 5), audio_len=torch.tensor([5, 4]), noise=torch.zeros(2, 5),
                        noise_len=torch.tensor([5, 4]), noisy_audio=torch.zeros(2, 5),
                        noisy_audio_len=torch.tensor([5, 4]), bad_files=["x"])
    out = dl_pin(b)
    assert isinstance(out, AudioNoiseBatch) and len(calls) == 6 and out.bad_files == ["x"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs a CUDA device")
def test_pin_memory_on_cuda():
    b = AudioNoiseBatch(audio=torch.zeros(2, 5), audio_len=torch.tensor([5, 4]), noise=torch.zeros(2, 5),
                        noise_len=torch.tensor([5, 4]), noisy_audio=torch.zeros(2, 5),
                        noisy_audio_len=torch.tensor([5, 4]))
    assert b.pin_memory().is_pinned()


# --------------------------------------------------------------------------------------------- samplers
def test_fixed_sampler_is_distributed_sampler_order():
    n, B, W = 37, 4, 3
    for r in range(W):
        ref = list(torch.utils.data.DistributedSampler(range(n), num_replicas=W, rank=r, shuffle=True, seed=5,
                                                       drop_last=True))
        s = FixedBatchSampler(n, B, shuffle=True, drop_last=True, seed=5, rank=r, world_size=W)
        got = [i for _, _, idx in s for i in idx]
        assert got == ref[: len(ref) // B * B]
    # resume: the same epoch starts at the saved batch
    s = FixedBatchSampler(n, B, seed=5)
    full = list(s)
    s.set_position(0, 3)
    assert list(s) == full[3:] and list(s) == full  # only once


def test_bucketing_sampler_budget_and_padding():
    rng = np.random.default_rng(0)
    dur = rng.uniform(1.0, 20.0, 500)
    s = BucketingBatchSampler(dur, batch_duration=60.0, seed=1)
    batches = [idx for _, _, idx in s]
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(dur[b].sum() <= 60.0 or len(b) == 1 for b in batches)
    pad_bucket = sum(len(b) * dur[b].max() - dur[b].sum() for b in batches)
    fixed = [idx for _, _, idx in FixedBatchSampler(500, 6, seed=1, drop_last=False)]
    pad_fixed = sum(len(b) * dur[b].max() - dur[b].sum() for b in fixed)
    assert pad_bucket < 0.2 * pad_fixed
    r0 = list(BucketingBatchSampler(dur, 60.0, seed=1, rank=0, world_size=2))
    r1 = list(BucketingBatchSampler(dur, 60.0, seed=1, rank=1, world_size=2))
    assert len(r0) == len(r1) and not set(map(tuple, (x[2] for x in r0))) & set(map(tuple, (x[2] for x in r1)))
    with pytest.raises(ValueError, match="duration"):
        BucketingBatchSampler([1.0, float("nan")], 10.0)
