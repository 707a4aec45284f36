"""The public Python API: byot.load, create_model(pretrained=), attach_exits on models byot did not build,
evaluate_exits on a plain DataLoader; checked on real digits scans and real library models."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import assert_cascade_is_the_policy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import byot
from byot.cli import main
from byot.data import NORMALIZATION
from byot.data.digits import load_digits
from byot.deploy import EarlyExitNet, ExitPolicy
from byot.errors import ByotError
from byot.losses import SelfDistillLoss
from byot.models import AttachedNet, HookedExits, attach_exits, create_model
from byot.models.cost import exit_costs
from byot.training.build import build_trained, load_data
from byot.training.evaluate import evaluate
from byot.training.resolve import resolve_config
from byot.training.runtime import Runtime

SIZE = 16  # px: the digits scans upscaled; small enough for full-width ResNets on the CPU
MEAN, STD = NORMALIZATION["digits"]
HAS_TIMM = importlib.util.find_spec("timm") is not None


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def small_cnn() -> nn.Module:
    """A user's 3-block CNN: blocks "0", "1", "2", then pooling and the classifier."""
    return nn.Sequential(_block(3, 16, 1), _block(16, 32, 2), _block(32, 64, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))


class SkipCNN(nn.Module):
    """A CNN whose forward adds block 1's map to block 3's: not a chain of its modules, so only hooks fit."""

    def __init__(self) -> None:
        super().__init__()
        self.block1, self.block2, self.block3 = _block(3, 32, 2), _block(32, 32, 1), _block(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.block1(x)  # (B, 32, H/2, W/2)
        b = self.block3(self.block2(a)) + a
        return self.fc(b.mean(dim=(2, 3)))


def tv_resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def timm_resnet18() -> nn.Module:
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=10)


RESNET_EXITS = ["layer1", "layer2", "layer3"]
# name -> (builder, at, the class attach_exits gives by default)
MODULES = {
    "torchvision_resnet18": (tv_resnet18, RESNET_EXITS, AttachedNet),
    "timm_resnet18": (timm_resnet18, RESNET_EXITS, AttachedNet),
    "small_cnn": (small_cnn, ["0", "1"], AttachedNet),
    "skip_cnn": (SkipCNN, ["block1", "block2"], HookedExits),
}
CASES = [pytest.param(name, marks=pytest.mark.skipif(name.startswith("timm") and not HAS_TIMM, reason="no timm"))
         for name in MODULES]


def _attached(name: str, mode: str = "auto") -> tuple[nn.Module, nn.Module]:
    """(the module, the module with exits) for MODULES[name], seeded."""
    build, at, _ = MODULES[name]
    torch.manual_seed(0)
    module = build()
    return module, attach_exits(module, at, num_classes=10, input_size=(1, 3, SIZE, SIZE), mode=mode)


@pytest.fixture(scope="module")
def digits() -> dict[str, torch.Tensor]:
    """Real digits scans at SIZE px: normalised float images and labels of both splits."""
    train, test = load_digits(SIZE)

    def normalised(images: torch.Tensor) -> torch.Tensor:
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        return (images.float() / 255 - mean) / std  # (N, 3, SIZE, SIZE)

    return {"train_x": normalised(train.images), "train_y": train.labels, "test_x": normalised(test.images),
            "test_y": test.labels, "test_uint8": test.images}


@pytest.mark.parametrize("mode", ["auto", "hooks"])
@pytest.mark.parametrize("name", CASES)
def test_attached_exits_shapes_and_the_module_output_is_the_deepest_exit(name, mode, digits):
    module, net = _attached(name, mode)
    before = copy.deepcopy(module).eval()
    expected_kind = MODULES[name][2] if mode == "auto" else HookedExits
    assert type(net) is expected_kind
    net.eval()
    x = digits["test_x"][:8]
    out = net(x)
    n = len(MODULES[name][1]) + 1
    assert len(out.logits) == len(out.features) == n == net.num_exits
    assert net.exit_stages == list(range(1, n + 1))
    assert all(z.shape == (8, 10) for z in out.logits)
    width = out.features[-1].shape[1]
    assert all(f.shape == (8, width) for f in out.features)
    # the deepest exit is the module's own output, and attaching changed nothing in the module
    assert torch.equal(out.logits[-1], before(x))
    assert torch.equal(module.eval()(x), before(x))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


