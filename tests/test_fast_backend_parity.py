"""The whole NEST model on the fast backend (every kernel: mel frontend op, Triton attention, conv module,
masked loss — Triton through its interpreter on CPU) against NeMo 3.0.0 itself.

Tolerances (fp32): the kernels accumulate in a different order than cuBLAS/ATen, so values agree to float32
rounding, not bit for bit: features ≤ 1e-4 abs (C++ FFT vs torch.stft), log-probs / loss / gradients ≤ 1e-4
relative to each tensor's max magnitude.
"""

import pytest
import torch

import nest_fast
from nest_fast import NESTModel, backend, model_config

from nemo_oracle import build_nemo_model, nemo_available

pytestmark = [pytest.mark.nemo]
if not nemo_available():
    pytest.fail("nemo-toolkit[asr]==3.0.0 is not importable; install the test requirements", pytrace=False)

REL = 1e-4


def _cfg():
    cfg = model_config("small", n_layers=1, d_model=32, n_heads=2, conv_kernel_size=9)
    cfg["num_classes"] = cfg["quantizer"]["num_classes"] = cfg["decoder"]["num_classes"] = 64
    cfg["masking"]["block_size"] = 12  # short audio: blocks must fit, so some tokens get masked
    cfg["masking"]["mask_prob"] = 0.05
    for k in ("dropout", "dropout_pre_encoder", "dropout_emb", "dropout_att"):
        cfg["encoder"][k] = 0.0
    return cfg


def _rel(a, b, what, rel=REL):
    a, b = a.detach().double(), b.detach().double()
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
    assert err <= rel, f"{what}: max error {err:.2e} of max |ref|"
    return err


def _audio():
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([12800, 9300])
    x = 0.1 * torch.randn(2, 12800, generator=g)
    y = 0.1 * torch.randn(2, 12800, generator=g)
    x[1, 9300:] = 0
    y[1, 9300:] = 0
    return x, x + 0.5 * y, lens


def test_all_fast_ops_are_used():
    cfg = _cfg()
    m = NESTModel(cfg).eval()
    x, noisy, n = _audio()
    feats, fl = m.preprocessor(input_signal=x, length=n)
    assert backend.fast_impl("mel_frontend") is not None, "C++ mel frontend extension not built"
    with nest_fast.use_backend("fast"):
        assert backend.will_use_fast("mel_frontend", m.preprocessor.featurizer, x, n)
        for op in ("rel_pos_attention", "conv_module", "masked_token_loss"):
            assert backend.fast_impl(op) is not None, op


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts calls that really reached each fast implementation."""
    counts = {}
    for op in backend.OPS:
        fn = backend.fast_impl(op)
        assert fn is not None, f"fast {op} not importable"

        def wrapped(*a, _fn=fn, _op=op, **k):
            counts[_op] = counts.get(_op, 0) + 1
            return _fn(*a, **k)

        wrapped.supports = getattr(fn, "supports", None) or (lambda *a, **k: True)
        monkeypatch.setitem(backend._fast_cache, op, wrapped)
    return counts


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fast_model_matches_nemo(mode, fast_calls):
    cfg = _cfg()
    torch.manual_seed(0)
    nemo = build_nemo_model(cfg)
    with torch.no_grad():
        for layer in nemo.encoder.layers:
            layer.self_attn.pos_bias_u.normal_(0, 0.2)
            layer.self_attn.pos_bias_v.normal_(0, 0.2)
            layer.conv.batch_norm.running_var.uniform_(0.5, 1.5)
    ours = NESTModel(cfg, nemo_init=False)
    ours.load_state_dict(nemo.state_dict())
    getattr(nemo, mode)()
    getattr(ours, mode)()
    for fe in (nemo.preprocessor.featurizer, ours.preprocessor.featurizer):
        fe.dither = 0.0  # the fast frontend draws its own dither: compare without it
    x, noisy, n = _audio()

    torch.manual_seed(3)
    lp, el, masks, tokens = nemo(input_signal=x.clone(), input_signal_length=n, noisy_input_signal=noisy.clone(),
                                 noisy_input_signal_length=n, apply_mask=True)
    loss_n = nemo.loss(masks=masks, decoder_outputs=lp, targets=tokens, decoder_lengths=el)
    assert torch.isfinite(loss_n), "no masked token in this batch: pick another seed"
    with nest_fast.use_backend("fast"):
        torch.manual_seed(3)
        enc, el_o, masks_o, tokens_o = ours.encode(input_signal=x.clone(), input_signal_length=n,
                                                   noisy_input_signal=noisy.clone(), noisy_input_signal_length=n,
                                                   apply_mask=True)
        assert torch.equal(masks_o, masks) and torch.equal(el_o, el)
        assert torch.equal(tokens_o, tokens), "tokens differ (features from the fast frontend drifted)"
        loss_o = ours.masked_loss(enc, masks_o, tokens_o)
        lp_o = ours.decoder(encoder_output=enc)
    assert set(fast_calls) == set(backend.OPS), f"fast ops actually run: {fast_calls}"
    for b, e in enumerate(el.tolist()):
        _rel(lp_o[b, :e], lp[b, :e], "log-probs")
    _rel(loss_o, loss_n, "loss")
    if mode == "train":
        loss_n.backward()
        loss_o.backward()
        gn = dict(nemo.named_parameters())
        for k, p in ours.named_parameters():
            if not p.requires_grad:
                continue
            if k.endswith("depthwise_conv.bias") or k.endswith("linear_k.bias"):
                # exact gradient 0: batch-statistics BN removes any per-channel constant, and softmax over keys
                # ignores a key bias (it shifts every score of a query equally). Both sides hold rounding noise:
                # bound it against the matching weight's gradient scale instead.
                scale = gn[k.replace(".bias", ".weight")].grad.abs().max().item()
                assert (p.grad - gn[k].grad).abs().max().item() <= REL * scale, k
                continue
            _rel(p.grad, gn[k].grad, f"grad {k}")
        sd_n = nemo.state_dict()
        for k, v in ours.state_dict().items():
            if "running" in k:
                _rel(v, sd_n[k], k)
