"""Every registered model on the multi-exit contract: shapes at two input sizes, gradients to every parameter,
heads sized from the real maps, FLOPs per exit, gradient checkpointing, options, published parameter counts."""

from __future__ import annotations

import itertools

import pytest
import torch

import byot
from byot.errors import ByotError
from byot.models import create_model, list_models, model_spec
from byot.models.cost import exit_costs
from byot.models.registry import model_entry

# Small configurations of each family (the registered name's options overridden) so that every entry runs in
# well under a second on the CPU; the structure (blocks, stages, shortcuts, groups) stays the family's.
TINY = {
    "resnet": {"width": 2},
    "vgg": {"width": 2},
    "wide_resnet": {"depth": 10, "widen": 1, "width": 4, "dropout": 0.1},
    "resnext": {"depth": 11, "cardinality": 2, "bottleneck_width": 2, "width": 4},
    "pyramidnet": {"depth": 8, "alpha": 6, "width": 4},
    "mobilenetv2": {"width_mult": 0.1},
}
TINY_ENTRY = {"multi_resnext50_32x4d_kd": {"width": 4, "groups": 2, "width_per_group": 32}}
FAMILIES = ["mobilenetv2", "pyramidnet", "resnet", "resnext", "vgg", "wide_resnet"]


def tiny(name: str) -> dict:
    return TINY_ENTRY.get(name, TINY[model_entry(name).family.name])


def tiny_model(name: str, num_classes: int = 7, image_size: int = 32, **common) -> byot.MultiExitNet:
    return create_model(name, num_classes, image_size, **common, **tiny(name))


def test_registry_lists_every_family_under_names_that_say_their_configuration():
    names = list_models()
    assert {model_entry(n).family.name for n in names} == set(FAMILIES)
    for expected in ("multi_resnet18_kd", "multi_resnet50_kd", "multi_vgg16_kd", "multi_vgg19_kd", "multi_wrn16_4_kd",
                     "multi_wrn28_10_kd", "multi_resnext29_8x64d_kd", "multi_pyramidnet110_48_kd",
                     "multi_mobilenetv2_kd"):
        assert expected in names
    assert byot.list_models() == names
    assert model_spec("multi_wrn28_10_kd").depth == 28 and model_spec("multi_wrn28_10_kd").widen == 10


def test_unknown_name_lists_known_ones():
    with pytest.raises(ByotError, match="multi_resnet18_kd"):
        create_model("resnet9000")


@pytest.mark.parametrize("head", ["bottleneck", "attention"])
@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("name", list_models())
def test_forward_shapes_heads_sized_from_the_real_maps_and_every_parameter_learns(name, image_size, head):
    torch.manual_seed(0)
    model = tiny_model(name, 7, image_size, head=head)
    seen, exit_sizes = [], []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[1:])))
    for h in model.heads[:-1]:
        h.body.register_forward_hook(lambda m, i, o: exit_sizes.append(tuple(o.shape[1:])))
    x = torch.randn(3, 3, image_size, image_size)
    out = model(x)
    # the recorded shapes are the real maps'; every shallow head brings its stage to the deepest map exactly
    assert seen == [(s.channels, s.height, s.width) for s in model.stage_shapes]
    assert exit_sizes == [seen[-1]] * (model.num_exits - 1)
    assert model.exit_stages == list(range(1, len(model.stages) + 1))  # natural boundaries: every stage
    assert len(out.logits) == len(out.features) == model.num_exits >= 3
    assert all(z.shape == (3, 7) for z in out.logits)
    assert all(f.shape == (3, seen[-1][0]) for f in out.features)
    loss = byot.SelfDistillLoss(beta=1e-2)(out, torch.tensor([0, 1, 6]), model.exit_stages)["loss"]
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without gradient: {missing[:5]}"


# every entry with the bottleneck heads; the attention heads on one entry per family (their sizing rule is the
# family's shapes, the same for every entry of a family)
FLOPS_CASES = [(n, "bottleneck") for n in list_models()] + [
    (n, "attention") for n in ("multi_resnet18_kd", "multi_resnet50_kd", "multi_vgg16_kd", "multi_wrn16_4_kd",
                               "multi_resnext29_8x64d_kd", "multi_pyramidnet110_48_kd", "multi_mobilenetv2_kd")]


@pytest.mark.parametrize("name,head", FLOPS_CASES)
def test_flops_per_exit_increase_with_depth_at_the_registered_configuration(name, head):
    with torch.device("meta"):  # the real configuration, counted on shapes alone
        model = create_model(name, 100, 32, head=head)
    costs = exit_costs(model, 32)
    assert [c["exit"] for c in costs] == model.exit_stages
    assert all(a["flops"] < b["flops"] for a, b in itertools.pairwise(costs))
    assert costs[-1]["params"] == sum(p.numel() for n, p in model.named_parameters()
                                      if not any(n.startswith(f"heads.{i}.") for i in range(model.num_exits - 1)))


