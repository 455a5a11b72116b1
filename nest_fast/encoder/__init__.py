"""Fast-Conformer encoder: subsampling, relative-position attention, Conformer layers."""

from .attention import RelPositionalEncoding, RelPositionMultiHeadAttention, rel_pos_attention_reference, rel_shift
from .conformer import CausalConv1D, ConformerConvolution, ConformerFeedForward, ConformerLayer, conv_module_reference
from .encoder import ConformerEncoder
from .subsampling import ConvSubsampling, MaskedConvSequential

__all__ = ["ConformerEncoder", "ConformerLayer", "ConformerConvolution", "ConformerFeedForward", "CausalConv1D",
           "RelPositionalEncoding", "RelPositionMultiHeadAttention", "ConvSubsampling", "MaskedConvSequential",
           "rel_pos_attention_reference", "conv_module_reference", "rel_shift"]
