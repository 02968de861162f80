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
from fashionlens.training.config import load_attribute_config
from fashionlens.training.config import load_train_config

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
