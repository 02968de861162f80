"""U^2-Net-p salient-object masks on onnxruntime (the model rembg uses; its pre-processing:
320 x 320, scaled by the photo's maximum, ImageNet mean and std; the first output, min-max scaled)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fashionlens.data.crops.model_files import model_path

SIZE = 320
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        from fashionlens.errors import UserError

        raise UserError("the saliency crop needs onnxruntime: pip install 'fashionlens[crop]'") from None
    return onnxruntime


class SaliencyModel:
    """Loaded on first use (a pickled copy, in a worker, loads its own)."""

    def __init__(self, threads: int = 1):
        self.threads, self._session = threads, None

    def __getstate__(self):
        return {"threads": self.threads, "_session": None}

    def check(self) -> None:
        """Fail now if onnxruntime or the model file is missing (fetching it once, here)."""
        _onnxruntime()
        model_path("u2netp.onnx")

    def _load(self):
        if self._session is None:
            ort = _onnxruntime()
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = self.threads
            self._session = ort.InferenceSession(str(model_path("u2netp.onnx")), options,
                                                 providers=["CPUExecutionProvider"])
        return self._session

    def mask(self, img: Image.Image) -> np.ndarray:
        """(H, W) float saliency in [0, 1], the photo's size."""
        session = self._load()
        x = np.asarray(img.resize((SIZE, SIZE), Image.LANCZOS), np.float32)
        x = (x / max(float(x.max()), 1e-6) - MEAN) / STD
        out = session.run(None, {session.get_inputs()[0].name: x.transpose(2, 0, 1)[None]})[0][0, 0]
        lo, hi = float(out.min()), float(out.max())
        out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
        return np.asarray(Image.fromarray(out.astype(np.float32), mode="F").resize(img.size, Image.BILINEAR))


def plain_backdrop_box(img: Image.Image, ring: float = 0.03, flat: float = 10.0, differs: float = 40.0,
                       min_share: float = 0.01) -> tuple[int, int, int, int] | None:
    """The box of what differs from a plain backdrop: when the photo's outer ring (``ring`` of each
    side) is one colour (per-channel standard deviation <= ``flat``), the pixels more than
    ``differs`` away from it (any channel), opened by a 3 x 3 square against JPEG noise. A product
    shot on a studio backdrop is found so in about a millisecond, where U^2-Net-p takes half a
    second; None when the ring is not plain or too little differs (then the saliency model decides)."""
    from scipy import ndimage

    arr = np.asarray(img.convert("RGB"), np.int16)
    h, w = arr.shape[:2]
    t, s = max(1, int(h * ring)), max(1, int(w * ring))
    border = np.concatenate([arr[:t].reshape(-1, 3), arr[-t:].reshape(-1, 3), arr[:, :s].reshape(-1, 3),
                             arr[:, -s:].reshape(-1, 3)])
    if float(border.std(0).max()) > flat:
        return None
    fg = np.abs(arr - np.median(border, 0)).max(2) > differs
    fg = ndimage.binary_opening(fg, structure=np.ones((3, 3), bool))
    if fg.mean() < min_share:
        return None
    ys, xs = np.nonzero(fg)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
