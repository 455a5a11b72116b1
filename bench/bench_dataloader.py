"""Data loader throughput: the DALI loader vs the torch DataLoader at the same number of CPU threads/workers.

A generated corpus of WAV and FLAC files at 16 / 22.05 / 44.1 kHz (harmonic "voiced" tones with vibrato and a
noise floor, 2-8 s, a fifth of them stereo) plus a FLAC noise manifest, read with NEST's training config
(batch 8, shuffle, noise + MultiSpeakerNoiseAugmentation). Both loaders get the same manifests and sampler; the
torch loader runs ``num_workers`` worker processes, the DALI loader ``num_threads`` DALI threads (each also has
the main process). Reported: utterances/s and audio-seconds/s (median over repeats), peak RSS growth.

    pytest bench/bench_dataloader.py --benchmark -s                        # pytest-benchmark, records extra_info
    python bench/bench_dataloader.py --workers 1 2 --repeats 5 --json out.json   # the table in RESULTS.md
    python bench/bench_dataloader.py --memory                              # RSS vs manifest size

Every run first checks that DALI's batches equal the torch loader's (same items, exact lengths, audio within
the resampler's tolerance) on the same manifest without augmentation.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pytest

RATES = (16000, 22050, 44100)
FORMATS = ("wav", "flac")
AUG = {"_target_": "MultiSpeakerNoiseAugmentation", "prob": 0.5, "noise_ratio": 0.5, "min_r_speech": -5.0,
       "max_r_speech": 5.0, "min_r_noise": -5.0, "max_r_noise": 20.0, "min_mix_rate": 0.5, "max_mix_rate": 0.5,
       "min_num_segments": 1, "max_num_segments": 1, "min_num_speakers": 1, "max_num_speakers": 1}


# ------------------------------------------------------------------------------------------------ corpus
def _voiced(rng, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    f0 = rng.uniform(90, 240) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(3, 6) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    y = sum(np.sin(k * phase) / k for k in range(1, 12) if k * f0.max() < 0.45 * sr)
    env = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1.5, 4) * t) ** 2
    y = y * env + 0.01 * rng.standard_normal(n)
    return (0.3 * y / np.abs(y).max()).astype(np.float32)


def make_corpus(root: str, num_files: int = 96, num_noise: int = 8, min_dur: float = 2.0, max_dur: float = 8.0,
                seed: int = 0, rates=RATES, formats=FORMATS):
    """Write the corpus under ``root`` (once); returns ``(train_manifest, noise_manifest, total_seconds)``."""
    import soundfile as sf

    os.makedirs(root, exist_ok=True)
    tag = f"{num_files}-{num_noise}-{min_dur}-{max_dur}-{seed}-{'_'.join(map(str, rates))}-{'_'.join(formats)}"
    train, noise = os.path.join(root, f"train-{tag}.json"), os.path.join(root, f"noise-{tag}.json")
    if os.path.isfile(train) and os.path.isfile(noise):
        with open(train) as f:
            return train, noise, sum(json.loads(x)["duration"] for x in f)
    rng = np.random.default_rng(seed)
    lines, total = [], 0.0
    for i in range(num_files):
        sr, fmt = rates[i % len(rates)], formats[(i // len(rates)) % len(formats)]
        n = int(rng.uniform(min_dur, max_dur) * sr)
        y = _voiced(rng, n, sr)
        if i % 5 == 4:
            y = np.stack([y, 0.8 * y], axis=1)
        rel = f"utt/{tag}-{i:05d}.{fmt}"
        os.makedirs(os.path.join(root, "utt"), exist_ok=True)
        sf.write(os.path.join(root, rel), y, sr, subtype="PCM_16")
        lines.append({"audio_filepath": rel, "duration": round(n / sr, 6)})
        total += n / sr
    nlines = []
    for k in range(num_noise):
        sr = rates[k % len(rates)]
        n = int(rng.uniform(6.0, 15.0) * sr)
        y = np.cumsum(rng.standard_normal(n)) * 0.02
        y = (0.2 * (y - y.mean()) / (np.abs(y - y.mean()).max() + 1e-9)
             + 0.05 * rng.standard_normal(n)).astype(np.float32)
        rel = f"noise/{tag}-{k:03d}.flac"
        os.makedirs(os.path.join(root, "noise"), exist_ok=True)
        sf.write(os.path.join(root, rel), y, sr)
        nlines.append({"audio_filepath": rel, "duration": round(n / sr, 6)})
    for path, rows in ((train, lines), (noise, nlines)):
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
    return train, noise, total


def ds_cfg(train: str, noise, workers: int, batch_size: int = 8, augment: bool = True, shuffle: bool = True):
    return {"manifest_filepath": train, "noise_manifest": noise, "sample_rate": 16000, "batch_size": batch_size,
            "shuffle": shuffle, "num_workers": workers, "pin_memory": False, "min_duration": None,
            "max_duration": None, "drop_last": False, "batch_augmentor": AUG if augment else None,
            "dali_num_threads": max(1, workers), "dali_device": "cpu"}


def build(kind: str, cfg, seed: int = 0):
    from nest_fast.training.data import build_dataset, build_loader

    ds = build_dataset(cfg, "train_ds")
    if kind == "torch":
        return build_loader(ds, cfg, seed, 0, 1, True)
    from nest_fast.data.dali import build_dali_loader

    return build_dali_loader(ds, cfg, seed, 0, 1, True)


# ------------------------------------------------------------------------------------------------ checks
def check_equal(train: str) -> dict:
    """DALI's batches vs the torch loader's on the same manifest, shuffled, no noise and no augmentation."""
    import torch

    cfg = ds_cfg(train, None, 0, augment=False)
    tl, _ = build("torch", cfg)
    dl, _ = build("dali", cfg)
    worst_rel, n = 0.0, 0
    for a, b in zip(tl, dl):
        assert a.sample_id == b.sample_id
        assert torch.equal(a.audio_len, b.audio_len) and torch.equal(a.noisy_audio_len, b.noisy_audio_len)
        for i in range(len(a)):
            L = int(a.audio_len[i])
            x, y = a.audio[i, 64:L - 64], b.audio[i, 64:L - 64]
            worst_rel = max(worst_rel, float((x - y).norm() / x.norm()))
        n += 1
    assert n == len(tl) and worst_rel < 2e-2, worst_rel
    dl.close()
    return {"batches": n, "worst_interior_rel_l2": worst_rel}


# ------------------------------------------------------------------------------------------------ timing
def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def time_epochs(loader, epochs: int = 1, warmup: int = 1):
    """Seconds, utterances and audio seconds for ``epochs`` full epochs after ``warmup`` epochs."""
    for e in range(warmup):
        loader.sampler.set_epoch(100 + e)
        for _ in loader:
            pass
    t0 = time.perf_counter()
    utts, samples = 0, 0
    for e in range(epochs):
        loader.sampler.set_epoch(e)
        for batch in loader:
            utts += len(batch)
            samples += int(batch.audio_len.sum())
    return time.perf_counter() - t0, utts, samples / 16000.0


def run(workers=(1, 2), repeats: int = 5, num_files: int = 96, root=None, noise: bool = True, rates=RATES,
        formats=FORMATS, epochs: int = 1):
    import torch

    root = root or os.path.join(tempfile.gettempdir(), "nest_fast_bench_corpus")
    train, noise_m, total = make_corpus(root, num_files=num_files, rates=rates, formats=formats)
    out = {"corpus": {"files": num_files, "seconds": total, "rates": list(rates), "formats": list(formats),
                      "noise": bool(noise)}, "check": check_equal(train), "rows": []}
    for w in workers:
        loaders = {k: build(k, ds_cfg(train, noise_m if noise else None, w))[0] for k in ("torch", "dali")}
        res = {k: [] for k in loaders}
        for r in range(repeats):
            for k, ld in loaders.items():  # interleaved, so that load from other processes hits both alike
                gc.collect()
                s, u, a = time_epochs(ld, epochs=epochs, warmup=1 if r == 0 else 0)
                res[k].append((u / s, a / s))
        row = {"workers": w}
        for k, v in res.items():
            row[f"{k}_utt_s"] = statistics.median(x[0] for x in v)
            row[f"{k}_audio_s_s"] = statistics.median(x[1] for x in v)
            row[f"{k}_all_utt_s"] = [round(x[0], 2) for x in v]
        row["speedup"] = row["dali_utt_s"] / row["torch_utt_s"]
        out["rows"].append(row)
        for ld in loaders.values():
            if hasattr(ld, "close"):
                ld.close()
        del loaders
    out["torch_threads"] = torch.get_num_threads()
    return out


def memory_vs_manifest(sizes=(10_000, 100_000, 400_000), loader="dali", root=None, batches: int = 20):
    """RSS growth of the process when a loader is built on manifests of ``sizes`` lines (all pointing at a small
    corpus) and ``batches`` batches are read; run in a fresh subprocess per size."""
    import subprocess

    root = root or os.path.join(tempfile.gettempdir(), "nest_fast_bench_corpus")
    train, _, _ = make_corpus(root, num_files=24)
    with open(train) as f:
        rows = [json.loads(x) for x in f]
    out = []
    for n in sizes:
        big = os.path.join(root, f"big-{n}.json")
        if not os.path.isfile(big):
            with open(big, "w") as f:
                for i in range(n):
                    r = dict(rows[i % len(rows)])
                    r["audio_filepath"] = os.path.join(root, r["audio_filepath"])
                    r["text"] = f"utterance {i} with a transcript that NeMo would keep in memory as a python string"
                    f.write(json.dumps(r) + "\n")
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import bench_dataloader as b; "
                f"import json; cfg = b.ds_cfg({big!r}, None, 1, augment=True); r0 = b._rss_mb(); "
                f"ld, _ = b.build({loader!r}, cfg); r1 = b._rss_mb(); it = iter(ld); "
                f"[next(it) for _ in range({batches})]; r2 = b._rss_mb(); "
                f"print(json.dumps({{'before': r0, 'built': r1, 'after': r2}}))")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        m = json.loads(p.stdout.strip().splitlines()[-1])
        out.append({"lines": n, "loader": loader, "rss_before_mb": m["before"], "rss_built_mb": m["built"],
                    "rss_after_mb": m["after"]})
    return out


# ------------------------------------------------------------------------------------------------ pytest-benchmark
@pytest.mark.parametrize("kind", ["torch", "dali"])
@pytest.mark.parametrize("workers", [1, 2])
def test_dataloader_throughput(benchmark, kind, workers, tmp_path_factory):
    pytest.importorskip("soundfile")
    pytest.importorskip("soxr")
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    root = str(tmp_path_factory.getbasetemp() / "corpus")
    train, noise, total = make_corpus(root, num_files=48)
    if kind == "dali":
        check_equal(train)
    loader, _ = build(kind, ds_cfg(train, noise, workers))
    time_epochs(loader, epochs=1, warmup=1)
    stats = {}

    def one_epoch():
        s, u, a = time_epochs(loader, epochs=1, warmup=0)
        stats.update(utt_s=u / s, audio_s_s=a / s)

    benchmark.pedantic(one_epoch, rounds=3, iterations=1)
    benchmark.extra_info.update({"loader": kind, "workers": workers, "utterances_per_s": stats["utt_s"],
                                 "audio_seconds_per_s": stats["audio_s_s"], "corpus_seconds": total,
                                 "rss_mb": _rss_mb()})
    if hasattr(loader, "close"):
        loader.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--files", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--no-noise", action="store_true")
    ap.add_argument("--rates", type=int, nargs="+", default=list(RATES))
    ap.add_argument("--formats", nargs="+", default=list(FORMATS))
    ap.add_argument("--memory", action="store_true", help="RSS vs manifest size instead of throughput")
    ap.add_argument("--json", default=None)
    ap.add_argument("--root", default=None)
    a = ap.parse_args(argv)
    if a.memory:
        res = {"memory": memory_vs_manifest(loader="dali", root=a.root)
               + memory_vs_manifest(loader="torch", root=a.root)}
        for r in res["memory"]:
            print(f"{r['loader']:>5} {r['lines']:>8} lines: RSS {r['rss_before_mb']:.0f} -> built "
                  f"{r['rss_built_mb']:.0f} -> after batches {r['rss_after_mb']:.0f} MB")
    else:
        res = run(workers=a.workers, repeats=a.repeats, num_files=a.files, root=a.root, noise=not a.no_noise,
                  rates=tuple(a.rates), formats=tuple(a.formats), epochs=a.epochs)
        print(f"check: {res['check']}")
        print(f"{'workers':>7} | {'torch utt/s':>11} {'audio s/s':>9} | {'DALI utt/s':>10} {'audio s/s':>9} | speedup")
        for r in res["rows"]:
            print(f"{r['workers']:>7} | {r['torch_utt_s']:>11.1f} {r['torch_audio_s_s']:>9.1f} | "
                  f"{r['dali_utt_s']:>10.1f} {r['dali_audio_s_s']:>9.1f} | {r['speedup']:.2f}x   "
                  f"(torch {r['torch_all_utt_s']}, dali {r['dali_all_utt_s']})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
