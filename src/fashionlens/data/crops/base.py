"""The crop stage before the letterbox: a photo in, the box of what to embed out.

A :class:`Cropper` (one registered class per ``--crop`` method, in :mod:`.methods`) gives a
:class:`CropBox` for a photo and an optional region hint (a catalog item's region, from its metadata
through :class:`~.regions.RegionMap`; None for a query). The box is kept with the item and returned
with each query's results, so that what was embedded can be shown.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from PIL import Image

from fashionlens.registry import Registry


@dataclass(frozen=True)
class CropBox:
    x0: int
    y0: int
    x1: int  # exclusive
    y1: int
    method: str  # "pose", "backdrop", "saliency" or "whole": what found it
    region: str  # "upper", "lower", "dress", "shoes", "person", "object" or "whole"
    size: tuple[int, int] = (0, 0)  # the photo's (width, height): what the box is in

    @classmethod
    def whole(cls, img: Image.Image) -> CropBox:
        return cls(0, 0, img.width, img.height, "whole", "whole", img.size)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"box": [d.pop("x0"), d.pop("y0"), d.pop("x1"), d.pop("y1")], **d, "size": list(self.size)}

    @classmethod
    def from_dict(cls, d: dict) -> CropBox:
        x0, y0, x1, y1 = (int(v) for v in d["box"])
        return cls(x0, y0, x1, y1, str(d["method"]), str(d["region"]), tuple(int(v) for v in d.get("size", (0, 0))))


class Cropper:
    """A crop method. Models load on first use; pickled copies (DataLoader workers, Ray actors)
    load their own."""

    name = "none"

    def region_for(self, metadata: dict | None) -> str | None:
        """The region hint of a catalog item with this ``metadata`` (None: decide from the photo)."""
        return None

    def box(self, img: Image.Image, region: str | None = None) -> CropBox:
        return CropBox.whole(img)

    def __call__(self, img: Image.Image, region: str | None = None) -> tuple[Image.Image, CropBox]:
        box = replace(self.box(img, region), size=img.size)
        if (box.x0, box.y0, box.x1, box.y1) == (0, 0, img.width, img.height):
            return img, box
        return img.crop((box.x0, box.y0, box.x1, box.y1)), box


CROPPERS: Registry[type[Cropper]] = Registry("crop method", "fashionlens.data.crops.methods")
CropName = CROPPERS.setting()


def build_cropper(name: str, regions: str | None = None) -> Cropper | None:
    """The cropper named ``name``; None for ``none`` (nothing to do)."""
    if CROPPERS.canonical(name) == "none":
        return None
    return CROPPERS.get(name)(regions=regions)
