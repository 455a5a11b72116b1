"""The DALI loader (nest_fast.data.dali) against the torch loader: same items, lengths and augmentation draws,
audio within the resampler's tolerance; shuffling, sharding, epochs, resume; noise semantics; bad files; a short
training run. CPU pipelines (device_id=None); a GPU test runs where CUDA is."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from nest_fast.data.augment import MultiSpeakerNoiseAugmentation, build_batch_augmentor

NEST_AUG = {"_target_": "nemo.collections.asr.modules.ssl_modules.MultiSpeakerNoiseAugmentation", "prob": 0.5,
            "noise_ratio": 0.5, "min_r_speech": -5.0, "max_r_speech": 5.0, "min_r_noise": -5.0, "max_r_noise": 20.0,
            "min_mix_rate": 0.5, "max_mix_rate": 0.5, "min_num_segments": 1, "max_num_segments": 1,
            "min_num_speakers": 1, "max_num_speakers": 1}


@pytest.fixture(scope="module")
def dali():
    if os.environ.get("CI"):  # CI installs DALI (requirements-test.txt): missing there is a failure, not a skip
        import nvidia.dali

        return nvidia.dali
    return pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")


def _tone(rng, n, sr, ch=1):
    """Band-limited 'speech' (partials below 3.5 kHz, so both resamplers keep all of it)."""
    t = np.arange(n) / sr
    y = sum(rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * rng.uniform(80, 3500) * t + rng.uniform(0, 6))
            for _ in range(6))
    y = y * np.hanning(n) ** 0.1
    if ch > 1:
        y = np.stack([y, 0.5 * y + 0.05 * np.sin(2 * np.pi * 440 * t)], axis=1)
    return y.astype(np.float32)


def _write(root, rel, y, sr, fmt=None, subtype=None):
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    sf.write(p, y, sr, format=fmt, subtype=subtype)
    return p


def _manifest(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """WAV/FLAC/OGG at 16/22.05/44.1 kHz, stereo, an offset/duration item, a 0.6 s clip (tiled), a filtered one."""
    root = str(tmp_path_factory.mktemp("dali_corpus"))
    rng = np.random.default_rng(0)
    specs = [(16000, "wav", 1, 1.7), (22050, "flac", 1, 2.1), (44100, "wav", 2, 1.3), (16000, "flac", 2, 2.4),
             (44100, "flac", 1, 1.9), (22050, "ogg", 1, 1.5), (16000, "wav", 1, 0.6), (22050, "wav", 1, 2.6),
             (44100, "wav", 1, 1.1), (16000, "ogg", 1, 1.2), (16000, "wav", 1, 3.0), (22050, "flac", 2, 1.4),
             (16000, "wav", 1, 9.0)]
    rows = []
    for i, (sr, fmt, ch, dur) in enumerate(specs):
        n = int(dur * sr)
        y = _tone(rng, n, sr, ch)
        rel = f"audio/u{i:02d}.{fmt}"
        _write(root, rel, y, sr, fmt="OGG" if fmt == "ogg" else None, subtype="VORBIS" if fmt == "ogg" else None)
        row = {"audio_filepath": rel, "duration": n / sr, "text": "ignored"}
        if i == 3:
            row.update(offset=0.35, duration=1.5)  # a cut inside the file
        rows.append(row)
    train = _manifest(os.path.join(root, "train.json"), rows)  # the 9 s item is filtered by max_duration=8
    nz_rows = []
    n = int(6.0 * 16000)
    ramp = (np.arange(n) + 1).astype(np.float32) / (4 * n)  # > 0 everywhere: value tells the position
    _write(root, "noise/ramp.wav", ramp, 16000, subtype="FLOAT")
    nz_rows.append({"audio_filepath": "noise/ramp.wav", "duration": n / 16000})
    short = _tone(rng, int(0.7 * 44100), 44100)
    _write(root, "noise/short.flac", short, 44100)
    nz_rows.append({"audio_filepath": "noise/short.flac", "duration": 0.7})
    noise = _manifest(os.path.join(root, "noise.json"), nz_rows)
    ramp_only = _manifest(os.path.join(root, "noise_ramp.json"), nz_rows[:1])
    return {"root": root, "train": train, "noise": noise, "ramp": ramp_only, "ramp_data": ramp,
            "rates": [s[0] for s in specs]}


def _cfg(manifest, noise=None, aug=None, batch_size=3, shuffle=True, drop_last=False, **kw):
    c = {"manifest_filepath": manifest, "noise_manifest": noise, "sample_rate": 16000, "batch_size": batch_size,
         "shuffle": shuffle, "num_workers": 0, "pin_memory": False, "min_duration": 0.5, "max_duration": 8.0,
         "drop_last": drop_last, "batch_augmentor": aug, "dali_device": "cpu", "dali_num_threads": 2}
    c.update(kw)
    return c


def _loaders(cfg, seed=0, rank=0, world=1, train=True):
    from nest_fast.data.dali import build_dali_loader
    from nest_fast.training.data import build_dataset, build_loader

    ds = build_dataset(cfg, "train_ds")
    return build_loader(ds, cfg, seed, rank, world, train), build_dali_loader(ds, cfg, seed, rank, world, train)


def _rates_by_id(corpus):
    with open(corpus["train"]) as f:
        rows = [json.loads(x) for x in f]
    return {str(i): corpus["rates"][i] for i in range(len(rows)) if rows[i]["duration"] <= 8.0}


def _check_audio(a, b, rate):
    """Row ``a`` (torch loader, soxr) vs ``b`` (DALI): equal at 16 kHz; within the resampler tolerance else."""
    if rate == 16000:
        torch.testing.assert_close(b, a, atol=2e-6, rtol=0)
        return
    inner = slice(48, a.numel() - 48)  # the two resamplers treat the clip's ends differently
    rel = float((a[inner] - b[inner]).norm() / a[inner].norm())
    assert rel < 5e-3, rel
    assert float((a - b).abs().max()) < 0.15


# ----------------------------------------------------------------------------------------------- import
def test_import_nest_fast_does_not_import_dali():
    code = ("import sys, nest_fast, nest_fast.data, nest_fast.data.dali, nest_fast.training.data; "
            "assert 'nvidia.dali' not in sys.modules, 'DALI imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_missing_dali_says_how_to_install(corpus, monkeypatch):
    from nest_fast.data import dali as nd
    from nest_fast.training.data import build_dataset

    for m in ("nvidia.dali", "nvidia.dali.fn", "nvidia.dali.types"):
        monkeypatch.setitem(sys.modules, m, None)  # "import nvidia.dali" now raises ImportError
    assert not nd.dali_available()
    ds = build_dataset(_cfg(corpus["train"]), "train_ds")
    with pytest.raises(ImportError, match=r"pip install nvidia-dali-cuda130.*\n.*|loader=torch"):
        nd.build_dali_loader(ds, _cfg(corpus["train"]), 0, 0, 1, True)


# ----------------------------------------------------------------------------------------------- equality
def test_batches_equal_torch_loader(dali, corpus):
    """Same manifest order (shuffled, seeded) and no augmentation: same items, exact lengths, audio equal at
    16 kHz and within the resampler's tolerance otherwise (WAV/FLAC/OGG, stereo, offset, tiling, filter)."""
    (tl, ts), (dl, dsm) = _loaders(_cfg(corpus["train"]))
    rates = _rates_by_id(corpus)
    tb, db = list(tl), list(dl)
    assert len(tb) == len(db) == len(dl) == 4  # 12 items (one filtered), batch 3
    seen = []
    for a, b in zip(tb, db):
        assert a.sample_id == b.sample_id and (a.epoch, a.batch_index) == (b.epoch, b.batch_index)
        assert torch.equal(a.audio_len, b.audio_len) and b.audio_len.dtype == torch.int64
        assert torch.equal(a.noisy_audio_len, b.noisy_audio_len) and torch.equal(a.noise_len, b.noise_len)
        assert a.audio.shape == b.audio.shape and b.audio.dtype == torch.float32
        assert torch.count_nonzero(b.noise) == 0 and torch.equal(b.noisy_audio, b.audio)
        assert b.bad_files == []
        for i, sid in enumerate(a.sample_id):
            L = int(a.audio_len[i])
            _check_audio(a.audio[i, :L], b.audio[i, :L], rates[sid])
            assert torch.count_nonzero(b.audio[i, L:]) == 0
        seen += b.sample_id
    assert sorted(seen, key=int) == sorted(rates, key=int)
    short = [b for b in db if "6" in b.sample_id][0]  # u06 is 0.6 s: tiled to 1 s
    assert int(short.audio_len[short.sample_id.index("6")]) == 16000


