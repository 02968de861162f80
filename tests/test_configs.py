"""Every ready-made config under configs/ loads with its command's config class (unknown keys are
refused there) and its free-form parts (the neck, the augmentations) build, so a typo or a
renamed setting fails here and not on a user's first run."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from fashionlens.data.augment import AugmentConfig
from fashionlens.errors import UserError
from fashionlens.models.necks import build_neck
from fashionlens.training.adapt import load_adapt_config
from fashionlens.training.config import load_attribute_config, load_train_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _loader(path: Path):
    """The command a config is for, by its name: adapt-* -> ``adapt``, attributes-* and street-*
    -> ``train-attributes``, the rest -> ``train``."""
    if path.name.startswith("adapt-"):
        return load_adapt_config
    if path.name.startswith(("attributes-", "street-")):
        return load_attribute_config
    return load_train_config


def _check_parts(cfg) -> None:
    """What the config classes keep as plain dicts, checked as the commands will use them."""
    train = getattr(cfg, "train", cfg)  # an adapt config trains with its `train`
    if getattr(train, "augment", None) is not None:
        AugmentConfig(**train.augment)  # unknown keys are refused there
    model = getattr(train, "model", None)
    if model is not None and getattr(model, "neck", None) is not None:
        build_neck(model.neck, in_channels=8)  # unknown neck types or arguments raise


def test_there_are_configs_of_each_command():
    loaders = {_loader(p) for p in CONFIGS}
    assert loaders == {load_adapt_config, load_attribute_config, load_train_config}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = _loader(path)(path)
    _check_parts(cfg)
    assert json.loads(cfg.model_dump_json()) == cfg.model_dump(mode="json")  # recorded in every artefact


def _one_per_command() -> list[Path]:
    first = {}
    for path in CONFIGS:
        first.setdefault(_loader(path), path)
    return list(first.values())


@pytest.mark.parametrize("path", _one_per_command(), ids=lambda p: p.name)
def test_a_misspelt_key_is_refused(path, tmp_path):
    """The loading above can fail: a misspelt key at the top or in the nested model section
    does not load, and the message names it."""
    data = yaml.safe_load(path.read_text())
    top = tmp_path / "top.yaml"
    top.write_text(yaml.safe_dump({**data, "epochz": 3}))
    with pytest.raises(UserError, match="epochz"):
        _loader(path)(top)
    nested = copy.deepcopy(data)
    (nested["train"] if "train" in nested else nested)["model"]["backbon"] = "lite0"
    bad = tmp_path / "nested.yaml"
    bad.write_text(yaml.safe_dump(nested))
    with pytest.raises(UserError, match="backbon"):
        _loader(path)(bad)


def test_a_bad_augmentation_or_neck_is_refused():
    with pytest.raises(ValueError, match="flipp"):
        AugmentConfig(**{"flipp": 0.5})
    with pytest.raises((TypeError, ValueError)):
        build_neck({"type": "lan", "branchs": 4}, in_channels=8)


OLD_TRAIN = {"identities_per_batch": "p", "images_per_identity": "k"}
OLD_ADAPT = {"group_size": "m", "negatives_from": "i", "negatives_to": "j"}


def _old_neck(neck: dict) -> dict:
    neck = {**neck, "type": "lan" if neck.get("type") == "local_alignment" else neck.get("type")}
    if "necks" in neck:
        neck["necks"] = {name: _old_neck(sub) for name, sub in neck["necks"].items()}
    return neck


def _with_old_names(data: dict, adapt: bool = False) -> dict:
    """A config as it was written before the renames (p, k, m, i, j, the flat loss weights, neck type lan)."""
    data = copy.deepcopy(data)
    if adapt:
        for new, old in OLD_ADAPT.items():
            if new in data:
                data[old] = data.pop(new)
        if isinstance(data.get("train"), dict):
            data["train"] = _with_old_names(data["train"])
        return data
    for new, old in OLD_TRAIN.items():
        if new in data:
            data[old] = data.pop(new)
    losses = data.pop("losses", None)
    if losses is not None:
        assert set(losses) <= {"triplet", "identity"}, "a config with other terms has no old form"
        triplet = losses.get("triplet", {"weight": 0.0})
        data["triplet"] = triplet.get("weight", 1.0)
        data.update({key: triplet[key] for key in ("margin", "reducer") if key in triplet})
        if "identity" in losses:
            data["identity"] = losses["identity"].get("weight", 1.0)
    if isinstance(data.get("model"), dict) and "neck" in data["model"]:
        data["model"]["neck"] = _old_neck(data["model"]["neck"])
    return data


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_old_setting_names_load_the_same_config(path, tmp_path):
    """Every config was migrated to the new names (identities_per_batch, losses, group_size ...,
    local_alignment); written with the old ones, as users' files and old run folders are, it loads
    to the very same settings."""
    data = yaml.safe_load(path.read_text())
    loader = _loader(path)
    old = tmp_path / path.name
    old.write_text(yaml.safe_dump(_with_old_names(data, adapt=loader is load_adapt_config)))
    assert loader(old).model_dump() == loader(path).model_dump()


def test_old_names_in_set_overrides_and_a_name_given_twice(tmp_path):
    path = next(p for p in CONFIGS if p.name == "recipe-cached-cpu.yaml")
    cfg = load_train_config(path, ["p=3", "k=4", "identity=0.5", "margin=0.3", "reducer=nonzero"])
    assert (cfg.identities_per_batch, cfg.images_per_identity) == (3, 4)
    assert cfg.losses == {"triplet": {"weight": 1.0, "margin": 0.3, "reducer": "nonzero"},
                          "identity": {"weight": 0.5, "label_smoothing": 0.0}}
    cfg = load_train_config(path, ["losses.identity.weight=0", "identities_per_batch=5"])
    assert "identity" not in cfg.losses and cfg.identities_per_batch == 5  # weight 0: the term is off
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "p": 3}))
    with pytest.raises(UserError, match="p and identities_per_batch name the same setting"):
        load_train_config(both)
    adapt = next(p for p in CONFIGS if p.name == "adapt-cpu.yaml")
    cfg = load_adapt_config(adapt, ["m=7", "j=50", "train.k=3", "train.identity=0"])
    assert (cfg.group_size, cfg.negatives_to, cfg.train.images_per_identity) == (7, 50, 3)
    assert list(cfg.train.losses) == ["triplet"]
    # an old name never adds a term by the back door, nor overrides its new name silently
    only_identity = tmp_path / "identity.yaml"
    only_identity.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "losses": {"identity": {"weight": 1}}}))
    with pytest.raises(UserError, match="margin=0.3.*triplet loss term"):
        load_train_config(only_identity, ["margin=0.3"])
    assert list(load_train_config(only_identity, ["triplet=0.5", "margin=0.3"]).losses) == ["identity", "triplet"]
    both = tmp_path / "both-weights.yaml"
    both.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "triplet": 0.5}))
    with pytest.raises(UserError, match="triplet and losses.triplet.weight"):
        load_train_config(both)


def test_losses_are_recorded_the_same_however_written():
    """Defaults filled in, weight-0 terms left out: an old run folder's 'identity: 0.0' and today's
    config without an identity term are one objective (adapt compares them to continue a run)."""
    from fashionlens.training.config import TrainConfig

    plain = TrainConfig(catalog="c", losses={"triplet": {"weight": 1}})
    old = TrainConfig(catalog="c", triplet=1.0, identity=0.0, margin=0.2, reducer="all")
    assert plain.losses == old.losses == {"triplet": {"weight": 1.0, "margin": 0.2, "reducer": "all"}}
    with pytest.raises(UserError, match="margin"):
        TrainConfig.load(None, catalog="c", losses={"triplet": {"margin": -0.1}})
