"""The Vision Transformer (plain torch, single device): model, hybrid stem, position-embedding resampling, presets."""

from pipeline.model.pos_embed import resample_pos_embed
from pipeline.model.presets import PRESETS, build_model, flops_per_image, preset_kwargs
from pipeline.model.vit import VisionTransformer

__all__ = ["PRESETS", "VisionTransformer", "build_model", "flops_per_image", "preset_kwargs", "resample_pos_embed"]
