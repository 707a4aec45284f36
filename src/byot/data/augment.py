"""Strong augmentation drawn per sample and applied to whole uint8 batches on the training device.

AutoAugment, RandAugment and TrivialAugment pick their operations per image: every image of a batch draws
its own sub-policy (or operations), its own magnitudes and signs, its own Cutout hole and its own mixing
partner and ratio. torchvision's and kornia's policy transforms draw one sub-policy per call, which on a
batch means one for the whole batch; so the policies are sampled here, and the operations run batched with a
per-sample magnitude. Their definitions are torchvision's: the policies and magnitude bins are read from
``torchvision.transforms.v2`` (``_get_policies``, ``_AUGMENTATION_SPACE``), and each operation computes what
torchvision's tensor kernel computes for one image (the tests compare them image by image); the histogram
ones (equalize, autocontrast, invert) are torchvision's own batched kernels.

Every random number comes from a CPU generator seeded by (seed, epoch), drawn for the whole global batch
and sliced to this process's part, so an epoch is the same after a resume and, but for the mixing partners
(paired within each process's part), on 1 or N processes. The draws go to the device in one copy per batch
(from pinned memory on a GPU); on the device nothing waits for the host: no operation branches on data, and
no constant is copied from the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from byot.data.batches import ONE_PROCESS, Shard

POLICIES = ("none", "autoaugment", "randaugment", "trivialaugment")
# every operation any policy uses, in one numbering; the geometric ones are one affine warp
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
OP_INDEX = {name: i for i, name in enumerate(OPS)}
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
RANDAUGMENT_OPS, RANDAUGMENT_MAGNITUDE, RANDAUGMENT_BINS = 2, 9, 31  # torchvision's defaults
TRIVIAL_BINS = 31


def augment_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch's augmentation: a stream of its own beside ``epoch_generator``'s
    (order, crops, flips), seeded by the same (seed, epoch)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch + 2**50)


@dataclass(frozen=True)
class AugmentSpec:
    """What strong augmentation a run asks for (``--augment``, ``--cutout``, ``--mixup``, ``--cutmix``).

    ``policy``: one of ``POLICIES``; ``autoaugment_policy``: "cifar10" (32 px data sets) or "imagenet"
    (image folders); ``fill``: the grey level geometric operations bring in; ``cutout``: side of the one
    square hole per image (0: none), filled with 0 as in the journal code, whose Cutout runs before
    normalisation; ``mixup``/``cutmix``: the Beta(a, a) of each image's mixing ratio (0: off; both: each
    image picks one of the two with probability 1/2)."""

    policy: str = "none"
    autoaugment_policy: str = "cifar10"
    fill: int = 0
    cutout: int = 0
    mixup: float = 0.0
    cutmix: float = 0.0

    @property
    def active(self) -> bool:
        return self.policy != "none" or self.cutout > 0 or self.mixup > 0 or self.cutmix > 0

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


class Mixed:
    """The targets of a mixed batch: image i is ``lam[i]`` of its own (``labels[i]``) and ``1 - lam[i]`` of
    its partner's (``partner_labels[i]``). The label terms weigh both labels by these shares; the KD and
    feature terms read the mixed image's own outputs and need no targets."""

    def __init__(self, labels: torch.Tensor, partner_labels: torch.Tensor, lam: torch.Tensor) -> None:
        self.labels, self.partner_labels, self.lam = labels, partner_labels, lam  # (B,), (B,), (B,) float

    def __len__(self) -> int:
        return len(self.labels)

    def dominant(self) -> torch.Tensor:
        """(B,) the label with the larger share: what training accuracy counts."""
        return torch.where(self.lam >= 0.5, self.labels, self.partner_labels)


Targets = torch.Tensor | Mixed


def hard_labels(targets: Targets) -> torch.Tensor:
    return targets.dominant() if isinstance(targets, Mixed) else targets


# ---------------------------------------------------------------------------------------------- the draws
def _v2() -> ModuleType:
    """torchvision.transforms.v2, imported when a policy first needs it: a run without a policy (every
    sweep and tune trial by default) starts without importing torchvision, about 0.5 s sooner on the
    2-core CPU (torch._dynamo, which torchvision imports, is imported by the optimizer anyway)."""
    from torchvision.transforms import v2

    return v2


