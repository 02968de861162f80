"""Cached feature maps, query validation, and training the necks on cached maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fashionlens.data.images import open_image
from fashionlens.data.transforms import Preprocess
from fashionlens.errors import UserError
from fashionlens.models.backbones import create_backbone
from fashionlens.models.checkpoints import load_checkpoint
from fashionlens.training import train
from fashionlens.training.feature_cache import CachedMapDataset, FeatureCache, MapAugment
from fashionlens.training.validation import QueryValidation, identity_hit_rate
from test_trainer import N_IDS, PER_ID, catalog, read_metrics, tiny_config  # noqa: F401 (fixture)

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead


def image_paths(catalog: Path) -> list[Path]:
    return sorted((catalog.parent / "images").glob("*.png"))


def reference_maps(paths) -> torch.Tensor:
    """Eager backbone maps with the offline ImageNet weights, as the cache's."""
    backbone, cfg = create_backbone("lite0", pretrained=True)
    pre = Preprocess(SIZE, tuple(cfg["mean"]), tuple(cfg["std"]))
    with torch.no_grad():
        return backbone.eval().forward_features(torch.stack([pre(open_image(p)) for p in paths]))


def new_cache(folder: Path) -> FeatureCache:
    return FeatureCache(folder, "lite0", SIZE, pretrained=True)


def test_cache_maps_equal_the_backbone_and_grow_and_resume(catalog, tmp_path):
    paths = image_paths(catalog)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    cache = new_cache(tmp_path / "cache")
    assert cache.ensure(paths[:5] + [bad], batch_size=4) == [str(bad.resolve())]
    assert bad not in cache and all(p in cache for p in paths[:5])
    # a second call adds only the missing paths, as a new part
    cache.ensure(paths, batch_size=4)
    parts = sorted(p.name for p in (tmp_path / "cache").glob("part-*"))
    assert parts == ["part-0000", "part-0001"]
    assert len((tmp_path / "cache" / "part-0001" / "paths.txt").read_text().split()) == len(paths) - 5
    ref = reference_maps(paths)
    got = cache.stack(paths)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=2e-2, rtol=1e-2)  # float16 storage, folded BatchNorms

    # an interrupted part (done < rows) is finished on the next call; earlier rows untouched
    state_path = tmp_path / "cache" / "part-0001" / "state.json"
    state = json.loads(state_path.read_text())
    state["done"] = 3
    state_path.write_text(json.dumps(state))
    maps = np.load(tmp_path / "cache" / "part-0001" / "maps.npy", mmap_mode="r+")
    maps[3:] = 0
    maps.flush()
    del maps
    again = new_cache(tmp_path / "cache")
    assert sum(p in again for p in paths) == 5 + 3
    again.ensure(paths, batch_size=4)
    assert torch.allclose(again.stack(paths), got)
    # a cache of another backbone / size is refused
    with pytest.raises(UserError, match="holds maps"):
        FeatureCache(tmp_path / "cache", "lite0", 96, pretrained=True)
    ds = CachedMapDataset([(p, 0) for p in paths] + [(bad, 1)], again)
    assert len(ds) == len(paths) and ds[0][0].shape == ref.shape[1:]


def test_map_augment_flips():
    t = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    assert torch.equal(MapAugment(1.0, 0.0)(t), t.flip(-1))
    assert torch.equal(MapAugment(0.0, 1.0)(t), torch.rot90(t, 2, (1, 2)))
    assert torch.equal(MapAugment(0.0, 0.0)(t), t)
    # a crop of the whole map (crop_min 1) is the map itself; a smaller one keeps the size
    assert torch.allclose(MapAugment(0.0, 0.0, crop=1.0, crop_min=1.0)(t), t)
    torch.manual_seed(0)
    big = torch.arange(7 * 7, dtype=torch.float32).reshape(1, 7, 7)
    out = [MapAugment(0.0, 0.0, crop=1.0, crop_min=0.2)(big) for _ in range(10)]
    assert all(o.shape == big.shape for o in out) and any(not torch.allclose(o, big) for o in out)
    # values stay inside the map's range (bilinear interpolation of a window)
    assert all(float(o.min()) >= 0 and float(o.max()) <= 48 for o in out)