def test_augmented_batches_equal_torch_loader(dali, corpus):
    """NEST's MultiSpeakerNoiseAugmentation (no noise manifest): the DALI loader draws the torch loader's
    per-batch Python RNG in the same order, so the same items are mixed at the same places and SNRs."""
    (tl, _), (dl, _) = _loaders(_cfg(corpus["train"], aug=NEST_AUG, batch_size=4))
    rates = _rates_by_id(corpus)
    mixed = 0
    for a, b in zip(tl, dl):
        assert a.sample_id == b.sample_id
        assert torch.equal(a.noisy_audio_len, b.noisy_audio_len) and torch.equal(a.noise_len, b.noise_len)
        for i in range(len(a)):
            L = int(a.audio_len[i])
            na, nb = a.noise[i, :L], b.noise[i, :L]
            assert torch.equal(na != 0, nb != 0) or float((na - nb).abs().max()) < 0.05
            if torch.count_nonzero(na):
                mixed += 1
                assert float((na - nb).norm() / na.norm()) < 5e-2
            if rates[a.sample_id[i]] == 16000:
                torch.testing.assert_close(b.noisy_audio[i] - b.noise[i], b.audio[i])
    assert mixed >= 2


@pytest.mark.parametrize("vectorised", [False, True])
@pytest.mark.parametrize("cfg", [
    dict(NEST_AUG),
    dict(NEST_AUG, prob=1.0, noise_ratio=0.0, max_num_segments=3, max_num_speakers=3, min_mix_rate=0.2,
         max_mix_rate=0.7),
    dict(NEST_AUG, prob=1.0, noise_ratio=1.0, max_num_segments=4, min_mix_rate=0.3, max_mix_rate=0.9),
])
def test_augment_batch_matches_torch_augmentor(cfg, vectorised):
    """``augment_batch`` (planned on the CPU, applied per segment or with one scatter) against the torch
    loader's ``MultiSpeakerNoiseAugmentation.augment`` with the same seed: bit-identical per segment on the CPU,
    float-close vectorised."""
    from nest_fast.data.dali import augment_batch

    aug = build_batch_augmentor(cfg)
    assert isinstance(aug, MultiSpeakerNoiseAugmentation)
    g = torch.Generator().manual_seed(1)
    B, N = 6, 3000
    audio_len = torch.tensor([3000, 1200, 2500, 700, 3000, 1999])
    audio = torch.randn(B, N, generator=g) * (torch.arange(N)[None] < audio_len[:, None])
    noise_len = torch.tensor([3000, 300, 2500, 50, 1000, 1999])  # some noise clips shorter than the utterance
    noise = torch.randn(B, N, generator=g) * (torch.arange(N)[None] < noise_len[:, None])
    for seed in range(4):
        ref = aug.augment(audio, audio_len, noise, noise_len, rng=random.Random(seed))
        got = augment_batch(aug, audio, audio_len, noise, noise_len, rng=random.Random(seed), vectorised=vectorised)
        for r, x in zip(ref, got):
            if vectorised:
                torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(x, r)
        assert torch.equal(got[3], got[1])  # noisy_audio_len is noise_len (NeMo quirk)


