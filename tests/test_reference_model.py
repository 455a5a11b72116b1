"""The reference NEST model on its own: parameter counts, state dicts, configs, invariances, errors."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import nest_fast
from nest_fast import NESTModel, model_config

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared")

# PARAMS.md (NeMo 3.0.0 instantiation): total and trainable per preset; cross-checked with
# shared/tools/nest_params.py below when that file is beside the checkout.
EXPECTED = {
    "small": (14_191_616, 14_050_224),
    "medium": (28_375_376, 28_233_984),
    "large": (113_106_000, 112_964_608),
    "large18": (119_418_448, 119_277_056),
    "xlarge": (615_844_944, 615_703_552),
    "xxlarge": (1_069_081_680, 1_068_940_288),
}


def _nest_params():
    path = os.path.join(SHARED, "tools", "nest_params.py")
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location("nest_params", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_parameter_counts(preset):
    with torch.device("meta"):
        m = NESTModel(model_config(preset), nemo_init=False)
    total, trainable = m.num_parameters(), m.num_parameters(trainable_only=True)
    assert (total, trainable) == EXPECTED[preset]
    enc = sum(p.numel() for p in m.encoder.parameters())
    dec = sum(p.numel() for p in m.decoder.parameters())
    np_mod = _nest_params()
    if np_mod is not None:
        p = nest_fast.PRESETS[preset]
        ref = np_mod.nest_model(d_model=p["d_model"], n_heads=p["n_heads"], n_layers=p["n_layers"],
                                kernel=p["conv_kernel_size"], use_bias=p["use_bias"])
        assert (total, trainable, enc, dec) == (ref["total"], ref["trainable"], ref["encoder"], ref["decoder"])


def _key_file():
    path = os.path.join(SHARED, "nemo_state_dict_keys_L17.txt")
    if not os.path.isfile(path):
        pytest.fail(f"{path} is missing: CI runs with shared/ beside the checkout")
    return [tuple(line.rstrip("\n").split("\t")) for line in open(path) if line.strip()]


def test_state_dict_keys_shapes_dtypes_match_nemo_list():
    with torch.device("meta"):
        m = NESTModel(model_config("large"), nemo_init=False)
    ours = []
    for k, v in m.state_dict().items():
        shape = "(" + ", ".join(str(s) for s in v.shape) + ("," if v.dim() == 1 else "") + ")"
        ours.append((k, shape, str(v.dtype).replace("torch.", "")))
    assert ours == _key_file()
    assert len(ours) == 699


def test_state_dict_round_trip_and_nemo_2_2_extra_keys():
    cfg = model_config("small", n_layers=2)
    torch.manual_seed(1)
    a = NESTModel(cfg)
    torch.manual_seed(2)
    b = NESTModel(cfg)
    sd = a.state_dict()
    b.load_state_dict(sd, strict=True)
    assert all(torch.equal(sd[k], v) for k, v in b.state_dict().items())
    # NeMo 2.1-2.2 checkpoints carry a dead decoder_ssl: ignored by load_nemo_state_dict
    sd2 = dict(sd)
    sd2["decoder_ssl.decoder_layers.0.weight"] = torch.zeros(8192, 176, 1)
    with pytest.raises(RuntimeError):
        b.load_state_dict(sd2, strict=True)
    b.load_nemo_state_dict(sd2)


def test_config_loading_overrides_and_errors(tmp_path):
    cfg = nest_fast.load_config(overrides=["model.encoder.n_layers=3", "preset=small", "trainer.max_steps=7"])
    assert cfg["model"]["encoder"]["n_layers"] == 3 and cfg["model"]["encoder"]["d_model"] == 176
    assert cfg["model"]["decoder"]["feat_in"] == 176  # interpolation follows the preset
    assert cfg["model"]["optim"]["weight_decay"] == 0.0 and isinstance(cfg["model"]["optim"]["sched"]["min_lr"], float)
    assert cfg["trainer"]["max_steps"] == 7
    with pytest.raises(KeyError, match="n_layers"):
        nest_fast.load_config(overrides=["model.encoder.n_layer=3"])
    cfg = nest_fast.load_config(overrides=["+model.encoder.extra=1"])
    with pytest.raises(ValueError, match="extra"):
        NESTModel(cfg["model"])
    with pytest.raises(ValueError, match="preset"):
        nest_fast.load_config(overrides=["preset=huge"])
    with pytest.raises(FileNotFoundError):
        nest_fast.load_config(str(tmp_path / "nope.yaml"))
    # OmegaConf input works as NeMo users pass it
    from omegaconf import OmegaConf

    m = NESTModel(OmegaConf.create(model_config("small", n_layers=1)))
    assert isinstance(m.encoder, nest_fast.ConformerEncoder)


def _small(**kw):
    cfg = model_config("small", n_layers=2, **kw)
    torch.manual_seed(0)
    m = NESTModel(cfg).eval()
    with torch.no_grad():  # non-trivial BN statistics and position biases
        for layer in m.encoder.layers:
            layer.conv.batch_norm.running_mean.normal_(0, 0.1)
            layer.conv.batch_norm.running_var.uniform_(0.5, 2.0)
            layer.self_attn.pos_bias_u.normal_(0, 0.1)
            layer.self_attn.pos_bias_v.normal_(0, 0.1)
    return m


def test_padding_and_batch_invariance():
    m = _small()
    g = torch.Generator().manual_seed(3)
    lens = torch.tensor([48000, 36913, 20011])
    x = torch.randn(3, 48000, generator=g) * 0.1
    for i, n in enumerate(lens):
        x[i, n:] = 0
    with torch.no_grad():
        enc, enc_len = m.encoder(*m.preprocessor(input_signal=x, length=lens))
        xp = torch.cat([x, torch.zeros(3, 16000)], 1)  # extra zero padding
        enc_p, enc_len_p = m.encoder(*m.preprocessor(input_signal=xp, length=lens))
        assert torch.equal(enc_len, enc_len_p)
        for i, e in enumerate(enc_len.tolist()):
            torch.testing.assert_close(enc_p[i, :, :e], enc[i, :, :e], atol=1e-5, rtol=1e-5)
            # batch-size invariance: each utterance alone, cut to its own length
            n = int(lens[i])
            e1, l1 = m.encoder(*m.preprocessor(input_signal=x[i:i + 1, :n], length=lens[i:i + 1]))
            assert int(l1) == e
            torch.testing.assert_close(e1[0, :, :e], enc[i, :, :e], atol=1e-5, rtol=1e-5)


def test_bad_input_errors():
    m = _small()
    x = torch.randn(2, 16000)
    n = torch.tensor([16000, 12000])
    with pytest.raises(ValueError, match="input_signal must be 2-D"):
        m(input_signal=x[0], input_signal_length=n, noisy_input_signal=x, noisy_input_signal_length=n)
    with pytest.raises(TypeError, match="floating-point"):
        m(input_signal=(x * 1000).long(), input_signal_length=n, noisy_input_signal=x, noisy_input_signal_length=n)
    with pytest.raises(TypeError, match="integer"):
        m(input_signal=x, input_signal_length=n.float(), noisy_input_signal=x, noisy_input_signal_length=n)
    with pytest.raises(ValueError, match="longer than"):
        m(input_signal=x, input_signal_length=torch.tensor([16001, 3]), noisy_input_signal=x,
          noisy_input_signal_length=n)
    with pytest.raises(ValueError, match="non-negative"):
        m(input_signal=x, input_signal_length=torch.tensor([-1, 3]), noisy_input_signal=x,
          noisy_input_signal_length=n)
    with pytest.raises(ValueError, match="batch size"):
        m(input_signal=x, input_signal_length=n, noisy_input_signal=x[:1], noisy_input_signal_length=n[:1])
    with pytest.raises(ValueError, match="entries"):
        m(input_signal=x, input_signal_length=n[:1], noisy_input_signal=x, noisy_input_signal_length=n)
    with pytest.raises(ValueError, match="exactly one"):
        m(input_signal=x, input_signal_length=n)
    with pytest.raises(ValueError, match=r"\[batch, 80, time\]"):
        m.encoder(audio_signal=torch.randn(2, 64, 32), length=torch.tensor([32, 10]))
    with pytest.raises(ValueError, match="n_heads"):
        nest_fast.ConformerEncoder(feat_in=80, n_layers=1, d_model=30, n_heads=4, subsampling="dw_striding",
                                   subsampling_factor=8)
    with pytest.raises(ValueError, match="self_attention_model"):
        nest_fast.ConformerEncoder(feat_in=80, n_layers=1, d_model=32, n_heads=4, subsampling="dw_striding",
                                   subsampling_factor=8, self_attention_model="abs_pos")
    with pytest.raises(ValueError, match="backend"):
        nest_fast.set_backend("fastest")


def test_backend_switch_and_env():
    nest_fast.set_backend("fast")
    assert nest_fast.get_backend() == "fast"
    with nest_fast.use_backend("reference"):
        assert nest_fast.get_backend() == "reference"
    assert nest_fast.get_backend() == "fast"
    code = "import nest_fast; print(nest_fast.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "NEST_FAST_BACKEND": "fast"}, check=True)
    assert out.stdout.strip() == "fast"
    env = {k: v for k, v in os.environ.items() if k != "NEST_FAST_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "auto"  # the default: kernels for CUDA tensors, the reference for CPU tensors


def test_auto_backend_keeps_cpu_tensors_on_the_reference_path():
    from nest_fast import backend

    m = _small()
    x, n = torch.randn(1, 16000), torch.tensor([16000])
    with nest_fast.use_backend("auto"):
        assert not backend.will_use_fast("mel_frontend", m.preprocessor.featurizer, x, n)
    with nest_fast.use_backend("fast"):  # the C++ CPU op is a real fast path on CPU
        assert backend.will_use_fast("mel_frontend", m.preprocessor.featurizer, x, n)


def test_import_without_nemo_or_heavy_deps():
    """`import nest_fast` and a forward pass work with NeMo, Lightning, Triton and OmegaConf hidden."""
    code = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('nemo', 'lightning', 'pytorch_lightning', 'triton', 'omegaconf', 'hydra',
                                  'soundfile', 'nvidia', 'librosa'):
            raise ImportError('hidden for this test: ' + name)
sys.meta_path.insert(0, Block())
import torch, nest_fast
m = nest_fast.NESTModel(nest_fast.model_config('small', n_layers=1)).eval()
x = torch.randn(2, 16000); n = torch.tensor([16000, 9000])
lp, el, masks, tok = m(input_signal=x, input_signal_length=n, noisy_input_signal=x, noisy_input_signal_length=n,
                       apply_mask=True)
assert lp.shape == (2, 14, 8192, 1) and tok.shape == (2, 14, 1) and el.tolist() == [13, 7]
assert not any(k.split('.')[0] in ('nemo', 'triton', 'lightning') for k in sys.modules)
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
