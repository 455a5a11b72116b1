"""A small synthetic speech-like corpus for the demo and the tests, generated in code (numpy only).

Utterances are word sequences from a 16-word lexicon chained by a bigram grammar (so context predicts what
is masked); words are fixed sequences of formant-synthesised syllables: an optional consonant (fricative noise in
a speaker-dependent band, a stop = closure + burst, or a nasal murmur) then a vowel whose glottal source follows
a pitch contour (declination over the utterance, an accent per word, vibrato) and whose spectrum is shaped by
the vowel's three formants scaled by the speaker's vocal-tract length. Eight speakers, six vowels, seven
consonant classes, pauses between words: enough structure for masked-token prediction to learn. A few files are
written at 22.05 kHz (so the loader's resampler is exercised); noise clips (pink, hum, babble-like, wind) are FLAC.

``make_demo_corpus(root)`` writes ``train_manifest.json``, ``val_manifest.json``, ``noise_manifest.json``
(NeMo JSON lines, paths relative to the manifest) under ``root`` and returns their paths. It is deterministic
and skips the work when the corpus is already there. ``default_cache_dir()`` is ``$NEST_FAST_CACHE`` or
``~/.cache/nest_fast``.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Tuple

import numpy as np

SR = 16000
CORPUS_VERSION = 2

# (F1, F2, F3) Hz, adult average (Peterson & Barney style)
VOWELS = {"a": (730, 1090, 2440), "i": (270, 2290, 3010), "u": (300, 870, 2240), "e": (530, 1840, 2480),
          "o": (570, 840, 2410), "ae": (660, 1720, 2410)}
CONSONANTS = ["", "s", "sh", "f", "p", "t", "m"]


def default_cache_dir() -> str:
    return os.environ.get("NEST_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nest_fast")


def _formant_filter(x: np.ndarray, formants, bandwidths, sr: int, gains=(1.0, 0.5, 0.25)) -> np.ndarray:
    n = len(x)
    nfft = 1 << int(np.ceil(np.log2(max(n, 2))))
    X = np.fft.rfft(x, nfft)
    f = np.fft.rfftfreq(nfft, 1.0 / sr)
    H = np.zeros_like(f)
    for F, B, g in zip(formants, bandwidths, gains):
        H += g / np.sqrt(1.0 + ((f - F) / (B / 2.0)) ** 2)
    return np.fft.irfft(X * H, nfft)[:n]


def _band_noise(n: int, lo: float, hi: float, rng, sr: int) -> np.ndarray:
    nfft = 1 << int(np.ceil(np.log2(max(n, 2))))
    X = np.fft.rfft(rng.standard_normal(nfft))
    f = np.fft.rfftfreq(nfft, 1.0 / sr)
    X[(f < lo) | (f > hi)] = 0
    y = np.fft.irfft(X, nfft)[:n]
    return y / (np.abs(y).max() + 1e-9)


def _envelope(n: int, attack: int, release: int) -> np.ndarray:
    env = np.ones(n)
    a, r = min(attack, n // 2), min(release, n // 2)
    if a:
        env[:a] = np.linspace(0, 1, a)
    if r:
        env[n - r:] = np.linspace(1, 0, r)
    return env


def _syllable(cons: str, vowel: str, f0: np.ndarray, spk: Dict, rng, sr: int) -> np.ndarray:
    parts = []
    scale = spk["tract"]
    if cons in ("s", "sh", "f"):
        n = int(rng.uniform(0.06, 0.11) * sr)
        lo, hi = {"s": (4000, 7500), "sh": (1800, 4200), "f": (1000, 7800)}[cons]
        amp = {"s": 0.25, "sh": 0.3, "f": 0.08}[cons]
        parts.append(amp * _band_noise(n, lo * scale, min(hi * scale, sr / 2 - 100), rng, sr)
                     * _envelope(n, n // 4, n // 4))
    elif cons in ("p", "t"):
        parts.append(np.zeros(int(rng.uniform(0.03, 0.06) * sr)))
        nb = int(0.012 * sr)
        lo, hi = (500, 2500) if cons == "p" else (2500, 6000)
        parts.append(0.5 * _band_noise(nb, lo, hi, rng, sr) * _envelope(nb, 10, nb // 2))
    # voiced part: glottal pulses at the pitch contour, then nasal murmur (m) and vowel formants
    n = len(f0)
    phase = np.cumsum(f0 / sr)
    frac = phase - np.floor(phase)
    oq = 0.6
    glottal = np.where(frac < oq, np.sin(np.pi * frac / oq) ** 2, 0.0)
    src = np.diff(glottal, prepend=0.0) * 20 + 0.02 * rng.standard_normal(n)
    if cons == "m":
        nm = min(n // 3, int(0.07 * sr))
        murmur = _formant_filter(src[:nm], (250 * scale, 1100 * scale, 2500 * scale), (60, 200, 300), sr,
                                 (1.0, 0.1, 0.05))
        vowel_part = _formant_filter(src[nm:], [F * scale for F in VOWELS[vowel]], (80, 120, 180), sr)
        voiced = np.concatenate([0.6 * murmur, vowel_part])
    else:
        voiced = _formant_filter(src, [F * scale for F in VOWELS[vowel]], (80, 120, 180), sr)
    voiced *= _envelope(n, int(0.015 * sr), int(0.04 * sr))
    voiced /= np.abs(voiced).max() + 1e-9
    parts.append(0.7 * voiced)
    return np.concatenate(parts)


def make_lexicon(rng, num_words: int = 16) -> List[List[Tuple[str, str, float]]]:
    """A small vocabulary: each word a fixed sequence of (consonant, vowel, relative length) syllables."""
    words = []
    for _ in range(num_words):
        n_syl = int(rng.integers(1, 4))
        words.append([(CONSONANTS[int(rng.integers(len(CONSONANTS)))], list(VOWELS)[int(rng.integers(len(VOWELS)))],
                       float(rng.uniform(0.8, 1.25))) for _ in range(n_syl)])
    return words


def make_grammar(rng, num_words: int) -> np.ndarray:
    """Word bigram probabilities: each word is followed by one of 3 preferred successors most of the time."""
    P = np.full((num_words, num_words), 0.1 / num_words)
    for w in range(num_words):
        succ = rng.choice(num_words, 3, replace=False)
        P[w, succ] += np.array([0.5, 0.25, 0.15])
    return P / P.sum(axis=1, keepdims=True)


def synth_utterance(rng, spk: Dict, duration: float, sr: int = SR, lexicon=None, grammar=None) -> np.ndarray:
    """About ``duration`` seconds of formant-synthesised 'speech' from speaker ``spk``: words of ``lexicon``
    chained by the bigram ``grammar`` (random syllables when no lexicon is given)."""
    out: List[np.ndarray] = [np.zeros(int(rng.uniform(0.05, 0.2) * sr))]
    total = len(out[0])
    target = int(duration * sr)
    word = int(rng.integers(len(lexicon))) if lexicon else 0
    w = 0
    while total < target - int(0.15 * sr) and w < 64:
        if lexicon:
            sylls = lexicon[word]
            word = int(rng.choice(len(lexicon), p=grammar[word]))
        else:
            sylls = [(CONSONANTS[int(rng.integers(len(CONSONANTS)))], list(VOWELS)[int(rng.integers(len(VOWELS)))],
                      float(rng.uniform(0.8, 1.25))) for _ in range(int(rng.integers(1, 4)))]
        accent = len(sylls) // 2
        for s, (cons, vowel, rel) in enumerate(sylls):
            t_rel = min(1.0, total / max(target, 1))
            base = spk["f0"] * (1.1 - 0.25 * t_rel)  # declination
            dur = 0.16 * rel * rng.uniform(0.92, 1.08) * (1.3 if s == accent else 1.0)
            nv = int(dur * sr)
            t = np.arange(nv) / sr
            rise = (0.18 if s == accent else 0.0) * np.sin(np.pi * t / dur)
            f0 = base * (1 + rise + 0.015 * np.sin(2 * np.pi * 5.5 * t))
            syl = _syllable(cons, vowel, f0, spk, rng, sr) * (1.0 if s == accent else 0.7)
            out.append(syl)
            total += len(syl)
        pause = np.zeros(int(rng.uniform(0.04, 0.12) * sr))
        out.append(pause)
        total += len(pause)
        w += 1
    y = np.concatenate(out)[:target]
    y = y + 10 ** (-55 / 20) * rng.standard_normal(len(y))  # faint room noise
    return (0.3 * y / (np.abs(y).max() + 1e-9)).astype(np.float32)


def synth_noise(rng, kind: str, duration: float, sr: int = SR) -> np.ndarray:
    n = int(duration * sr)
    t = np.arange(n) / sr
    if kind == "pink":
        X = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n, 1 / sr)
        X[1:] /= np.sqrt(f[1:])
        X[0] = 0
        y = np.fft.irfft(X, n)
    elif kind == "hum":
        f0 = rng.uniform(50, 60)
        y = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.28)) / k for k in range(1, 8))
        y = y + 0.1 * rng.standard_normal(n)
    elif kind == "babble":
        spk = {"f0": rng.uniform(100, 220), "tract": rng.uniform(0.9, 1.1)}
        y = np.zeros(n)
        for _ in range(4):
            u = synth_utterance(rng, dict(spk, f0=spk["f0"] * rng.uniform(0.8, 1.3)), duration, sr)[:n]
            y[:len(u)] += u
    else:  # wind: low-passed noise with a slow amplitude modulation
        y = _band_noise(n, 20, 600, rng, sr) * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t))
    y = np.asarray(y, dtype=np.float64)
    return (0.3 * y / (np.abs(y).max() + 1e-9)).astype(np.float32)


def _speakers(rng, n: int) -> List[Dict]:
    return [{"f0": float(rng.uniform(90, 240)), "tract": float(rng.uniform(0.88, 1.15))} for _ in range(n)]


def make_demo_corpus(root: str, num_train: int = 160, num_val: int = 24, num_noise: int = 8,
                     min_dur: float = 1.5, max_dur: float = 3.5, seed: int = 1234,
                     force: bool = False) -> Dict[str, str]:
    """Write the corpus under ``root`` (once) and return ``{"train": path, "val": path, "noise": path}``."""
    import soundfile as sf

    root = os.path.abspath(os.path.expanduser(root))
    manifests = {k: os.path.join(root, f"{k}_manifest.json") for k in ("train", "val", "noise")}
    meta = dict(version=CORPUS_VERSION, num_train=num_train, num_val=num_val, num_noise=num_noise,
                min_dur=min_dur, max_dur=max_dur, seed=seed)
    stamp = os.path.join(root, "corpus.json")
    if not force and os.path.isfile(stamp):
        try:
            with open(stamp) as f:
                if json.load(f) == meta and all(os.path.isfile(p) for p in manifests.values()):
                    return manifests
        except (OSError, ValueError):
            pass
    tmp = f"{root}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    speakers = _speakers(rng, 8)
    lexicon = make_lexicon(rng)
    grammar = make_grammar(rng, len(lexicon))
    for split, count in (("train", num_train), ("val", num_val)):
        os.makedirs(os.path.join(tmp, split))
        lines = []
        for k in range(count):
            spk_id = int(rng.integers(len(speakers)))
            dur = float(rng.uniform(min_dur, max_dur))
            y = synth_utterance(rng, speakers[spk_id], dur, lexicon=lexicon, grammar=grammar)
            sr = SR
            if k % 8 == 7:  # some files at 22.05 kHz: the loader resamples them
                from .audio import resample

                sr = 22050
                y = resample(y, SR, sr)
            rel = f"{split}/{split}_{k:04d}.wav"
            sf.write(os.path.join(tmp, rel), y, sr, subtype="PCM_16")
            lines.append({"audio_filepath": rel, "duration": round(len(y) / sr, 4), "speaker": spk_id,
                          "text": ""})
        with open(os.path.join(tmp, f"{split}_manifest.json"), "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)
    os.makedirs(os.path.join(tmp, "noise"))
    lines = []
    kinds = ["pink", "hum", "babble", "wind"]
    for k in range(num_noise):
        kind = kinds[k % len(kinds)]
        dur = float(rng.uniform(4.0, 8.0))
        rel = f"noise/noise_{k:02d}_{kind}.flac"
        sf.write(os.path.join(tmp, rel), synth_noise(rng, kind, dur), SR)
        lines.append({"audio_filepath": rel, "duration": round(dur, 4)})
    with open(os.path.join(tmp, "noise_manifest.json"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
    with open(os.path.join(tmp, "corpus.json"), "w") as f:
        json.dump(meta, f)
    if os.path.isdir(root):
        shutil.rmtree(root)
    os.makedirs(os.path.dirname(root) or ".", exist_ok=True)
    os.replace(tmp, root)
    return manifests
