"""Many photos decoded and preprocessed in DataLoader worker processes: (key, path) pairs in,
batches of tensors out; unreadable files come out as errors beside the batch and never stop
the stream (a run over millions of photos meets a few broken ones)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from fashionlens.data.images import ImageError, open_image
from fashionlens.errors import UserError


def open_cut(path, size: int, cropper=None, region: str | None = None):
    """``(image, crop box as a dict or None)`` of one photo: decoded at a draft size near ``size``
    (the letterbox), or whole and cut by ``cropper`` to ``region``. Raises :class:`ImageError`."""
    img = open_image(path, draft_size=None if cropper else size)
    if cropper is None:
        return img, None
    img, box = cropper(img, region)
    return img, box.to_dict()


def decode_one(path, preprocess, cropper=None, region: str | None = None):
    """``(tensor, crop box as a dict or None)`` of one photo (:func:`open_cut`, then ``preprocess``)."""
    img, box = open_cut(path, preprocess.size, cropper, region)
    return preprocess(img), box


class _Decode(Dataset):
    def __init__(self, rows: Sequence[tuple], preprocess, cropper=None):
        self.rows, self.preprocess, self.cropper = rows, preprocess, cropper

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        key, path, *region = self.rows[i]
        try:
            return key, *decode_one(path, self.preprocess, self.cropper, region[0] if region else None), None
        except ImageError as exc:
            return key, None, None, str(exc)
        except UserError:  # the run's own setting (a crop model that cannot load): not this photo's fault
            raise
        except Exception as exc:  # a codec bug must not end a run of millions of images
            return key, None, None, f"{path}: cannot decode ({type(exc).__name__}: {exc})"


def _collate(samples):
    ok = [(k, t, b) for k, t, b, e in samples if e is None]
    errors = [(k, e) for k, _, _, e in samples if e is not None]
    keys = [k for k, _, _ in ok]
    batch = torch.stack([t for _, t, _ in ok]) if ok else None
    return keys, batch, errors, [b for _, _, b in ok]


def decode_batches(rows: Sequence[tuple], preprocess, batch_size: int = 16, workers: int = 1,
                   pin_memory: bool = False, cropper=None
                   ) -> Iterator[tuple[list, torch.Tensor | None, list[tuple[object, str]], list[dict | None]]]:
    """``(keys, preprocessed batch or None, errors, crop boxes)`` for ``rows`` of (key, path) or
    (key, path, region), in order; decoding (and the crop, by ``cropper``) runs in ``workers``
    DataLoader processes (0 = in this process)."""
    yield from DataLoader(
        _Decode(rows, preprocess, cropper), batch_size=batch_size, num_workers=workers,
        collate_fn=_collate, prefetch_factor=4 if workers else None,
        persistent_workers=False, pin_memory=pin_memory,
    )
