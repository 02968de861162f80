"""RetrievalModel / build_model / checkpoints (fashionlens.models.builder) and the heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fashionlens.data.transforms import Preprocess
from fashionlens.errors import UserError
from fashionlens.models.builder import EmbeddingOnly, ModelConfig, build_model
from fashionlens.models.checkpoints import (
    chosen_model,
    is_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from fashionlens.models.embedder import Embedder, build_embedder
from fashionlens.models.heads import AttributeHead, IdentityHead

SCHEMA = {"sleeve_length": ["short", "long", "invisible"], "collar.design": ["round", "v"]}


def _x(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))


def _unit(e: torch.Tensor) -> None:
    assert torch.allclose(e.norm(dim=1), torch.ones(e.shape[0]), atol=1e-5)


@pytest.fixture(scope="module")
def headed():
    """Lite0 + LAN(K=2, d=32) + identity and attribute heads."""
    torch.manual_seed(0)
    cfg = ModelConfig(pretrained=False, neck={"type": "lan", "branches": 2, "dim": 32},
                      num_identities=5, attributes=SCHEMA)
    model, data_cfg = build_model(cfg)
    return model.eval(), cfg, data_cfg


NECKS = [
    ({"type": "gap"}, 1280, set()),
    ({"type": "lan", "branches": 2, "dim": 16}, 32, {"masks", "branch_features"}),
    ({"type": "stripes", "parts": [2], "dim": 8}, 4 * 8, {"stripes"}),
    ({"type": "rings", "rings": 2, "dim": 8}, 16, {"rings"}),
    ({"type": "multi", "necks": {"g": {"type": "gap"}, "r": {"type": "rings", "rings": 2, "dim": 4}}},
     1280 + 8, {"g.embedding", "r.rings"}),
]


@pytest.mark.parametrize("neck,dim,keys", NECKS, ids=[n[0]["type"] for n in NECKS])
def test_lite0_with_each_neck(neck, dim, keys):
    model, data_cfg = build_model(ModelConfig(pretrained=False, neck=neck))
    model.eval()
    assert data_cfg["input_size"] == (3, 224, 224)
    assert model.embedding_dim == dim
    with torch.no_grad():
        for size, hw in ((224, 7), (227, 8)):  # TF "same" padding: ceil(227 / 32) = 8
            out = model(_x(size, 1), return_map=True)  # a batch of 1: CPU time is scarce
            assert out["embedding"].shape == (1, dim)
            _unit(out["embedding"])
            assert keys <= set(out)
            assert "id_logits" not in out and "attr_logits" not in out
            assert out["feature_map"].shape == (1, 1280, hw, hw)
            if "masks" in out:
                assert out["masks"].shape == (1, 2, hw, hw)


def test_input_size_and_embedding_only(headed):
    model, cfg, _ = headed
    _, data_cfg = build_model(ModelConfig(backbone="resnet18", pretrained=False, input_size=227,
                                          neck={"type": "gap"}))
    assert data_cfg["input_size"] == (3, 227, 227)
    wrapped = EmbeddingOnly(model)
    with torch.no_grad():
        e = wrapped(_x(96, 2))
        assert torch.allclose(e, model(_x(96, 2))["embedding"], atol=1e-6)
    assert e.shape == (2, 64)
    _unit(e)
    embedder = Embedder(wrapped, Preprocess(64, (0.5,) * 3, (0.5,) * 3), "trained", "cpu")
    assert embedder.dim == 64
    assert model.training is False  # Embedder put it in eval mode


def test_heads_on_the_model(headed):
    model, _, _ = headed
    with torch.no_grad():
        out = model(_x(96, 3))
    assert "feature_map" not in out
    assert out["id_logits"].shape == (3, 5)
    assert out["attr_logits"].shape == (3, 5)
    parts = model.attr_head.split(out["attr_logits"])
    assert parts["sleeve_length"].shape == (3, 3) and parts["collar.design"].shape == (3, 2)


def test_identity_head_bnneck():
    head = IdentityHead(16, 7)
    assert head.classifier.bias is None and not head.bn.bias.requires_grad
    assert head(torch.randn(4, 16)).shape == (4, 7)
    plain = IdentityHead(16, 7, bnneck=False)
    assert plain.bn is None and plain.classifier.bias is not None
    assert plain(torch.randn(1, 16)).shape == (1, 7)


def test_attribute_head_slices():
    head = AttributeHead(8, SCHEMA)
    assert head.slices == {"sleeve_length": slice(0, 3), "collar.design": slice(3, 5)}
    x = torch.randn(2, 8)
    logits = head(x)
    assert logits.shape == (2, 5)
    assert torch.allclose(logits[:, head.slices["collar.design"]], head.heads[1](x))
    with pytest.raises(ValueError):
        AttributeHead(8, {"a": []})


def test_freeze_backbone():
    model, _ = build_model(ModelConfig(backbone="resnet18", pretrained=False, freeze_backbone=True,
                                       neck={"type": "lan", "branches": 2, "dim": 8}, num_identities=3))
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert model.neck.training and model.id_head.training
    stats = bns[0].running_mean.clone()
    out = model(_x(64, 4))
    (out["id_logits"].sum() + out["embedding"].sum()).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert model.neck.reduce[0].weight.grad is not None
    assert torch.equal(bns[0].running_mean, stats)


@pytest.mark.parametrize("backbone,stage", [("lite0", "blocks.6"), ("resnet18", "layer4")])
def test_trainable_from_trains_only_the_tail(backbone, stage):
    from fashionlens.models.backbones import backbone_stages

    model, _ = build_model(ModelConfig(backbone=backbone, pretrained=False, freeze_backbone=True, trainable_from=stage,
                                       input_size=64, neck={"type": "gap"}, num_identities=3))
    names = [n for n, _ in backbone_stages(model.backbone)]
    tail = {id(p) for _, m in backbone_stages(model.backbone)[names.index(stage):] for p in m.parameters()}
    model.train()
    for module_name, module in model.backbone.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            assert module.training == any(id(p) in tail for p in module.parameters()), module_name
    x = _x(64, 4)
    out = model(x)
    (out["id_logits"].sum() + out["embedding"].sum()).backward()
    for name, p in model.backbone.named_parameters():
        assert (p.grad is not None) == (id(p) in tail), name
    # the frozen stages' output (what a cache stores) + the tail = the whole model
    model.eval()
    with torch.no_grad():
        whole = model(x)["embedding"]
        via_map = model(model.cached_map(x), from_map=True)["embedding"]
        assert torch.allclose(whole, via_map, atol=1e-5)
        assert torch.allclose(model.backbone.forward_features(x), model.feature_map(x), atol=1e-5)
    # the state_dict keeps the backbone's names, once
    assert all(not k.startswith("_split") for k in model.state_dict())
    assert len(model.state_dict()) == len(set(model.state_dict()))


def test_trainable_from_errors():
    with pytest.raises(UserError, match="stages: conv_stem, bn1, blocks.0"):
        build_model(ModelConfig(freeze_backbone=True, trainable_from="blocks.99", pretrained=False, neck={"type": "gap"}))
    with pytest.raises(UserError, match="trainable_from needs freeze_backbone"):
        ModelConfig.load(None, trainable_from="blocks.6")


def test_freeze_batchnorm_keeps_statistics_but_trains_weights():
    model, _ = build_model(ModelConfig(backbone="resnet18", pretrained=False, freeze_batchnorm=True,
                                       neck={"type": "lan", "branches": 2, "dim": 8}))
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.training for m in convs) and model.neck.training
    stats = bns[0].running_mean.clone()
    model(_x(64, 4))["embedding"].sum().backward()
    assert torch.equal(bns[0].running_mean, stats)
    assert bns[0].weight.grad is not None and convs[0].weight.grad is not None
    model.eval()
    model.train()  # and again after a round trip through eval()
    assert all(not m.training for m in bns)


def test_checkpoint_round_trip(tmp_path, headed):
    model, cfg, data_cfg = headed
    folder = save_checkpoint(tmp_path / "ckpt", model, cfg, {"epoch": 3, "metrics": {"top4": 0.5},
                                                             "data_config": data_cfg})
    assert is_checkpoint(folder) and is_checkpoint(folder / "model.safetensors")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    tensors = load_file(folder / "model.safetensors")  # a real safetensors file
    assert set(tensors) == set(model.state_dict())
    loaded, cfg2, extra = load_checkpoint(folder / "model.safetensors")
    assert cfg2 == cfg and extra["epoch"] == 3 and extra["metrics"] == {"top4": 0.5}
    assert extra["data_config"]["input_size"] == [3, 224, 224]
    assert not loaded.training
    x = _x(128, 2)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for key in ("embedding", "id_logits", "attr_logits", "masks"):
        assert torch.equal(a[key], b[key]), key
    # overwriting in place keeps a loadable checkpoint
    save_checkpoint(folder, loaded, cfg2, {"epoch": 4})
    assert load_checkpoint(folder)[2] == {"epoch": 4}


def test_tied_weights_are_saved(tmp_path):
    model, _ = build_model(cfg := ModelConfig(backbone="resnet18", pretrained=False, neck={"type": "gap"},
                                              num_identities=4))
    model.id_head.bn.running_var = model.id_head.bn.weight.data  # two keys, one storage
    save_checkpoint(tmp_path / "c", model, cfg)
    loaded, _, _ = load_checkpoint(tmp_path / "c")
    assert torch.equal(loaded.id_head.bn.running_var, model.id_head.bn.weight)


def test_mismatched_checkpoint_raises(tmp_path, headed):
    model, cfg, _ = headed
    folder = save_checkpoint(tmp_path / "ckpt", model, cfg)
    doc = json.loads((folder / "config.json").read_text())
    doc["model"]["neck"]["dim"] = 16
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="do not fit"):
        load_checkpoint(folder)
    doc["checkpoint_id"] = "another-save"
    (folder / "config.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="different saves"):
        load_checkpoint(folder)


def test_not_a_checkpoint(tmp_path):
    assert not is_checkpoint(tmp_path)
    assert not is_checkpoint(tmp_path / "missing")
    with pytest.raises(UserError, match="not a model checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model": {"neck": {"type": "gap"}}}))
    assert is_checkpoint(tmp_path)
    with pytest.raises(UserError, match="cannot read the weights"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not a valid checkpoint config"):
        load_checkpoint(tmp_path)


def test_config_validation():
    with pytest.raises(UserError, match="neck"):
        ModelConfig.load(neck={"type": "pyramid"})
    assert "freeze_backbone" in ModelConfig.help_text()


def test_resolve_checkpoint_of_run_folders(tmp_path, headed):
    model, cfg, _ = headed
    train_run = tmp_path / "train"
    best = save_checkpoint(train_run / "best", model, cfg)
    save_checkpoint(train_run / "last", model, cfg)
    assert resolve_checkpoint(train_run) == best
    adapt = tmp_path / "adapt"
    save_checkpoint(adapt / "round-1" / "train" / "best", model, cfg)
    chosen = save_checkpoint(adapt / "round-2" / "train" / "best", model, cfg)
    (adapt / "best.json").write_text(json.dumps({"round": 2, "query_top1": 0.5, "model": "moved/elsewhere"}))
    assert resolve_checkpoint(adapt) == chosen  # found inside the run, wherever it was started from
    (adapt / "best.json").write_text(json.dumps({"round": 0, "model": str(best)}))  # round 0 won: its init
    assert resolve_checkpoint(str(adapt)) == best
    # a checkpoint, a model name, a folder that names nothing and a broken best.json stay as they are
    assert resolve_checkpoint(chosen) == chosen
    assert resolve_checkpoint(chosen / "model.safetensors") == chosen / "model.safetensors"
    assert resolve_checkpoint("lite0") == Path("lite0")
    (tmp_path / "empty").mkdir()
    assert resolve_checkpoint(tmp_path / "empty") == tmp_path / "empty"
    (adapt / "best.json").write_text("{broken")
    assert resolve_checkpoint(adapt) == adapt
    # the embedder of a run folder is its chosen model's; a folder that names none is refused clearly
    (adapt / "best.json").write_text(json.dumps({"round": 2, "model": "x"}))
    assert build_embedder(str(adapt), optimize="none").describe()["model"] == f"checkpoint {chosen.resolve()}"
    with pytest.raises(UserError, match="neither a checkpoint"):
        build_embedder(str(tmp_path / "empty"), optimize="none")
    # a config's init given as a run folder is stored as the checkpoint that run chose
    from fashionlens.training.adapt import AdaptConfig
    from fashionlens.training.config import TrainConfig

    assert TrainConfig(catalog="c", init=str(train_run)).init == str(best)
    assert AdaptConfig(init=str(adapt), target="t", train=TrainConfig(catalog="c")).init == str(chosen)
    assert TrainConfig(catalog="c", init="not/there").init == "not/there"  # left for the run's own message
    # best.json naming a model that is not there (a relative path read from elsewhere): said so
    (adapt / "best.json").write_text(json.dumps({"round": 0, "model": "runs/recipe/best"}))
    with pytest.raises(UserError, match="hands over runs/recipe/best, which is not a checkpoint"):
        resolve_checkpoint(adapt)


def test_a_model_name_wins_over_a_run_folder_of_that_name(tmp_path, headed, monkeypatch):
    model, cfg, _ = headed
    save_checkpoint(tmp_path / "lite0" / "best", model, cfg)  # e.g. `fashionlens train ... --out lite0`
    monkeypatch.chdir(tmp_path)
    assert chosen_model("lite0") == "lite0"
    assert "offline ImageNet weights" in build_embedder("lite0", pretrained=False, optimize="none").describe()["model"]
    assert chosen_model("./lite0") == str(Path("lite0") / "best")  # a path is a path

