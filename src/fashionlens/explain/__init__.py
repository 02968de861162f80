"""Looking inside a trained model: the attention maps of its local alignment branches."""

from fashionlens.explain.attention import attention_masks, attention_sheet, masked_images

__all__ = ["attention_masks", "attention_sheet", "masked_images"]
