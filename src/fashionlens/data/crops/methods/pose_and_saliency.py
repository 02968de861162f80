"""``none``, ``person``, ``garment`` and ``auto``.

* ``person``: the person's box (landmarks, widened to the person mask); the whole photo without one.
* ``garment``: the garment's region of a photo with a person: the item's region for a catalog
  photo (its metadata, :mod:`..regions`), for a query what the photo shows
  (:func:`~..regions.shown_region`); the whole photo without a person.
* ``auto``: ``garment`` for a photo with a person; without one, the box of what differs from a
  plain backdrop (studio product shots) or else of the salient object's largest region (flat lays,
  hangers, cluttered product shots); the whole photo when none is found.
"""

from __future__ import annotations

from PIL import Image

from fashionlens.data.crops.base import CROPPERS, Cropper, CropBox
from fashionlens.data.crops.pose import PoseModel
from fashionlens.data.crops.regions import region_box, region_map, shown_region
from fashionlens.data.crops.saliency import SaliencyModel, plain_backdrop_box
from fashionlens.data.masks import largest_box

MIN_OBJECT = 0.01  # of the photo: a smaller salient region is no object


@CROPPERS.register("none")
class NoCrop(Cropper):
    def __init__(self, regions: str | None = None):
        pass


@CROPPERS.register("person")
class PersonCrop(Cropper):
    name = "person"

    def __init__(self, regions: str | None = None):
        self.regions = regions
        self.pose = PoseModel()
        self.pose.check()
        region_map(regions)  # a bad region file fails now

    def region_for(self, metadata: dict | None) -> str | None:
        """A catalog item's region (by its metadata and the region map)."""
        return region_map(self.regions).region_of(metadata)

    def _region(self, person, img: Image.Image, region: str | None) -> str:
        return "person"

    def _no_person(self, img: Image.Image) -> CropBox:
        return CropBox.whole(img)

    def box(self, img: Image.Image, region: str | None = None) -> CropBox:
        person = self.pose.find(img)
        if person is None:
            return self._no_person(img)
        region = self._region(person, img, region)
        if region == "whole":
            return CropBox.whole(img)
        found = region_box(person, region, img.size)
        return CropBox(*found, "pose", region) if found else self._no_person(img)


@CROPPERS.register("garment")
class GarmentCrop(PersonCrop):
    name = "garment"

    def _region(self, person, img: Image.Image, region: str | None) -> str:
        return shown_region(person, img.size) if region is None else region


@CROPPERS.register("auto")
class AutoCrop(GarmentCrop):
    name = "auto"

    def __init__(self, regions: str | None = None):
        super().__init__(regions)
        self.saliency = SaliencyModel()
        self.saliency.check()

    def _no_person(self, img: Image.Image) -> CropBox:
        plain = plain_backdrop_box(img)  # a studio shot: its backdrop's colour says it, 50x faster
        if plain is not None:
            return CropBox(*plain, "backdrop", "object")
        mask = self.saliency.mask(img)
        found = largest_box((mask >= 0.5).astype("float32"), 1.0) if float(mask.max()) >= 0.5 else None
        if found is None or (found[2] - found[0]) * (found[3] - found[1]) < MIN_OBJECT * img.width * img.height:
            return CropBox.whole(img)
        return CropBox(*found, "saliency", "object")
