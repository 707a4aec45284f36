"""Image folders: ``root/train/<class>/*.jpg`` and ``root/test/<class>/`` (or ``val/``).

Images of any size and mode are decoded with PIL, converted to 8-bit RGB and sized to
``image_size`` per sample in DataLoader workers, then batched as uint8 like the tensor data sets.

Links are read by one rule. A link (class folder or file) that resolves inside the split folder is
followed; one that leads out of it is skipped with a warning, with one exception: when the data root (the
folder holding ``train/`` and ``test/``) has the ``split.json`` of a ``byot split --mode symlink``, a file
link that resolves inside that manifest's ``"source"`` folder is followed, since byot made it. One image
never counts twice: two class folders that are one folder are an error naming both, and a file that is a
second name (symlink or hard link) of a file already listed in the split is skipped with a warning. A data
root holding ``.byot-split-incomplete`` is refused: ``byot split`` was interrupted there and is rerun with
``--force`` to finish it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from byot.data.batches import ONE_PROCESS, Shard, batch_bounds, epoch_generator, epoch_order
from byot.errors import ByotError
from byot.runs.signals import ignore_handled_signals

log = logging.getLogger("byot.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
RESIZE_RATIO = 0.875  # test images: resize the short side to size / 0.875, then centre-crop
MANIFEST = "split.json"  # written last by byot split, in the data root: the split is complete
UNFINISHED = ".byot-split-incomplete"  # written first by byot split, removed after MANIFEST: still in progress


@dataclass
class FolderIndex:
    """The files of one split and their labels; classes are the sorted folder names."""

    paths: list[Path]
    labels: list[int]
    classes: list[str]


def find_split(root: Path, names: tuple[str, ...]) -> Path:
    refuse_unfinished(root)
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise ByotError(f"{root} has no {' or '.join(n + '/' for n in names)} folder; an image folder data set needs "
                    f"{root}/train/<class>/ and {root}/test/<class>/ (byot split makes them)")


def refuse_unfinished(root: Path) -> None:
    """Raise ByotError if ``root`` is the destination of a ``byot split`` that did not finish."""
    marker = root / UNFINISHED
    if not os.path.lexists(marker):
        return
    try:
        src = marker.read_text(encoding="utf-8").strip() or "SRC"  # byot split writes its SRC there
    except (OSError, UnicodeDecodeError):
        src = "SRC"
    raise ByotError(f"{root} holds a byot split that was interrupted before it finished ({UNFINISHED} is there, "
                    f"{MANIFEST} is not); rerun byot split {src} --out {root} --force")


def index_folder(split_dir: Path, classes: list[str] | None = None) -> FolderIndex:
    """List ``split_dir/<class>/<image>``; hidden entries and non-image files are ignored, and so are links
    that lead outside ``split_dir`` and second names of a file (with a warning naming them); see the module
    docstring for the rule. ``classes`` (the training split's) makes this a later split, which must hold
    the same class folders and at least one image in all."""
    for folder in (split_dir, split_dir.parent):  # a split folder on its own, or one in a data root
        refuse_unfinished(folder)
    root = split_dir.resolve()
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and _inside(p, root))
    _refuse_one_folder_twice(split_dir, found)
    first_split = classes is None
    if classes is None:
        classes = found
    elif found != classes:
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise ByotError(f"class folders of {split_dir} differ from the training split's: "
                        f"missing {missing or 'none'}, extra {extra or 'none'}")
    if not classes:
        raise ByotError(f"{split_dir} holds no class folders")
    source, seen = symlinked_source(split_dir.parent), {}
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = [p for p in sorted((split_dir / name).iterdir())
                 if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
                 and _inside(p, root, source) and _first_name(p, seen)]
        if not files and first_split:
            raise ByotError(f"class folder {split_dir / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        if not files:  # e.g. a class of one image: byot split puts it in train and leaves test empty
            log.warning("class folder %s holds no images; that class is not evaluated", split_dir / name)
        paths += files
        labels += [label] * len(files)
    if not paths:  # nothing to evaluate on: refused now, not after the first epoch
        raise ByotError(f"{split_dir} holds no images in any of its {len(classes)} class folders; put test "
                        f"images in {split_dir}/<class>/ (byot split SRC --out DST makes both splits)")
    return FolderIndex(paths, labels, classes)


def symlinked_source(data_root: Path) -> Path | None:
    """The resolved SRC of the ``byot split --mode symlink`` that made ``data_root``, or None (no manifest,
    another mode, or a manifest byot cannot read)."""
    try:
        manifest = json.loads((data_root / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        log.warning("ignoring %s: %s", data_root / MANIFEST, e)
        return None
    if not isinstance(manifest, dict) or manifest.get("mode") != "symlink" or not isinstance(
            manifest.get("source"), str):
        return None
    source = Path(manifest["source"])
    return source.resolve() if source.is_absolute() and source.is_dir() else None


def earlier_name(seen: dict[tuple[int, int], str], st: os.stat_result, name: str) -> str | None:
    """The name under which the file of ``st`` was listed before, if it is not ``name``: then ``name`` is a
    second name (a symlink or hard link) of it. ``seen`` maps (device, inode) to first names; a first name
    is recorded and gives None.

    The one rule of byot split and the folder reader: one image under two names would be trained on
    twice, under two labels, or land in both train and test."""
    first = seen.setdefault((st.st_dev, st.st_ino), name)
    return None if first == name else first


def _first_name(path: Path, seen: dict[tuple[int, int], str]) -> bool:
    first = earlier_name(seen, path.stat(), str(path))
    if first:
        log.warning("skipping %s: same file as %s", path, first)
    return first is None


def _refuse_one_folder_twice(split_dir: Path, names: list[str]) -> None:
    seen: dict[tuple[int, int], str] = {}
    for name in names:
        first = earlier_name(seen, (split_dir / name).stat(), name)
        if first:
            raise ByotError(f"class folders {split_dir / first} and {split_dir / name} are the same folder "
                            "(one links to the other), so their images would get two labels; remove the link")


def resolve_inside(entry: Path, root: Path, also: Path | None = None) -> tuple[Path | None, str | None]:
    """(resolved path, None), or (None, why it is refused): unsafe name, broken link, link out of ``root``
    (a resolved folder) and out of ``also`` (another resolved folder a link may lead into, or None). Used
    wherever byot lists user folders, so that a link never takes it elsewhere."""
    bad = _unsafe_name(entry.name)
    if bad:
        return None, bad
    try:
        real = entry.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # broken link, or a loop (RuntimeError before Python 3.13)
        return None, f"cannot be resolved ({e.__class__.__name__})"
    if not real.is_relative_to(root) and not (also is not None and real.is_relative_to(also)):
        return None, f"symlink to {real}, outside {root}; not followed"
    return real, None


def _unsafe_name(name: str) -> str | None:
    # names come from a listing, so these cannot occur on POSIX; a name that could climb out of
    # DST/<split>/<class>/ must never become part of a target path, however it got here
    if name in ("", ".", ".."):
        return f"name {name!r} is not a file name"
    if any(c in name for c in ("/", "\\", "\0", os.sep, os.altsep or "/")):
        return "name holds a path separator or NUL"
    return None


def _inside(entry: Path, root: Path, also: Path | None = None) -> bool:
    real, reason = resolve_inside(entry, root, also)
    if real is None:
        log.warning("skipping %s: %s", entry, reason)
    return real is not None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: EXIF orientation applied, 16-bit and float scaled (not clipped)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))  # transparent -> black
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int, ratio: float = RESIZE_RATIO) -> Image.Image:
    """The evaluation transform: the short side resized to size / ratio (bilinear), then the centre
    size x size square. ``ratio`` 1 keeps the whole short side (for models trained on whole images)."""
    short = round(size / ratio)
    scale = short / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> uint8 (3, H, W)."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _random_resized_crop_box(width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """(left, top, w, h) as torchvision's RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3))."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        r = torch.rand(3, generator=g).tolist()
        target = area * (0.08 + r[0] * (1.0 - 0.08))
        aspect = math.exp(log_ratio[0] + r[1] * (log_ratio[1] - log_ratio[0]))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(r[2] * (width - w + 1))
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            return left, top, w, h
    side = min(width, height)  # fallback: the centre square
    return (width - side) // 2, (height - side) // 2, side, side


class FolderDataset(torch.utils.data.Dataset):
    """Item ``(index, seed)`` -> (uint8 (3, S, S) image, label); ``seed`` None means evaluation."""

    def __init__(self, index: FolderIndex, image_size: int) -> None:
        self.index, self.image_size = index, image_size

    def __len__(self) -> int:
        return len(self.index.paths)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, int]:
        i, seed = key
        path = self.index.paths[i]
        try:
            with Image.open(path) as raw:
                image = to_rgb(raw)
        except Exception as e:  # truncated, corrupt or not an image at all
            raise ByotError(f"cannot read image {path}: {e}") from e
        s = self.image_size
        if seed is None:
            image = resize_center_crop(image, s)
        else:
            g = torch.Generator().manual_seed(seed)
            left, top, w, h = _random_resized_crop_box(image.width, image.height, g)
            image = image.resize((s, s), Image.BILINEAR, box=(left, top, left + w, top + h))
            if torch.rand(1, generator=g).item() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_uint8_tensor(image), self.index.labels[i]


