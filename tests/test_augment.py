"""Per-image strong augmentation on the device: each operation against torchvision's kernel image by image,
the policies' per-image sampling, Cutout, mixup and CutMix, and the (seed, epoch) determinism that exact
resume and torchrun rest on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from byot.data.augment import (
    OP_INDEX,
    OPS,
    AugmentedBatches,
    AugmentSpec,
    Mixed,
    apply_operations,
    augment_batch,
    cutmix_boxes,
    cutout,
    draw,
    draw_operations,
)
from byot.data.batches import Shard, TensorBatches
from byot.data.images import ImageSet


def real_images(cifar100_full, n: int = 8) -> torch.Tensor:
    data = np.asarray(cifar100_full["train"]["data"][:n]).reshape(n, 3, 32, 32)
    return torch.from_numpy(data.copy())


# torchvision's magnitudes as AutoAugment hands them to an operation (signed where the operation is)
MAGNITUDES = {
    "Identity": [0.0], "ShearX": [0.3, -0.1667], "ShearY": [-0.3, 0.0333], "TranslateX": [14.5, -4.8],
    "TranslateY": [-14.5, 9.7], "Rotate": [30.0, -6.67, 135.0], "Brightness": [0.9, -0.5], "Color": [0.3, -0.7],
    "Contrast": [0.6, -0.9], "Sharpness": [0.9, -0.3], "Posterize": [4.0, 6.0, 8.0], "Solarize": [0.0, 0.5556, 1.0],
    "AutoContrast": [0.0], "Equalize": [0.0], "Invert": [0.0],
}


@pytest.mark.parametrize("name", OPS)
def test_each_operation_is_torchvisions_image_by_image(cifar100_full, name):
    images = real_images(cifar100_full)
    images[1] = images[1] // 3 + 70  # a low-contrast image: autocontrast and equalize stretch it
    reference = v2.AutoAugment()
    for m in MAGNITUDES[name]:
        m = float(torch.tensor(m))  # torchvision's magnitudes are float32 values
        got = apply_operations(images, torch.full((8,), OP_INDEX[name]), torch.full((8,), m), fill=128)
        want = torch.stack([reference._apply_image_or_video_transform(
            img, name, m, interpolation=v2.InterpolationMode.NEAREST, fill={torch.Tensor: [128.0] * 3})
            for img in images])
        assert torch.equal(got, want), (name, m)
        if name != "Identity" and not (name == "Posterize" and m == 8.0):
            assert not torch.equal(got, images)


def test_one_batch_applies_a_different_operation_to_each_image(cifar100_full):
    images = real_images(cifar100_full, 4)
    ops = torch.tensor([OP_INDEX["Rotate"], OP_INDEX["Invert"], OP_INDEX["Identity"], OP_INDEX["Solarize"]])
    mags = torch.tensor([20.0, 0.0, 0.0, 0.5])
    got = apply_operations(images, ops, mags, fill=0)
    assert torch.equal(got[1], 255 - images[1]) and torch.equal(got[2], images[2])
    assert torch.equal(got[0], v2.functional.rotate(images[0], 20.0))
    assert torch.equal(got[3], v2.functional.solarize(images[3], 127.5))


@pytest.mark.parametrize("policy", ["autoaugment", "randaugment", "trivialaugment"])
def test_identical_images_in_one_batch_come_out_differently(cifar100_full, policy):
    image = real_images(cifar100_full, 1)
    images = image.expand(64, -1, -1, -1).contiguous()
    spec = AugmentSpec(policy, fill=128)
    g = torch.Generator().manual_seed(0)
    out, labels = augment_batch(spec, images, torch.zeros(64, dtype=torch.long), draw(spec, 64, 32, 32, g).packed())
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) >= 16, len(distinct)  # one policy for the whole batch would give one or two
    assert torch.equal(labels, torch.zeros(64, dtype=torch.long))


def test_autoaugment_draws_each_sub_policy_and_its_probabilities_per_image():
    n = 40_000
    spec = AugmentSpec("autoaugment")
    ops, mags = draw_operations(spec, n, 32, 32, torch.Generator().manual_seed(1))
    assert ops.shape == (n, 2)
    policies = v2.AutoAugment()._get_policies(v2.AutoAugmentPolicy.CIFAR10)
    # sub-policy 0 is (Invert 0.1, Contrast 0.2 at bin 6): a contrast draw is +-linspace(0, 0.9, 10)[6] = +-0.6
    contrast = ops[:, 1] == OP_INDEX["Contrast"]
    share = contrast.float().mean().item()  # only sub-policy 0 (1/25) has it second, with probability 0.2
    assert share == pytest.approx(0.2 / 25, abs=4 * math.sqrt(0.008 / n))
    assert set(mags[:, 1][contrast].abs().tolist()) == {float(torch.linspace(0.0, 0.9, 10)[6])}
    assert 0.4 < (mags[:, 1][contrast] < 0).float().mean().item() < 0.6  # signed: either way, half the time
    solarize = ops == OP_INDEX["Solarize"]
    assert (mags[solarize] >= 0).all()  # unsigned operations keep their sign
    # never an operation outside the policy
    names = {name for sub in policies for name, _, _ in sub} | {"Identity"}
    assert {OPS[i] for i in ops.unique().tolist()} <= names


def test_cutout_makes_one_clipped_hole_per_image():
    images = torch.full((3, 3, 32, 32), 200, dtype=torch.uint8)
    out = cutout(images, torch.tensor([[16, 16], [0, 0], [31, 5]]), 16)
    holes = (out == 0).all(dim=1)  # (B, H, W)
    assert holes[0].sum() == 256 and holes[0, 8:24, 8:24].all()
    assert holes[1].sum() == 64 and holes[1, :8, :8].all()  # rows 0-7, columns 0-7
    assert holes[2].sum() == 9 * 13 and holes[2, 23:, :13].all()


def test_cutmix_takes_the_box_share_as_its_ratio_and_mixup_blends():
    box, lam = cutmix_boxes(torch.tensor([0.75, 0.0]), torch.tensor([[16, 16], [0, 0]]), 32, 32)
    assert box[0].sum() == 256 and lam[0] == pytest.approx(0.75)
    assert box[1].sum() == 256 and lam[1] == pytest.approx(0.75)  # a box of side 32 around a corner: clipped
    images = torch.stack([torch.zeros(3, 8, 8), torch.full((3, 8, 8), 200.0)]).to(torch.uint8)
    labels = torch.tensor([3, 5])
    spec = AugmentSpec(mixup=1.0)
    packed = torch.tensor([[16.0, 16.0, 0.9, 0.25, 0.0, 4.0, 4.0], [16.0, 16.0, 0.1, 0.5, 0.0, 4.0, 4.0]])
    out, targets = augment_batch(spec, images, labels, packed)  # keys 0.9, 0.1: the two images swap partners
    assert isinstance(targets, Mixed) and targets.partner_labels.tolist() == [5, 3]
    assert out[0].unique().tolist() == [150] and out[1].unique().tolist() == [100]  # 0.25 x 0 + 0.75 x 200
    assert targets.lam.tolist() == [0.25, 0.5] and targets.dominant().tolist() == [5, 5]


def _batches(cifar100_full, shard: Shard | None = None) -> TensorBatches:
    data = np.asarray(cifar100_full["train"]["data"][:40]).reshape(40, 3, 32, 32)
    images = ImageSet(torch.from_numpy(data.copy()), torch.arange(40) % 7, [str(i) for i in range(7)])
    return TensorBatches(images, 16, True, seed=3, device=torch.device("cpu"), shard=shard or Shard(), pad_fill=128)


def _epoch(batches, epoch: int) -> list:
    batches.set_epoch(epoch)
    return [(x.clone(), y) for x, y in batches]


def test_an_epochs_augmentation_is_a_function_of_seed_and_epoch_and_processes_add_up(cifar100_full):
    spec = AugmentSpec("autoaugment", fill=128, cutout=16)
    one = AugmentedBatches(_batches(cifar100_full), spec, seed=3)
    first, again, other = _epoch(one, 1), _epoch(one, 1), _epoch(one, 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    parts = [_epoch(AugmentedBatches(_batches(cifar100_full, Shard(r, 2)), spec, seed=3), 1) for r in (0, 1)]
    for whole, left, right in zip(first, *parts):  # under torchrun the processes' parts are the one-process batch
        assert torch.equal(whole[0], torch.cat([left[0], right[0]]))
        assert torch.equal(whole[1], torch.cat([left[1], right[1]]))


def test_mixed_batches_pair_images_within_the_batch(cifar100_full):
    spec = AugmentSpec(mixup=0.4, cutmix=1.0)
    batches = AugmentedBatches(_batches(cifar100_full), spec, seed=3)
    _, targets = next(iter(batches))
    assert isinstance(targets, Mixed) and len(targets) == 16
    assert sorted(targets.partner_labels.tolist()) == sorted(targets.labels.tolist())  # a pairing: a permutation
    assert ((targets.lam >= 0) & (targets.lam <= 1)).all() and (targets.lam < 1).any()