def test_query_validation_equals_full_ranking():
    rng = np.random.default_rng(0)
    gallery = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(50, 8)), dtype=torch.float32), dim=1)
    queries = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(12, 8)), dtype=torch.float32), dim=1)
    values = [f"t{i % 5}" for i in range(50)]
    ok = [frozenset({f"t{i % 5}", f"t{(i + 1) % 5}"}) if i % 3 else frozenset({"t0"}) for i in range(12)]
    table = {**{f"q{i}": queries[i] for i in range(12)}, **{f"g{i}": gallery[i] for i in range(50)}}
    qv = QueryValidation([Path(f"q{i}") for i in range(12)], ok, [Path(f"g{i}") for i in range(50)], values)
    got = qv.evaluate(lambda paths: torch.stack([table[str(p)] for p in paths]) * 3.0, ks=(1, 4, 10), chunk=7)
    order = (queries @ gallery.T).argsort(dim=1, descending=True)
    for k in (1, 4, 10):
        expect = np.mean([any(values[j] in ok[q] for j in order[q, :k].tolist()) for q in range(12)])
        assert got[f"query_top{k}"] == pytest.approx(expect)
    hits = qv.hits(lambda paths: torch.stack([table[str(p)] for p in paths]), k=10, chunk=7)
    assert hits.tolist() == [[values[j] in ok[q] for j in order[q, :10].tolist()] for q in range(12)]
    # no query could be embedded: no rows, no figures (not a crash)
    def nan(paths):
        return torch.stack([table[str(p)] * (float("nan") if str(p).startswith("q") else 1.0) for p in paths])

    assert qv.hits(nan, k=4).shape == (0, 4)
    assert qv.evaluate(nan) == {"query_top1": None, "query_top4": None}


def test_identity_hit_rate_brute_force():
    e = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.7, 0.7]])
    labels = [0, 0, 1, 1, 1]
    got = identity_hit_rate(e, labels, ks=(1,))
    # nearest other row by cosine: 0->1, 1->0, 2->3, 3->2, 4->(1 or 3: 0.1,0.9 vs 0.9,0.1 tie) ...
    e_n = torch.nn.functional.normalize(e, dim=1)
    sim = e_n @ e_n.T
    sim.fill_diagonal_(-2)
    expect = np.mean([labels[int(sim[i].argmax())] == labels[i] for i in range(5)])
    assert got["val_top1"] == pytest.approx(expect)


