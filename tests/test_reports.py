"""Per-class reports: accuracies against hand-computed values, the CSV read back, the PNG opened."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from byot.errors import ByotError
from byot.jobs.reports import (
    class_counts,
    format_per_class,
    overall_accuracy,
    per_class_accuracy,
    per_class_table,
    write_confusion,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# rows = true class, columns = predicted; "fish" has no test images
CONFUSION = torch.tensor([[5, 1, 0], [2, 2, 0], [1, 0, 0]], dtype=torch.int64)
CONFUSION_EMPTY_ROW = torch.tensor([[5, 1, 0], [2, 2, 0], [0, 0, 0]], dtype=torch.int64)


def test_per_class_accuracy_golden_values():
    assert per_class_accuracy(CONFUSION) == pytest.approx([100 * 5 / 6, 100 * 2 / 4, 0.0])
    assert overall_accuracy(CONFUSION) == pytest.approx(100 * 7 / 11)
    assert class_counts(CONFUSION) == [6, 4, 1]


def test_class_without_images_gets_none_not_nan():
    accuracies = per_class_accuracy(CONFUSION_EMPTY_ROW)
    assert accuracies[:2] == pytest.approx([100 * 5 / 6, 50.0])
    assert accuracies[2] is None
    assert overall_accuracy(torch.zeros(2, 2, dtype=torch.int64)) is None


def test_non_square_or_float_matrix_is_refused():
    with pytest.raises(ValueError, match="K, K"):
        per_class_accuracy(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        per_class_accuracy(torch.eye(3))


def test_per_class_table_one_column_per_exit_and_valid_json():
    exit1 = torch.tensor([[1, 1, 0], [0, 4, 0], [0, 0, 0]])
    table = per_class_table(["cat", "dog", "fish"], [exit1, CONFUSION_EMPTY_ROW], exit_ids=[1, 4])
    assert list(table) == ["cat", "dog", "fish"]
    assert table["cat"] == pytest.approx([50.0, 100 * 5 / 6])
    assert table["dog"] == pytest.approx([100.0, 50.0])
    assert table["fish"] == [None, None]
    assert json.loads(json.dumps(table, allow_nan=False)) == table
    with pytest.raises(ValueError, match="3 classes"):
        per_class_table(["cat", "dog", "fish"], [torch.zeros(2, 2, dtype=torch.int64)], exit_ids=[1])


def test_format_per_class_rows_columns_and_counts():
    table = {"cat": [50.0, 83.3333], "hippopotamus": [100.0, 50.0], "fish": [None, None]}
    text = format_per_class(table, [1, 4], counts=[6, 4, 0])
    lines = text.splitlines()
    assert lines[0].split() == ["class", "exit1", "exit4", "images"]
    assert lines[2].split() == ["cat", "50.0", "83.3", "6"]
    assert lines[3].split() == ["hippopotamus", "100.0", "50.0", "4"]
    assert lines[4].split() == ["fish", "-", "-", "0"]
    assert len({len(line) for line in lines}) == 1  # right-aligned columns: every row as wide as the header
    assert "images" not in format_per_class(table, [1, 4])


def test_csv_round_trip_keeps_counts_and_awkward_names(tmp_path):
    classes = ["plain", 'say "hi", twice', "a,b"]
    csv_path, _ = write_confusion(CONFUSION, classes, exit_id=2, out_dir=tmp_path)
    assert csv_path == tmp_path / "confusion_exit2.csv"
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true\\pred", *classes]
    assert [row[0] for row in rows[1:]] == classes
    assert torch.equal(torch.tensor([[int(n) for n in row[1:]] for row in rows[1:]]), CONFUSION)


def test_png_is_a_real_image_that_grows_with_the_class_count(tmp_path):
    _, small = write_confusion(CONFUSION, ["cat", "dog", "$\\frac{$"], exit_id=1, out_dir=tmp_path / "a")
    torch.manual_seed(0)
    many = torch.randint(0, 5, (40, 40))
    _, large = write_confusion(many, [f"class/{i}" for i in range(40)], exit_id=3, out_dir=tmp_path / "b")
    sizes = []
    for path in (small, large):
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            sizes.append(image.size)
    assert min(sizes[0]) > 100
    assert sizes[1][0] > sizes[0][0] and sizes[1][1] > sizes[0][1]
    # class names never reach file names, even ones holding a path separator
    written = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert written == ["confusion_exit3.csv", "confusion_exit3.png"]


def test_rewrite_replaces_the_files(tmp_path):
    write_confusion(CONFUSION, ["a", "b", "c"], exit_id=1, out_dir=tmp_path)
    csv_path, _ = write_confusion(CONFUSION * 2, ["a", "b", "c"], exit_id=1, out_dir=tmp_path)
    with open(csv_path, newline="") as f:
        assert list(csv.reader(f))[1] == ["a", "10", "2", "0"]


def test_unwritable_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ByotError, match="a_file"):
        write_confusion(CONFUSION, ["a", "b", "c"], exit_id=1, out_dir=blocker / "reports")


def test_failed_write_leaves_no_temporary_file(tmp_path):
    (tmp_path / "confusion_exit1.png").mkdir()  # the rename onto it must fail
    with pytest.raises(ByotError, match="confusion_exit1.png"):
        write_confusion(CONFUSION, ["a", "b", "c"], exit_id=1, out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_exit1.csv", "confusion_exit1.png"]
