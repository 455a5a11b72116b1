"""nest_fast: a fast, faithful, standalone implementation of NVIDIA NeMo's NEST speech pre-training.

``import nest_fast`` needs only torch, numpy and PyYAML: Triton kernels, the C++/CUDA frontend,
Lightning, DALI and soundfile are imported where they are used.
"""

from .backend import dispatch, get_backend, set_backend, use_backend
from .config import PRESETS, apply_overrides, load_config, model_config
from .encoder import ConformerEncoder
from .frontend import AudioToMelSpectrogramPreprocessor, FilterbankFeatures
from .model import NESTModel, noam_lr
from .ssl import MLMLoss, MultiMLMLoss, MultiSoftmaxDecoder, RandomBlockMasking, RandomProjectionVectorQuantizer

__version__ = "0.1.0"

__all__ = [
    "NESTModel", "ConformerEncoder", "AudioToMelSpectrogramPreprocessor", "FilterbankFeatures",
    "RandomProjectionVectorQuantizer", "RandomBlockMasking", "MultiSoftmaxDecoder", "MultiMLMLoss", "MLMLoss",
    "load_config", "model_config", "apply_overrides", "PRESETS", "set_backend", "get_backend", "use_backend",
    "dispatch", "noam_lr", "__version__",
]
