"""Every registered model: shapes at two input sizes, gradients to every parameter, stems, sizes."""

from __future__ import annotations

import itertools

import pytest
import torch

import byot
from byot.engine.cost import exit_costs
from byot.errors import ByotError
from byot.models import create_model, list_models, stage_sizes

CHANNELS_LAST = {"multi_resnet18_kd": 8, "multi_resnet34_kd": 8}  # width 1 -> 8 * width channels; x4 otherwise


def expected_channels(name: str, width: int) -> int:
    return 8 * width * (1 if name in CHANNELS_LAST else 4)


def test_registry_lists_the_resnet_family():
    assert list_models() == sorted(f"multi_resnet{d}_kd" for d in (18, 34, 50, 101, 152))
    assert byot.list_models() == list_models()


def test_unknown_name_lists_known_ones():
    with pytest.raises(ByotError, match="multi_resnet18_kd"):
        create_model("resnet9000")


@pytest.mark.parametrize("head", ["bottleneck", "attention"])
@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("image_size,stem", [(32, "cifar"), (64, "imagenet")])
def test_forward_shapes_and_every_parameter_learns(name, image_size, stem, head):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, width=4, image_size=image_size, head=head)
    assert model.spec.stem == stem  # "auto" picks the stem from the input size
    x = torch.randn(3, 3, image_size, image_size)
    out = model(x)
    assert len(out.logits) == len(out.features) == 4
    assert all(z.shape == (3, 7) for z in out.logits)
    assert all(f.shape == (3, expected_channels(name, 4)) for f in out.features)
    loss = byot.SelfDistillLoss(beta=1e-2)(out, torch.tensor([0, 1, 6]))["loss"]
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without gradient: {missing[:5]}"


@pytest.mark.parametrize("head", ["bottleneck", "attention"])
@pytest.mark.parametrize("stem,size", [("cifar", 17), ("cifar", 33), ("cifar", 50), ("imagenet", 33),
                                       ("imagenet", 100), ("imagenet", 224)])
def test_stage_sizes_match_real_feature_maps(stem, size, head):
    model = create_model("multi_resnet18_kd", 5, width=2, stem=stem, image_size=size, head=head).eval()
    seen = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    # the exits' strided convolutions (bottleneck) or SepConv chains (attention) bring each stage to exactly
    # the last stage's size
    exit_sizes = []
    for exit_head in model.heads[:3]:
        exit_head.body.register_forward_hook(lambda m, i, o: exit_sizes.append(o.shape[-1]))
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    assert seen == stage_sizes(stem, size)
    assert exit_sizes == [seen[-1]] * 3


def test_plain_backbone_has_one_exit_and_no_unused_modules():
    model = create_model("multi_resnet18_kd", 10, width=4, exits=False)
    assert model.exit_stages == [4] and model.num_exits == 1
    out = model(torch.randn(2, 3, 32, 32))
    assert len(out.logits) == 1 and out.logits[0].shape == (2, 10)
    full = create_model("multi_resnet18_kd", 10, width=4)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())


def test_depth_stops_early():
    model = create_model("multi_resnet18_kd", 10, width=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full, two = model(x), model(x, depth=2)
    assert len(two.logits) == 2
    assert torch.equal(two.logits[1], full.logits[1])


def test_batch_of_one_trains_at_cifar_size():
    model = create_model("multi_resnet50_kd", 10, width=2).train()
    out = model(torch.randn(1, 3, 32, 32))
    byot.SelfDistillLoss()(out, torch.tensor([3]))["loss"].backward()


def test_exit_costs_count_flops_from_the_model():
    # The CIFAR ResNet18 (width 64, 100 classes) is 0.556 G multiply-adds at 32 px: 1.11 GFLOPs.
    model = create_model("multi_resnet18_kd", 100, width=64, image_size=32)
    costs = exit_costs(model, 32)
    assert [c["exit"] for c in costs] == [1, 2, 3, 4]
    assert costs[-1]["flops"] == pytest.approx(2 * 0.5569e9, rel=0.01)
    assert all(a["flops"] < b["flops"] for a, b in itertools.pairwise(costs))
    # the stem alone: 3x3 conv 3 -> 64 at 32x32 = 2 * 32*32*64*27 FLOPs; stage 1: 4 convs 64->64 3x3
    stem_and_stage1 = 2 * 32 * 32 * 64 * 27 + 4 * 2 * 32 * 32 * 64 * 64 * 9
    assert costs[0]["flops"] > stem_and_stage1
    backbone_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("heads.0")
                          and not n.startswith("heads.1") and not n.startswith("heads.2"))
    assert costs[-1]["params"] == backbone_params


def test_attention_exit_masks_the_stage_with_a_sigmoid_and_keeps_the_backbone_unmasked():
    torch.manual_seed(0)
    model = create_model("multi_resnet18_kd", 10, width=4, head="attention").eval()
    head = model.heads[0]
    seen = {}

    def keep(name, tensor):  # a forward hook that returns something replaces the output: return None
        seen[name] = tensor

    head.body.register_forward_hook(lambda m, i, o: keep("masked", i[0]))
    model.stages[0].register_forward_hook(lambda m, i, o: keep("stage1", o))
    model.stages[1].register_forward_hook(lambda m, i, o: keep("stage2_input", i[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    stage1, masked = seen["stage1"], seen["masked"]
    nonzero = stage1 > 0  # ReLU output: the mask's factor is masked / stage1 where stage1 > 0
    factor = masked[nonzero] / stage1[nonzero]
    assert factor.min() > 0 and factor.max() < 1  # a sigmoid's range
    assert torch.equal(seen["stage2_input"], stage1)  # the backbone goes on with the unmasked map
    # three stride-2 SepConv blocks take stage 1 (32 px, 4 channels) to stage 4's 4 px and 32 channels
    assert len(head.body) == 3 and head.fc.in_features == 32
