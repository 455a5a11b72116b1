"""``python -m nest_fast.train``: NEST pre-training on NeMo configs and manifests, through PyTorch Lightning.

    python -m nest_fast.train                                   # the built-in demo (no data needed)
    python -m nest_fast.train --demo trainer.max_steps=50       # the demo, with overrides
    python -m nest_fast.train --config nest_fast-conformer.yaml \\
        model.train_ds.manifest_filepath=train.json model.validation_ds.manifest_filepath=dev.json \\
        model.train_ds.noise_manifest=noise.json trainer.devices=8 trainer.precision=bf16-mixed

Overrides are Hydra-style on NeMo's layout: ``key=value`` (the key must exist), ``+key=value`` (add),
``~key`` (delete), ``preset=small|medium|large|large18|xlarge|xxlarge``. Without ``--config`` but with overrides,
nest_fast's copy of NeMo's ``nest_fast-conformer.yaml`` is used.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import logging
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from .config import CONFIG_DIR, DEFAULT_CONFIG, apply_overrides, apply_preset, resolve, yaml_load

DEMO_CONFIG = os.path.join(CONFIG_DIR, "demo.yaml")

HELP_EPILOG = """main options (key=value overrides on NeMo's config layout):
  model.train_ds.manifest_filepath=PATH[,PATH...]   training manifest(s) (NeMo JSON lines)
  model.validation_ds.manifest_filepath=PATH         validation manifest(s)
  model.train_ds.noise_manifest=PATH[,PATH...]       noise manifest(s) for the batch augmentation
  model.train_ds.batch_size=8                        fixed batch size per device (NeMo)
  model.train_ds.batch_duration=SECONDS              or: duration-bucketed batches of ~SECONDS of audio
  model.train_ds.loader=torch|dali                   data loader (dali: pip install nvidia-dali-cuda130)
  model.train_ds.num_workers=8  model.train_ds.min_duration=1.0  model.train_ds.max_duration=60.0
  preset=small|medium|large|large18|xlarge|xxlarge    encoder size (SPEC §1.2)
  model.optim.lr=5.0  model.optim.sched.warmup_steps=25000  model.optim.weight_decay=1e-3
  trainer.devices=-1  trainer.num_nodes=1  trainer.accelerator=auto|cpu|gpu  trainer.strategy=ddp
  trainer.precision=32|bf16-mixed  trainer.max_steps=500000  trainer.val_check_interval=2500
  trainer.accumulate_grad_batches=1  trainer.gradient_clip_val=0.0  trainer.sync_batchnorm=true
  exp_manager.exp_dir=DIR  exp_manager.name=NAME  exp_manager.resume_if_exists=true
  exp_manager.checkpoint_callback_params.save_top_k=1
  init_from_nemo_model=FILE.nemo                     initialise the weights from a NeMo model / state dict
  seed=0  backend=auto|reference|fast  compile=false|true|BACKEND (torch.compile the encoder)
Use +key=value to add a key the config lacks and ~key to delete one. An unknown key fails with the
nearest valid key. SIGTERM/SIGINT save a checkpoint and stop; the same command resumes the run."""

log = logging.getLogger("nest_fast.train")


# ------------------------------------------------------------------------------------------------ config
def _defaults(cfg: Dict[str, Any]) -> None:
    """nest_fast's own keys, present with defaults so that plain ``key=value`` overrides work for them."""
    from .training.data import DATASET_EXTRA_DEFAULTS

    cfg.setdefault("seed", 0)
    cfg.setdefault("init_from_nemo_model", None)
    cfg.setdefault("backend", None)
    cfg.setdefault("compile", False)
    model = cfg.setdefault("model", {})
    for sec in ("train_ds", "validation_ds"):
        ds = model.get(sec)
        if isinstance(ds, dict):
            for k, v in DATASET_EXTRA_DEFAULTS.items():
                ds.setdefault(k, v)
    cfg.setdefault("trainer", {})
    em = cfg.setdefault("exp_manager", {}) or {}
    cfg["exp_manager"] = em
    for k, v in {"exp_dir": None, "name": cfg.get("name", "NEST"), "create_tensorboard_logger": True,
                 "create_csv_logger": True, "create_checkpoint_callback": True, "resume_if_exists": False,
                 "resume_ignore_no_checkpoint": True, "plot": True}.items():
        em.setdefault(k, v)
    em.setdefault("checkpoint_callback_params", {})
    for k, v in {"monitor": "val_loss", "mode": "min", "save_top_k": 1}.items():
        em["checkpoint_callback_params"].setdefault(k, v)


def load_train_config(config: Optional[str], overrides: Sequence[str], demo: bool = False) -> Dict[str, Any]:
    path = config or (DEMO_CONFIG if demo else DEFAULT_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        cfg = yaml_load(f)
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ValueError(f"{path}: not a NeMo-layout config (needs a 'model:' section)")
    _defaults(cfg)
    overrides = list(overrides)
    presets = [o for o in overrides if o.split("=", 1)[0] == "preset"]
    if presets:
        apply_preset(cfg, presets[-1].split("=", 1)[1])
    apply_overrides(cfg, [o for o in overrides if o.split("=", 1)[0] != "preset"])
    return resolve(cfg)


def _trainer_kwargs(cfg: Dict[str, Any]) -> Dict[str, Any]:
    import lightning.pytorch as pl
    import torch

    t = dict(cfg.get("trainer") or {})
    for k in ("logger", "enable_checkpointing", "callbacks", "plugins"):  # exp_manager provides these
        t.pop(k, None)
    valid = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    import difflib

    for k in t:
        if k not in valid:
            near = difflib.get_close_matches(k, sorted(valid), n=1)
            raise KeyError(f"unknown trainer option 'trainer.{k}'" + (f"; did you mean 'trainer.{near[0]}'?"
                                                                      if near else ""))
    acc = str(t.get("accelerator", "auto"))
    if acc == "auto":
        acc = "gpu" if torch.cuda.is_available() else "cpu"
    t["accelerator"] = acc
    dev = t.get("devices", "auto")
    if acc == "cpu":
        if dev in (-1, "-1", "auto", None):
            dev = 1
    elif dev in (-1, "-1", "auto", None):
        dev = max(1, torch.cuda.device_count())
    t["devices"] = dev
    n_dev = len(dev) if isinstance(dev, (list, tuple)) else int(str(dev).split(",")[0]) if str(dev).isdigit() \
        else len(str(dev).split(","))
    world = n_dev * int(t.get("num_nodes", 1) or 1)
    if world == 1 and str(t.get("strategy", "auto")).startswith("ddp"):
        t["strategy"] = "auto"  # one process: no DDP wrapper
    if world == 1:
        t["sync_batchnorm"] = False
    elif acc == "cpu" and t.get("sync_batchnorm"):
        # torch's SyncBatchNorm refuses CPU tensors: the module converts to CPUSyncBatchNorm itself
        t["sync_batchnorm"] = False
        cfg.setdefault("_runtime", {})["cpu_sync_batchnorm"] = True
    t["use_distributed_sampler"] = False  # our samplers shard by rank themselves
    return t


# ------------------------------------------------------------------------------------------------ run
def _run_dir(cfg: Dict[str, Any], demo: bool) -> str:
    em = cfg["exp_manager"]
    base = em.get("exp_dir")
    if not base:
        if demo:
            from .data.demo import default_cache_dir

            base = os.path.join(default_cache_dir(), "demo_runs")
        else:
            base = os.path.join(os.getcwd(), "nemo_experiments")
    d = os.path.join(os.path.expanduser(str(base)), str(em.get("name") or "NEST"))
    if not em.get("resume_if_exists"):
        d = os.path.join(d, datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    return os.path.abspath(d)


def _prepare_demo(cfg: Dict[str, Any]) -> None:
    from .data.demo import default_cache_dir, make_demo_corpus

    dcfg = dict(cfg.get("demo") or {})
    root = dcfg.pop("corpus_dir", None) or os.path.join(default_cache_dir(), "demo_corpus")
    print(f"[nest_fast] demo corpus: {root} (generated once, deterministic)", flush=True)
    m = make_demo_corpus(root, **dcfg)
    model = cfg["model"]
    for sec, key in (("train_ds", "train"), ("validation_ds", "val")):
        if model[sec].get("manifest_filepath") in (None, "???"):
            model[sec]["manifest_filepath"] = m[key]
        if model[sec].get("noise_manifest", None) is None:
            model[sec]["noise_manifest"] = m["noise"]


def read_loss_log(path: str):
    """``(train: {step: loss}, val: {step: val_loss})`` from a run's ``losses.jsonl`` (later lines win)."""
    train: Dict[int, float] = {}
    val: Dict[int, float] = {}
    if not os.path.isfile(path):
        return train, val
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if "loss" in r:
                train[int(r["step"])] = float(r["loss"])
            if "val_loss" in r:
                val[int(r["step"])] = float(r["val_loss"])
    return dict(sorted(train.items())), dict(sorted(val.items()))


def plot_losses(run_dir: str, num_classes: Optional[int] = None) -> Optional[str]:
    train, val = read_loss_log(os.path.join(run_dir, "losses.jsonl"))
    if not train:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[nest_fast] matplotlib is not installed: no loss plot (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps, losses = list(train), list(train.values())
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="train loss")
    k = max(1, len(losses) // 40)
    if k > 1:
        sm = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, sm, lw=1.5, label=f"train loss ({k}-step mean)")
    if val:
        ax.plot(list(val), list(val.values()), "o-", label="val_loss")
    if num_classes:
        ax.axhline(math.log(num_classes), color="gray", ls="--", lw=0.8, label=f"ln({num_classes})")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("masked-token NLL")
    ax.set_title("NEST pre-training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = os.path.join(run_dir, "loss.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def train(cfg: Dict[str, Any], demo: bool = False) -> Dict[str, Any]:
    """Train from a resolved config; returns a summary dict (paths, losses, counters)."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from . import backend as _backend
    from .training.data import build_dataset
    from .training.module import AtomicCheckpointIO, NESTLightningModule, SignalCheckpoint, init_from_nemo

    if cfg.get("backend"):
        _backend.set_backend(cfg["backend"])
    if demo:
        _prepare_demo(cfg)
    model_cfg = cfg["model"]
    # data first: a missing manifest or an empty dataset stops here, before any model is built
    train_set = build_dataset(model_cfg.get("train_ds"), "train_ds")
    val_set = build_dataset(model_cfg.get("validation_ds"), "validation_ds")
    tkw = _trainer_kwargs(cfg)
    run_dir = _run_dir(cfg, demo)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    em = cfg["exp_manager"]
    seed = int(cfg.get("seed") or 0)
    pl.seed_everything(seed, workers=False, verbose=False)
    if tkw["accelerator"] == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # CPU training: leave a core to each data worker (OpenMP threads fighting over cores cost far more)
        workers = int((model_cfg.get("train_ds") or {}).get("num_workers") or 0)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(tkw["devices"]) if str(
            tkw["devices"]).isdigit() else 1) - workers))

    module = NESTLightningModule(cfg, train_set, val_set, run_dir=run_dir)
    last = os.path.join(ckpt_dir, "last.ckpt")
    ckpt_path = last if em.get("resume_if_exists") and os.path.isfile(last) else None
    if em.get("resume_if_exists") and ckpt_path is None and not em.get("resume_ignore_no_checkpoint", True):
        raise FileNotFoundError(f"exp_manager.resume_if_exists: no checkpoint at {last}")
    init_msg = None
    if cfg.get("init_from_nemo_model") and ckpt_path is None:
        init_msg = init_from_nemo(module.model, str(cfg["init_from_nemo_model"]))

    callbacks: List[Any] = [SignalCheckpoint(last)]
    if em.get("create_checkpoint_callback", True):
        cp = dict(em.get("checkpoint_callback_params") or {})
        monitor = cp.get("monitor", "val_loss") if val_set is not None else None
        callbacks.append(ModelCheckpoint(
            dirpath=ckpt_dir, filename=f"{em.get('name') or 'NEST'}--{{val_loss:.4f}}-{{step}}",
            monitor=monitor, mode=cp.get("mode", "min"), save_top_k=int(cp.get("save_top_k", 1)) if monitor else 0,
            save_last=True, save_on_train_epoch_end=False if monitor else None,
            every_n_train_steps=None if monitor else int(tkw.get("val_check_interval") or 1000)))
    loggers: List[Any] = []
    if em.get("create_tensorboard_logger", True):
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
        except (ImportError, ModuleNotFoundError) as e:  # pragma: no cover
            print(f"[nest_fast] no TensorBoard logger ({e})")
    if em.get("create_csv_logger", True):
        from lightning.pytorch.loggers import CSVLogger

        loggers.append(CSVLogger(run_dir, name="csv", version=""))
    trainer = pl.Trainer(**tkw, default_root_dir=run_dir, callbacks=callbacks, logger=loggers or False,
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                         plugins=[AtomicCheckpointIO()])
    is_zero = trainer.is_global_zero
    if is_zero:
        n_par = module.model.num_parameters(trainable_only=True)
        print(f"[nest_fast] run folder: {run_dir}", flush=True)
        print(f"[nest_fast] model: {n_par / 1e6:.2f}M trainable parameters, {model_cfg['num_classes']} classes "
              f"(ln = {math.log(model_cfg['num_classes']):.3f}); train data: {len(train_set)} utterances, "
              f"{train_set.manifest.total_duration / 60:.1f} min" + (f"; validation: {len(val_set)} utterances"
                                                                      if val_set is not None else ""), flush=True)
        if init_msg:
            print(f"[nest_fast] {init_msg}", flush=True)
        if ckpt_path:
            print(f"[nest_fast] resuming from {ckpt_path}", flush=True)
    _state["fitting"] = True
    trainer.fit(module, ckpt_path=ckpt_path)

    # ------------------------------------------------------------------ summary
    bad = torch.tensor([float(len(module.bad_files)), float(module.skipped_steps)])
    summary: Dict[str, Any] = {"run_dir": run_dir, "checkpoint_dir": ckpt_dir, "last_checkpoint": last,
                               "bad_files": int(bad[0]), "skipped_steps": int(bad[1]),
                               "interrupted": bool(module.signal_received),
                               "signal": int(module.signal_received or 0), "global_step": trainer.global_step}
    ck = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    if ck is not None and ck.best_model_path:
        summary["best_checkpoint"] = ck.best_model_path
    if is_zero:
        trn, val = read_loss_log(os.path.join(run_dir, "losses.jsonl"))
        summary["train_losses"], summary["val_losses"] = trn, val
        summary["plot"] = plot_losses(run_dir, model_cfg.get("num_classes")) if em.get("plot", True) else None
        losses = list(trn.values())
        print("\n[nest_fast] ---------------------------------------------------------------- done", flush=True)
        if losses:
            k = max(1, min(10, len(losses) // 5))
            first, lastl = sum(losses[:k]) / k, sum(losses[-k:]) / k
            summary["first_loss"], summary["final_loss"] = first, lastl
            print(f"[nest_fast] masked-token loss: first {k} steps {first:.3f} -> last {k} steps {lastl:.3f} "
                  f"(ln(num_classes) = {math.log(model_cfg['num_classes']):.3f}); steps: {trainer.global_step}")
        if val:
            print(f"[nest_fast] val_loss: " + ", ".join(f"{v:.3f}@{s}" for s, v in val.items()))
        print(f"[nest_fast] checkpoints: {ckpt_dir}" + (f" (best: {os.path.basename(summary['best_checkpoint'])})"
                                                        if summary.get("best_checkpoint") else ""))
        print(f"[nest_fast] logs: {run_dir}/tensorboard (tensorboard --logdir {run_dir}), {run_dir}/csv, "
              f"{run_dir}/losses.jsonl")
        if summary.get("plot"):
            print(f"[nest_fast] loss plot: {summary['plot']}")
        print(f"[nest_fast] unusable audio files skipped: {summary['bad_files']}"
              + (f" (e.g. {sorted(module.bad_files)[:3]})" if module.bad_files else "")
              + f"; optimiser steps skipped for non-finite loss/gradients: {summary['skipped_steps']}", flush=True)
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({k: v for k, v in summary.items() if k not in ("train_losses", "val_losses")}, f, indent=1)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nest_fast.train", description=__doc__.split("\n\n")[0],
                                     epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "--config-path", dest="config", default=None,
                        help="a NeMo-layout YAML (default: nest_fast's nest_fast-conformer.yaml; the demo config "
                             "when no argument at all is given)")
    parser.add_argument("--demo", action="store_true",
                        help="train the built-in demo: synthetic speech corpus generated in code, small model")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra-style overrides (see below)")
    args = parser.parse_args(argv)
    demo = args.demo or (args.config is None and not args.overrides)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _state["fitting"] = False
    try:
        cfg = load_train_config(args.config, args.overrides, demo=demo and args.config is None)
        summary = train(cfg, demo=demo)
    except (KeyError, ValueError, FileNotFoundError) as e:
        if _state["fitting"]:  # a failure inside training is a bug or a crash: keep the traceback
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"nest_fast.train: error: {msg}", file=sys.stderr)
        return 2
    if summary.get("interrupted"):
        return 128 + int(summary.get("signal") or 15)
    return 0


_state = {"fitting": False}


if __name__ == "__main__":
    sys.exit(main())