def make_queries(catalog: Path, root: Path) -> tuple[Path, Path]:
    """Query photos: each identity's image 0 recoloured slightly, under a label folder."""
    for i in range(N_IDS):
        arr = np.asarray(Image.open(catalog.parent / "images" / f"{i}_0.png")).astype(int) + 5
        (root / f"label{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / f"label{i % 4}" / f"q{i}.png")
    mapping = root.parent / "mapping.csv"
    mapping.write_text("label,types\n" + "".join(f"label{j},type{j}\n" for j in range(4)))
    return root, mapping


def test_train_necks_on_cached_maps(catalog, tmp_path):
    queries, mapping = make_queries(catalog, tmp_path / "queries")
    out = tmp_path / "run"
    cfg = tiny_config(catalog, out, feature_cache=str(tmp_path / "cache"), val_queries=str(queries),
                      val_mapping=str(mapping), epochs=2, batches_per_epoch=3, identity=1.0,
                      model={"backbone": "lite0", "pretrained": True, "input_size": SIZE, "freeze_backbone": True,
                             "neck": {"type": "multi", "necks": {"lan": {"type": "lan", "branches": 2, "dim": 16},
                                                                 "stripes": {"type": "stripes", "parts": [2], "dim": 8}}}})
    events = []
    torch.manual_seed(0)
    train(cfg, progress=events.append)
    kinds = [e["event"] for e in events]
    assert "cache" in kinds and "cache_step" in kinds
    rows = read_metrics(out)
    assert all(0 <= float(r["query_top1"]) <= float(r["query_top4"]) <= 1 for r in rows)
    assert cfg.best_metric == "query_macro_top4"  # each garment type weighs the same
    assert all(float(r["query_macro_top4"]) == pytest.approx(np.mean([float(r[f"query_top4.label{j}"])
                                                                      for j in range(4)])) for r in rows)
    best = max(rows, key=lambda r: float(r["query_macro_top4"]))  # first of equals, as the trainer keeps
    model, model_cfg, extra = load_checkpoint(out / "best")
    assert extra["epoch"] == int(best["epoch"])
    assert extra["metrics"]["query_top1"] == pytest.approx(float(best["query_top1"]))
    # stripes got their identity classifiers (thesis A, chapter 4)
    assert model_cfg.num_identities == 6
    assert len(model.neck.necks["stripes"].classifiers) == 4  # parts [2] x (h, v)
    # the checkpoint, run on images, embeds as the neck did on the cached maps
    paths = image_paths(catalog)[:6]
    cache = new_cache(tmp_path / "cache")
    pre = Preprocess(SIZE, (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        from_images = model.embed(torch.stack([pre(open_image(p)) for p in paths]))
        from_maps = model(cache.stack(paths), from_map=True)["embedding"]
    assert torch.allclose(from_images, from_maps, atol=2e-2)
    # the backbone was frozen: its weights are still the ImageNet ones
    ref, _ = create_backbone("lite0", pretrained=True)
    assert torch.equal(model.backbone.conv_stem.weight, ref.conv_stem.weight)


def test_cache_of_the_frozen_stages_trains_the_tail(catalog, tmp_path):
    out = tmp_path / "run"
    model_section = {"backbone": "lite0", "pretrained": True, "input_size": SIZE, "freeze_backbone": True,
                     "trainable_from": "blocks.6", "neck": {"type": "lan", "branches": 2, "dim": 16}}
    cfg = tiny_config(catalog, out, feature_cache=str(tmp_path / "cache"), epochs=1, model=model_section)
    train(cfg)
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["stage"] == "blocks.6" and meta["shape"][0] == 192  # lite0's 6th stage output, not 1280
    model, _, _ = load_checkpoint(out / "last")
    ref, _ = create_backbone("lite0", pretrained=True)
    assert torch.equal(model.backbone.blocks[5][0].conv_pw.weight, ref.blocks[5][0].conv_pw.weight)
    assert not torch.equal(model.backbone.conv_head.weight, ref.conv_head.weight)  # the tail trained
    paths = image_paths(catalog)[:6]
    cache = FeatureCache.for_model(tmp_path / "cache", cfg.model, SIZE)
    pre = Preprocess(SIZE, (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        from_images = model.embed(torch.stack([pre(open_image(p)) for p in paths]))
        from_maps = model(cache.stack(paths), from_map=True)["embedding"]
    assert torch.allclose(from_images, from_maps, atol=2e-2)
    # the full-map cache of the same backbone is another cache
    with pytest.raises(UserError, match="holds maps of"):
        new_cache(tmp_path / "cache")


def test_the_anchor_runs_beside_the_untrained_pooled_feature(catalog, tmp_path):
    """The anchor term's reference, run on the cached maps of a run that trains the last stage,
    is the untrained ImageNet backbone's pooled feature of the images."""
    from fashionlens.training.retrieval_task import reference_model

    out = tmp_path / "run"
    model_section = {"backbone": "lite0", "pretrained": True, "input_size": SIZE, "freeze_backbone": True,
                     "trainable_from": "blocks.6", "neck": {"type": "lan", "branches": 2, "dim": 16}}
    cfg = tiny_config(catalog, out, feature_cache=str(tmp_path / "cache"), epochs=1, model=model_section,
                      losses={"triplet": {"weight": 1.0}, "anchor": {"weight": 2.0}})
    train(cfg)
    row = read_metrics(out)[0]
    assert float(row["anchor"]) > 0 and float(row["loss"]) == pytest.approx(
        float(row["triplet"]) + 2.0 * float(row["anchor"]), rel=1e-4)
    reference = reference_model(cfg.model, {"type": "gap"}, "cpu")
    paths = image_paths(catalog)[:6]
    cache = FeatureCache.for_model(tmp_path / "cache", cfg.model, SIZE)
    pre = Preprocess(SIZE, (0.5,) * 3, (0.5,) * 3)
    untrained, _ = create_backbone("lite0", pretrained=True)
    untrained.eval()
    with torch.no_grad():
        from_maps = reference(cache.stack(paths), from_map=True)["embedding"]
        pooled = untrained.forward_features(torch.stack([pre(open_image(p)) for p in paths])).mean((2, 3))
    cos = torch.nn.functional.cosine_similarity(from_maps, pooled, dim=1)
    assert bool((cos > 0.999).all())


def test_feature_cache_config_checks(catalog, tmp_path):
    with pytest.raises(ValueError, match="freeze_backbone"):
        tiny_config(catalog, tmp_path, feature_cache=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="pretrained"):
        tiny_config(catalog, tmp_path, feature_cache=str(tmp_path / "c"),
                    model={"backbone": "lite0", "pretrained": False, "freeze_backbone": True})
    with pytest.raises(ValueError, match="go together"):
        tiny_config(catalog, tmp_path, val_queries=str(tmp_path))


def test_query_validation_from_images_picks_best(catalog, tmp_path):
    """Without a cache the queries and the catalog are embedded from images each epoch."""
    queries, mapping = make_queries(catalog, tmp_path / "queries")
    out = tmp_path / "run"
    train(tiny_config(catalog, out, val_queries=str(queries), val_mapping=str(mapping), epochs=2,
                      batches_per_epoch=1))
    rows = read_metrics(out)
    assert all(r["query_top1"] != "" for r in rows)
    model, _, extra = load_checkpoint(out / "best")
    best = max(rows, key=lambda r: float(r["query_macro_top4"]))  # first of equals, as the trainer keeps
    assert extra["epoch"] == int(best["epoch"])
    # the logged figure is what the saved model gives, recomputed here independently
    qv = QueryValidation.load(queries, mapping, catalog, "articleType")
    pre = Preprocess(64, (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        got = qv.evaluate(lambda ps: model.embed(torch.stack([pre(open_image(p)) for p in ps])))
    assert got["query_top1"] == pytest.approx(float(best["query_top1"]))


def test_train_cli_reports_config_cross_checks(catalog, tmp_path):
    import subprocess
    import sys

    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"catalog": str(catalog), "feature_cache": str(tmp_path / "c")}))
    proc = subprocess.run([sys.executable, "-m", "fashionlens", "train", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: config: feature_cache needs model.freeze_backbone: true "
                                   "(cached maps are of the frozen backbone)")


def test_query_validation_leaves_out_unembeddable_rows():
    """NaN rows (unreadable photos): a query is left out, a gallery item is never ranked."""
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [float("nan"), float("nan")], [0.7, 0.7]])
    queries = torch.tensor([[1.0, 0.1], [float("nan"), 0.0], [0.1, 1.0]])
    table = {**{f"q{i}": queries[i] for i in range(3)}, **{f"g{i}": gallery[i] for i in range(4)}}
    values = ["a", "b", "c", "d"]
    # q0 wants c (only the NaN item has it): a miss at every k; q2 wants b: a hit at 1
    qv = QueryValidation([Path("q0"), Path("q1"), Path("q2")], [frozenset("c"), frozenset("a"), frozenset("b")],
                         [Path(f"g{i}") for i in range(4)], values)
    got = qv.evaluate(lambda paths: torch.stack([table[str(p)] for p in paths]), ks=(1, 4), chunk=2)
    assert got == {"query_top1": 0.5, "query_top4": 0.5}
    assert identity_hit_rate(torch.cat([gallery, gallery]), [0, 1, 2, 3] * 2, ks=(1,))["val_top1"] == 1.0


@pytest.mark.parametrize("cached", [True, False])
def test_training_validates_around_unreadable_photos(catalog, tmp_path, cached):
    """An unreadable catalog photo and an unreadable buyer's photo are left out of validation
    (and out of the cache) instead of ending the run or borrowing another photo's embedding."""
    import shutil

    root = tmp_path / "cat"
    shutil.copytree(catalog.parent, root)
    (root / "images" / "broken.png").write_bytes(b"not an image")
    csv_text = (root / "styles.csv").read_text()
    (root / "styles.csv").write_text(csv_text.rstrip("\n") + "\nbroken,images/broken.png,type1,colour1,Women\n")
    queries, mapping = make_queries(catalog, tmp_path / "queries")
    (queries / "label0" / "bad.png").write_bytes(b"nope")
    events = []
    extra = {"feature_cache": str(tmp_path / "cache"),
             "model": {"backbone": "lite0", "pretrained": True, "input_size": SIZE, "freeze_backbone": True,
                       "neck": {"type": "lan", "branches": 2, "dim": 16}}} if cached else {}
    cfg = tiny_config(root / "styles.csv", tmp_path / "run", val_queries=str(queries), val_mapping=str(mapping),
                      epochs=1, batches_per_epoch=1, **extra)
    train(cfg, progress=events.append)
    row = read_metrics(tmp_path / "run")[0]
    assert row["query_top1"] != ""
    model, _, _ = load_checkpoint(tmp_path / "run" / "last")
    good = QueryValidation.load(queries, mapping, root / "styles.csv", "articleType")
    good = QueryValidation([p for p in good.query_paths if p.name != "bad.png"],
                           [ok for p, ok in zip(good.query_paths, good.query_ok) if p.name != "bad.png"],
                           [p for p in good.gallery_paths if p.name != "broken.png"],
                           [v for p, v in zip(good.gallery_paths, good.gallery_values) if p.name != "broken.png"])
    pre = Preprocess(SIZE, (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        expect = good.evaluate(lambda ps: model.embed(torch.stack([pre(open_image(p)) for p in ps])))
    assert float(row["query_top1"]) == pytest.approx(expect["query_top1"], abs=1e-6 if not cached else 0.13)
    if cached:
        bad = [e for e in events if e["event"] == "cache_unreadable"][0]["images"]
        assert sorted(Path(p).name for p in bad) == ["bad.png", "broken.png"]


def test_damaged_cache_files_give_clear_errors(catalog, tmp_path):
    paths = image_paths(catalog)[:3]
    folder = tmp_path / "cache"
    new_cache(folder).ensure(paths)
    (folder / ".part-0001").mkdir()  # a part whose creation was interrupted: removed, not read
    (folder / ".part-0001" / "paths.txt").write_text("x\n")
    cache = new_cache(folder)
    cache.ensure(image_paths(catalog)[:4])
    assert not (folder / ".part-0001").exists() and sorted(p.name for p in folder.glob("part-*")) == [
        "part-0000", "part-0001"]
    maps = folder / "part-0001" / "maps.npy"
    maps.write_bytes(maps.read_bytes()[:100])  # truncated
    with pytest.raises(UserError, match="damaged feature cache part"):
        new_cache(folder)
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="damaged feature cache file"):
        new_cache(folder)


def test_val_field_missing_from_the_catalog(catalog, tmp_path):
    queries, mapping = make_queries(catalog, tmp_path / "queries")
    with pytest.raises(UserError, match="no catalog item has a value in the column 'colour'"):
        QueryValidation.load(queries, mapping, catalog, "colour")


def test_augmented_views_are_the_backbone_on_augmented_photos(catalog, tmp_path):
    from fashionlens.training.feature_cache import view_caches

    paths = image_paths(catalog)[:6]
    plain = new_cache(tmp_path / "cache")
    plain.ensure(paths, batch_size=4)
    off = {"hflip": 0.0, "rot180": 0.0, "rotate": 0.0, "color": 0.0, "erase": 0.0}
    # no augmentation at all: a view is the plain map
    same = FeatureCache(tmp_path / "same", "lite0", SIZE, True, augment=off, view=1)
    same.ensure(paths, batch_size=4)
    assert torch.allclose(same.stack(paths), plain.stack(paths), atol=1e-3)
    # a flip with probability 1: the maps of the mirrored photos
    flipped = FeatureCache(tmp_path / "flip", "lite0", SIZE, True, augment={**off, "hflip": 1.0}, view=1)
    flipped.ensure(paths, batch_size=4)
    backbone, cfg = create_backbone("lite0", pretrained=True)
    pre = Preprocess(SIZE, tuple(cfg["mean"]), tuple(cfg["std"]))
    with torch.no_grad():
        ref = backbone.eval().forward_features(torch.stack([pre(open_image(p)) for p in paths]).flip(-1))
    assert torch.allclose(flipped.stack(paths), ref, atol=2e-2, rtol=1e-2)
    assert not torch.allclose(flipped.stack(paths), plain.stack(paths), atol=1e-1)
    # random augmentations: each view draws its own, a rebuild draws the same, and the caller's
    # random state is left alone
    model_cfg = tiny_config(catalog, tmp_path, model={"backbone": "lite0", "pretrained": True, "input_size": SIZE,
                                                      "freeze_backbone": True}).model
    erase = {**off, "erase": 1.0, "erase_min": 0.3, "erase_max": 0.5}
    views = view_caches(tmp_path / "cache", model_cfg, SIZE, erase, 2)
    assert [v.folder.parent for v in views] == [views[0].folder.parent] * 2
    assert views[0].folder.parent.parent == tmp_path / "cache"
    torch.manual_seed(5)
    for v in views:
        v.ensure(paths, batch_size=4)
    after = torch.rand(())
    torch.manual_seed(5)
    assert torch.rand(()) == after
    again = view_caches(tmp_path / "again", model_cfg, SIZE, erase, 1)[0]
    again.ensure(paths, batch_size=4)
    assert torch.equal(again.stack(paths), views[0].stack(paths))
    assert not torch.allclose(views[0].stack(paths), views[1].stack(paths), atol=1e-2)
    # other settings, another folder; a view folder opened with other settings is refused
    assert view_caches(tmp_path / "cache", model_cfg, SIZE, off, 1)[0].folder.parent != views[0].folder.parent
    with pytest.raises(UserError, match="holds maps"):
        FeatureCache(views[0].folder, "lite0", SIZE, True, augment=off, view=1)
    with pytest.raises(UserError, match="holds maps"):
        new_cache(views[0].folder)
    # the dataset draws the plain map or a view; a photo missing from a view comes from the others
    only_some = FeatureCache(tmp_path / "some", "lite0", SIZE, True, augment={**off, "hflip": 1.0}, view=2)
    only_some.ensure(paths[:1], batch_size=4)
    ds = CachedMapDataset([(p, 0) for p in paths], plain, None, [flipped, only_some])
    torch.manual_seed(0)
    draws = torch.stack([ds[1][0] for _ in range(30)])
    is_plain = [torch.equal(d, plain.get(paths[1])) for d in draws]
    is_flip = [torch.equal(d, flipped.get(paths[1])) for d in draws]
    assert all(a or b for a, b in zip(is_plain, is_flip)) and any(is_plain) and any(is_flip)
    torch.manual_seed(0)
    draws0 = [ds[0][0] for _ in range(60)]
    assert any(torch.equal(d, only_some.get(paths[0])) for d in draws0)


def test_training_with_augmented_views(catalog, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(catalog, out, feature_cache=str(tmp_path / "cache"), feature_cache_views=2, epochs=1,
                      batches_per_epoch=2, augment={"rotate": 1.0, "erase": 1.0},
                      model={"backbone": "lite0", "pretrained": True, "input_size": SIZE, "freeze_backbone": True,
                             "neck": {"type": "lan", "branches": 2, "dim": 16}})
    events = []
    train(cfg, progress=events.append)
    views = [e["view"] for e in events if e["event"] == "cache" and "view" in e]
    assert views == [1, 2]
    folders = sorted((tmp_path / "cache").glob("views-*/v*"))
    assert [f.name for f in folders] == ["v1", "v2"]
    from fashionlens.training.identities import split_for
    split = split_for(cfg)
    for f in folders:  # every training photo has its view
        view = FeatureCache(f, "lite0", SIZE, True, augment=json.loads((f / "meta.json").read_text())["augment"],
                            view=int(f.name[1:]))
        assert view.key["augment"]["rotate"] == 1.0
        assert split.train and all(p in view for p, _ in split.train)
        assert split.val and not any(p in view for p, _ in split.val)  # views are of training photos only
    assert (out / "best").exists() or (out / "last").exists()
    with pytest.raises(ValueError, match="feature_cache_views needs feature_cache"):
        tiny_config(catalog, tmp_path, feature_cache_views=1)


def test_view_folders_of_earlier_settings_stay_where_they_were(catalog, tmp_path):
    """``augment.background`` came later: settings without it hash as before (the defaults'
    views stay in ``views-d145a96dbf``, made before it existed), its level counts only when it
    is on, and with it on the views go elsewhere."""
    from fashionlens.training.feature_cache import view_cache

    model_cfg = tiny_config(catalog, tmp_path, model={"backbone": "lite0", "pretrained": True, "input_size": SIZE,
                                                      "freeze_backbone": True}).model

    def folder(augment):
        return view_cache(tmp_path / "cache", model_cfg, SIZE, augment, 1).folder.parent.name

    assert folder(None) == folder({}) == "views-d145a96dbf"
    assert folder({"background": 0.0, "background_level": 200}) == "views-d145a96dbf"
    assert folder({"background": 0.5}) != "views-d145a96dbf"
    assert folder({"background": 0.5}) != folder({"background": 0.5, "background_level": 200})


def test_a_complete_cache_is_read_while_another_process_writes(catalog, tmp_path):
    """Runs that share a cache (arms trained side by side) read it at once; only a run that must
    add maps needs the writer lock, and is told when another process holds it."""
    import fcntl

    paths = image_paths(catalog)
    folder = tmp_path / "cache"
    new_cache(folder).ensure(paths[:4])
    with open(folder / ".lock", "w") as held:  # another process writing
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other = new_cache(folder)
        assert other.ensure(paths[:4]) == [] and all(p in other for p in paths[:4])
        with pytest.raises(UserError, match="another fashionlens process is writing this feature cache"):
            new_cache(folder).ensure(paths[:5])
    assert new_cache(folder).ensure(paths[:5]) == [] and paths[4] in new_cache(folder)
