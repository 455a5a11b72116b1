"""Parity with NeMo 3.0.0 itself (the oracle, a test dependency): same config, NeMo's weights loaded into ours.

fp32 on CPU. Eval mode: features, encoder output on valid frames, tokens (identical), masks under the same
seed (identical), log-probs and loss. Train mode with every dropout at 0: loss and every parameter gradient.
Tolerance: max abs and max relative error <= 1e-5 (in practice the reference path is bit-exact).
"""

import copy

import pytest
import torch

import nest_fast
from nest_fast import NESTModel, model_config

from nemo_oracle import build_nemo_model, nemo_available

pytestmark = [pytest.mark.nemo]
if not nemo_available():  # the suite's set-up installs NeMo; a missing oracle is a failure, not a skip
    pytest.fail("nemo-toolkit[asr]==3.0.0 is not importable; install the test requirements", pytrace=False)

TOL = 1e-5

# (samples per utterance, padded length). The first is SPEC §2's example. The second makes intermediate
# subsampling lengths odd (F=301 -> 151 -> 76 -> 38; F=77 -> 39 -> 20 -> 10; F=37 -> 19 -> 10 -> 5).
LENGTH_SETS = [
    ((48000, 36913, 20011), 48000),
    ((48160, 12320, 5920), 48200),
    ((16000, 16000), 16000),
]

CONFIGS = {
    # small preset, 2 layers (fast on CPU), rel_pos, kernel 9, bias, xscaling
    "small2": dict(preset="small", n_layers=2),
    # XL-style options at a small size: no biases, no xscaling, kernel 5, 4 heads of 44 dims
    "nobias_k5": dict(preset="small", n_layers=2, use_bias=False, xscaling=False, conv_kernel_size=5),
}


def _cfg(name, dropout0=False, num_classes=None):
    spec = dict(CONFIGS[name])
    preset = spec.pop("preset")
    cfg = model_config(preset, **spec)
    if dropout0:
        for k in ("dropout", "dropout_pre_encoder", "dropout_emb", "dropout_att"):
            cfg["encoder"][k] = 0.0
    if num_classes:
        cfg["num_classes"] = cfg["quantizer"]["num_classes"] = cfg["decoder"]["num_classes"] = num_classes
    return cfg


def _pair(cfg):
    """NeMo model with randomised BN statistics and position biases, and ours with NeMo's state dict."""
    torch.manual_seed(0)
    nemo = build_nemo_model(cfg)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for layer in nemo.encoder.layers:
            bn = layer.conv.batch_norm
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.2)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.1)
            layer.self_attn.pos_bias_u.copy_(torch.randn(layer.self_attn.pos_bias_u.shape, generator=g) * 0.2)
            layer.self_attn.pos_bias_v.copy_(torch.randn(layer.self_attn.pos_bias_v.shape, generator=g) * 0.2)
    ours = NESTModel(cfg, nemo_init=False)
    ours.load_state_dict(nemo.state_dict(), strict=True)
    return nemo, ours


def _audio(lengths, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    t = torch.arange(N) / 16000.0
    x = 0.05 * torch.randn(B, N, generator=g)
    for b in range(B):  # some tonal structure so features are not white
        x[b] += 0.3 * torch.sin(2 * torch.pi * (150 + 60 * b) * t) * torch.sin(2 * torch.pi * 3 * t)
        x[b, lengths[b]:] = 0
    return x, torch.tensor(lengths, dtype=torch.int64)


def _close(a, b, what):
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin), f"{what}: non-finite values differ"  # NaN loss when nothing masked
    a, b = a[fin], b[fin]
    abs_err = (a - b).abs().max().item() if a.numel() else 0.0
    rel_err = abs_err / max(b.abs().max().item(), 1e-12) if b.numel() else 0.0
    print(f"[parity] {what}: max abs {abs_err:.3e}, max rel {rel_err:.3e}")
    assert abs_err <= TOL or rel_err <= TOL, f"{what}: max abs {abs_err:.3e}, max rel {rel_err:.3e}"
    return abs_err


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def eval_pair(request):
    nemo, ours = _pair(_cfg(request.param))
    return nemo.eval(), ours.eval()