@pytest.mark.parametrize("name", list_models())
def test_forward_exit_and_depth_match_the_full_forward(name):
    model = tiny_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        for k, z in zip(model.exit_stages, full.logits):
            assert torch.allclose(model.forward_exit(x, k), z, atol=1e-5)
        assert len(model(x, depth=2).logits) == model.exit_stages.index(2) + 1


@pytest.mark.parametrize("name", list_models())
def test_gradient_checkpointing_gives_the_plain_paths_gradients(name):
    torch.manual_seed(0)
    model = tiny_model(name, head="attention")
    model.eval()  # no dropout, BatchNorm on its running statistics: both paths compute the same function
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.grad_checkpoint = flag
        model.training = True  # checkpointing applies in training only; the submodules stay in eval
        byot.SelfDistillLoss(beta=1e-2)(model(x), y)["loss"].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_exits_after_chosen_stages_and_the_plain_backbone():
    model = tiny_model("multi_vgg16_kd", exits=(2, 4))
    assert model.exit_stages == [2, 4, 5] and model.num_exits == 3
    out = model(torch.randn(2, 3, 32, 32))
    assert len(out.logits) == 3
    plain = tiny_model("multi_vgg16_kd", exits=False)
    assert plain.exit_stages == [5] and len(plain(torch.randn(2, 3, 32, 32)).logits) == 1
    for bad in ((0,), (5,), (1, 9), ()):
        with pytest.raises(ByotError, match="--exits"):
            tiny_model("multi_vgg16_kd", exits=bad)


def test_family_options_are_typed_and_checked_once_with_one_line_errors():
    with pytest.raises(ByotError, match=r"takes no option stem; its options: depth, width"):
        create_model("multi_vgg16_kd", stem="cifar")
    with pytest.raises(ByotError, match="depth must be 6n \\+ 4"):
        create_model("multi_wrn16_4_kd", depth=17)
    with pytest.raises(ByotError, match="option widen must be int"):
        create_model("multi_wrn16_4_kd", widen="wide")
    assert model_spec("multi_wrn16_4_kd", {"depth": "22", "dropout": "0.3"}).depth == 22  # text from a flag
    with pytest.raises(ByotError, match="cardinality"):
        create_model("multi_resnext29_8x64d_kd", cardinality=0)


def test_subnet_shares_modules_and_keeps_only_the_chosen_exits():
    model = tiny_model("multi_resnet18_kd").eval()
    sub = model.subnet([2])
    assert sub.exit_stages == [2] and len(sub.stages) == 2 and len(sub.heads) == 1
    assert sub.stages[0] is model.stages[0] and sub.heads[0] is model.heads[1]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(sub(x).logits[0], model(x).logits[1])
    with pytest.raises(ByotError, match="exits are 1, 2, 3, 4"):
        model.subnet([7])


def test_attention_mask_spans_zero_to_one_and_keeps_the_backbone_unmasked():
    # The journal's attention ends BN -> sigmoid: values below 0.5 occur (a ReLU before the sigmoid made the
    # range [0.5, 1), so the mask could at most halve the map)
    torch.manual_seed(0)
    model = create_model("multi_resnet18_kd", 10, width=4, head="attention").train()
    head, seen = model.heads[0], {}

    def keep(name, tensor):  # a forward hook that returns something replaces the output: return None
        seen[name] = tensor

    head.body.register_forward_hook(lambda m, i, o: keep("masked", i[0]))
    model.stages[0].register_forward_hook(lambda m, i, o: keep("stage1", o))
    model.stages[1].register_forward_hook(lambda m, i, o: keep("stage2_input", i[0]))
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    stage1, masked = seen["stage1"], seen["masked"]
    nonzero = stage1 > 0  # ReLU output: the mask's factor is masked / stage1 where stage1 > 0
    factor = masked[nonzero] / stage1[nonzero]
    assert factor.min() > 0 and factor.max() < 1  # a sigmoid's range
    assert (factor < 0.5).float().mean() > 0.2  # and its lower half is used: BN -> sigmoid, no ReLU between
    assert torch.equal(seen["stage2_input"], stage1)  # the backbone goes on with the unmasked map
    # three stride-2 SepConv blocks take stage 1 (32 px, 4 channels) to stage 4's 4 px and 32 channels
    assert len(head.body) == 3 and head.fc.in_features == 32
    legacy = create_model("multi_resnet18_kd", 10, width=4, head="attention", legacy_attention=True)
    assert isinstance(legacy.heads[0].attention[-1], torch.nn.ReLU)  # old checkpoints keep their mask
    assert model.state_dict().keys() == legacy.state_dict().keys()


def test_attention_head_of_a_family_whose_channels_do_not_double():
    model = tiny_model("multi_vgg16_kd", head="attention")  # VGG: 2, 4, 8, 16, 16 channels x width 2
    last = model.heads[3]  # stage 4 (16 ch, 2 px) -> stage 5 (16 ch, 1 px): one stride-2 block, same channels
    assert len(last.body) == 1 and last.fc.in_features == 16
    assert len(model.heads[0].body) == 4  # 16 px -> 1 px: four halvings