# ----------------------------------------------------------------------------------------------- order
def test_shuffling_sharding_epochs_and_resume(dali, corpus):
    cfg = _cfg(corpus["train"], batch_size=2)
    n_items = len(_rates_by_id(corpus))
    per_rank = []
    for rank in range(2):
        (tl, ts), (dl, dsm) = _loaders(cfg, seed=3, rank=rank, world=2)
        epochs = []
        for ep in range(2):
            dl.sampler.set_epoch(ep)  # what Lightning calls through loader.sampler
            keys = [(e, k, [str(i) for i in idx]) for e, k, idx in dsm]
            got = [(b.epoch, b.batch_index, b.sample_id) for b in dl]
            assert got == keys and len(got) == len(dl)
            epochs.append([s for _, _, ids in got for s in ids])
        assert epochs[0] != epochs[1]  # reshuffled per epoch
        per_rank.append(epochs[0])
        # an abandoned epoch does not leak prefetched batches into the next one
        dl.sampler.set_epoch(0)
        it = iter(dl)
        next(it)
        del it
        assert [s for b in dl for s in b.sample_id] == epochs[0]
        # resume: the next epoch-0 iteration starts at batch 2
        dsm.set_position(0, 2)
        assert [b.batch_index for b in dl] == list(range(2, len(dl)))
    assert len(per_rank[0]) == len(per_rank[1]) == (n_items + 1) // 2  # padded to equal length per rank
    assert set(per_rank[0]) | set(per_rank[1]) == set(_rates_by_id(corpus))