class _EpochBatchSampler:
    def __init__(self, owner: FolderBatches) -> None:
        self.owner = owner

    def __len__(self) -> int:
        return len(self.owner)

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        o = self.owner
        g = epoch_generator(o.seed, o.epoch)
        order = epoch_order(o.num_samples, o.train, g).tolist()
        seeds = torch.randint(0, 2**62, (o.num_samples,), generator=g).tolist() if o.train else None
        for start, end in batch_bounds(o.num_samples, o.batch_size, o.train):
            lo, hi = o.shard.part(end - start)
            if lo < hi:  # an evaluation batch smaller than the number of processes may leave this one none
                yield [(i, seeds[i] if seeds else None) for i in order[start + lo:start + hi]]


class FolderBatches:
    """Batches of an image folder: same interface as TensorBatches (``set_epoch``, ``len``, iterate)."""

    def __init__(self, index: FolderIndex, image_size: int, batch_size: int, train: bool, seed: int,
                 device: torch.device, workers: int, shard: Shard = ONE_PROCESS) -> None:
        self.batch_size, self.train, self.seed, self.device, self.shard = batch_size, train, seed, device, shard
        self.epoch = 0
        self.num_samples = len(index.paths)
        self.loader = torch.utils.data.DataLoader(
            FolderDataset(index, image_size), batch_sampler=_EpochBatchSampler(self), num_workers=workers,
            pin_memory=device.type == "cuda", persistent_workers=False,
            # a signal to the process group (Ctrl-C, timeout, a scheduler) is the main process's to handle
            worker_init_fn=ignore_handled_signals,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batch_sizes(self) -> list[int]:
        """Samples of each batch over all processes (this process decodes its shard's part of each)."""
        return [e - s for s, e in batch_bounds(self.num_samples, self.batch_size, self.train)]

    def __len__(self) -> int:
        return len(self.global_batch_sizes())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
