"""The crop stage (thesis A's detection step): person pose and salient-object models cut a photo
to its garment before the letterbox. See :mod:`.base` and :mod:`.methods.pose_and_saliency`."""

from fashionlens.data.crops.base import CROPPERS, CropBox, Cropper, CropName, build_cropper

__all__ = ["CROPPERS", "CropBox", "CropName", "Cropper", "build_cropper"]
