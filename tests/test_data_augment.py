"""Batch augmentation and collation against NeMo 3.0.0 (SPEC §3.3–3.4), draw for draw, plus statistics."""

import math
import random

import numpy as np
import pytest
import torch

from nest_fast.data import AudioNoiseBatch, MultiSpeakerNoiseAugmentation, SpeakerNoiseAugmentation
from nest_fast.data import AudioNoiseItem, build_batch_augmentor, collate_audio_noise

NEST_AUG = dict(prob=0.5, noise_ratio=0.5, min_r_speech=-5.0, max_r_speech=5.0, min_r_noise=-5.0, max_r_noise=20.0,
                min_mix_rate=0.5, max_mix_rate=0.5, min_num_segments=1, max_num_segments=1, min_num_speakers=1,
                max_num_speakers=1)
CONFIGS = [
    NEST_AUG,
    dict(NEST_AUG, prob=1.0),
    dict(NEST_AUG, prob=1.0, noise_ratio=0.0),  # speech only
    dict(prob=0.9, noise_ratio=0.5, min_mix_rate=0.2, max_mix_rate=0.8, min_num_segments=1, max_num_segments=4,
         min_num_speakers=1, max_num_speakers=3),  # NeMo's class defaults-like: random mix rate, several segments
]


def _batch(seed, B=5, N=4000, short_noise=True):
    g = torch.Generator().manual_seed(seed)
    audio_len = torch.randint(N // 4, N + 1, (B,), generator=g)
    audio_len[0] = N
    audio = torch.randn(B, N, generator=g) * (torch.arange(N)[None] < audio_len[:, None])
    noise_len = audio_len.clone()
    if short_noise:
        noise_len[1] = max(3, int(audio_len[1]) // 7)  # a noise file shorter than its utterance
    noise = torch.randn(B, N, generator=g) * 0.3 * (torch.arange(N)[None] < noise_len[:, None])
    return audio.float(), audio_len.long(), noise.float(), noise_len.long()


@pytest.mark.nemo
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_multispeaker_matches_nemo(cfg, seed):
    from nemo.collections.asr.data.ssl_dataset import AudioNoiseBatch as NemoBatch
    from nemo.collections.asr.modules.ssl_modules import MultiSpeakerNoiseAugmentation as NemoAug

    audio, alen, noise, nlen = _batch(seed)
    random.seed(1000 + seed)
    ref = NemoAug(**cfg)(NemoBatch(audio=audio.clone(), audio_len=alen.clone(), noise=noise.clone(),
                                   noise_len=nlen.clone()))
    ours = MultiSpeakerNoiseAugmentation(**cfg).augment(audio, alen, noise, nlen, rng=random.Random(1000 + seed))
    for a, b in zip(ours, (ref.noise, ref.noise_len, ref.noisy_audio, ref.noisy_audio_len)):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.nemo
@pytest.mark.parametrize("seed", [0, 3])
def test_speaker_noise_matches_nemo(seed):
    from nemo.collections.asr.data.ssl_dataset import AudioNoiseBatch as NemoBatch
    from nemo.collections.asr.modules.ssl_modules.augmentation import SpeakerNoiseAugmentation as NemoAug

    cfg = dict(prob=0.8, noise_ratio=0.5, min_mix_rate=0.3, max_mix_rate=0.6)
    audio, alen, noise, nlen = _batch(seed, short_noise=False)
    random.seed(seed)
    ref = NemoAug(**cfg)(NemoBatch(audio=audio.clone(), audio_len=alen.clone(), noise=noise.clone(),
                                   noise_len=nlen.clone()))
    ours = SpeakerNoiseAugmentation(**cfg).augment(audio, alen, noise, nlen, rng=random.Random(seed))
    for a, b in zip(ours, (ref.noise, ref.noise_len, ref.noisy_audio, ref.noisy_audio_len)):
        assert torch.equal(a, b)


@pytest.mark.nemo
def test_collate_matches_nemo():
    from nemo.collections.asr.data.ssl_dataset import AudioNoiseItem as NemoItem
    from nemo.collections.asr.data.ssl_dataset import _audio_noise_collate_fn
    from nemo.collections.asr.modules.ssl_modules import MultiSpeakerNoiseAugmentation as NemoAug

    g = torch.Generator().manual_seed(0)
    lens = [16000, 17321, 20011, 16000]
    items = []
    for i, n in enumerate(lens):
        nl = [16000, 900, 25000, 16000][i]  # shorter, longer (cut at collation) noise
        items.append(dict(audio=torch.randn(n, generator=g), audio_len=torch.tensor(n),
                          noise=torch.randn(min(nl, n) if i != 2 else nl, generator=g), noise_len=torch.tensor(nl)))
    for aug in (None, NEST_AUG):
        random.seed(5)
        ref = _audio_noise_collate_fn([NemoItem(**d) for d in items], None if aug is None else NemoAug(**aug))
        ours = collate_audio_noise([AudioNoiseItem(**d) for d in items],
                                   None if aug is None else MultiSpeakerNoiseAugmentation(**aug), rng=random.Random(5))
        for k in ("audio", "audio_len", "noise", "noise_len", "noisy_audio", "noisy_audio_len"):
            assert torch.equal(getattr(ours, k), getattr(ref, k)), k


def test_skipped_items_and_lengths():
    """prob=0: every item skipped; noisy = audio + raw noise, noisy_audio_len = noise_len (quirk (b))."""
    audio, alen, noise, nlen = _batch(2)
    n2, nl2, noisy, noisy_len = MultiSpeakerNoiseAugmentation(**dict(NEST_AUG, prob=0.0)).augment(
        audio, alen, noise, nlen, rng=random.Random(0))
    assert torch.equal(n2, noise) and torch.equal(noisy, audio + noise) and torch.equal(noisy_len, nlen)
    assert noisy_len[1] < alen[1]


def test_snr_and_mix_length_statistics():
    """Every augmented item: noise confined to mix_len = L/2 samples inside [0, L), energy ratio = the drawn
    SNR within its mode's range, and both modes occur about half the time."""
    aug = MultiSpeakerNoiseAugmentation(**dict(NEST_AUG, prob=1.0))
    snrs = []
    rng = random.Random(11)
    for s in range(40):
        audio, alen, noise, nlen = _batch(100 + s, B=4, short_noise=False)
        n2, nl2, noisy, noisy_len = aug.augment(audio, alen, noise, nlen, rng=rng)
        assert torch.equal(noisy_len, alen) and torch.equal(nl2, alen)
        for i in range(4):
            L = int(alen[i])
            nz = (n2[i] != 0).nonzero()
            assert nz.numel() > 0 and int(nz.max()) < L
            assert int(nz.max()) - int(nz.min()) + 1 <= max(1, L // 2)
            e_a = float((audio[i, :L] ** 2).mean())
            e_n = float((n2[i, :L] ** 2).mean())
            snrs.append(10 * math.log10(e_a / e_n))
    snrs = np.array(snrs)
    assert snrs.min() >= -5.0 - 1e-3 and snrs.max() <= 20.0 + 1e-3
    assert (snrs > 5.01).mean() > 0.15  # only noise mode reaches above 5 dB: about a quarter of the draws
    assert (snrs < 5.0).mean() > 0.5


def test_no_noise_manifest_noise_mode_is_noop():
    """Quirk (c): with all-zero noise, 'noise' mode leaves the item clean; B == 1 forces noise mode."""
    audio, alen, noise, nlen = _batch(4, B=1, short_noise=False)
    noise = torch.zeros_like(noise)
    n2, _, noisy, _ = MultiSpeakerNoiseAugmentation(**dict(NEST_AUG, prob=1.0)).augment(
        audio, alen, noise, nlen, rng=random.Random(0))
    assert torch.equal(noisy, audio) and not n2.any()


def test_getrandbits_shortcut_is_the_same_draws():
    r1, r2 = random.Random(42), random.Random(42)
    r1.choices(range(1), k=12345)
    r2.getrandbits(64 * 12345)
    assert r1.random() == r2.random()


def test_build_from_nemo_config_and_errors():
    aug = build_batch_augmentor(dict(NEST_AUG, _target_="nemo.collections.asr.modules.ssl_modules."
                                                        "MultiSpeakerNoiseAugmentation"))
    assert isinstance(aug, MultiSpeakerNoiseAugmentation) and aug.prob == 0.5
    assert build_batch_augmentor(None) is None
    with pytest.raises(ValueError, match="not supported"):
        build_batch_augmentor({"_target_": "foo.Bar"})
    with pytest.raises(ValueError, match="prob"):
        MultiSpeakerNoiseAugmentation(prob=2.0)


def test_batch_call_returns_new_batch():
    audio, alen, noise, nlen = _batch(9)
    b = AudioNoiseBatch(audio=audio, audio_len=alen, noise=noise.clone(), noise_len=nlen.clone())
    out = MultiSpeakerNoiseAugmentation(**dict(NEST_AUG, prob=1.0))(b, rng=random.Random(1))
    assert out.noisy_audio is not None and torch.equal(b.noise, noise)  # input untouched
    assert torch.equal(out.noisy_audio, out.audio + out.noise)