# ----------------------------------------------------------------------------------------------- noise
def test_noise_semantics(dali, corpus):
    """SPEC §3.2 steps 4-5: a long noise file is cut at a random offset (segment sum > 0), padded/cut to the
    utterance, ``noise_len`` = the loaded length when shorter; no augmentation: noisy = audio + noise."""
    (tl, _), (dl, _) = _loaders(_cfg(corpus["train"], noise=corpus["ramp"], batch_size=4))
    ramp = torch.from_numpy(corpus["ramp_data"])
    offsets = set()
    for b in dl:
        assert torch.equal(b.noise_len, b.audio_len) and torch.equal(b.noisy_audio_len, b.noise_len)
        torch.testing.assert_close(b.noisy_audio, b.audio + b.noise)
        for i in range(len(b)):
            L = int(b.audio_len[i])
            seg = b.noise[i, :L]
            off = int(round(float(seg[0]) * 4 * ramp.numel())) - 1
            torch.testing.assert_close(seg, ramp[off:off + L], atol=1e-6, rtol=0)  # a window of the file
            assert torch.count_nonzero(b.noise[i, L:]) == 0
            offsets.add(off)
    assert len(offsets) > 3
    # with a noise clip shorter than the utterance, noise_len stays short (and noisy_audio_len with it)
    (tl, _), (dl, _) = _loaders(_cfg(corpus["train"], noise=corpus["noise"], batch_size=4))
    short = 0
    for b in dl:
        assert (b.noise_len <= b.audio_len).all()
        for i in range(len(b)):
            nl = int(b.noise_len[i])
            assert torch.count_nonzero(b.noise[i, nl:]) == 0 and torch.count_nonzero(b.noise[i, :nl]) > nl // 2
            short += nl == int(np.ceil(int(0.7 * 44100) * 16000 / 44100)) and nl < int(b.audio_len[i])
    assert short >= 1


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_files_are_skipped_logged_and_counted(dali, corpus, tmp_path, caplog):
    root = corpus["root"]
    with open(corpus["train"]) as f:
        rows = [json.loads(x) for x in f][:8]
    for r in rows:
        r["audio_filepath"] = os.path.join(root, r["audio_filepath"])
    good = _tone(np.random.default_rng(5), 24000, 22050)
    sf.write(tmp_path / "full.flac", good, 22050)
    data = (tmp_path / "full.flac").read_bytes()
    (tmp_path / "truncated.flac").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.wav").write_bytes(b"RIFF this is not a wav file at all" * 10)
    (tmp_path / "empty.wav").write_bytes(b"")
    nan = _tone(np.random.default_rng(6), 20000, 16000)
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    bad = {name: str(tmp_path / name) for name in ("missing.wav", "truncated.flac", "garbage.wav", "empty.wav",
                                                   "nan.wav")}
    rows += [{"audio_filepath": p, "duration": 1.2} for p in bad.values()]
    man = _manifest(tmp_path / "bad.json", rows)
    cfg = _cfg(man, batch_size=4, shuffle=False)
    (tl, _), (dl, _) = _loaders(cfg)
    caplog.set_level("WARNING", logger="nest_fast.data")
    batches = list(dl)
    assert [len(b) for b in batches] == [len(b) for b in tl] == [4, 4, 4, 1]  # sizes kept
    skipped = [p for b in batches for p in b.bad_files]
    assert set(bad.values()) <= set(skipped)
    assert set(bad.values()) <= dl.bad_paths and dl.num_bad_files >= len(bad)
    for p in bad.values():
        assert p in caplog.text
    for b in batches:
        assert torch.isfinite(b.audio).all() and (b.audio_len >= 16000).all()
        assert not set(b.sample_id) & {str(i) for i in range(8, 13)}  # the bad items never come out
    assert dl.num_recoveries >= 1  # truncated/garbage files made DALI fail: the pipeline was rebuilt
    # a second epoch knows them already: no pipeline failure
    n = dl.num_recoveries
    assert len(list(dl)) == 4 and dl.num_recoveries == n


