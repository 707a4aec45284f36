"""``byot check-data`` and the pre-flight scan: decode every image once, fully, before training does.

A file that fails here (truncated, empty, not an image, a decompression bomb) would otherwise stop a
training run at the batch that first meets it, possibly hours in. Decoding is strict: PIL's
``LOAD_TRUNCATED_IMAGES`` is forced off while scanning, so a truncated JPEG or PNG counts as corrupt
instead of loading with a grey band.

A parallel scan stops as promptly as a serial one. Its worker processes ignore SIGINT and SIGTERM (a
terminal's Ctrl-C reaches the whole process group; the main process alone decides how to stop), are
killed without waiting as soon as the main process meets any exception (KeyboardInterrupt, the engine's
``Interrupted``), and on Linux die with it when it dies, however it dies.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from byot.config import check_range
from byot.data.folder import FolderIndex, index_folder
from byot.errors import ByotError
from byot.runs.signals import die_with_parent, ignore_handled_signals

log = logging.getLogger("byot.data")

SPLIT_NAMES = ("train", "test", "val")  # the split folders of a data root, scanned in this order


@dataclass
class ScanReport:
    """The result of decoding a list of files; both lists keep the order the files were given in."""

    ok: list[Path]
    corrupt: list[tuple[Path, str]]  # (path, one-line reason)


def scan_images(paths: list[Path], workers: int = 0) -> ScanReport:
    """Decode each file fully; ``workers`` > 0 spreads the work over that many processes.

    The report is the same whatever ``workers`` is. ``Image.MAX_IMAGE_PIXELS`` is left as it is: an
    image above PIL's decompression-bomb limit is reported corrupt with PIL's reason.
    """
    _check_workers(workers)
    paths = [Path(p) for p in paths]
    if workers > 0 and len(paths) > 1:
        reasons = _check_in_workers(paths, workers)
    else:
        reasons = [check_image(p) for p in paths]
    ok = [p for p, r in zip(paths, reasons) if r is None]
    corrupt = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    if corrupt:
        log.warning("%d of %d images cannot be decoded", len(corrupt), len(paths))
    return ScanReport(ok, corrupt)


def _check_workers(workers: int) -> None:
    check_range("workers", workers)  # the range byot train checks: 0 decodes in this process


def _check_in_workers(paths: list[Path], workers: int) -> list[str | None]:
    """``check_image`` of every path, in order, over ``workers`` processes that end with this call."""
    chunk = max(1, len(paths) // (workers * 8))  # a few chunks per worker: balance vs. overhead
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_start_worker, initargs=(os.getpid(),))
    try:
        # futures are submitted, not mapped: map's iterator cancels them behind the pool's back when it
        # is interrupted, and the pool's thread then fails on them (InvalidStateError) instead of ending
        futures = [pool.submit(_check_chunk, paths[i:i + chunk]) for i in range(0, len(paths), chunk)]
        reasons = [r for f in futures for r in f.result()]
    except BaseException:
        _kill(pool)
        raise
    pool.shutdown()
    return reasons


def _check_chunk(paths: list[Path]) -> list[str | None]:
    return [check_image(p) for p in paths]


def _start_worker(parent: int) -> None:
    """A scan worker's initializer: leave signals to the main process, and end when it ends."""
    ignore_handled_signals()
    die_with_parent(signal.SIGKILL, parent)


def _kill(pool: ProcessPoolExecutor) -> None:
    """End ``pool`` now: pending work cancelled, its processes killed (they ignore SIGINT and SIGTERM)."""
    processes = list((pool._processes or {}).values())  # no public handle on them before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.kill()
    for process in processes:
        process.join(timeout=5)  # reaped, so that no zombie outlives the scan


