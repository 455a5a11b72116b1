"""NEST-specific modules: quantizer, masking, decoder, loss."""

from .decoder import MultiSoftmaxDecoder
from .loss import MLMLoss, MultiMLMLoss, masked_token_loss_reference
from .masking import RandomBlockMasking
from .quantizer import RandomProjectionVectorQuantizer

__all__ = ["MultiSoftmaxDecoder", "MLMLoss", "MultiMLMLoss", "RandomBlockMasking", "RandomProjectionVectorQuantizer",
           "masked_token_loss_reference"]
