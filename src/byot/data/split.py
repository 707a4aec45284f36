"""``byot split``: one folder of class folders -> ``DST/train/<class>/`` + ``DST/test/<class>/``, stratified.

The split is a pure function of (seed, class name, file name): each file's place in its class is the
SHA-256 of those three, so it is the same on every machine, Python version and file system, whatever
order the files were created or listed in, and adding a file to a class moves no other file.

Safety promises (the tests check each one):

- nothing in SRC is modified, deleted or created; DST may not be SRC or lie inside it;
- nothing is written outside DST; class and file names that could climb out of it are refused;
- a symlink in SRC (class folder or file) that resolves outside SRC is skipped, never followed;
- a non-empty DST is refused unless ``force``; with ``force`` only ``DST/train``, ``DST/test`` and
  ``DST/split.json`` are replaced (removed first, so no file of an earlier split survives to leak between
  train and test); everything else in DST is left alone, and a symlink there is removed, never followed;
- an unfinished split is never taken for a finished one: ``DST/.byot-split-incomplete`` is written before
  anything in DST is removed or placed and deleted only after ``DST/split.json``, and byot's readers
  refuse a DST that holds it (an interrupted split is finished by rerunning it with ``force``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from byot.data.folder import (
    IMAGE_EXTENSIONS,
    MANIFEST,
    UNFINISHED,
    earlier_name,
    refuse_unfinished,
    resolve_inside,
)
from byot.errors import ByotError

log = logging.getLogger("byot.data")

SPLITS = ("train", "test")
# how a split file is made from its source; every function takes (source, target) like os.link
PLACERS: dict[str, Callable[[Path, Path], object]] = {
    "copy": shutil.copy2,  # keeps the modification time
    "hardlink": os.link,  # no extra space; SRC and DST must share a file system
    "symlink": os.symlink,  # absolute link to the resolved source file
}
MODES = tuple(PLACERS)


@dataclass
class SplitReport:
    """What ``split_folder`` did; ``manifest`` records the same in JSON."""

    classes: dict[str, tuple[int, int]]  # class -> (train images, test images)
    files: dict[str, dict[str, list[str]]]  # split -> class -> sorted file names
    skipped: list[str]  # every entry of SRC not split, relative to SRC ("cat/notes.txt", "raw/")
    refused: list[str]  # "path: reason" for the skipped entries refused for safety
    manifest: Path  # DST/split.json


@dataclass
class _Source:
    """SRC as found: usable files per class, and what was left out."""

    classes: dict[str, list[Path]] = field(default_factory=dict)  # class -> resolved files, sorted by name
    skipped: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    seen: dict[tuple[int, int], str] = field(default_factory=dict)  # (device, inode) -> first relative path

    def skip(self, rel: str, reason: str | None = None) -> None:
        self.skipped.append(rel)
        if reason:
            self.refused.append(f"{rel}: {reason}")
            log.warning("split: skipping %s: %s", rel, reason)


def split_folder(src: Path, dst: Path, test_ratio: float = 0.2, seed: int = 0, mode: str = "copy",
                 force: bool = False) -> SplitReport:
    """Split ``src/<class>/<image>`` into ``dst/train/<class>/`` and ``dst/test/<class>/``.

    Per class of n images, ``n_test(n, test_ratio)`` go to test (at least one each side when n >= 2;
    a class of one image goes to train). Hidden entries, files whose extension is not in
    ``IMAGE_EXTENSIONS`` and class folders without images are skipped; symlinks leaving SRC, special
    files and second names of one file (symlink or hard link inside SRC, which would put one image in
    both splits) are skipped and listed in ``refused`` with the reason. ``mode`` is one of ``MODES``.
    ``DST/split.json`` is written last, then the ``UNFINISHED`` marker written first is removed: a DST
    without the marker and with the manifest holds a finished split. Raises ByotError.
    """
    _check_options(test_ratio, mode)
    src_real, dst_real = _check_roots(Path(src).expanduser(), Path(dst).expanduser())
    source = _scan_source(src_real)
    if not source.classes:
        raise ByotError(f"{src} holds no class folder with images ({', '.join(IMAGE_EXTENSIONS)}); "
                        f"byot split needs SRC/<class>/<image>{_already_split_hint(source)}")
    _prepare_dst(dst_real, src_real, force)
    files: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    for name, paths in source.classes.items():
        train, test = assign_split([p.name for p in paths], seed, name, test_ratio)
        by_name = {p.name: p for p in paths}
        for split, chosen in zip(SPLITS, (train, test)):
            _place_class([by_name[n] for n in chosen], dst_real / split / name, mode)
            files[split][name] = chosen
        if not test:  # test/<class>/ is still made, empty, so both splits name the same classes
            log.warning("split: class %s has a single image; it goes to train only", name)
    classes = {c: (len(files["train"][c]), len(files["test"][c])) for c in source.classes}
    report = SplitReport(classes, files, source.skipped, source.refused, dst_real / MANIFEST)
    _write_manifest(report, src_real, seed, test_ratio, mode)
    (dst_real / UNFINISHED).unlink()
    return report


def n_test(n: int, test_ratio: float) -> int:
    """Images of a class of ``n`` that go to test: round(n * ratio) (Python's round: halves to even,
    so 2.5 -> 2) clamped to [1, n - 1]; 0 when n < 2."""
    if n < 2:
        return 0
    return min(max(round(n * test_ratio), 1), n - 1)


def assign_split(names: list[str], seed: int, class_name: str, test_ratio: float) -> tuple[list[str], list[str]]:
    """(train names, test names) of one class, each sorted: the ``n_test`` names whose
    SHA-256(seed, class, name) sort first go to test."""
    def encode(text: str) -> bytes:
        # NFC: macOS may store "é" decomposed; fsencode: undecodable names (surrogates) still hash
        return os.fsencode(unicodedata.normalize("NFC", text))

    def key(name: str) -> tuple[bytes, str]:
        return hashlib.sha256(f"{seed}".encode() + b"\0" + encode(class_name) + b"\0" + encode(name)).digest(), name

    ordered = sorted(set(names), key=key)
    k = n_test(len(ordered), test_ratio)
    return sorted(ordered[k:]), sorted(ordered[:k])


def format_split_table(report: SplitReport) -> str:
    """The per-class table (class, train, test, total), a totals row, then skipped and refused entries."""
    width = max([len("class"), *map(len, report.classes)])
    rows = [("class", "train", "test", "total")]
    rows += [(c, str(tr), str(te), str(tr + te)) for c, (tr, te) in report.classes.items()]
    train, test = (sum(v[i] for v in report.classes.values()) for i in (0, 1))
    rows.append(("total", str(train), str(test), str(train + test)))
    lines = [f"{r[0]:<{width}}  {r[1]:>6}  {r[2]:>6}  {r[3]:>6}" for r in rows]
    lines.append(_listing("skipped", report.skipped))
    if report.refused:
        lines.append(_listing("refused", report.refused))
    return "\n".join(lines)


def _listing(what: str, items: list[str], shown: int = 10) -> str:
    if not items:
        return f"{what}: none"
    more = f" (and {len(items) - shown} more)" if len(items) > shown else ""
    return f"{what} {len(items)}: {', '.join(items[:shown])}{more}"


def _check_options(test_ratio: float, mode: str) -> None:
    if isinstance(test_ratio, bool) or not 0.0 < test_ratio < 1.0:  # also rejects NaN
        raise ByotError(f"--test-ratio must be between 0 and 1 (exclusive), got {test_ratio}")
    if mode not in PLACERS:
        raise ByotError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")


def _check_roots(src: Path, dst: Path) -> tuple[Path, Path]:
    """Resolved (SRC, DST), refusing layouts where writing DST would touch SRC."""
    if not src.is_dir():
        raise ByotError(f"SRC {src} does not exist or is not a folder")
    src_real, dst_real = src.resolve(strict=True), dst.resolve()
    if _inside(dst_real, src_real):
        raise ByotError(f"--out {dst} is SRC {src} or lies inside it: the split would be written into the "
                        "folder it splits; choose a DST outside SRC")
    for split in SPLITS:
        if _inside(src_real, dst_real / split):  # --force would replace DST/<split>, i.e. SRC
            raise ByotError(f"SRC {src} lies inside {dst / split}, which the split replaces; choose another --out")
    return src_real, dst_real


def _inside(path: Path, root: Path) -> bool:
    """``path`` is ``root`` or below it, by name or by identity (case-insensitive disks, bind mounts)."""
    if path == root or path.is_relative_to(root):
        return True
    if not root.exists():
        return False
    return any(p.exists() and os.path.samefile(p, root) for p in (path, *path.parents))


def _scan_source(src: Path) -> _Source:
    """Class folders of SRC in sorted order, each with its usable image files."""
    source = _Source()
    for entry in sorted(src.iterdir(), key=lambda p: p.name):
        rel = entry.name
        if entry.name.startswith("."):
            source.skip(rel + "/" if entry.is_dir() else rel)
            continue
        real, reason = resolve_inside(entry, src)
        if real is None:
            source.skip(rel, reason)
        elif not real.is_dir():
            source.skip(rel)  # a loose file beside the class folders (README, labels.csv)
        else:
            files = _scan_class(src, entry.name, real, source)
            if files:
                source.classes[entry.name] = files
            elif files is not None:  # None: unlistable, already reported
                source.skip(rel + "/")
                log.warning("split: class folder %s holds no usable images; it is left out", entry)
    return source


def _scan_class(src: Path, name: str, real_dir: Path, source: _Source) -> list[Path] | None:
    """Resolved image files of class folder ``name``, sorted by file name; the rest goes to ``source.skip``.
    None if the folder cannot be listed."""
    try:
        entries = sorted(real_dir.iterdir(), key=lambda p: p.name)
    except OSError as e:  # an unreadable folder is reported, not a traceback
        source.skip(f"{name}/", f"cannot be listed ({e.strerror or e})")
        return None
    files = []
    for path in entries:
        rel = f"{name}/{path.name}"
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
            source.skip(rel)
            continue
        real, reason = resolve_inside(path, src)
        if real is None:
            source.skip(rel, reason)
            continue
        st = real.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would hang a copy; a folder named x.jpg is no image
            source.skip(rel, "not a regular file")
            continue
        first = earlier_name(source.seen, st, rel)
        if first:
            source.skip(rel, f"same file as {first}")
            continue
        files.append(real)
    return files


def _already_split_hint(source: _Source) -> str:
    if any(s.rstrip("/") in ("train", "test", "val") for s in source.skipped):
        return "; it looks already split (train/, test/): split one folder of class folders"
    return ""


def _prepare_dst(dst: Path, src: Path, force: bool) -> None:
    """Create DST and mark it unfinished, or with ``force`` mark it and clear the parts that the split writes."""
    if dst.exists() and not dst.is_dir():
        raise ByotError(f"--out {dst} exists and is not a folder")
    clear = dst.is_dir() and any(dst.iterdir())
    if clear and not force:
        refuse_unfinished(dst)  # the more useful message, if an earlier split was interrupted here
        raise ByotError(f"--out {dst} is not empty; pass --force to replace its train/, test/ and "
                        f"{MANIFEST} (nothing else in it is touched)")
    dst.mkdir(parents=True, exist_ok=True)
    marker = dst / UNFINISHED
    _remove(marker)  # a link there is not followed by the write
    marker.write_text(f"{src}\n", encoding="utf-8")  # first: from here on an interruption leaves DST refused
    if clear:
        for name in (*SPLITS, MANIFEST):
            _remove(dst / name)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()  # a link itself goes; what it points to stays
    elif path.is_dir():
        shutil.rmtree(path)  # removes links inside it without following them


def _place_class(sources: list[Path], folder: Path, mode: str) -> None:
    """Make ``folder`` (fresh) and put each source file in it under its own name."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        target = folder / source.name
        try:
            PLACERS[mode](source, target)
        except OSError as e:
            raise ByotError(_place_error(mode, source, target, e)) from e


def _place_error(mode: str, source: Path, target: Path, e: OSError) -> str:
    reason = e.strerror or str(e)
    if mode == "hardlink" and e.errno in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
        return (f"cannot hard-link {source} to {target} ({reason}): hard links need SRC and DST on one "
                "file system that supports them; use --mode copy or --mode symlink (rerun with --force)")
    return f"cannot {mode} {source} to {target}: {reason} (rerun with --force once fixed)"


def _write_manifest(report: SplitReport, src: Path, seed: int, test_ratio: float, mode: str) -> None:
    manifest = {
        "seed": seed, "test_ratio": test_ratio, "mode": mode, "source": str(src),
        "classes": {c: {"train": tr, "test": te} for c, (tr, te) in report.classes.items()},
        "files": report.files, "skipped": report.skipped, "refused": report.refused,
    }
    report.manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
