"""Build NeMo 3.0.0's NEST model (the oracle) from the same config as ours. Test-only: NeMo never runs in
nest_fast itself."""

from __future__ import annotations

import copy
import logging
import os
import warnings

os.environ.setdefault("NEMO_TESTING", "1")


def nemo_available() -> bool:
    try:
        import nemo  # noqa: F401
        from nemo.collections.asr.models import EncDecDenoiseMaskedTokenPredModel  # noqa: F401
    except Exception:  # pragma: no cover
        return False
    return True


def quiet_nemo():
    try:
        from nemo.utils import logging as nemo_logging

        nemo_logging.setLevel(logging.ERROR)
    except Exception:
        pass
    warnings.filterwarnings("ignore")


def build_nemo_model(model_cfg: dict):
    """EncDecDenoiseMaskedTokenPredModel from a resolved ``model:`` dict (datasets stripped)."""
    from omegaconf import OmegaConf
    from nemo.collections.asr.models import EncDecDenoiseMaskedTokenPredModel

    quiet_nemo()
    cfg = copy.deepcopy(model_cfg)
    for k in ("train_ds", "validation_ds", "test_ds"):
        cfg.pop(k, None)
    return EncDecDenoiseMaskedTokenPredModel(cfg=OmegaConf.create(cfg))
