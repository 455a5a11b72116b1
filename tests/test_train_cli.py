"""The training CLI: --help, overrides, clear start-up errors, NeMo init (.nemo archives read safely)."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from nest_fast.train import load_train_config, main


def test_help_lists_main_options():
    out = subprocess.run([sys.executable, "-m", "nest_fast.train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for key in ("model.train_ds.manifest_filepath", "trainer.devices", "trainer.precision", "batch_duration",
                "init_from_nemo_model", "preset=", "--config", "--demo"):
        assert key in out.stdout, key


def test_overrides_presets_and_extras():
    cfg = load_train_config(None, ["model.train_ds.batch_size=3", "trainer.precision=bf16-mixed", "preset=small",
                                   "model.train_ds.batch_duration=120", "+model.foo=1", "~trainer.benchmark"])
    assert cfg["model"]["train_ds"]["batch_size"] == 3 and cfg["trainer"]["precision"] == "bf16-mixed"
    assert cfg["model"]["encoder"]["d_model"] == 176 and cfg["model"]["optim"]["sched"]["d_model"] == 176
    assert cfg["model"]["train_ds"]["batch_duration"] == 120 and cfg["model"]["foo"] == 1
    assert "benchmark" not in cfg["trainer"]


def test_unknown_key_names_nearest(capsys):
    assert main(["model.train_ds.batch_sise=4"]) == 2
    err = capsys.readouterr().err
    assert "model.train_ds.batch_sise" in err and "model.train_ds.batch_size" in err
    assert main(["--demo", "+trainer.max_step=3"]) == 2
    assert "trainer.max_steps" in capsys.readouterr().err


def test_missing_manifest_and_empty_dataset(tmp_path, capsys):
    assert main(["model.train_ds.manifest_filepath=" + str(tmp_path / "nope.json")]) == 2
    assert "not found" in capsys.readouterr().err
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"audio_filepath": "a.wav", "duration": 0.2}) + "\n")
    assert main([f"model.train_ds.manifest_filepath={p}", f"model.validation_ds.manifest_filepath={p}"]) == 2
    err = capsys.readouterr().err
    assert "no usable items" in err and "min_duration" in err
    assert main(["trainer.max_steps=3"]) == 2
    assert "manifest_filepath is not set" in capsys.readouterr().err


def _nemo_archive(path, sd, evil=False):
    buf = io.BytesIO()
    torch.save(sd, buf)
    with tarfile.open(path, "w:gz") as tar:
        ti = tarfile.TarInfo("./model_config.yaml")
        data = b"name: x\n"
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
        if evil:
            ti = tarfile.TarInfo("./model_weights.ckpt")
            ti.type = tarfile.SYMTYPE
            ti.linkname = "/etc/passwd"
            tar.addfile(ti)
        else:
            ti = tarfile.TarInfo("./model_weights.ckpt")
            ti.size = len(buf.getvalue())
            tar.addfile(ti, io.BytesIO(buf.getvalue()))


def test_init_from_nemo_archive(tmp_path):
    from nest_fast.model import NESTModel
    from nest_fast.training.module import init_from_nemo, load_nemo_weights

    cfg = load_train_config(None, ["model.num_classes=32", "model.encoder.d_model=32", "model.encoder.n_layers=1",
                                   "model.encoder.n_heads=2", "model.encoder.subsampling_conv_channels=16"],
                            demo=True)["model"]
    torch.manual_seed(1)
    src = NESTModel(cfg)
    sd = dict(src.state_dict())
    sd["decoder_ssl.decoder_layers.0.weight"] = torch.zeros(3)  # NeMo 2.1-2.2 dead module: ignored
    _nemo_archive(tmp_path / "m.nemo", sd)
    torch.manual_seed(2)
    dst = NESTModel(cfg)
    msg = init_from_nemo(dst, str(tmp_path / "m.nemo"))
    assert "initialised" in msg
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())
    _nemo_archive(tmp_path / "evil.nemo", sd, evil=True)
    with pytest.raises(ValueError, match="refusing"):
        load_nemo_weights(str(tmp_path / "evil.nemo"))
    assert not os.path.exists(tmp_path / "model_weights.ckpt")