def check_image(path: Path) -> str | None:
    """None if ``path`` decodes fully with PIL; otherwise why not, in one line."""
    try:
        if Path(path).stat().st_size == 0:
            return "empty file (0 bytes)"
        with _strict_decoding(), Image.open(path) as image:
            image.load()  # open() reads only the header; load() decodes every pixel
    except Image.DecompressionBombError as e:
        return _one_line(f"decompression bomb: {e}")
    except UnidentifiedImageError:
        return "not an image PIL can read (unknown format, or not an image at all)"
    # any failure means training would fail on this file; PIL's decoders raise OSError, SyntaxError,
    # ValueError, EOFError, struct.error, IndexError... depending on the format and the damage
    except Exception as e:  # noqa: BLE001
        return _one_line(f"{type(e).__name__}: {e}")
    return None


@contextmanager
def _strict_decoding() -> Iterator[None]:
    # a process-wide switch another library may have turned on; turned off here so that truncated
    # files are found, and restored so that the caller's choice stands outside the scan
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _one_line(text: str) -> str:
    return " ".join(text.split())


def scan_folder(root: Path, workers: int = 0) -> dict[str, ScanReport]:
    """Scan a data root: its ``train/``, ``test/`` and ``val/`` class folders (keys: those names), or,
    when it has none of them, ``root`` itself as one split of class folders (key: ``root.name``).

    Files are listed with ``index_folder`` (so hidden and non-image files are not scanned), and the
    splits after the first must hold the same classes. Raises ByotError for a missing root.
    """
    _check_workers(workers)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ByotError(f"{root} does not exist or is not a folder")
    splits = {name: root / name for name in SPLIT_NAMES if (root / name).is_dir()}
    reports: dict[str, ScanReport] = {}
    classes = None
    for name, folder in (splits or {root.name or str(root): root}).items():
        index = index_folder(folder, classes)
        classes = index.classes
        reports[name] = scan_images(index.paths, workers)
    return reports


def class_counts(report: ScanReport) -> dict[str, tuple[int, int]]:
    """Class folder name -> (readable, corrupt) images, sorted by name; the class is the parent folder."""
    counts: dict[str, list[int]] = {}
    for path in report.ok:
        counts.setdefault(path.parent.name, [0, 0])[0] += 1
    for path, _ in report.corrupt:
        counts.setdefault(path.parent.name, [0, 0])[1] += 1
    return {name: (ok, bad) for name, (ok, bad) in sorted(counts.items())}


def unreadable_classes(report: ScanReport) -> list[Path]:
    """Class folders in which every scanned file is corrupt (training cannot use such a class)."""
    readable = {p.parent for p in report.ok}
    return sorted({p.parent for p, _ in report.corrupt} - readable)


def without_corrupt(index: FolderIndex, report: ScanReport) -> FolderIndex:
    """``index`` minus the corrupt files of ``report`` (labels kept aligned): ``--skip-corrupt``.

    Raises ByotError naming the first class folder left with no readable image.
    """
    empty = unreadable_classes(report)
    if empty:
        raise ByotError(f"class folder {empty[0]} has no readable image "
                        f"({len(empty)} such folder(s)); byot check-data lists the corrupt files")
    bad = {p for p, _ in report.corrupt}
    kept = [(p, label) for p, label in zip(index.paths, index.labels) if p not in bad]
    return FolderIndex([p for p, _ in kept], [label for _, label in kept], index.classes)


def format_scan(reports: dict[str, ScanReport]) -> str:
    """Per split: a summary line, (class, ok, corrupt) rows, then every corrupt file with its reason."""
    lines = []
    for split, report in reports.items():
        counts = class_counts(report)
        total = len(report.ok) + len(report.corrupt)
        lines.append(f"{split}: {total} images, {len(report.ok)} readable, {len(report.corrupt)} corrupt")
        width = max([len("class"), *map(len, counts)])
        lines.append(f"  {'class':<{width}}  {'ok':>6}  {'corrupt':>7}")
        lines += [f"  {name:<{width}}  {ok:>6}  {bad:>7}" for name, (ok, bad) in counts.items()]
        lines += [f"  corrupt: {path}: {reason}" for path, reason in report.corrupt]
    return "\n".join(lines)