def _space(policy: str) -> dict:
    v2 = _v2()
    cls = {"autoaugment": v2.AutoAugment, "randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide}
    return cls[policy]._AUGMENTATION_SPACE


@lru_cache(maxsize=32)
def _magnitude_table(policy: str, bins: int, height: int, width: int) -> torch.Tensor:
    """(len(OPS), bins) each operation's magnitude per bin (0 where it has none), float32 as torchvision's."""
    table = torch.zeros(len(OPS), bins)
    for name, (values, _) in _space(policy).items():
        v = values(bins, height, width)
        if v is not None:
            table[OP_INDEX[name]] = v.float()
    return table


@lru_cache(maxsize=8)
def _signed(policy: str) -> torch.Tensor:
    signed = torch.zeros(len(OPS), dtype=torch.bool)
    for name, (_, is_signed) in _space(policy).items():
        signed[OP_INDEX[name]] = is_signed
    return signed


@lru_cache(maxsize=4)
def _autoaugment_table(which: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy's sub-policies as (P, 2) op indices, (P, 2) probabilities and (P, 2) magnitude bins."""
    v2 = _v2()
    kind = {"cifar10": v2.AutoAugmentPolicy.CIFAR10, "imagenet": v2.AutoAugmentPolicy.IMAGENET}[which]
    policies = v2.AutoAugment(kind)._get_policies(kind)
    ops = torch.tensor([[OP_INDEX[name] for name, _, _ in sub] for sub in policies])
    probs = torch.tensor([[p for _, p, _ in sub] for sub in policies], dtype=torch.float64)
    bins = torch.tensor([[b if b is not None else 0 for _, _, b in sub] for sub in policies])
    return ops, probs, bins


def draw_operations(spec: AugmentSpec, n: int, height: int, width: int,
                    g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, S) operation indices (Identity where an operation is not applied) and (n, S) signed magnitudes,
    S operations in sequence per image, as the policy samples them for each image on its own."""
    if spec.policy == "autoaugment":
        ops, probs, bins = _autoaugment_table(spec.autoaugment_policy)
        pick = torch.randint(len(ops), (n,), generator=g)
        op, applied = ops[pick], torch.rand(n, 2, generator=g, dtype=torch.float64) <= probs[pick]
        table, bin_ = _magnitude_table("autoaugment", 10, height, width), bins[pick]
        op = torch.where(applied, op, OP_INDEX["Identity"])
    elif spec.policy == "randaugment":
        names = list(_space("randaugment"))
        op = torch.tensor([OP_INDEX[k] for k in names])[torch.randint(len(names), (n, RANDAUGMENT_OPS), generator=g)]
        table = _magnitude_table("randaugment", RANDAUGMENT_BINS, height, width)
        bin_ = torch.full_like(op, RANDAUGMENT_MAGNITUDE)
    elif spec.policy == "trivialaugment":
        names = list(_space("trivialaugment"))
        op = torch.tensor([OP_INDEX[k] for k in names])[torch.randint(len(names), (n, 1), generator=g)]
        table = _magnitude_table("trivialaugment", TRIVIAL_BINS, height, width)
        bin_ = torch.randint(TRIVIAL_BINS, (n, 1), generator=g)
    else:
        return torch.zeros(n, 0, dtype=torch.long), torch.zeros(n, 0)
    magnitude = table[op, bin_]
    flip = (torch.rand(op.shape, generator=g) <= 0.5) & _signed(spec.policy)[op]
    return op, torch.where(flip, -magnitude, magnitude)


@dataclass
class Draw:
    """One global batch's random draws (CPU), packed into one float tensor for a single copy to the device."""

    ops: torch.Tensor  # (n, S) long
    magnitudes: torch.Tensor  # (n, S)
    holes: torch.Tensor  # (n, 2) Cutout centres (row, column)
    order: torch.Tensor  # (n,) keys whose ranking within a process's part pairs the images for mixing
    lam: torch.Tensor  # (n,) mixing ratio drawn from Beta
    use_cutmix: torch.Tensor  # (n,) bool
    boxes: torch.Tensor  # (n, 2) CutMix box centres (row, column)

    def packed(self) -> torch.Tensor:
        return torch.cat([self.ops.float(), self.magnitudes, self.holes.float(), self.order[:, None],
                          self.lam[:, None].float(), self.use_cutmix[:, None].float(), self.boxes.float()], dim=1)


def draw(spec: AugmentSpec, n: int, height: int, width: int, g: torch.Generator) -> Draw:
    """Every random number one global batch of ``n`` images needs, in a fixed order from ``g``."""
    ops, magnitudes = draw_operations(spec, n, height, width, g)
    holes = torch.stack([torch.randint(height, (n,), generator=g), torch.randint(width, (n,), generator=g)], 1)
    order = torch.rand(n, generator=g)
    beta_seed = int(torch.randint(2**62, (), generator=g))
    rng = np.random.default_rng(beta_seed)  # torch's Beta sampler takes no generator
    lam_mixup = rng.beta(spec.mixup, spec.mixup, n) if spec.mixup > 0 else np.ones(n)
    lam_cutmix = rng.beta(spec.cutmix, spec.cutmix, n) if spec.cutmix > 0 else np.ones(n)
    switch = torch.rand(n, generator=g) < 0.5
    use_cutmix = switch if spec.mixup > 0 and spec.cutmix > 0 else torch.full((n,), spec.cutmix > 0)
    lam = torch.where(use_cutmix, torch.from_numpy(lam_cutmix), torch.from_numpy(lam_mixup)).float()
    boxes = torch.stack([torch.randint(height, (n,), generator=g), torch.randint(width, (n,), generator=g)], 1)
    return Draw(ops, magnitudes, holes, order, lam, use_cutmix, boxes)


# ------------------------------------------------------------------------------------------ the operations
def _inverse_affine(angle: torch.Tensor, shear_x: torch.Tensor, shear_y: torch.Tensor, tx: torch.Tensor,
                    ty: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) torchvision's ``_get_inverse_affine_matrix`` (scale 1) per sample, in float64: degrees for
    the angle and shears, pixels for the translation and the centre (relative to the image's middle)."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    return torch.stack([torch.stack([m0, m1, m2], 1), torch.stack([m3, m4, m5], 1)], 1)


def geometric_thetas(op: torch.Tensor, magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 2, 3) the inverse affine matrix of each image's geometric operation (identity for the others),
    with torchvision's conventions: shears about the top-left corner by atan(m), translations by int(m) px,
    rotations by m degrees about the centre."""
    m = magnitude.double()
    zero = torch.zeros_like(m)
    shear = torch.rad2deg(torch.atan(m))
    is_ = {name: op == OP_INDEX[name] for name in GEOMETRIC}
    corner_x = torch.where(is_["ShearX"] | is_["ShearY"], torch.full_like(m, -width * 0.5), zero)
    corner_y = torch.where(is_["ShearX"] | is_["ShearY"], torch.full_like(m, -height * 0.5), zero)
    return _inverse_affine(
        angle=torch.where(is_["Rotate"], -torch.remainder(m, 360.0), zero),
        shear_x=torch.where(is_["ShearX"], shear, zero), shear_y=torch.where(is_["ShearY"], shear, zero),
        tx=torch.where(is_["TranslateX"], torch.trunc(m), zero), ty=torch.where(is_["TranslateY"], torch.trunc(m), zero),
        cx=corner_x, cy=corner_y)


def warp(images: torch.Tensor, theta: torch.Tensor, fill: int) -> torch.Tensor:
    """uint8 (B, C, H, W) resampled (nearest) through per-sample inverse matrices ``theta`` (B, 2, 3), pixels
    from outside the image set to ``fill``: torchvision's ``_affine_grid`` and ``_apply_grid_transform``."""
    b, c, h, w = images.shape
    device = images.device
    base = torch.empty(1, h, w, 3, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scaled = theta.float().transpose(1, 2).clone()  # (B, 3, 2); scaled by Python numbers: no host-to-device copy
    scaled[..., 0] /= 0.5 * w
    scaled[..., 1] /= 0.5 * h
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(scaled).view(b, h, w, 2)
    x = torch.cat([images.float(), torch.ones(b, 1, h, w, device=device)], dim=1)
    x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    x, mask = x[:, :c], x[:, c:]
    x = torch.where(mask < 0.5, torch.full_like(x, float(fill)), x)
    return x.round_().to(torch.uint8)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.float().view(-1, 1, 1, 1)


def _complement(ratio: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, 1) 1 - ratio, taken in float64 as torchvision takes it of a Python float."""
    return (1.0 - ratio.double()).float().view(-1, 1, 1, 1)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` with a (B,) ratio: ratio * images + (1 - ratio) * other, clamped, truncated;
    the sum is one fused multiply-add, as torchvision's ``add_(other, alpha=...)`` computes it."""
    scaled = images.float() * _per_image(ratio)
    return torch.addcmul(scaled, other.expand_as(scaled), _complement(ratio)).clamp_(0, 255).to(torch.uint8)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) floor of the luma, as torchvision's saturation and contrast kernels take it."""
    r, g, b = images.float().unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1).floor_()


def brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images.float() * _per_image(factor)).clamp_(0, 255).to(torch.uint8)


def color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _grey(images), factor)


def contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _grey(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the 3x3 smoothed image inside a one-pixel border (torchvision's kernel, per sample)."""
    c = images.shape[1]
    if images.shape[-1] <= 2 or images.shape[-2] <= 2:
        return images
    kernel = torch.full((3, 3), 1.0 / 13.0, device=images.device)  # made on the device: no host-to-device copy
    kernel[1, 1] = 5.0 / 13.0
    kernel = kernel.expand(c, 1, 3, 3)
    out = images.float()
    blurred = F.conv2d(out, kernel, groups=c).round_()
    view = out[..., 1:-1, 1:-1]
    view.addcmul_(blurred.sub_(view), _complement(factor))
    return out.clamp_(0, 255).to(torch.uint8)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep each image's ``bits`` (B,) high bits (8 keeps the image)."""
    keep = bits.long().clamp(0, 8)
    mask = ((1 << keep) - 1) << (8 - keep)  # (B,)
    return images & mask.to(torch.uint8).view(-1, 1, 1, 1)


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(images.float() >= _per_image(threshold), images.bitwise_not(), images)


def apply_operations(images: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor, fill: int) -> torch.Tensor:
    """uint8 (B, C, H, W): image i gets operation ``op[i]`` (an index into ``OPS``) at ``magnitude[i]``, the
    way torchvision's ``_apply_image_or_video_transform`` applies it to one image. Every operation runs on
    the whole batch and each image keeps its own result: no data-dependent branch, so no host sync."""
    from torchvision.transforms.v2 import functional as TF

    h, w = images.shape[-2:]
    factor = 1.0 + magnitude.double()  # torchvision adds 1 to a Python float
    results = {
        "Brightness": lambda: brightness(images, factor),
        "Color": lambda: color(images, factor),
        "Contrast": lambda: contrast(images, factor),
        "Sharpness": lambda: sharpness(images, factor),
        "Posterize": lambda: posterize(images, torch.trunc(magnitude)),
        "Solarize": lambda: solarize(images, 255.0 * magnitude),
        "AutoContrast": lambda: TF.autocontrast(images),
        "Equalize": lambda: TF.equalize(images),
        "Invert": lambda: TF.invert(images),
    }
    present = set(op.unique().tolist()) if images.device.type == "cpu" else set(range(len(OPS)))  # a CPU may skip
    out = images
    geometric = torch.zeros_like(op, dtype=torch.bool)
    for name in GEOMETRIC:
        geometric |= op == OP_INDEX[name]
    if present & {OP_INDEX[name] for name in GEOMETRIC}:
        warped = warp(images, geometric_thetas(op, magnitude, h, w), fill)
        out = torch.where(geometric.view(-1, 1, 1, 1), warped, out)
    for name, make in results.items():
        if OP_INDEX[name] in present:
            out = torch.where((op == OP_INDEX[name]).view(-1, 1, 1, 1), make(), out)
    return out


def cutout(images: torch.Tensor, centres: torch.Tensor, size: int) -> torch.Tensor:
    """One ``size`` px square hole per image around ``centres`` (B, 2), clipped at the border, set to 0
    (DeVries & Taylor's Cutout: rows max(0, y - size // 2) to min(H, y + size // 2))."""
    h, w = images.shape[-2:]
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    y, x = centres[:, 0:1], centres[:, 1:2]
    in_rows = (rows >= (y - size // 2).clamp(0, h)) & (rows < (y + size // 2).clamp(0, h))  # (B, H)
    in_cols = (cols >= (x - size // 2).clamp(0, w)) & (cols < (x + size // 2).clamp(0, w))  # (B, W)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return images.masked_fill(hole, 0)


def cutmix_boxes(lam: torch.Tensor, centres: torch.Tensor, height: int,
                 width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) bool box of each image (a side of sqrt(1 - lam) of the image's, around ``centres``,
    clipped) and (B,) the ratio it leaves the image's own pixels (Yun et al.'s CutMix)."""
    cut = torch.sqrt(1.0 - lam)
    cut_h, cut_w = (height * cut).long(), (width * cut).long()
    y, x = centres[:, 0], centres[:, 1]
    y1, y2 = (y - cut_h // 2).clamp(0, height), (y + cut_h // 2).clamp(0, height)
    x1, x2 = (x - cut_w // 2).clamp(0, width), (x + cut_w // 2).clamp(0, width)
    rows = torch.arange(height, device=lam.device)
    cols = torch.arange(width, device=lam.device)
    box = ((rows >= y1[:, None]) & (rows < y2[:, None]))[:, :, None] & ((cols >= x1[:, None]) & (cols < x2[:, None]))[:, None, :]
    return box, 1.0 - ((y2 - y1) * (x2 - x1)).float() / (height * width)


def mix(images: torch.Tensor, labels: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor,
        use_cutmix: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, Mixed]:
    """Mix image i with image ``partner[i]`` of the same batch: mixup blends the pixels by ``lam[i]``;
    CutMix pastes the partner's pixels into a box and takes the box's true share as the ratio."""
    h, w = images.shape[-2:]
    box, box_lam = cutmix_boxes(lam, centres, h, w)
    other = images[partner]
    blended = (_per_image(lam) * images.float() + (1.0 - _per_image(lam)) * other.float()).round_().to(torch.uint8)
    pasted = torch.where(box[:, None], other, images)
    cut = use_cutmix.view(-1, 1, 1, 1)
    return torch.where(cut, pasted, blended), Mixed(labels, labels[partner], torch.where(use_cutmix, box_lam, lam))


def augment_batch(spec: AugmentSpec, images: torch.Tensor, labels: torch.Tensor,
                  draws: torch.Tensor) -> tuple[torch.Tensor, Targets]:
    """Apply a (part of a) ``Draw``'s packed rows (on the device) to uint8 ``images`` and their labels."""
    s = (draws.shape[1] - 7) // 2  # S operations and S magnitudes, then 7 columns (see Draw.packed)
    ops, magnitudes = draws[:, :s].long(), draws[:, s:2 * s]
    holes, order, lam = draws[:, 2 * s:2 * s + 2].long(), draws[:, 2 * s + 2], draws[:, 2 * s + 3]
    use_cutmix, boxes = draws[:, 2 * s + 4] > 0.5, draws[:, 2 * s + 5:2 * s + 7].long()
    for k in range(s):
        images = apply_operations(images, ops[:, k], magnitudes[:, k], spec.fill)
    if spec.cutout > 0:
        images = cutout(images, holes, spec.cutout)
    if not spec.mixes:
        return images, labels
    partner = order.argsort()  # a random pairing within this process's part of the batch
    return mix(images, labels, partner, lam, use_cutmix, boxes)


class AugmentedBatches:
    """Training batches of any ``Batches`` with ``spec``'s augmentation applied on their device; the rest of
    the interface (``set_epoch``, ``len``, ``global_batch_sizes``, ``shard``) is the wrapped one's.

    Under torchrun the draws are made for the whole global batch and each process applies its part; the
    mixing partners are paired within each process's part (every process holds only its own images).
    """

    def __init__(self, inner, spec: AugmentSpec, seed: int) -> None:
        self.inner, self.spec, self.seed = inner, spec, seed
        self.epoch = 0

    def __getattr__(self, name: str):  # num_samples, batch_size, shard, ...: the wrapped batches'
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def shard(self) -> Shard:
        return getattr(self.inner, "shard", ONE_PROCESS)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def global_batch_sizes(self) -> list[int]:
        return self.inner.global_batch_sizes()

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Targets]]:
        g = augment_generator(self.seed, self.epoch)
        for n, (images, labels) in zip(self.global_batch_sizes(), self.inner):
            h, w = images.shape[-2:]
            packed = draw(self.spec, n, h, w, g).packed()
            lo, hi = self.shard.part(n)
            part = packed[lo:hi]
            if images.device.type == "cuda":
                part = part.pin_memory()
            yield augment_batch(self.spec, images, labels, part.to(images.device, non_blocking=True))


def describe(spec: AugmentSpec) -> str:
    """One line for the run log."""
    parts = []
    if spec.policy != "none":
        parts.append(f"{spec.policy}" + (f" ({spec.autoaugment_policy} policy)" if spec.policy == "autoaugment" else ""))
    if spec.cutout:
        parts.append(f"cutout {spec.cutout} px")
    if spec.mixup:
        parts.append(f"mixup {spec.mixup:g}")
    if spec.cutmix:
        parts.append(f"cutmix {spec.cutmix:g}")
    return ", ".join(parts) + f" per image (fill {spec.fill})" if parts else "none"

