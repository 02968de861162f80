"""Every ready-made config under configs/ loads with its command's config class (unknown keys are
refused there), so a typo or a renamed setting fails here and not on a user's first run."""

from pathlib import Path

import pytest

from fashionlens.errors import UserError
from fashionlens.training.adapt import AdaptConfig, load_adapt_config
from fashionlens.training.attributes import load_attribute_config
from fashionlens.training.config import TrainConfig, load_train_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _loader(path: Path):
    """The command a config is for, by its name: adapt-* -> ``adapt``, attributes-* and street-*
    -> ``train-attributes``, the rest -> ``train``."""
    if path.name.startswith("adapt-"):
        return load_adapt_config
    if path.name.startswith(("attributes-", "street-")):
        return load_attribute_config
    return load_train_config


def test_there_are_configs_of_each_command():
    loaders = {_loader(p) for p in CONFIGS}
    assert loaders == {load_adapt_config, load_attribute_config, load_train_config}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = _loader(path)(path)
    if isinstance(cfg, AdaptConfig):
        assert isinstance(cfg.train, TrainConfig)
    assert cfg.model_dump()  # a complete, serialisable config (it is recorded in every artefact)


def test_an_unknown_key_is_refused(tmp_path):
    """The check above can fail: a config with a misspelt setting does not load."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS[0].read_text()) + "\nvote_min_shar: 0.3\n")
    with pytest.raises((UserError, ValueError)):
        _loader(CONFIGS[0])(bad)
