"""Per-class reports from confusion matrices: accuracy per class and exit, a text table, CSV and PNG files.

A confusion matrix here is (K, K) integer counts, rows = true class, columns = predicted class, as
the evaluator accumulates it. Class names are user folder names: they go into file contents and plot
labels, never into file paths.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import torch

from byot.errors import ByotError
from byot.runs.atomic import write_atomic

logger = logging.getLogger("byot")

CELL_NUMBERS_MAX_CLASSES = 20  # up to here every cell shows its count
SMALL_TICKS_MIN_CLASSES = 31  # from here on tick labels shrink with K
PLOT_LABEL_MAX_CHARS = 30  # longer class names are cut in the plot (the CSV keeps them whole)
MAX_PLOT_INCHES = 30.0  # the plot's side stops growing here (3000 px at 100 dpi)


def _counts(confusion: torch.Tensor) -> torch.Tensor:
    """Check that ``confusion`` is a square (K, K) count matrix; return it as int64 on the CPU."""
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"a confusion matrix is (K, K); got shape {tuple(confusion.shape)}")
    if confusion.is_floating_point() or confusion.is_complex():
        raise ValueError(f"a confusion matrix holds integer counts; got dtype {confusion.dtype}")
    return confusion.detach().to("cpu", torch.int64)


def per_class_accuracy(confusion: torch.Tensor) -> list[float | None]:
    """confusion: (K, K) counts, rows = true class -> K accuracies in percent (diagonal / row sum).

    A class with no test images (an all-zero row) gets ``None``, never NaN, so the list stays valid JSON.
    """
    counts = _counts(confusion)
    totals = counts.sum(dim=1).tolist()  # (K,) images per true class
    hits = counts.diagonal().tolist()  # (K,) correctly classified images per class
    return [100.0 * h / n if n > 0 else None for h, n in zip(hits, totals)]


def overall_accuracy(confusion: torch.Tensor) -> float | None:
    """confusion: (K, K) counts -> top-1 accuracy in percent over all images (None when there are none)."""
    counts = _counts(confusion)
    total = int(counts.sum())
    return 100.0 * int(counts.diagonal().sum()) / total if total > 0 else None


def class_counts(confusion: torch.Tensor) -> list[int]:
    """confusion: (K, K) counts -> the number of test images of each true class (row sums)."""
    return _counts(confusion).sum(dim=1).tolist()


def per_class_table(
    classes: list[str], confusions: list[torch.Tensor], exit_ids: list[int]
) -> dict[str, list[float | None]]:
    """{class name: [accuracy (%) at exit_ids[0], ..., at exit_ids[-1]]}: the ``--json`` "per_class" field.

    ``confusions[i]`` is exit ``exit_ids[i]``'s (K, K) matrix with K == len(classes), rows in class order.
    """
    if len(confusions) != len(exit_ids):
        raise ValueError(f"{len(confusions)} confusion matrices for {len(exit_ids)} exits")
    if len(set(classes)) != len(classes):
        raise ValueError("class names must be unique to key the per-class table")
    columns = []
    for exit_id, confusion in zip(exit_ids, confusions):
        if confusion.shape[0] != len(classes):
            raise ValueError(f"exit {exit_id}: confusion matrix is {tuple(confusion.shape)} "
                             f"for {len(classes)} classes")
        columns.append(per_class_accuracy(confusion))
    return {name: [column[k] for column in columns] for k, name in enumerate(classes)}


def format_per_class(
    table: dict[str, list[float | None]], exit_ids: list[int], counts: list[int] | None = None
) -> str:
    """A fixed-width text table: one row per class, one accuracy column (%) per exit, "-" for no images.

    ``counts`` (images per class, in the table's class order, e.g. ``class_counts(confusion)``) adds an
    "images" column.
    """
    if counts is not None and len(counts) != len(table):
        raise ValueError(f"{len(counts)} image counts for {len(table)} classes")
    name_width = max([len("class"), *(len(name) for name in table)])
    header = f"{'class':<{name_width}}" + "".join(f" {f'exit{k}':>7}" for k in exit_ids)
    header += "  images" if counts is not None else ""
    lines = [header, "-" * len(header)]
    for row, (name, accuracies) in enumerate(table.items()):
        cells = "".join(f" {'-' if a is None else f'{a:.1f}':>7}" for a in accuracies)
        tail = f" {counts[row]:>7}" if counts is not None else ""
        lines.append(f"{name:<{name_width}}{cells}{tail}")
    return "\n".join(lines)


def write_confusion(
    confusion: torch.Tensor, classes: list[str], exit_id: int, out_dir: Path
) -> tuple[Path, Path]:
    """Write exit ``exit_id``'s (K, K) matrix to ``out_dir/confusion_exit{k}.csv`` and ``.png``.

    The CSV's header is ``true\\pred,<class>,...`` and each row a true class followed by its K counts.
    Each file is written to a temporary name and renamed, so a reader never sees half a file.
    Returns (csv path, png path); raises ByotError when ``out_dir`` cannot be created or written.
    """
    counts = _counts(confusion)
    if counts.shape[0] != len(classes):
        raise ValueError(f"confusion matrix is {tuple(counts.shape)} for {len(classes)} classes")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ByotError(f"cannot create report folder {out_dir}: {e.strerror or e}") from e
    csv_path = out_dir / f"confusion_exit{exit_id}.csv"
    png_path = out_dir / f"confusion_exit{exit_id}.png"
    # surrogateescape: a folder name that is not valid UTF-8 is written back as the bytes it was
    _write_atomically(csv_path, _confusion_csv(counts, classes).encode("utf-8", "surrogateescape"))
    _write_atomically(png_path, _confusion_png(counts, classes, exit_id))
    logger.debug("wrote %s and %s", csv_path, png_path)
    return csv_path, png_path


def _confusion_csv(counts: torch.Tensor, classes: list[str]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)  # quotes names holding commas, quotes or newlines
    writer.writerow(["true\\pred", *classes])
    for name, row in zip(classes, counts.tolist()):
        writer.writerow([name, *row])
    return buffer.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        write_atomic(path, "wb", lambda f: f.write(data))
    except OSError as e:
        raise ByotError(f"cannot write {path}: {e.strerror or e}") from e


def _plot_label(name: str) -> str:
    """A class name as a tick label: cut to PLOT_LABEL_MAX_CHARS, "$" escaped so it is not mathtext, bytes
    that are not UTF-8 shown escaped (a font has no glyph for them)."""
    name = name.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(name) > PLOT_LABEL_MAX_CHARS:
        name = name[: PLOT_LABEL_MAX_CHARS - 1] + "\u2026"
    return name.replace("$", r"\$")


def _confusion_png(counts: torch.Tensor, classes: list[str], exit_id: int) -> bytes:
    """(K, K) counts -> PNG bytes: cells coloured by share of their true class, counts printed for small K."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ByotError("confusion plots need matplotlib: python3 -m pip install matplotlib") from e
    k = len(classes)
    side = min(3.0 + 0.2 * k, MAX_PLOT_INCHES)  # inches; a fifth of an inch per class
    fig = Figure(figsize=(side + 1.5, side), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # Colour by the share of each true class so that rare and common classes read alike; counts stay printed.
    shares = counts.double() / counts.sum(dim=1, keepdim=True).clamp(min=1)  # (K, K) rows sum to 1 or 0
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    _label_axes(ax, classes, side)
    if k <= CELL_NUMBERS_MAX_CLASSES:
        _print_counts(ax, counts.tolist(), shares.tolist())
    accuracy = overall_accuracy(counts)
    shown = "n/a" if accuracy is None else f"{accuracy:.2f}%"
    ax.set_title(f"exit {exit_id}: top-1 {shown} on {int(counts.sum())} images")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _label_axes(ax, classes: list[str], side: float) -> None:
    """Class names on both axes; from SMALL_TICKS_MIN_CLASSES on, small enough to fit one row each."""
    k = len(classes)
    row_points = 72 * 0.8 * side / k  # height of one class row (1 pt = 1/72 in), the axes taking ~80%
    fontsize = 8.0 if k < SMALL_TICKS_MIN_CLASSES else max(1.0, min(6.0, 0.7 * row_points))
    labels = [_plot_label(name) for name in classes]
    ax.set_xticks(range(k), labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(k), labels, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")


def _print_counts(ax, counts: list[list[int]], shares: list[list[float]]) -> None:
    """Write each cell's count on it, white on dark cells."""
    for i, row in enumerate(counts):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", fontsize=8,
                    color="white" if shares[i][j] > 0.5 else "black")
