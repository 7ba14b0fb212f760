"""Networks: the conditional diffusion U-Net (with its image encoder and attention layers), the baseline U-Net and
MONAI's Attention U-Net."""

from medseg_diff.models.attention import AttentionOutput, LinearAttention3d, MaskPriorCrossAttention
from medseg_diff.models.attention_unet import AttentionUNet, build_attention_unet
from medseg_diff.models.baseline import baseline_stride, build_baseline_unet
from medseg_diff.models.blocks import ResBlock3d, SinusoidalTimeEmbedding, TimeEmbedding
from medseg_diff.models.denoiser import PRIOR_SOURCES, DiffusionSegUNet
from medseg_diff.models.encoder import ImageEncoder, resample_to_grid, sinusoidal_position_embedding
from medseg_diff.models.types import Conditioning, DenoiserOutput, count_parameters

__all__ = [
    "PRIOR_SOURCES",
    "AttentionOutput",
    "AttentionUNet",
    "Conditioning",
    "DenoiserOutput",
    "DiffusionSegUNet",
    "ImageEncoder",
    "LinearAttention3d",
    "MaskPriorCrossAttention",
    "ResBlock3d",
    "SinusoidalTimeEmbedding",
    "TimeEmbedding",
    "baseline_stride",
    "build_attention_unet",
    "build_baseline_unet",
    "count_parameters",
    "resample_to_grid",
    "sinusoidal_position_embedding",
]