@pytest.mark.parametrize("lengths,N", LENGTH_SETS)
def test_eval_parity(eval_pair, lengths, N):
    nemo, ours = eval_pair
    x, n = _audio(lengths, N)
    y, _ = _audio(lengths, N, seed=1)
    noisy = x + 0.5 * y
    with torch.no_grad():
        f_n, fl_n = nemo.preprocessor(input_signal=x.clone(), length=n)
        f_o, fl_o = ours.preprocessor(input_signal=x.clone(), length=n)
        assert torch.equal(fl_n, fl_o)
        _close(f_o, f_n, "features")
        e_n, el_n = nemo.encoder(audio_signal=f_n, length=fl_n)
        e_o, el_o = ours.encoder(audio_signal=f_n, length=fl_n)
        assert torch.equal(el_n, el_o)
        for b, e in enumerate(el_n.tolist()):
            _close(e_o[b, :, :e], e_n[b, :, :e], "encoder output (valid frames)")
        _, tok_n = nemo.quantizer(input_signal=f_n)
        _, tok_o = ours.quantizer(input_signal=f_n)
        assert torch.equal(tok_n, tok_o)

        torch.manual_seed(123)
        out_n = nemo(input_signal=x.clone(), input_signal_length=n, noisy_input_signal=noisy.clone(),
                     noisy_input_signal_length=n, apply_mask=True)
        torch.manual_seed(123)
        out_o = ours(input_signal=x.clone(), input_signal_length=n, noisy_input_signal=noisy.clone(),
                     noisy_input_signal_length=n, apply_mask=True)
        lp_n, len_n, m_n, t_n = out_n
        lp_o, len_o, m_o, t_o = out_o
        assert torch.equal(m_n, m_o) and torch.equal(t_n, t_o) and torch.equal(len_n, len_o)
        for b, e in enumerate(len_n.tolist()):
            _close(lp_o[b, :e], lp_n[b, :e], "log-probs (valid frames)")
        loss_n = nemo.loss(masks=m_n, decoder_outputs=lp_n, targets=t_n, decoder_lengths=len_n)
        loss_o = ours.loss(masks=m_o, decoder_outputs=lp_o, targets=t_o, decoder_lengths=len_o)
        _close(loss_o, loss_n, "loss")
        # the training-path op (decoder + masked NLL) gives the same number
        enc, _, masks, tokens = ours.encode(input_signal=x.clone(), input_signal_length=n,
                                            noisy_input_signal=noisy.clone(), noisy_input_signal_length=n,
                                            apply_mask=False)
        ours_op = ours.masked_loss(enc, m_n, tokens)
        ref = nemo.loss(masks=m_n, decoder_outputs=nemo.decoder(encoder_output=nemo.encoder(
            audio_signal=nemo.preprocessor(input_signal=noisy.clone(), length=n)[0], length=n // 160)[0]),
            targets=tokens, decoder_lengths=None)
        if torch.isfinite(ref):
            _close(ours_op, ref, "masked_token_loss op")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_train_mode_loss_and_gradients(name):
    cfg = _cfg(name, dropout0=True, num_classes=1024)
    nemo, ours = _pair(cfg)
    nemo.train()
    ours.train()
    lengths, N = LENGTH_SETS[0]
    x, n = _audio(lengths, N)
    y, _ = _audio(lengths, N, seed=1)
    noisy = x + 0.5 * y

    torch.manual_seed(7)  # same dither draws (clean, noisy) and mask draw in both
    lp, el, masks, tokens = nemo(input_signal=x.clone(), input_signal_length=n, noisy_input_signal=noisy.clone(),
                                 noisy_input_signal_length=n, apply_mask=True)
    loss_n = nemo.loss(masks=masks, decoder_outputs=lp, targets=tokens, decoder_lengths=el)
    loss_n.backward()

    torch.manual_seed(7)
    loss_o = ours.training_loss(x.clone(), n, noisy.clone(), n)
    loss_o.backward()
    _close(loss_o, loss_n, "train loss")
    grads_n = {k: p.grad for k, p in nemo.named_parameters() if p.requires_grad}
    grads_o = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert sorted(grads_n) == sorted(grads_o)
    for k in grads_n:
        assert grads_n[k] is not None and grads_o[k] is not None, k
        _close(grads_o[k], grads_n[k], f"grad {k}")
    # BN running statistics updated identically
    for (k, a), (_, b) in zip(sorted(nemo.state_dict().items()), sorted(ours.state_dict().items())):
        if "running" in k or "num_batches" in k:
            _close(b.float(), a.float(), k)


def test_nemo_loads_our_state_dict():
    cfg = _cfg("small2")
    torch.manual_seed(3)
    ours = NESTModel(cfg)
    nemo = build_nemo_model(cfg)
    nemo.load_state_dict(ours.state_dict(), strict=True)
    for k, v in nemo.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k


def test_same_seed_same_initial_weights_as_nemo():
    cfg = _cfg("small2")
    torch.manual_seed(11)
    nemo = build_nemo_model(cfg)
    torch.manual_seed(11)
    ours = NESTModel(cfg)
    for k, v in nemo.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k


def test_large_preset_eval_parity():
    """NEST-L as configured (17 layers, d 512, 8 heads) on a short batch."""
    cfg = model_config("large")
    nemo, ours = _pair(cfg)
    nemo.eval()
    ours.eval()
    x, n = _audio((24000, 17001), 24000)
    with torch.no_grad():
        torch.manual_seed(1)
        lp_n, el_n, m_n, t_n = nemo(input_signal=x.clone(), input_signal_length=n, noisy_input_signal=x.clone(),
                                    noisy_input_signal_length=n, apply_mask=True)
        torch.manual_seed(1)
        lp_o, el_o, m_o, t_o = ours(input_signal=x.clone(), input_signal_length=n, noisy_input_signal=x.clone(),
                                    noisy_input_signal_length=n, apply_mask=True)
    assert torch.equal(el_n, el_o) and torch.equal(m_n, m_o) and torch.equal(t_n, t_o)
    for b, e in enumerate(el_n.tolist()):
        _close(lp_o[b, :e], lp_n[b, :e], "large log-probs (valid frames)")


def test_bf16_autocast_parity():
    """Under (CPU) bf16 autocast both models take the same mixed-precision path: same log-probs."""
    nemo, ours = _pair(_cfg("small2"))
    nemo.eval()
    ours.eval()
    x, n = _audio(*LENGTH_SETS[0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        f, fl = nemo.preprocessor(input_signal=x.clone(), length=n)
        e_n, el = nemo.encoder(audio_signal=f, length=fl)
        e_o, _ = ours.encoder(audio_signal=f, length=fl)
        assert e_o.dtype == e_n.dtype
        lp_n, lp_o = nemo.decoder(encoder_output=e_n), ours.decoder(encoder_output=e_o)
    for b, e in enumerate(el.tolist()):
        _close(e_o[b, :, :e], e_n[b, :, :e], "bf16 encoder output")
        _close(lp_o[b, :e], lp_n[b, :e], "bf16 log-probs")