# ----------------------------------------------------------------------------------------------- training
TINY = ["model.num_classes=32", "model.encoder.d_model=32", "model.encoder.n_layers=1", "model.encoder.n_heads=2",
        "model.encoder.subsampling_conv_channels=16", "model.train_ds.batch_size=4", "model.train_ds.num_workers=1",
        "model.validation_ds.batch_size=4", "model.optim.sched.warmup_steps=4", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "exp_manager.create_tensorboard_logger=false", "exp_manager.plot=false"]


def test_training_steps_with_dali_loader(dali, corpus):
    """A few optimiser steps of a tiny NEST model on DALI batches (noise + NEST augmentation)."""
    from nest_fast.model import NESTModel
    from nest_fast.train import load_train_config

    cfg = load_train_config(None, TINY + ["model.train_ds.manifest_filepath=" + corpus["train"],
                                          "model.train_ds.noise_manifest=" + corpus["noise"]], demo=True)
    torch.manual_seed(0)
    model = NESTModel(cfg["model"])
    ds_cfg = dict(cfg["model"]["train_ds"], dali_device="cpu", max_duration=8.0)
    (_, _), (dl, _) = _loaders(ds_cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    losses = []
    for epoch in range(2):  # 2 batches an epoch (drop_last, 1 s minimum): 4 steps over an epoch boundary
        dl.sampler.set_epoch(epoch)
        for batch in dl:
            loss = model.training_loss(input_signal=batch.audio, input_signal_length=batch.audio_len,
                                       noisy_input_signal=batch.noisy_audio,
                                       noisy_input_signal_length=batch.noisy_audio_len, apply_mask=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert len(losses) == 4 and all(np.isfinite(losses))
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_short_training_run_with_loader_dali(dali, corpus, tmp_path, monkeypatch):
    """``python -m nest_fast.train`` with ``model.train_ds.loader=dali`` (the trainer's build_loader dispatch)."""
    from nest_fast.train import load_train_config, train

    extra = ["model.train_ds.loader=dali", "++model.train_ds.dali_device=cpu"]
    cfg = load_train_config(None, TINY + extra + [
        "model.train_ds.manifest_filepath=" + corpus["train"], "model.train_ds.noise_manifest=" + corpus["noise"],
        "model.validation_ds.manifest_filepath=" + corpus["train"], "model.train_ds.max_duration=8.0",
        "model.validation_ds.max_duration=8.0", "trainer.max_steps=3", "trainer.val_check_interval=3",
        f"exp_manager.exp_dir={tmp_path}"], demo=True)
    out = train(cfg)
    assert out["global_step"] == 3 and out["bad_files"] == 0
    assert len(out["train_losses"]) == 3 and all(np.isfinite(list(out["train_losses"].values())))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_output_equals_cpu_pipeline(dali, corpus):
    cfg = _cfg(corpus["train"], aug=NEST_AUG, noise=corpus["noise"])
    (_, _), (cpu, _) = _loaders(cfg)
    (_, _), (gpu, _) = _loaders(dict(cfg, dali_device="gpu"))
    for a, b in zip(cpu, gpu):
        assert b.audio.is_cuda and b.noisy_audio.is_cuda
        assert a.sample_id == b.sample_id and torch.equal(a.audio_len, b.audio_len.cpu())
        torch.testing.assert_close(b.audio.cpu(), a.audio, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.noisy_audio.cpu(), a.noisy_audio, atol=1e-4, rtol=1e-4)
