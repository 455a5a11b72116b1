"""The Lightning side of ``python -m nest_fast.train``: module, callbacks, atomic checkpoint IO, NeMo init.

Only this package imports Lightning (``import nest_fast`` does not).

* :class:`NESTLightningModule` wraps :class:`nest_fast.NESTModel` and trains it with ``model.training_loss``
  (fast kernels on the fast backend), AdamW (fused on CUDA) and NeMo's Noam schedule stepped per optimiser step
  (SPEC §9). It logs ``loss``, ``lr``, ``audio_s/s`` (throughput) and ``val_loss`` (mean of the per-batch
  validation losses, as NeMo), appends them to ``losses.jsonl`` in the run folder (used for the plot), skips
  optimiser steps whose loss or gradients are not finite (counted), and keeps what exact resume needs in the
  checkpoint: RNG states (torch, CUDA, numpy, random), the data position and the counters.
* :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file, fsyncs it and renames it into place.
* :class:`SignalCheckpoint` turns SIGTERM/SIGINT into "finish this step, save ``last.ckpt``, stop".
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import signal
import tarfile
import time
from typing import Any, Dict, List, Mapping, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ..model import NESTModel, noam_lr
from .data import audio_seconds, build_loader

log = logging.getLogger("nest_fast.train")


# ---------------------------------------------------------------------------------------------- RNG state
def rng_state() -> Dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Mapping[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------------------------------------- NeMo weights
def load_nemo_weights(path: str) -> Dict[str, torch.Tensor]:
    """The state dict of a ``.nemo`` archive (its ``model_weights.ckpt``), a plain state-dict file, or a
    Lightning checkpoint (ours or NeMo's). The archive is never extracted to disk: only the regular member
    ``model_weights.ckpt`` is read, into memory, and loaded with ``weights_only=True``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init_from_nemo_model: file not found: {path}")
    if tarfile.is_tarfile(path):
        with tarfile.open(path, "r:*") as tar:
            members = [m for m in tar.getmembers() if os.path.basename(m.name) == "model_weights.ckpt"]
            if not members:
                raise ValueError(f"init_from_nemo_model: {path} is a tar archive without model_weights.ckpt")
            m = members[0]
            if not m.isfile() or m.name.startswith("/") or ".." in m.name.split("/"):
                raise ValueError(f"init_from_nemo_model: refusing archive member {m.name!r} of {path} (not a "
                                 f"regular file with a safe relative name)")
            data = tar.extractfile(m).read()
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"init_from_nemo_model: {path} holds no state dict")
    if sd and all(k.startswith("model.") for k in sd):  # a nest_fast Lightning checkpoint
        sd = {k[len("model."):]: v for k, v in sd.items()}
    return dict(sd)


def init_from_nemo(model: NESTModel, path: str) -> str:
    sd = load_nemo_weights(path)
    res = model.load_nemo_state_dict(sd, strict=False)
    own = model.state_dict()
    loaded = [k for k in sd if k in own]
    if not loaded:
        raise ValueError(f"init_from_nemo_model: no key of {path} matches the model (first keys: {list(sd)[:3]})")
    return (f"initialised {len(loaded)}/{len(own)} tensors from {path}"
            + (f"; missing {len(res.missing_keys)} (e.g. {res.missing_keys[:2]})" if res.missing_keys else "")
            + (f"; unused {len(res.unexpected_keys)} (e.g. {res.unexpected_keys[:2]})" if res.unexpected_keys
               else ""))


# ---------------------------------------------------------------------------------------------- checkpoint IO
class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are never half-written: write ``<path>.tmp-<pid>``, fsync, ``os.replace`` onto ``path``."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options=None) -> None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        try:  # make the rename durable
            fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------- the module
