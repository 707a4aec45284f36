"""The published reference script's checkpoints: written here by a model with the reference's own module
structure (luanyunteng/pytorch-be-your-own-teacher models/resnet.py: conv1, bn1, layer1-4, bottleneckK_1,
middle_fcK, fc and the never-used downsampleK_1), wrapped in DataParallel and saved as its train.py saves,
then tested and resumed by byot."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from byot.cli import main
from byot.training.build import build_trained, check_checkpoint_fits, load_data
from byot.training.checkpoint import load_checkpoint
from byot.training.evaluate import collect_logits
from byot.training.resolve import resolve_config


class RefBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + residual)


def ref_branch(channel_in: int, channel_out: int, kernel_size: int) -> nn.Sequential:
    middle = channel_out // 4
    return nn.Sequential(nn.Conv2d(channel_in, middle, 1), nn.BatchNorm2d(middle), nn.ReLU(),
                         nn.Conv2d(middle, middle, kernel_size, kernel_size), nn.BatchNorm2d(middle), nn.ReLU(),
                         nn.Conv2d(middle, channel_out, 1), nn.BatchNorm2d(channel_out), nn.ReLU())


class RefMultiResNet18(nn.Module):
    """The reference's Multi_ResNet(BasicBlock, [2, 2, 2, 2]): module names and forward as it has them. Its
    widths are 64, 128, 256, 512 (``w`` = 64); the tests use a narrower copy of the same structure to stay
    fast on the CPU (byot reads the width from the file)."""

    def __init__(self, num_classes: int = 100, w: int = 64) -> None:
        super().__init__()
        self.inplanes = w
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(w, 2)
        self.layer2 = self._make_layer(2 * w, 2, 2)
        self.layer3 = self._make_layer(4 * w, 2, 2)
        self.layer4 = self._make_layer(8 * w, 2, 2)
        for k, (channels, kernel) in enumerate(((w, 8), (2 * w, 4), (4 * w, 2)), start=1):
            setattr(self, f"downsample{k}_1", nn.Sequential(nn.Conv2d(channels, 8 * w, 1, kernel, bias=False),
                                                            nn.BatchNorm2d(8 * w)))  # never used in forward
            setattr(self, f"bottleneck{k}_1", ref_branch(channels, 8 * w, kernel))
            setattr(self, f"middle_fc{k}", nn.Linear(8 * w, num_classes))
        self.fc = nn.Linear(8 * w, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [RefBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [RefBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        outputs = []
        for k, layer in enumerate((self.layer1, self.layer2, self.layer3), start=1):
            x = layer(x)
            feature = getattr(self, f"bottleneck{k}_1")(x).mean(dim=(2, 3))
            outputs.append(getattr(self, f"middle_fc{k}")(feature))
        x = self.layer4(x)
        outputs.append(self.fc(x.mean(dim=(2, 3))))
        return outputs  # shallow to deep


REFERENCE_MEAN, REFERENCE_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # its CIFAR loader's


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    torch.manual_seed(0)
    full = sum(p.numel() for p in RefMultiResNet18(100).parameters())
    assert full == 13_243_600  # the reference's multi_resnet18_kd, its unused downsample*_1 included
    model = RefMultiResNet18(100, w=16)
    for m in model.modules():  # trained-looking BatchNorm statistics, so that every buffer must map right
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    wrapped = nn.DataParallel(model)  # as train.py: every key starts with "module."
    path = tmp_path_factory.mktemp("reference") / "checkpoint_00004.pth.tar"
    torch.save({"epoch": 4, "arch": "multi_resnet18_kd", "state_dict": wrapped.state_dict(),
                "best_prec1": torch.tensor(12.5)}, path)
    assert all(k.startswith("module.") for k in torch.load(path, weights_only=True)["state_dict"])
    return path, model.eval()


def _reference_logits(model: nn.Module, data_dir) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The reference model's own forward on the test images, normalised as its loader does."""
    test = pickle.loads((data_dir / "cifar-100-python" / "test").read_bytes())
    images = torch.from_numpy(np.asarray(test["data"]).reshape(-1, 3, 32, 32)).float() / 255
    images = (images - torch.tensor(REFERENCE_MEAN).view(1, 3, 1, 1)) / torch.tensor(REFERENCE_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(images), torch.tensor(test["fine_labels"])


def test_the_reference_names_cifar100s_classes_in_label_order(cifar100_full):
    from byot.training.reference import CIFAR100_CLASSES

    assert list(CIFAR100_CLASSES) == list(cifar100_full["meta"]["fine_label_names"])


def test_calibrate_does_not_write_into_a_reference_file(reference_file, cifar100_small, capsys):
    path, _ = reference_file
    before = path.read_bytes()
    code = main(["calibrate", "multi_resnet18_kd", "--data-dir", str(cifar100_small), "--resume", str(path),
                 "--val-split", "0.2"])
    assert code == 2 and "does not write into it" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_byot_test_evaluates_a_reference_checkpoint_to_its_own_accuracy(reference_file, cifar100_small, capsys,
                                                                         caplog):
    path, model = reference_file
    state = load_checkpoint(path)
    dropped = state["reference"]["dropped"]
    assert sorted({k.split(".")[0] for k in dropped}) == ["downsample1_1", "downsample2_1", "downsample3_1"]
    assert state["epoch"] == 5 and state["best_top1"] == 12.5  # epoch index 4 finished: 5 epochs done
    code = main(["test", "multi_resnet18_kd", "--data-dir", str(cifar100_small), "--resume", str(path), "--json",
                 "--amp", "off"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    expected, labels = _reference_logits(model, cifar100_small)
    top1 = [float((z.argmax(1) == labels).float().mean() * 100) for z in expected]
    assert [e["top1"] for e in result["exits"]] == pytest.approx(top1, abs=0.01)
    # and logit for logit: every exit of byot's model is the reference's (a head mapped onto another, a
    # BatchNorm buffer left behind or the other normalisation would show)
    cfg, checkpoint = resolve_config({"resume": str(path), "data_dir": str(cifar100_small), "amp": "off"})
    data = load_data(cfg, torch.device("cpu"))
    check_checkpoint_fits(checkpoint, data, str(path))
    byot_model, runtime = build_trained(cfg, checkpoint, torch.device("cpu"))
    logits, targets = collect_logits(byot_model, data.test, runtime)
    assert torch.equal(targets, labels)
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(logits, expected))
    assert not torch.allclose(expected[0], expected[3], atol=1e-2)  # the exits really differ


def test_byot_train_continues_a_reference_checkpoint_from_its_epoch(reference_file, cifar100_small, tmp_path,
                                                                    capsys):
    path, _ = reference_file
    code = main(["train", "multi_resnet18_kd", "--data-dir", str(cifar100_small), "--resume", str(path),
                 "--epochs", "6", "--save-folder", str(tmp_path), "--no-progress", "--batch-size", "150",
                 "--amp", "off"])
    assert code == 0
    err = capsys.readouterr().err
    assert "no optimizer state" in err and "dropped 18 of the never-used downsample1_1" in err
    latest = load_checkpoint(tmp_path / "multi_resnet18_kd" / "checkpoint_latest.pth.tar")
    assert latest["epoch"] == 6 and latest["classes"][:2] == ["apple", "aquarium_fish"]
    assert latest["normalization"] == [list(REFERENCE_MEAN), list(REFERENCE_STD)]  # kept for the next resume
    metrics = [json.loads(line) for line in (tmp_path / "multi_resnet18_kd" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [6]
    assert metrics[0]["lr"] == pytest.approx(0.1 * 0.1 ** 3)  # step schedule of 6 epochs at epoch index 5
