"""NESTModel: NeMo's ``EncDecDenoiseMaskedTokenPredModel`` as a plain ``nn.Module`` (SPEC §1–§2).

clean audio → log-mel → quantizer tokens; noisy audio → log-mel → block masking → Conformer encoder →
softmax decoder → NLL on the masked tokens. Children, state-dict keys, shapes and dtypes equal NeMo's.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from . import backend
from ._checks import check_audio_and_lengths
from .config import to_container
from .encoder import ConformerEncoder
from .frontend import AudioToMelSpectrogramPreprocessor
from .ssl import MultiMLMLoss, MultiSoftmaxDecoder, RandomBlockMasking, RandomProjectionVectorQuantizer

# keys of NeMo's ``model:`` section that NESTModel itself consumes or knowingly ignores
_MODEL_KEYS = {
    "sample_rate", "num_classes", "num_books", "code_dim", "squeeze_single", "mask_position", "train_ds",
    "validation_ds", "test_ds", "preprocessor", "spec_augment", "masking", "quantizer", "encoder", "decoder", "loss",
    "optim", "dropout_features", "dropout_features_q", "feature_penalty", "target", "nemo_version",
}


def _section(cfg: Mapping[str, Any], name: str, cls) -> Dict[str, Any]:
    if name not in cfg or cfg[name] is None:
        raise ValueError(f"NESTModel config lacks the '{name}' section")
    sec = dict(cfg[name])
    sec.pop("_target_", None)
    import inspect

    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in sec if k not in params]
    if unknown:
        import difflib

        hints = []
        for k in unknown:
            near = difflib.get_close_matches(k, list(params), n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{near[0]}'?)" if near else ""))
        raise ValueError(f"NESTModel: model.{name} has key(s) {', '.join(hints)} that NeMo's {cls.__name__} "
                         f"does not accept")
    return sec


class NESTModel(nn.Module):
    """The denoising masked-token-prediction model.

    ``NESTModel(cfg)`` takes NeMo's ``model:`` section (dict or OmegaConf; ``_target_`` keys tolerated).
    ``forward(input_signal=, input_signal_length=, noisy_input_signal=, noisy_input_signal_length=,
    apply_mask=)`` returns ``(log_probs [B,T,C,H], encoded_len [B], masks [B,F,T_mel], tokens [B,T,H])``.
    For training use :meth:`training_loss`, which on the fast backend never materialises the log-probs.

    ``nemo_init=True`` spends the same torch RNG draws as NeMo's constructor (it builds and discards the
    parent class's first encoder and decoder), so a seeded NESTModel starts from NeMo's initial weights.
    """

    def __init__(self, cfg: Mapping[str, Any], nemo_init: bool = True):
        super().__init__()
        cfg = to_container(cfg)
        if not isinstance(cfg, Mapping):
            raise TypeError(f"NESTModel: cfg must be a mapping (NeMo's model: section), got {type(cfg).__name__}")
        if "model" in cfg and "encoder" not in cfg:
            raise ValueError("NESTModel: pass the config's 'model' section (cfg['model']), not the whole file")
        unknown = [k for k in cfg if k not in _MODEL_KEYS]
        if unknown:
            raise ValueError(f"NESTModel: unknown model config key(s) {unknown}; NeMo's "
                             f"EncDecDenoiseMaskedTokenPredModel accepts {sorted(_MODEL_KEYS)}")
        if cfg.get("mask_position", "pre_conv") != "pre_conv":
            raise ValueError("NESTModel: mask_position must be 'pre_conv' (post_conv is not supported)")
        self.cfg = cfg
        pre = _section(cfg, "preprocessor", AudioToMelSpectrogramPreprocessor)
        enc = _section(cfg, "encoder", ConformerEncoder)
        dec = _section(cfg, "decoder", MultiSoftmaxDecoder)
        los = _section(cfg, "loss", MultiMLMLoss)
        qua = _section(cfg, "quantizer", RandomProjectionVectorQuantizer)
        msk = _section(cfg, "masking", RandomBlockMasking)

        preprocessor = AudioToMelSpectrogramPreprocessor(**pre)
        if nemo_init:  # NeMo's parent constructor: encoder #1 and decoder_ssl, built then thrown away
            ConformerEncoder(**enc)
            MultiSoftmaxDecoder(**dec)
        # NeMo's child constructor builds in this order (it decides the RNG draws) ...
        quantizer = RandomProjectionVectorQuantizer(**qua)
        mask_processor = RandomBlockMasking(**msk)
        encoder = ConformerEncoder(**enc)
        decoder = MultiSoftmaxDecoder(**dec)
        loss = MultiMLMLoss(**los)
        # ... and registers children in this one (it decides the state-dict key order)
        self.preprocessor = preprocessor
        self.encoder = encoder
        self.loss = loss
        self.quantizer = quantizer
        self.mask_processor = mask_processor
        self.decoder = decoder
        if self.quantizer.combine_time_steps != self.encoder.subsampling_factor:
            raise ValueError("NESTModel: quantizer.combine_time_steps must equal encoder.subsampling_factor")
        if self.decoder.feat_in != self.encoder.feat_out:
            raise ValueError(f"NESTModel: decoder.feat_in ({self.decoder.feat_in}) must equal the encoder output "
                             f"size ({self.encoder.feat_out})")

    # ------------------------------------------------------------------ NeMo-compatible forward
    def _features(self, signal, signal_len, processed, processed_len, what: str):
        has_sig = signal is not None and signal_len is not None
        has_proc = processed is not None and processed_len is not None
        if has_sig == has_proc:
            raise ValueError(f"NESTModel: give exactly one of ({what}_signal, {what}_signal_length) and "
                             f"(processed_{what}_signal, processed_{what}_signal_length)")
        if has_sig:
            return self.preprocessor(input_signal=signal, length=signal_len)
        return processed, processed_len

    def encode(self, input_signal=None, input_signal_length=None, processed_signal=None,
               processed_signal_length=None, noise_signal=None, noise_signal_length=None,
               processed_noise_signal=None, processed_noise_signal_length=None, noisy_input_signal=None,
               noisy_input_signal_length=None, processed_noisy_input_signal=None,
               processed_noisy_input_signal_length=None, apply_mask: bool = False):
        """Everything but the decoder: returns ``(encoded [B,D,T], encoded_len, masks, tokens)``."""
        if input_signal is not None and noisy_input_signal is not None:
            if input_signal.dim() == 2 and noisy_input_signal.dim() == 2 and (
                    input_signal.size(0) != noisy_input_signal.size(0)):
                raise ValueError(f"NESTModel: input_signal has batch size {input_signal.size(0)} but "
                                 f"noisy_input_signal has {noisy_input_signal.size(0)}")
        if noisy_input_signal is not None:
            check_audio_and_lengths(noisy_input_signal, noisy_input_signal_length, "noisy_input_signal",
                                    "noisy_input_signal_length")
        if input_signal is not None:
            check_audio_and_lengths(input_signal, input_signal_length, "input_signal", "input_signal_length")
        clean, clean_len = self._features(input_signal, input_signal_length, processed_signal,
                                          processed_signal_length, "input")
        noisy, noisy_len = self._features(noisy_input_signal, noisy_input_signal_length,
                                          processed_noisy_input_signal, processed_noisy_input_signal_length,
                                          "noisy_input")
        if clean.shape[0] != noisy.shape[0] or clean.shape[2] != noisy.shape[2]:
            raise ValueError(f"NESTModel: clean features {tuple(clean.shape)} and noisy features "
                             f"{tuple(noisy.shape)} must have the same batch size and length")
        _, tokens = self.quantizer(input_signal=clean)
        if apply_mask:
            masked, masks = self.mask_processor(input_feats=noisy, input_lengths=noisy_len)
        else:
            masked, masks = noisy, torch.zeros_like(noisy)
        encoded, encoded_len = self.encoder(audio_signal=masked, length=noisy_len)
        return encoded, encoded_len, masks, tokens

    def forward(self, input_signal=None, input_signal_length=None, processed_signal=None,
                processed_signal_length=None, noise_signal=None, noise_signal_length=None,
                processed_noise_signal=None, processed_noise_signal_length=None, noisy_input_signal=None,
                noisy_input_signal_length=None, processed_noisy_input_signal=None,
                processed_noisy_input_signal_length=None, apply_mask: bool = False):
        encoded, encoded_len, masks, tokens = self.encode(
            input_signal, input_signal_length, processed_signal, processed_signal_length, None, None, None, None,
            noisy_input_signal, noisy_input_signal_length, processed_noisy_input_signal,
            processed_noisy_input_signal_length, apply_mask)
        log_probs = self.decoder(encoder_output=encoded)
        return log_probs, encoded_len, masks, tokens

    # ------------------------------------------------------------------ training
    def masked_loss(self, encoded: torch.Tensor, masks: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Decoder + masked-token NLL through the ``masked_token_loss`` op (fused on the fast backend)."""
        conv = self.decoder.decoder_layers[0]
        if tokens.dim() == 2:  # squeeze_single
            tokens = tokens.unsqueeze(-1)
        return backend.dispatch("masked_token_loss", encoded, conv.weight[..., 0], conv.bias, masks, tokens,
                                self.decoder.num_classes, self.decoder.num_decoders,
                                self.loss.mlm_loss.combine_time_steps, self.loss.mlm_loss.mask_threshold)

    def training_loss(self, input_signal, input_signal_length, noisy_input_signal, noisy_input_signal_length,
                      apply_mask: bool = True, **_unused) -> torch.Tensor:
        """The training step's loss: ``MultiMLMLoss(masks, decoder(encoder(...)), tokens)``."""
        encoded, _, masks, tokens = self.encode(input_signal=input_signal, input_signal_length=input_signal_length,
                                                noisy_input_signal=noisy_input_signal,
                                                noisy_input_signal_length=noisy_input_signal_length,
                                                apply_mask=apply_mask)
        return self.masked_loss(encoded, masks, tokens)

    # ------------------------------------------------------------------ utilities
    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def train(self, mode: bool = True):
        super().train(mode)
        # frozen NeMo modules stay in eval mode, as NeMo's freeze() leaves them
        self.quantizer.eval()
        self.mask_processor.eval()
        return self

    def load_nemo_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        """Load a NeMo state dict; drops the dead ``decoder_ssl.*`` of NeMo 2.1–2.2 checkpoints."""
        sd = {k: v for k, v in state_dict.items() if not k.startswith("decoder_ssl.")}
        return self.load_state_dict(sd, strict=strict)


def noam_lr(step: int, d_model: int = 512, warmup_steps: int = 25000, lr: float = 5.0,
            min_lr: float = 1e-6) -> float:
    """NeMo's NoamAnnealing learning rate at optimiser step ``step`` (SPEC §9)."""
    s = max(1, step)
    mult = d_model ** -0.5 * min(s ** -0.5, s * warmup_steps ** -1.5)
    out = lr * mult
    return max(out, min_lr) if s > warmup_steps else out
