"""BlazePose (MediaPipe's pose detector + full landmark model) and its person mask, on LiteRT.

Written by hand: MediaPipe's own graph runs them only with numpy 1.x, so the outputs are decoded
here as its calculators do (``pose_detection_cpu`` / ``pose_landmark_by_roi`` 0.10.21):

* detector (224 x 224, letterboxed, RGB in [-1, 1]): 2,254 SSD anchors (strides 8, 16, 32, 32, 32;
  two per cell; fixed size 1), regressors ``(x, y, w, h, 4 keypoints)`` / 224 relative to the
  anchor, sigmoid scores; the best above ``min_score`` is the person. Keypoint 0 is the hips' centre,
  keypoint 1 the end of the vector whose length is the body's radius.
* region of interest: centred on the hips, side 2 x 1.25 x that radius, turned so that the vector
  points up (``AlignmentPointsRectsCalculator`` + ``RectTransformationCalculator``).
* landmarks (256 x 256 crop of that square, RGB in [0, 1]): 39 x (x, y, z, visibility, presence) in
  crop pixels, mapped back to the photo; the first 33 are the body's landmarks.
* selfie segmentation (256 x 256, the whole photo, RGB in [0, 1]): a person probability per pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fashionlens.data.crops.model_files import model_path

DET, LMK, SEG = 224, 256, 256
MODELS = ("pose_detection.tflite", "pose_landmark_full.tflite", "selfie_segmentation.tflite")
# MediaPipe keeps detections from 0.5; on the catalog's studio shots of shoes the detector fires at
# 0.52-0.67 (and the landmark model agrees), on real people at 0.84 and more (p10 of 40 catalog
# model shots and 40 street photos). A person must also stand on its own mask: the person mask at its
# visible landmarks averages >= 0.89 on real people (p10), 0 on those shoes (median).
MIN_SCORE, MIN_PRESENCE, MIN_ON_MASK = 0.75, 0.5, 0.5


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, np.float64), -60.0, 60.0)))


def ssd_anchors(size: int = DET, strides=(8, 16, 32, 32, 32), per_layer: int = 2) -> np.ndarray:
    """(2254, 2) anchor centres in [0, 1], in the order of the detector's outputs (layers of one
    stride merged; per cell row-major, then the anchors of the cell)."""
    out, i = [], 0
    while i < len(strides):
        stride, n = strides[i], 0
        while i < len(strides) and strides[i] == stride:
            n, i = n + per_layer, i + 1
        cells = math.ceil(size / stride)
        ys, xs = np.mgrid[0:cells, 0:cells]
        centres = np.stack([(xs + 0.5) / cells, (ys + 0.5) / cells], -1).reshape(-1, 1, 2)
        out.append(np.repeat(centres, n, axis=1).reshape(-1, 2))
    return np.concatenate(out).astype(np.float32)


@dataclass
class Person:
    score: float  # the detector's
    presence: float  # the landmark model's "a pose is here"
    landmarks: np.ndarray  # (33, 3): x, y in photo pixels, visibility in [0, 1]
    mask: np.ndarray | None  # (H, W) float person probability, the photo's size


def _litert():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from fashionlens.errors import UserError

        raise UserError("the pose crop needs LiteRT: pip install 'fashionlens[crop]'") from None
    return Interpreter


def _interpreter(name: str):
    it = _litert()(model_path=str(model_path(name)), num_threads=1)
    it.allocate_tensors()
    return it


def _run(it, x: np.ndarray) -> list[np.ndarray]:
    it.set_tensor(it.get_input_details()[0]["index"], x[None].astype(np.float32))
    it.invoke()
    return [it.get_tensor(d["index"]) for d in it.get_output_details()]


class PoseModel:
    """The three models, loaded on first use (so that a pickled copy, in a worker, loads its own)."""

    def __init__(self, with_mask: bool = True):
        self.with_mask = with_mask
        self._models = None

    def __getstate__(self):
        return {"with_mask": self.with_mask, "_models": None}

    def check(self) -> None:
        """Fail now, in the calling process, if the runtime or a model file is missing (fetching
        the files once here, not in every worker)."""
        _litert()
        for name in MODELS:
            model_path(name)

    def _load(self):
        if self._models is None:
            det, lmk, seg = MODELS
            self._models = (_interpreter(det), _interpreter(lmk), _interpreter(seg) if self.with_mask else None,
                            ssd_anchors())
        return self._models

    def find(self, img: Image.Image) -> Person | None:
        """The most confident person of an RGB photo, or None."""
        det, lmk, seg, anchors = self._load()
        w, h = img.size
        scale = DET / max(w, h)
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        px, py = (DET - sw) // 2, (DET - sh) // 2
        canvas = np.zeros((DET, DET, 3), np.float32)
        canvas[py:py + sh, px:px + sw] = np.asarray(img.resize((sw, sh), Image.BILINEAR), np.float32) / 127.5 - 1.0
        boxes, scores = _run(det, canvas)
        scores = _sigmoid(scores[0, :, 0])
        best = int(scores.argmax())
        if scores[best] < MIN_SCORE:
            return None
        raw = boxes[0, best]
        keypoints = raw[4:12].reshape(4, 2) / DET + anchors[best]  # in the 224 canvas, [0, 1]
        keypoints = (keypoints * DET - (px, py)) / scale  # in photo pixels
        (hx, hy), (ex, ey) = keypoints[0], keypoints[1]
        side = 2.0 * math.hypot(ex - hx, ey - hy) * 1.25
        if side < 2:
            return None
        turn = math.pi / 2 - math.atan2(-(ey - hy), ex - hx)
        turn = (turn + math.pi) % (2 * math.pi) - math.pi
        cos, sin = math.cos(turn), math.sin(turn)
        s = side / LMK  # PIL's affine maps each output pixel to the photo
        coeffs = (s * cos, -s * sin, hx - side / 2 * (cos - sin), s * sin, s * cos, hy - side / 2 * (sin + cos))
        crop = img.transform((LMK, LMK), Image.AFFINE, coeffs, resample=Image.BILINEAR)
        out = _run(lmk, np.asarray(crop, np.float32) / 255.0)
        values = next(o for o in out if o.shape == (1, 195)).reshape(39, 5)[:33]
        presence = float(next(o for o in out if o.shape == (1, 1)).ravel()[0])
        if presence < MIN_PRESENCE:
            return None
        u, v = values[:, 0] / LMK - 0.5, values[:, 1] / LMK - 0.5
        xs = hx + side * (cos * u - sin * v)
        ys = hy + side * (sin * u + cos * v)
        landmarks = np.stack([xs, ys, _sigmoid(values[:, 3])], 1).astype(np.float32)
        mask = None
        if seg is not None:
            small = np.asarray(img.resize((SEG, SEG), Image.BILINEAR), np.float32) / 255.0
            prob = _run(seg, small)[0][0, :, :, 0]
            mask = np.asarray(Image.fromarray(prob.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
            seen = (landmarks[:, 2] >= 0.5) & (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
            if not seen.any() or float(mask[ys[seen].astype(int), xs[seen].astype(int)].mean()) < MIN_ON_MASK:
                return None
        return Person(float(scores[best]), presence, landmarks, mask)
