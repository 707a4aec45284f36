"""Pretrained backbones without a network: random torchvision ResNets saved to disk, loaded into byot."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from byot.errors import ByotError
from byot.models import create_model
from byot.models.pretrained import backbone_key_map, describe_load, load_pretrained


def _randomised(builder) -> torch.nn.Module:
    """A torchvision ResNet with every tensor random (BN statistics too), so a copy cannot match by chance."""
    torch.manual_seed(1)
    net = builder(weights=None)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            else:
                tensor.normal_(0, 0.05)
    return net.eval()


def _saved(builder, tmp_path_factory):
    """A randomised torchvision ResNet and the path of its saved state dict."""
    net = _randomised(builder)
    path = tmp_path_factory.mktemp("weights") / f"{builder.__name__}.pth"
    torch.save(net.state_dict(), path)
    return net, path


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    return _saved(torchvision.models.resnet18, tmp_path_factory)


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    return _saved(torchvision.models.resnet50, tmp_path_factory)


def _model(name: str = "multi_resnet18_kd", **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, 10, **{"width": 64, "image_size": 224, **options})


def _trunk(model, x: torch.Tensor) -> torch.Tensor:
    x = model.stem(x)
    for stage in model.stages:
        x = stage(x)
    return x  # (B, C_last, H / 32, W / 32)


def _torchvision_trunk(net, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def test_key_map_names_stem_stages_and_deepest_head():
    mapping = backbone_key_map(_model())
    assert mapping["conv1.weight"] == "stem.0.weight"
    assert mapping["bn1.running_var"] == "stem.1.running_var"
    assert mapping["layer3.1.conv2.weight"] == "stages.2.1.conv2.weight"
    assert mapping["layer2.0.downsample.1.weight"] == "stages.1.0.downsample.1.weight"
    assert mapping["fc.bias"] == "heads.3.fc.bias"
    assert not any(v.startswith(("heads.0", "heads.1", "heads.2")) for v in mapping.values())
    assert backbone_key_map(_model(exits=False))["fc.weight"] == "heads.0.fc.weight"


def test_resnet18_backbone_copied_fc_reported_exits_untouched(resnet18_file):
    net, path = resnet18_file
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("stem", "stages"))}
    summary = load_pretrained(model, str(path))
    ours, theirs = model.state_dict(), net.state_dict()
    for tv_key, byot_key in backbone_key_map(model).items():
        if not tv_key.startswith("fc."):
            assert torch.equal(ours[byot_key], theirs[tv_key]), tv_key
    assert torch.equal(ours["stem.0.weight"], theirs["conv1.weight"])
    assert torch.equal(ours["stages.2.1.conv2.weight"], theirs["layer3.1.conv2.weight"])
    assert torch.equal(ours["stages.3.0.bn2.running_mean"], theirs["layer4.0.bn2.running_mean"])
    assert summary["loaded"] == len(theirs) - 2
    assert [m.split()[0] for m in summary["shape_mismatch"]] == ["fc.weight", "fc.bias"]
    assert "[1000, 512] vs [10, 512]" in summary["shape_mismatch"][0]
    assert summary["missing"] == [] and summary["unexpected"] == []
    for key, tensor in before.items():  # exits 1-3 and the deepest head keep their initialisation
        assert torch.equal(ours[key], tensor), key


@pytest.mark.parametrize("name,fixture", [("multi_resnet18_kd", "resnet18_file"),
                                          ("multi_resnet50_kd", "resnet50_file")])
def test_trunk_computes_what_torchvision_computes(name, fixture, request):
    net, path = request.getfixturevalue(fixture)
    model = _model(name)
    load_pretrained(model, path)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(_trunk(model, x), _torchvision_trunk(net, x), rtol=1e-5, atol=1e-5)


def test_cifar_stem_is_a_mismatch_but_stages_load(resnet18_file):
    net, path = resnet18_file
    model = _model(image_size=32)
    assert model.stem_kind == "cifar"
    stem_before = model.stem[0].weight.clone()
    summary = load_pretrained(model, path)
    assert summary["shape_mismatch"][0] == "conv1.weight [64, 3, 7, 7] vs [64, 3, 3, 3]"
    assert torch.equal(model.stem[0].weight, stem_before)
    assert torch.equal(model.stem[1].weight, net.bn1.weight)  # same 64 channels: the BN still fits
    assert torch.equal(model.stages[3][1].conv2.weight, net.layer4[1].conv2.weight)


def test_matching_class_count_loads_the_fc_too(resnet18_file):
    net, path = resnet18_file
    torch.manual_seed(0)
    model = create_model("multi_resnet18_kd", 1000, width=64, image_size=224, exits=False)
    summary = load_pretrained(model, path)
    assert summary["shape_mismatch"] == [] and summary["loaded"] == len(net.state_dict())
    assert torch.equal(model.heads[0].fc.weight, net.fc.weight)


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module."])
def test_wrapped_state_dicts_are_accepted(resnet18_file, tmp_path, wrap):
    net, _ = resnet18_file
    state = net.state_dict()
    if wrap == "module.":  # saved from DataParallel
        saved = {f"module.{k}": v for k, v in state.items()}
    else:
        saved = {wrap: state, "epoch": 90}
    path = tmp_path / "wrapped.pth"
    torch.save(saved, path)
    model = _model()
    assert load_pretrained(model, path)["loaded"] == len(state) - 2
    assert torch.equal(model.stages[0][0].conv1.weight, net.layer1[0].conv1.weight)


def test_file_without_bn_step_counters_still_loads(resnet18_file, tmp_path):
    net, _ = resnet18_file
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    summary = load_pretrained(_model(), tmp_path / "old.pth")
    assert summary["missing"] == []


def test_other_architecture_is_refused_and_model_untouched(resnet50_file):
    _, path = resnet50_file
    model = _model("multi_resnet18_kd")
    before = model.stem[0].weight.clone()  # the 7x7 stem would fit: a partial load must not happen
    with pytest.raises(ByotError, match="resnet50.pth.*resnet18"):
        load_pretrained(model, path)
    assert torch.equal(model.stem[0].weight, before)


@pytest.mark.parametrize("content", [b"this is not a checkpoint", None])
def test_unreadable_or_tensorless_file_is_refused(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content is None:
        torch.save({"epoch": 3, "note": "no tensors here"}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ByotError, match="weights.pth"):
        load_pretrained(_model(), path)


def test_absent_file_is_refused(tmp_path):
    with pytest.raises(ByotError, match="no pretrained weights at .*absent.pth"):
        load_pretrained(_model(), tmp_path / "absent.pth")


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_width_other_than_64_refused_before_any_download(monkeypatch):
    def must_not_download(*args, **kwargs):
        raise AssertionError("downloaded although the width cannot fit")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", must_not_download)
    with pytest.raises(ByotError, match="--width 64"):
        load_pretrained(_model(width=32), "imagenet")


@pytest.mark.parametrize("source", [None, "imagenet"])
def test_no_network_names_the_local_file_fix(monkeypatch, source):
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", _no_network)
    with pytest.raises(ByotError, match=r"resnet18.*name resolution.*--pretrained PATH.*torch\.save"):
        load_pretrained(_model(), source)


def test_describe_load_is_one_line_with_counts_and_names(resnet18_file):
    _, path = resnet18_file
    line = describe_load(load_pretrained(_model(image_size=32), path))
    assert "\n" not in line
    assert "loaded 119 tensors" in line  # 122 in resnet18 less conv1.weight, fc.weight, fc.bias
    assert "3 shape mismatches (conv1.weight [64, 3, 7, 7] vs [64, 3, 3, 3], fc.weight" in line
    assert "0 missing from the file" in line and "0 unused from the file" in line
    many = {"source": "f.pth", "loaded": 1, "shape_mismatch": [], "missing": [],
            "unexpected": [f"extra{i}" for i in range(5)]}
    assert describe_load(many).endswith("5 unused from the file (extra0, extra1, extra2, +2 more)")
