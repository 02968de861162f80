"""Class activation maps, the box of their largest region, and the features under a box.

Grad-CAM (Selvaraju et al. 2017). For a target layer with output T (N, K, h, w) and a logit
y_c, the channel weights are the spatially averaged gradients
``alpha_k = mean_ij dy_c / dT_k(i, j)`` and the map is ``ReLU(sum_k alpha_k T_k)``, min-max
scaled to [0, 1] and resized to the input image.

For a head ``y = W GAP(T) + b`` the gradient is a constant, ``dy_c / dT_k(i, j) = W[c, k] / (h w)``,
so ``alpha_k = W[c, k] / (h w)`` and ``cam_c = ReLU(sum_k W[c, k] T_k / (h w))`` (the classic
CAM of Zhou et al. 2016, up to the positive factor ``1 / (h w)``, which the min-max scaling
removes anyway). :func:`linear_gap_cams` uses this closed form; :func:`grad_cams` asks the
``grad-cam`` library; both give the same maps.

* :func:`region_mask` / :func:`largest_region_box` - threshold a map at a fraction of its
  peak and keep the largest 8-connected region (its mask / its [x, y, w, h] box).
* :func:`roi_features` - torchvision's RoI max pooling of a feature map under boxes given in
  input-image pixels; :func:`pooled_vector` - one L2-normalised vector per box.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torchvision.ops import roi_pool

from fashionlens.data.masks import largest_box
from fashionlens.data.masks import largest_label as _largest_label

Box = tuple[int, int, int, int]


def region_mask(cam: np.ndarray, threshold: float = 0.5) -> np.ndarray | None:
    """Bool (H, W) mask of the largest 8-connected region where ``cam >= threshold * cam.max()``.

    Largest = most pixels; ties go to the larger sum of ``cam`` over the region, then to the
    lowest scipy label (first region met in row-major order). None when the map has no
    positive, finite peak (all zero, all negative, or any NaN / inf).
    """
    found = _largest_label(cam, threshold)
    return None if found is None else found[0] == found[1]


def largest_region_box(cam: np.ndarray, threshold: float = 0.5) -> Box | None:
    """``(x, y, w, h)`` in pixels of ``cam`` (inclusive extents: ``w = x_max - x_min + 1``) of
    the region chosen by :func:`region_mask`; None when there is none."""
    found = largest_box(cam, threshold)
    return None if found is None else (found[0], found[1], found[2] - found[0], found[3] - found[1])


def roi_features(feature_map: torch.Tensor, boxes: torch.Tensor, batch_index: torch.Tensor | None,
                 image_size: tuple[int, int], output_size: int = 7) -> torch.Tensor:
    """RoI max pooling (``torchvision.ops.roi_pool``) of ``feature_map`` (N, C, h, w) under
    ``boxes`` (K, 4) ``[x, y, w, h]`` in pixels of the model's input of ``image_size`` =
    (height, width); ``batch_index`` (K,) picks each box's image (None: all image 0).
    Returns (K, C, output_size, output_size).

    Which cells torchvision takes (CPU and CUDA kernels, float32 arithmetic): with
    ``s = h / height``, ``x1 = x``, ``x2 = x + w``, it uses ``c1 = round(x1 * s)`` and
    ``c2 = round(x2 * s)`` with C ``round`` (halves away from zero, unlike Python's ``round``),
    and treats ``c2`` as *inclusive*: the RoI spans ``n = max(c2 - c1 + 1, 1)`` cells. So a box
    whose right edge lies on a cell boundary takes one more cell (clipped at the map border).
    Output bin p covers cells ``c1 + floor(p * n / S)`` to ``c1 + ceil((p + 1) * n / S)``
    (end exclusive; ``n / S`` in float32), clipped to the map; an empty bin is 0. Rows alike.
    """
    if feature_map.ndim != 4 or boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"need feature_map (N, C, h, w) and boxes (K, 4), got "
                         f"{tuple(feature_map.shape)} and {tuple(boxes.shape)}")
    height, width = image_size
    scale = feature_map.shape[2] / height
    if abs(feature_map.shape[3] / width - scale) > 1e-6:
        raise ValueError(f"feature map {tuple(feature_map.shape[2:])} is not a uniform scaling "
                         f"of the image size {tuple(image_size)}")
    if batch_index is None:
        batch_index = torch.zeros(len(boxes), dtype=torch.long)
    _check_batch_index(batch_index, len(boxes), len(feature_map))
    boxes = boxes.to(device=feature_map.device, dtype=feature_map.dtype)
    index = batch_index.to(device=feature_map.device, dtype=feature_map.dtype)
    rois = torch.cat([index[:, None], boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)
    return roi_pool(feature_map, rois, output_size, spatial_scale=scale)


def _check_batch_index(batch_index: torch.Tensor, boxes: int, images: int) -> None:
    # The kernel does not check the image index: one out of range would read past the map.
    inside = bool(((batch_index >= 0) & (batch_index < images)).all())
    if batch_index.shape != (boxes,) or not inside:
        raise ValueError(f"batch_index must hold {boxes} indices in [0, {images})")


def pooled_vector(roi: torch.Tensor) -> torch.Tensor:
    """(K, C, s, s) RoI features -> (K, C): mean over the s x s cells, L2-normalised."""
    return F.normalize(roi.mean(dim=(2, 3)), dim=1)


def grad_cams(model: torch.nn.Module, target_layer: torch.nn.Module, images: torch.Tensor,
              columns: list[int]) -> np.ndarray:
    """Grad-CAM of logit ``columns[n]`` of ``model(images)`` for each image n, at
    ``target_layer``'s output, by ``pytorch_grad_cam.GradCAM``: float32 (N, H, W) in [0, 1].

    Side effects undone here: the library puts the model in eval mode (every module's mode
    is restored afterwards), needs the target output to require grad (parameters are made
    trainable for the call, their flags restored), and zeroes / fills the parameters'
    ``.grad`` (the previous ``.grad`` tensors are put back).
    """
    if len(columns) != len(images):
        raise ValueError(f"need one column per image, got {len(columns)} for {len(images)} images")
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    modes = [(m, m.training) for m in model.modules()]
    cam = None
    try:
        for p in params:
            p.requires_grad_(True)
        cam = GradCAM(model=model, target_layers=[target_layer])
        targets = [ClassifierOutputTarget(int(c)) for c in columns]
        with torch.enable_grad():
            maps = cam(input_tensor=images, targets=targets)
    finally:
        # Not ``with GradCAM(...)``: its __exit__ swallows IndexError (prints it, returns None).
        if cam is not None:
            cam.activations_and_grads.release()
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
        for m, training in modes:
            m.training = training
    return np.asarray(maps, dtype=np.float32)


def linear_gap_cams(feature_map: torch.Tensor, weight: torch.Tensor,
                    columns: torch.Tensor | Sequence[int], size: tuple[int, int] | None) -> np.ndarray:
    """Grad-CAM in closed form for a ``Linear(GAP(T))`` head: float32 (N, M, H, W) in [0, 1],
    one map per image and per entry of ``columns`` (M of them).

    ``feature_map`` is T (N, K, h, w), ``weight`` the Linear's (total_columns, K) weight;
    ``size`` = (height, width) of the input image to resize to, None = keep (h, w).

    Exact, not an approximation: the gradient of a GAP + linear logit with respect to T is
    the constant ``W[c, k] / (h w)`` (see the module docstring), so the Grad-CAM weights need
    no backward pass. It exists because one forward then yields the maps of all attributes at
    once, where the library needs one forward + backward per attribute. Written by hand
    because no library computes CAMs for many classes from one feature map; the scaling
    is the library's own ``scale_cam_image``, applied as ``BaseCAM`` does, so the maps equal
    :func:`grad_cams`.
    """
    n, _, h, w = feature_map.shape
    cols = torch.as_tensor(columns, dtype=torch.long, device=weight.device)
    alpha = weight.detach()[cols].to(feature_map) / (h * w)  # (M, K)
    cams = torch.relu(torch.einsum("mk,nkij->nmij", alpha, feature_map.detach()))
    flat = cams.cpu().numpy().astype(np.float32).reshape(n * len(cols), h, w)
    # scale_cam_image resizes with cv2.resize, whose size is (width, height).
    target = None if size is None else (int(size[1]), int(size[0]))
    scaled = scale_cam_image(flat, target)
    # BaseCAM min-max scales a second time after averaging its (here: one) target layers.
    scaled = scale_cam_image(np.maximum(scaled, 0))
    return scaled.reshape(n, len(cols), *scaled.shape[1:])