@pytest.mark.parametrize("mode", ["auto", "hooks"])
@pytest.mark.parametrize("name", CASES)
def test_self_distillation_gradients_reach_every_parameter(name, mode, digits):
    module, net = _attached(name, mode)
    with torch.no_grad():  # timm zero-initialises each block's last BN scale, which zeroes the block's gradients
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    net.train()
    out = net(digits["train_x"][:16])
    terms = SelfDistillLoss(alpha=0.1, beta=1e-2)(out, digits["train_y"][:16], net.exit_stages)
    assert "kd/exit1" in terms and "hint/exit1" in terms
    terms["loss"].backward()
    params = dict(net.named_parameters())
    assert {id(p) for p in module.parameters()} <= {id(p) for p in params.values()}  # the backbone trains too
    missing = [k for k, p in params.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing


@pytest.mark.parametrize("name,mode,lr", [("small_cnn", "auto", 0.2), ("small_cnn", "hooks", 0.2),
                                          ("skip_cnn", "auto", 0.2), ("torchvision_resnet18", "auto", 0.05)])
def test_sgd_steps_on_digits_lower_the_self_distillation_loss(name, mode, lr, digits):
    _, net = _attached(name, mode)
    loss_fn = SelfDistillLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    x, y = digits["train_x"][:128], digits["train_y"][:128]
    net.train()
    losses = []
    for _ in range(10):
        loss = loss_fn(net(x), y, net.exit_stages)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]  # the small CNNs: about -10% in 10 steps; the ResNet: -80%


@pytest.mark.parametrize("name", [c for c in CASES if MODULES[c.values[0]][2] is AttachedNet])
def test_early_exit_on_an_attached_model_is_the_simulated_policy(name, digits):
    _, net = _attached(name)
    runtime = Runtime(torch.device("cpu"), torch.tensor(MEAN), torch.tensor(STD))
    images, labels = digits["test_uint8"][:96], digits["test_y"][:96]
    batches = [(images[i:i + 32], labels[i:i + 32]) for i in range(0, 96, 32)]  # uint8, as byot's batches
    assert_cascade_is_the_policy(net.eval(), runtime, batches)
    flops = [c["flops"] for c in exit_costs(net, SIZE)]  # counted along the same stage walk
    assert len(flops) == net.num_exits and flops == sorted(set(flops))


def test_a_module_that_is_not_a_chain_gets_hooks_and_early_exit_refuses_in_one_line(digits):
    _, net = _attached("skip_cnn")
    assert isinstance(net, HookedExits)
    with pytest.raises(ByotError) as refused:  # refused when the cascade is built, not at its first batch
        EarlyExitNet(net, ExitPolicy((0.5, 0.5)))
    assert "\n" not in str(refused.value) and "stages" in str(refused.value)
    assert net(digits["test_x"][:4]).logits[-1].shape == (4, 10)  # the model itself still runs
    with pytest.raises(ByotError, match="stages"):
        exit_costs(net, SIZE)
    with pytest.raises(ByotError, match="not a chain|more than run its modules"):
        _attached("skip_cnn", mode="stages")


def test_attach_exits_refuses_bad_arguments_in_one_line():
    for kwargs, words in [({"at": ["layer9"]}, "unknown: 'layer9'"), ({"num_classes": 7}, "outputs 10 classes"),
                          ({"head": "mlp"}, "unknown exit head"), ({"mode": "jit"}, "choose one of"),
                          ({"input_size": (1, 5, 16, 16)}, "input_size")]:
        with pytest.raises(ByotError, match=words) as refused:
            attach_exits(tv_resnet18(), **{"at": RESNET_EXITS, "input_size": (1, 3, SIZE, SIZE), **kwargs})
        assert "\n" not in str(refused.value)


def test_attention_heads_on_a_torchvision_model(digits):
    torch.manual_seed(0)
    net = attach_exits(tv_resnet18(), RESNET_EXITS, head="attention", input_size=(1, 3, SIZE, SIZE))
    out = net.eval()(digits["test_x"][:4])
    assert [z.shape for z in out.logits] == [(4, 10)] * 4
    assert "AttentionExit" in {type(m).__name__ for m in net.heads.modules()}


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="no onnxruntime")
def test_an_attached_model_exports_to_onnx(tmp_path):
    from byot.deploy.export import ExitNetwork, export

    _, net = _attached("small_cnn")
    result = export(ExitNetwork(net.eval(), [1, 3], MEAN, STD), "onnx", tmp_path / "cnn.onnx", SIZE, {})
    assert result["max_abs_diff"] < 1e-4 and (tmp_path / "cnn.onnx").stat().st_size > 0


def test_evaluate_exits_on_a_plain_dataloader_counts_as_by_hand(digits):
    _, net = _attached("small_cnn")
    net.train()
    loader = DataLoader(TensorDataset(digits["test_x"], digits["test_y"]), batch_size=50)  # last batch partial
    scores = byot.evaluate_exits(net, loader)
    assert net.training  # put back in the mode it was in
    with torch.no_grad():
        logits = net.eval()(digits["test_x"]).logits
    y = digits["test_y"]
    assert scores.num_images == len(y)
    for k, z in zip(net.exit_stages, logits):
        assert scores.top1[k] == pytest.approx(100.0 * (z.argmax(1) == y).double().mean().item())
        in_top5 = (z.topk(5, dim=1).indices == y[:, None]).any(dim=1)
        assert scores.top5[k] == pytest.approx(100.0 * in_top5.double().mean().item())
    ensemble = torch.stack([z.softmax(1) for z in logits]).mean(0)
    assert scores.ensemble_top1 == pytest.approx(100.0 * (ensemble.argmax(1) == y).double().mean().item())
    with pytest.raises(ByotError, match="no images"):
        byot.evaluate_exits(net, [])