def test_batch_of_one_trains_at_cifar_size():
    model = create_model("multi_resnet50_kd", 10, width=2).train()
    out = model(torch.randn(1, 3, 32, 32))
    byot.SelfDistillLoss()(out, torch.tensor([3]))["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_exit_costs_count_flops_from_the_model():
    # The CIFAR ResNet18 (width 64, 100 classes) is 0.556 G multiply-adds at 32 px: 1.11 GFLOPs.
    model = create_model("multi_resnet18_kd", 100, width=64, image_size=32)
    costs = exit_costs(model, 32)
    assert [c["exit"] for c in costs] == [1, 2, 3, 4]
    assert costs[-1]["flops"] == pytest.approx(2 * 0.5569e9, rel=0.01)
    # the stem alone: 3x3 conv 3 -> 64 at 32x32 = 2 * 32*32*64*27 FLOPs; stage 1: 4 convs 64->64 3x3
    stem_and_stage1 = 2 * 32 * 32 * 64 * 27 + 4 * 2 * 32 * 32 * 64 * 64 * 9
    assert costs[0]["flops"] > stem_and_stage1


def _count(name: str, num_classes: int, **common) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        model = create_model(name, num_classes, **common)
    return sum(p.numel() for p in model.parameters())


# The plain backbones against counts published for the same configuration. "public file" counts were
# obtained by building that file's model as written and counting its parameters.
PUBLISHED = [
    # torchvision's model tables (ImageNet stem at 224 px, 1000 classes)
    ("multi_resnet18_kd", 1000, 224, 11_689_512),
    ("multi_resnet50_kd", 1000, 224, 25_557_032),
    ("multi_resnext50_32x4d_kd", 1000, 224, 25_028_904),
    ("multi_wide_resnet50_2_kd", 1000, 224, 68_883_240),
    ("multi_mobilenetv2_kd", 1000, 224, 3_504_872),  # the paper: 3.4M
    # kuangliu/pytorch-cifar models/vgg.py (Linear(512, 10)); bearpaw/pytorch-classification: VGG19-BN 20.04M
    ("multi_vgg11_kd", 10, 32, 9_231_114),
    ("multi_vgg13_kd", 10, 32, 9_416_010),
    ("multi_vgg16_kd", 10, 32, 14_728_266),
    ("multi_vgg19_kd", 10, 32, 20_040_522),
    # Zagoruyko & Komodakis: WRN-28-10 36.5M, WRN-40-4 8.9M; xternalz/WideResNet-pytorch wideresnet.py
    ("multi_wrn28_10_kd", 10, 32, 36_479_194),
    ("multi_wrn40_4_kd", 10, 32, 8_949_210),
    ("multi_wrn16_4_kd", 100, 32, 2_772_020),  # 2.77M for CIFAR-100 (chitraz/KnowledgeDistillation... README)
    # Xie et al. 2017: ResNeXt-29 8x64d 34.4M, 16x64d 68.1M; prlz77/ResNeXt.pytorch models/model.py
    ("multi_resnext29_8x64d_kd", 10, 32, 34_426_698),
    ("multi_resnext29_16x64d_kd", 10, 32, 68_155_210),
    # Han et al. 2017: PyramidNet-110 alpha 48 1.7M; dyhan0920/PyramidNet-PyTorch PyramidNet.py
    ("multi_pyramidnet110_48_kd", 10, 32, 1_772_706),
]


@pytest.mark.parametrize("name,classes,size,count", PUBLISHED)
def test_plain_backbones_have_the_published_parameter_counts(name, classes, size, count):
    assert _count(name, classes, image_size=size, exits=False) == count


def test_multi_exit_resnets_have_the_reference_scripts_parameter_counts():
    # the reference's multi_resnet18_kd / multi_resnet50_kd with 100 classes (luanyunteng/pytorch-be-your-own-
    # teacher models/resnet.py), without its never-used downsample*_1 modules (232,448 and 3,682,304 parameters)
    assert _count("multi_resnet18_kd", 100) == 13_243_600 - 232_448 == 13_011_152
    assert _count("multi_resnet50_kd", 100) == 54_113_232 - 3_682_304 == 50_430_928


def test_checkpoints_written_before_the_contract_keep_their_attention_mask():
    # byot < 0.2 wrote no "model_spec"; its attention exits were trained with the ReLU -> sigmoid mask, and
    # rebuilding them with it makes them test to the accuracy they were trained to (a real 0.1.0 checkpoint
    # tested identically per exit with 0.1.0 and with this code: see the session note of issue 13)
    from byot.config import build_config
    from byot.training.build import build_model

    cfg = build_config({}, {"head": "attention", "width": 4})
    old = build_model(cfg, 10, 32, {"model": {}})
    new = build_model(cfg, 10, 32, {"model": {}, "model_spec": {}})
    assert isinstance(old.heads[0].attention[-1], torch.nn.ReLU)
    assert not isinstance(new.heads[0].attention[-1], torch.nn.ReLU)
    plain = build_model(build_config({}, {"width": 4}), 10, 32, {"model": {}})  # bottleneck heads: no mask
    assert not hasattr(plain.heads[0], "attention")