class NESTLightningModule(pl.LightningModule):
    def __init__(self, cfg: Dict[str, Any], train_set=None, val_set=None, run_dir: Optional[str] = None):
        super().__init__()
        self.cfg = cfg
        mcfg = cfg["model"]
        self.model = NESTModel(mcfg)
        compile_backend = cfg.get("compile")
        if compile_backend:  # torch.compile the encoder in place (state-dict keys unchanged); kernels are custom ops
            self.model.encoder.compile(backend="inductor" if compile_backend is True else str(compile_backend))
        self.sample_rate = int(mcfg.get("sample_rate", 16000))
        self.train_set, self.val_set, self.run_dir = train_set, val_set, run_dir
        self.seed = int(cfg.get("seed") or 0)
        self.train_sampler = self.val_sampler = None
        self.skipped_steps = 0
        self.bad_files: set = set()
        self.signal_received: Optional[int] = None
        self._skip_step = False
        self._pending_rng: Optional[Dict[str, Any]] = None
        self._resume_position: Optional[tuple] = None
        self._position = (0, 0)
        self._val_losses: List[float] = []
        self._t_last: Optional[float] = None
        self._restored = False

    def setup(self, stage: str) -> None:
        # before the DDP wrap; seeds: identical init everywhere (DDP also broadcasts), per-rank RNG afterwards
        if (self.cfg.get("_runtime") or {}).get("cpu_sync_batchnorm") and self.trainer.world_size > 1:
            from .syncbn import convert_sync_batchnorm

            convert_sync_batchnorm(self.model)
        if self.trainer.world_size > 1:
            torch.manual_seed(self.seed * 1000 + 17 * self.trainer.global_rank + 1)

    # ---------------------------------------------------------------- data
    def _world(self):
        return (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)

    def train_dataloader(self):
        rank, world = self._world()
        loader, self.train_sampler = build_loader(self.train_set, self.cfg["model"]["train_ds"], self.seed, rank,
                                                  world, train=True)
        self._apply_resume_position()
        return loader

    def val_dataloader(self):
        if self.val_set is None:
            return []
        rank, world = self._world()
        loader, self.val_sampler = build_loader(self.val_set, self.cfg["model"]["validation_ds"], self.seed, rank,
                                                world, train=False)
        return loader

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device, non_blocking=True)

    def _apply_resume_position(self):
        if self._resume_position is not None and self.train_sampler is not None:
            self.train_sampler.set_position(*self._resume_position)
            self._resume_position = None

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        ocfg = dict(self.cfg["model"].get("optim") or {})
        name = str(ocfg.get("name", "adamw")).lower()
        params = [p for p in self.model.parameters() if p.requires_grad]  # one group; frozen params excluded
        kw = dict(lr=float(ocfg.get("lr", 5.0)), betas=tuple(ocfg.get("betas", (0.9, 0.98))),
                  eps=float(ocfg.get("eps", 1e-8)), weight_decay=float(ocfg.get("weight_decay", 0.0)))
        if name not in ("adamw", "adam"):
            raise ValueError(f"model.optim.name={name!r}: nest_fast.train supports 'adamw' and 'adam'")
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        fused = self.device.type == "cuda"
        opt = cls(params, fused=fused, **kw) if fused else cls(params, **kw)
        sched = ocfg.get("sched")
        if not sched:
            return opt
        sname = str(sched.get("name", "NoamAnnealing"))
        if sname != "NoamAnnealing":
            raise ValueError(f"model.optim.sched.name={sname!r}: nest_fast.train supports NoamAnnealing "
                             f"(or sched: null for a constant lr)")
        base = kw["lr"]
        d_model = int(sched.get("d_model") or self.cfg["model"]["encoder"]["d_model"])
        warmup = sched.get("warmup_steps")
        if sched.get("warmup_ratio") is not None:
            max_steps = int(self.trainer.max_steps) if self._trainer is not None else -1
            if max_steps <= 0:
                raise ValueError("model.optim.sched.warmup_ratio needs trainer.max_steps > 0")
            warmup = int(sched["warmup_ratio"] * max_steps)
        warmup = int(warmup or 0)
        min_lr = float(sched.get("min_lr", 0.0))
        if warmup <= 0:
            raise ValueError("model.optim.sched: NoamAnnealing needs warmup_steps > 0 (or warmup_ratio)")

        def lam(step: int) -> float:
            return noam_lr(step, d_model=d_model, warmup_steps=warmup, lr=base, min_lr=min_lr) / base

        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lam), "interval": "step",
                                 "frequency": 1}}

    def _loss(self, batch):
        return self.model.training_loss(input_signal=batch.audio, input_signal_length=batch.audio_len,
                                        noisy_input_signal=batch.noisy_audio,
                                        noisy_input_signal_length=batch.noisy_audio_len, apply_mask=True)

    def _all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        return t

    # ---------------------------------------------------------------- hooks
    def on_train_batch_start(self, batch, batch_idx):
        if self._pending_rng is not None:  # exact resume: the RNG as it was before this step, uninterrupted
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def training_step(self, batch, batch_idx):
        self.bad_files.update(batch.bad_files)
        loss = self._loss(batch)
        finite = bool(torch.isfinite(loss.detach()))
        stats = torch.tensor([loss.detach().item() if finite else 0.0, 0.0 if finite else 1.0,
                              1.0 if self.signal_received else 0.0, 1.0], dtype=torch.float64, device=self.device)
        stats = self._all_reduce_sum(stats)
        if stats[1] > 0:
            self._skip_step = True
        if stats[2] > 0:
            self.signal_received = self.signal_received or signal.SIGTERM
        n_ok = float(stats[3] - stats[1])
        mean_loss = float(stats[0]) / n_ok if n_ok > 0 else math.nan
        self.log("loss", mean_loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(batch))
        self._last_loss = mean_loss
        self._last_audio_s = audio_seconds(batch, self.sample_rate) * float(stats[3])
        return loss

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        bad = self._skip_step
        if not bad and grads:
            norms = torch._foreach_norm(grads)
            bad = not bool(torch.isfinite(torch.stack(norms)).all())
        if bad:  # drop the gradients: AdamW then leaves every parameter (and its moments) untouched
            for p in self.model.parameters():
                p.grad = None
            self.skipped_steps += 1
            if self.trainer.is_global_zero:
                log.warning("non-finite loss or gradients at step %d: optimiser step skipped (%d so far)",
                            self.global_step, self.skipped_steps)
        self._skip_step = False

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self._position = (int(batch.epoch), int(batch.batch_index) + 1)
        now = time.perf_counter()
        if self._t_last is not None:
            rate = self._last_audio_s / max(now - self._t_last, 1e-9)
            self.log("audio_s/s", rate, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        self._t_last = now
        lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else math.nan
        self.log("lr", lr, on_step=True, on_epoch=False, batch_size=1)
        self._append_log({"step": int(self.global_step), "epoch": int(batch.epoch), "loss": self._last_loss,
                          "lr": lr})

    def validation_step(self, batch, batch_idx):
        self.bad_files.update(batch.bad_files)
        loss = self._loss(batch)
        self._val_losses.append(float(loss))
        return loss

    def on_validation_epoch_end(self):
        vals = [v for v in self._val_losses if math.isfinite(v)]
        t = torch.tensor([sum(vals), float(len(vals))], dtype=torch.float64, device=self.device)
        t = self._all_reduce_sum(t)
        self._val_losses = []
        if t[1] > 0:
            val = float(t[0] / t[1])
            self.log("val_loss", val, prog_bar=True, on_step=False, on_epoch=True, batch_size=1)
            if not self.trainer.sanity_checking:
                self._append_log({"step": int(self.global_step), "val_loss": val})

    def _append_log(self, rec: Dict[str, Any]) -> None:
        if self.run_dir and self.trainer.is_global_zero:
            with open(os.path.join(self.run_dir, "losses.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")

    # ---------------------------------------------------------------- checkpoint state
    def on_save_checkpoint(self, checkpoint):
        checkpoint["nest_fast"] = {"rng": rng_state(), "data_position": self._position,
                                   "skipped_steps": self.skipped_steps, "bad_files": sorted(self.bad_files),
                                   "config": self.cfg}

    def on_load_checkpoint(self, checkpoint):
        st = checkpoint.get("nest_fast")
        if not st:
            return
        self._pending_rng = st["rng"]
        self._resume_position = tuple(st["data_position"])
        self._position = tuple(st["data_position"])
        self.skipped_steps = int(st.get("skipped_steps", 0))
        self.bad_files = set(st.get("bad_files", []))
        self._restored = True
        self._apply_resume_position()


# ---------------------------------------------------------------------------------------------- callbacks
class SignalCheckpoint(pl.Callback):
    """SIGTERM/SIGINT: finish the running step, save ``last.ckpt`` (atomically), then stop the run."""

    def __init__(self, ckpt_path: str):
        self.ckpt_path = ckpt_path
        self._old: Dict[int, Any] = {}
        self.saved = False

    def on_train_start(self, trainer, pl_module):
        def handler(signum, frame):
            if pl_module.signal_received:  # a second signal: give up at once
                raise KeyboardInterrupt
            pl_module.signal_received = signum
            print(f"\n[nest_fast] received signal {signum}: saving a checkpoint after this step, then stopping",
                  flush=True)

        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, handler)
            except ValueError:  # not the main thread
                pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.signal_received and not self.saved:
            trainer.save_checkpoint(self.ckpt_path)
            self.saved = True
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(f"[nest_fast] checkpoint saved to {self.ckpt_path}; run the same command again to resume",
                      flush=True)

    def on_train_end(self, trainer, pl_module):
        for s, h in self._old.items():
            try:
                signal.signal(s, h)
            except (ValueError, TypeError):
                pass
        self._old = {}