def test_load_gives_a_ready_model_and_what_it_expects(ckpt):
    loaded = byot.load(ckpt)
    model, info = loaded
    assert model is loaded.model and not model.training
    assert next(model.parameters()).device.type == "cpu"
    assert info.arch == "multi_resnet18_kd" and info.classes == tuple(str(c) for c in range(10))
    assert info.num_classes == 10 and info.image_size == 16 and info.exits == (1, 2, 3, 4)
    assert info.mean == pytest.approx(MEAN) and info.std == pytest.approx(STD)
    assert info.policy is None and info.weights == "raw" and info.config.width == 8 and info.epoch >= 1
    with pytest.raises(AttributeError):
        info.arch = "other"  # frozen
    # the same model the commands build, on the same images
    cfg, checkpoint = resolve_config({"resume": str(ckpt), "amp": "off"})
    reference, runtime = build_trained(cfg, checkpoint, torch.device("cpu"))
    images = next(iter(load_data(cfg, torch.device("cpu")).test))[0]
    x = runtime.inputs(images)
    assert all(torch.equal(a, b) for a, b in zip(model(x).logits, reference(x).logits))


def test_load_holds_the_fitted_calibration_and_evaluate_exits_matches_byot_test(ckpt, capsys):
    assert main(["calibrate", "multi_resnet18_kd", "--resume", str(ckpt), "--json"]) == 0
    capsys.readouterr()
    model, info = byot.load(ckpt)
    assert info.policy is not None and len(info.policy.temperatures) == 4
    assert all(t > 0 for t in info.policy.temperatures) and len(info.policy.thresholds) == 3
    cfg, checkpoint = resolve_config({"resume": str(ckpt), "amp": "off"})
    _, runtime = build_trained(cfg, checkpoint, torch.device("cpu"))
    batches = load_data(cfg, torch.device("cpu")).test
    expected = evaluate(model, batches, runtime, model.exit_stages)
    loader = [(runtime.inputs(images), labels) for images, labels in batches]
    scores = byot.evaluate_exits(model, loader)
    assert scores.num_images == expected["num_images"]
    assert scores.top1 == {e["exit"]: pytest.approx(e["top1"]) for e in expected["exits"]}
    assert scores.ensemble_top1 == pytest.approx(expected["ensemble"]["top1"])


def test_load_refuses_a_missing_file_in_one_line(tmp_path):
    with pytest.raises(ByotError, match="no checkpoint"):
        byot.load(tmp_path / "none.pth.tar")


def _randomised_file(builder, path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    state = builder(weights=None).state_dict()
    for name, tensor in state.items():
        if tensor.is_floating_point():
            tensor.normal_(0, 0.05).abs_() if "running_var" in name else tensor.normal_(0, 0.05)
    torch.save(state, path)
    return state


def test_create_model_loads_local_pretrained_weights_into_the_backbone(tmp_path):
    state = _randomised_file(torchvision.models.resnet18, tmp_path / "resnet18.pth")
    torch.manual_seed(0)
    fresh = create_model("multi_resnet18_kd", num_classes=10, width=64)
    torch.manual_seed(0)
    same = create_model("multi_resnet18_kd", num_classes=10, width=64, pretrained=None)  # today's behaviour
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), same.state_dict().values()))
    torch.manual_seed(0)
    loaded = byot.create_model("multi_resnet18_kd", num_classes=10, width=64, pretrained=tmp_path / "resnet18.pth")
    assert torch.equal(loaded.stages[2][1].conv2.weight, state["layer3.1.conv2.weight"])
    assert torch.equal(loaded.stem[1].running_mean, state["bn1.running_mean"])
    assert torch.equal(loaded.heads[0].fc.weight, fresh.heads[0].fc.weight)  # the shallow exits start fresh
    with pytest.raises(ByotError, match="no pretrained weights"):
        create_model("multi_resnet18_kd", num_classes=10, width=64, pretrained=tmp_path / "absent.pth")
    with pytest.raises(ByotError, match="width"):
        create_model("multi_resnet18_kd", num_classes=10, width=8, pretrained=tmp_path / "resnet18.pth")


def test_create_model_loads_a_library_models_own_file(tmp_path):
    state = _randomised_file(torchvision.models.resnet18, tmp_path / "tv_resnet18.pth")
    model = create_model("tv/resnet18", num_classes=10, pretrained=tmp_path / "tv_resnet18.pth")
    own = dict(model.state_dict())
    key = next(k for k, lib in model.library_keys.items() if lib == "layer2.0.conv1.weight")
    assert torch.equal(own[key], state["layer2.0.conv1.weight"])


def test_the_public_names_resolve_and_the_package_is_typed():
    for name in byot.__all__:
        assert getattr(byot, name) is not None
    assert set(byot.__all__) <= set(dir(byot))
    assert (Path(byot.__file__).parent / "py.typed").is_file()
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '[tool.setuptools.package-data]\nbyot = ["py.typed"]' in pyproject
    assert byot.load.__annotations__["return"] == "Loaded" and byot.attach_exits.__doc__
