"""Inputs that were attacked and are held: each is refused with exit code 2 (the ONNX example: 1) and one line
naming the problem, before anything is trained or written. Attacks with a test elsewhere keep it there; these
are the ones that had none. Every case here fails before training, or reads a few files with a trained model."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image
from test_config import billion_laughs
from test_pretrained import _randomised

from byot.cli import main
from byot.errors import ByotError
from byot.models import create_model
from byot.models.pretrained import load_pretrained

ARCH = "multi_resnet18_kd"
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "onnx_predict.py"
TINY = ["--dataset", "digits", "--image-size", "16", "--width", "4", "--epochs", "1", "--workers", "0",
        "--no-progress"]
DIGITS = {"arch": ARCH, "dataset": "digits", "image_size": 16, "width": 4, "epochs": 2, "batch_size": 64,
          "val_split": 0.2, "workers": 0}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("byot: error:") and "\n" not in err, err
    return err


# --- pretrained weights ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    """A random torchvision resnet18's state dict (every tensor random, BN statistics too)."""
    return _randomised(torchvision.models.resnet18).state_dict()


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def _train_with(tmp_path: Path, weights: Path | str) -> int:
    return main(["train", ARCH, "--dataset", "digits", "--image-size", "16", "--pretrained", str(weights), "--epochs",
                 "1", "--workers", "0", "--no-progress", "--save-folder", str(tmp_path / "runs")])


@pytest.mark.parametrize("suffix, bad", [(".pth", math.nan), (".safetensors", math.inf)])
def test_pretrained_weights_holding_a_nan_or_an_infinity_are_refused_naming_the_tensor(
        resnet18_state, tmp_path, capsys, suffix, bad):
    state = {k: v.clone() for k, v in resnet18_state.items()}
    state["layer2.0.conv1.weight"][0, 0, 0, :3] = bad  # the first tensor, in the file's order, with one
    state["layer4.1.bn2.running_var"][5] = bad
    path = _save(state, tmp_path / f"diverged{suffix}")
    assert _train_with(tmp_path, path) == 2
    err = _one_line(capsys)
    assert f"pretrained weights {path} hold 4 non-finite values (NaN or infinity)" in err
    assert "first in tensor layer2.0.conv1.weight (3 of its 73728)" in err
    assert not list((tmp_path / "runs").rglob("*.pth.tar"))  # nothing trained
    # the same file without the bad values loads
    clean = _save(resnet18_state, tmp_path / f"clean{suffix}")
    torch.manual_seed(0)
    model = create_model(ARCH, 10, width=64, image_size=224)
    summary = load_pretrained(model, clean)
    assert summary["loaded"] == len(resnet18_state) - 2  # all but the 1000-class fc
    assert torch.equal(model.stages[1][0].conv1.weight, resnet18_state["layer2.0.conv1.weight"])


class _RunsCode:
    """Pickled, it calls open(path, "w") when loaded: a file that carries code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _not_weights(kind: str, folder: Path, state: dict[str, torch.Tensor]) -> Path:
    path = folder / ("weights.safetensors" if kind in ("huge header", "lying offsets", "torch file") else "weights.pth")
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "fifo":
        os.mkfifo(path)  # reading it would wait forever for a writer
    elif kind == "code":
        torch.save({"conv1.weight": torch.zeros(1), "payload": _RunsCode(folder / "ran")}, path)
    elif kind == "huge header":  # the 8-byte header length claims 2**62 bytes of JSON
        path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    elif kind == "lying offsets":  # the header claims a 64x3x7x7 float tensor; the file holds 100 bytes
        header = json.dumps({"conv1.weight": {"dtype": "F32", "shape": [64, 3, 7, 7],
                                              "data_offsets": [0, 64 * 3 * 7 * 7 * 4]}}).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(100))
    elif kind == "torch file":  # a torch.save file named .safetensors
        torch.save(state, path)
    return path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes")
@pytest.mark.parametrize("kind, says", [("empty", "cannot read pretrained weights"),
                                        ("fifo", "no pretrained weights at"),
                                        ("code", "cannot read pretrained weights"),
                                        ("huge header", "header too large"),
                                        ("lying offsets", "cannot read pretrained weights"),
                                        ("torch file", "cannot read pretrained weights")])
def test_pretrained_files_that_are_not_weights_are_refused(resnet18_state, tmp_path, capsys, kind, says):
    path = _not_weights(kind, tmp_path, resnet18_state)
    assert _train_with(tmp_path, path) == 2
    err = _one_line(capsys)
    assert str(path) in err and says in err
    assert not (tmp_path / "ran").exists()  # the pickled call never ran


# --- byot models: the split check training runs ------------------------------------------------------------

def test_models_refuses_a_library_model_training_cannot_split_with_trainings_line(tmp_path, capsys):
    assert main(["train", "tv/densenet121", "--dataset", "digits", "--image-size", "32", "--epochs", "1",
                 "--workers", "0", "--no-progress", "--save-folder", str(tmp_path)]) == 2
    training = _one_line(capsys)
    assert "tv/densenet121: byot cannot split it into stages" in training
    assert main(["models", "tv/densenet121", "--image-size", "32"]) == 2
    assert _one_line(capsys) == training


def test_models_lists_byot_and_splittable_library_models(monkeypatch, capsys):
    assert main(["models", "multi_wrn16_4_kd", "tv/resnet18", "--json"]) == 0
    rows = {r["arch"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["multi_wrn16_4_kd"]["exits"] == [1, 2, 3] and rows["tv/resnet18"]["exits"] == [1, 2, 3, 4]
    assert all(r["flops"] == sorted(r["flops"]) and r["flops"][0] > 0 for r in rows.values())
    # the default listing (every registered name; two of them here, the whole registry takes ~20 s)
    from byot.models import table

    monkeypatch.setattr(table, "list_models", lambda: ["multi_vgg11_kd", "multi_wrn16_4_kd"])
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["arch", "multi_vgg11_kd", "multi_wrn16_4_kd"]


# --- tune files -----------------------------------------------------------------------------------------

def _tune_file(tmp_path: Path, **keys) -> Path:
    doc = {"name": "digits", "base": dict(DIGITS), "space": {"lr": {"low": 0.01, "high": 0.2}}, **keys}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _tune_refused(tmp_path: Path, capsys, path: Path, *flags: str) -> str:
    storage = tmp_path / "s.db"
    assert main(["tune", str(path), "--storage", str(storage), *flags]) == 2
    err = _one_line(capsys)
    assert not storage.exists() and not (tmp_path / "digits").exists()  # no study, no folder
    return err


NAN, INF = math.nan, math.inf
TUNE_FILES = {  # case: (keys of the file, words of the refusal)
    "name a number": ({"name": 5}, "name must be a non-empty string"),
    "base a list": ({"base": [1, 2]}, "base must be a mapping of byot train options"),
    "trials a string": ({"trials": "5"}, "trials must be an integer >= 1"),
    "trials a boolean": ({"trials": True}, "trials must be an integer >= 1"),
    "objective a number": ({"objective": 3}, "objective must be one of deepest"),
    "budget NaN": ({"objective": "early-exit", "budget_flops": NAN}, "budget_flops must be a positive finite number"),
    "space empty": ({"space": {}}, "space must be a mapping of option: range or choices"),
    "space a list": ({"space": [{"lr": [0.1, 0.2]}]}, "space must be a mapping of option: range or choices"),
    "space null": ({"space": None}, "space must be a mapping of option: range or choices"),
    "low NaN": ({"space": {"lr": {"low": NAN, "high": 0.2}}}, "space: lr: low must be a finite number, not nan"),
    "high infinite": ({"space": {"lr": {"low": 0.01, "high": INF}}}, "lr: high must be a finite number, not inf"),
    "step NaN": ({"space": {"lr": {"low": 0.01, "high": 0.2, "step": NAN}}}, "lr: step must be a finite number"),
    "family low NaN": ({"space": {"model_options.depth": {"low": NAN, "high": 16}}},
                       "model_options.depth: low must be a finite number"),
    "repeated choice": ({"space": {"head": ["attention", "attention"]}}, "head: the choices repeat a value"),
    "unknown key": ({"budget": 3}, "unknown key(s) budget; known: name, base, space"),
    "unknown pruner key": ({"pruner": {"type": "median", "patience": 3}}, "pruner: unknown key(s) patience"),
    "sampler unknown": ({"sampler": "grid"}, "sampler must be one of tpe, random, nsga2"),
    "sampler a list": ({"sampler": ["tpe"]}, "sampler must be one of tpe, random, nsga2"),
    "pruner unknown": ({"pruner": "always"}, "--pruner must be median, hyperband, successive-halving, none"),
    "pruner type a list": ({"pruner": {"type": ["median"]}}, "--pruner must be median, hyperband"),
    "pruner startup negative": ({"pruner": {"type": "median", "startup_trials": -1}},
                                "startup_trials must be an integer >= 0, not -1"),
    "pruner reduction 1": ({"pruner": {"type": "hyperband", "reduction_factor": 1}},
                           "reduction_factor must be an integer >= 2, not 1"),
}


@pytest.mark.parametrize("case", list(TUNE_FILES))
def test_a_bad_tune_file_is_one_line_before_any_study(tmp_path, capsys, case):
    keys, says = TUNE_FILES[case]
    assert says in _tune_refused(tmp_path, capsys, _tune_file(tmp_path, **keys))


@pytest.mark.parametrize("flags, says", [(["--sampler", "grid"], "--sampler must be tpe, random, nsga2, not 'grid'"),
                                         (["--pruner", "always"], "--pruner must be median, hyperband"),
                                         (["--trials", "0"], "--trials must be at least 1")])
def test_bad_sampler_pruner_or_trials_flags_are_one_line(tmp_path, capsys, flags, says):
    assert says in _tune_refused(tmp_path, capsys, _tune_file(tmp_path), *flags)


def test_an_alias_bomb_as_tune_file_is_refused_at_once(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text("name: digits\nspace: {lr: [0.1, 0.2]}\n" + billion_laughs())
    start = time.perf_counter()
    err = _tune_refused(tmp_path, capsys, path)
    assert "its aliases expand to more than 100,000 values" in err and "bomb.yaml" in err
    assert time.perf_counter() - start < 5  # expanded, 9**9 strings would take minutes and gigabytes


@pytest.mark.parametrize("name", ["../", "///"])
def test_a_study_name_without_letters_or_digits_is_refused(tmp_path, capsys, name):
    err = _tune_refused(tmp_path, capsys, _tune_file(tmp_path), "--study-name", name)
    assert f"name {name!r} has no letters or digits" in err


# --- storages -------------------------------------------------------------------------------------------

STORAGES = {  # case: (--storage, relative to tmp_path unless absolute or a URL; words of the refusal)
    "a folder as journal": ("folder", "is not an Optuna journal file"),
    "a folder as SQLite": ("folder.db", "Is a directory"),
    "sqlite:/// without a path": ("sqlite:///", "is an in-memory database"),
    "an unknown scheme": ("nosuch://host/db", "cannot open --storage nosuch://host/db"),
    "a missing driver": ("postgresql://user:secret@localhost:5432/byot", "pip install psycopg2-binary"),
    "/proc": ("/proc", "cannot open --storage /proc"),
    "a file in /proc": ("/proc/study.db", "cannot open --storage /proc/study.db"),
    "a symlink loop": ("loop", "Too many levels of symbolic links"),
    "a symlink loop named .db": ("loopa.db", "cannot resolve the path"),
}


@pytest.mark.parametrize("case", list(STORAGES))
def test_odd_storages_are_one_line(tmp_path, monkeypatch, case):
    pytest.importorskip("optuna")
    from byot.jobs.tune.study import open_storage

    text, says = STORAGES[case]
    if "://" not in text and not text.startswith("/"):
        text = str(tmp_path / text)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder.db").mkdir()
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    (tmp_path / "loopa.db").symlink_to(tmp_path / "loopb.db")
    (tmp_path / "loopb.db").symlink_to(tmp_path / "loopa.db")
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # not installed, wherever this runs
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ByotError) as error:
        open_storage(text)
    assert says in str(error.value) and "\n" not in str(error.value)
    assert sorted(tmp_path.iterdir()) == before and list((tmp_path / "folder").iterdir()) == []


READ_ONLY_CHECK = """
import sys
from byot.errors import ByotError
from byot.jobs.tune.study import open_storage
for text in sys.argv[1:]:
    try:
        open_storage(text)
        print("opened", text)
    except ByotError as e:
        print("refused", e)
"""


def test_a_new_storage_in_a_read_only_folder_is_refused(tmp_path):
    """chmod for an ordinary user; root ignores it, so a read-only bind mount (a mount namespace of its own)."""
    pytest.importorskip("optuna")
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "old.db").write_bytes(b"")  # storages a study wrote before the file system went read-only
    (folder / "old.log").write_bytes(b"")
    storages = [str(folder / "study.db"), str(folder / "study.log"), str(folder / "sub" / "study.db"),
                str(folder / "old.db"), str(folder / "old.log")]
    check = [sys.executable, "-c", READ_ONLY_CHECK, *storages]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if os.geteuid() != 0:
        folder.chmod(0o555)
        command = check
    else:
        script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" || exit 77; shift; exec "$@"'
        command = ["unshare", "-m", "sh", "-c", script, "sh", str(folder), *check]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    except FileNotFoundError:
        pytest.skip("root without unshare: no way to make a folder read-only for it")
    finally:
        folder.chmod(0o755)
    if proc.returncode == 77:
        pytest.skip(f"root cannot bind-mount here: {proc.stderr.strip()}")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 5, proc.stdout + proc.stderr
    assert all(line.startswith("refused cannot open --storage") for line in lines[:3]), lines
    assert all(line.startswith("refused --storage") and "is read-only here" in line for line in lines[3:]), lines
    assert sorted(p.name for p in folder.iterdir()) == ["old.db", "old.log"]


# --- continuing a study -----------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, says", [(["--epochs", "3"], "epochs': 2"),
                                         (["--objective", "ensemble"], "objective 'deepest' -> 'ensemble'"),
                                         (["--seed", "1"], "'seed': 1")])
def test_a_study_continued_with_another_base_objective_or_seed_is_refused(tmp_path, capsys, monkeypatch, flags,
                                                                         says):
    optuna = pytest.importorskip("optuna")
    from byot.jobs.tune import runner
    from byot.jobs.tune.spec import load_tune
    from byot.jobs.tune.study import open_storage, open_study

    path = _tune_file(tmp_path)
    storage = tmp_path / "s.db"
    open_study(load_tune(path, {}, {}), open_storage(str(storage)))  # the study as its first run made it

    def must_not_train(*args, **kwargs):
        raise AssertionError("a trial started")

    monkeypatch.setattr(runner, "threads_per_trial", must_not_train)
    assert main(["tune", str(path), "--storage", str(storage), *flags]) == 2
    err = _one_line(capsys)
    assert "study 'digits' was started with other settings" in err and says in err, err
    assert "--study-name NAME" in err
    assert optuna.load_study(study_name="digits", storage=f"sqlite:///{storage}").trials == []


# --- augmentation and family options ----------------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--mixup", "-1"], ["--mixup", "nan"], ["--cutmix", "-0.5"], ["--cutmix", "inf"],
                                   ["--label-smoothing", "-0.1"], ["--pad-fill", "-1"]], ids=" ".join)
def test_augmentation_values_out_of_range_stop_byot_train(tmp_path, capsys, flags):
    assert main(["train", ARCH, *TINY, "--save-folder", str(tmp_path), *flags]) == 2
    assert _one_line(capsys).startswith(f"byot: error: {flags[0]} must")
    assert not (tmp_path / ARCH).exists()


@pytest.mark.parametrize("arch, option, says", [
    ("multi_wrn16_4_kd", "depth=4", "WideResNet depth must be 6n + 4 (10, 16, 22, 28, 40, ...), not 4"),
    ("multi_wrn16_4_kd", "depth=-2", "WideResNet depth must be 6n + 4"),
    ("multi_wrn16_4_kd", "widen=0", "WideResNet widen must lie in [1, 64]"),
    ("multi_wrn16_4_kd", "widen=65", "WideResNet widen must lie in [1, 64]"),
    ("multi_wrn16_4_kd", "dropout=1", "WideResNet dropout must lie in [0, 1), not 1.0"),
    ("multi_wrn16_4_kd", "depth=deep", "option depth must be int"),
    ("multi_pyramidnet110_48_kd", "depth=9", "PyramidNet depth must be 6n + 2"),
    ("multi_vgg16_kd", "depth=12", "VGG depth must be one of 11, 13, 16, 19, not 12"),
    ("multi_mobilenetv2_kd", "width_mult=0.01", "MobileNetV2 width_mult must lie in [0.05, 8]"),
])
def test_family_options_out_of_range_stop_byot_train(tmp_path, capsys, arch, option, says):
    run = [flag for flag in TINY if flag not in ("--width", "4")]  # MobileNetV2 has width_mult, not width
    assert main(["train", arch, *run, "--save-folder", str(tmp_path), "--model-option", option]) == 2
    assert says in _one_line(capsys)
    assert not (tmp_path / arch).exists()


# --- byot predict and examples/onnx_predict.py on odd images and folders ---------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


UNREADABLE = ["zero.png", "text.jpg", "cut.png", "bomb.png"]
ODD_BUT_VALID = ["gray16.png", "cmyk.jpg", "palette.png", "one_pixel.png", "thin.png", "animated.png",
                 "float.tif", "UPPER.PNG", "caf\udce9.png"]


def _odd_folder(root: Path) -> Path:
    """A folder of images byot reads (odd modes and sizes, a name that is not UTF-8), files it cannot read,
    a FIFO named like an image, a hidden image and a link back to the folder itself."""
    folder = root / "odd"
    folder.mkdir()
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image\n")
    Image.new("RGB", (8, 8)).save(folder / "whole.png")
    (folder / "cut.png").write_bytes((folder / "whole.png").read_bytes()[:40])
    (folder / "whole.png").unlink()
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 10**10 pixels claimed
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                                      + _png_chunk(b"IDAT", zlib.compress(bytes(100))) + _png_chunk(b"IEND", b""))
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(folder / "gray16.png")
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
    Image.new("P", (8, 8)).save(folder / "palette.png", transparency=0)
    Image.new("RGBA", (1, 1)).save(folder / "one_pixel.png")
    Image.new("LA", (300, 2)).save(folder / "thin.png")
    frames = [Image.new("RGB", (8, 8), color) for color in ("red", "blue")]
    frames[0].save(folder / "animated.png", save_all=True, append_images=frames[1:])
    Image.new("F", (8, 8)).save(folder / "float.tif")
    Image.new("RGB", (8, 8)).save(folder / "UPPER.PNG")
    (folder / "caf\udce9.png").write_bytes((folder / "one_pixel.png").read_bytes())  # Latin-1 bytes on disk
    Image.new("RGB", (8, 8)).save(folder / ".hidden.png")
    os.mkfifo(folder / "pipe.png")  # opening it would wait forever
    (folder / "again").symlink_to(folder, target_is_directory=True)
    return folder


def _empty_like(root: Path, case: str) -> Path:
    """A path that holds no image file."""
    path = root / case.replace(" ", "_")
    if case == "a folder of other files":
        path.mkdir()
        (path / "notes.txt").write_text("x")
        (path / ".hidden").mkdir()
        Image.new("RGB", (8, 8)).save(path / ".hidden" / "a.png")
    elif case == "an empty folder":
        path.mkdir()
    elif case == "a fifo":
        os.mkfifo(path)
    return path


NO_IMAGES = {"nothing there": "is neither an image file nor a folder", "an empty folder": "no image files",
             "a folder of other files": "no image files", "a fifo": "is neither an image file nor a folder"}
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes")


@needs_fifo
@pytest.mark.parametrize("case", list(NO_IMAGES))
def test_predict_refuses_a_path_with_no_image(digits_checkpoint, tmp_path, capsys, case):
    path = _empty_like(tmp_path, case)
    assert main(["predict", "--resume", str(digits_checkpoint), str(path)]) == 2
    err = _one_line(capsys)
    assert NO_IMAGES[case] in err and str(path) in err


@needs_fifo
def test_predict_answers_odd_images_once_and_lists_the_unreadable(digits_checkpoint, tmp_path, capsys):
    folder = _odd_folder(tmp_path)
    code = main(["predict", "--resume", str(digits_checkpoint), str(folder), "--json"])
    captured = capsys.readouterr()
    assert code == 1, captured.err  # some files unreadable: listed, the rest answered
    answered = sorted(Path(r["path"]).name for r in json.loads(captured.out))
    assert answered == sorted(ODD_BUT_VALID)  # once each: the link back to the folder is not walked again
    unreadable = [line for line in captured.err.splitlines() if "cannot read image" in line]
    assert sorted(Path(line.split("cannot read image ")[1].split(":")[0]).name for line in unreadable) == sorted(
        UNREADABLE)
    assert "decompression bomb" in captured.err and "pipe.png" not in captured.err
    for name in UNREADABLE:  # only unreadable files: exit 2
        assert main(["predict", "--resume", str(digits_checkpoint), str(folder / name)]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "byot: error: none of the 1 file(s) could be read as an image")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    """A two-class ONNX classifier (global average pool, one matrix) with the metadata byot export writes."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [3, 2], [1.0, -1.0, 0.5, 0.0, -0.5, 1.0])
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["logits_exit4"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                            ["B", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits_exit4", TensorProto.FLOAT, ["B", 2])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {"byot": json.dumps({"image_size": 16, "resize_ratio": 1.0, "exits": [4],
                                                       "classes": ["cat", "dog"]})})
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save(model, str(path))
    return path


def _example(model: Path, *paths: Path) -> subprocess.CompletedProcess:
    """examples/onnx_predict.py with byot made unimportable, as a user without byot runs it."""
    code = ("import sys, runpy; sys.modules['byot'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, str(EXAMPLE), str(model), *map(str, paths)],
                          capture_output=True, text=True, timeout=120, check=False)


@needs_fifo
def test_the_onnx_example_refuses_paths_with_no_image(tiny_onnx, tmp_path):
    for case, says in NO_IMAGES.items():
        path = _empty_like(tmp_path, case)
        proc = _example(tiny_onnx, path)
        assert proc.returncode == 1 and proc.stdout == "", (case, proc.stderr)
        assert proc.stderr.strip() == (f"{path} {says}" if "neither" in says else
                                       f"no image files (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp) in {path}")


@needs_fifo
def test_the_onnx_example_answers_odd_images_once_and_lists_the_unreadable(tiny_onnx, tmp_path):
    folder = _odd_folder(tmp_path)
    proc = _example(tiny_onnx, folder)
    assert proc.returncode == 1, proc.stderr
    rows = json.loads(proc.stdout)
    assert sorted(Path(r["path"]).name for r in rows) == sorted(ODD_BUT_VALID)
    assert all(r["class"] in ("cat", "dog") and 0.5 <= r["probability"] <= 1 for r in rows)
    unreadable = proc.stderr.strip().splitlines()
    assert sorted(Path(line.split(": cannot read image")[0]).name for line in unreadable) == sorted(UNREADABLE)


# --- attacks the third pass found not held, now held ------------------------------------------------------

def test_a_blank_storage_and_a_name_of_no_letters_with_out_are_one_line(tmp_path, capsys):
    assert _tune_refused(tmp_path, capsys, _tune_file(tmp_path), "--storage", "  ").endswith(
        "--storage is empty; give a file (e.g. runs/tune/study.db) or a database URL")
    err = _tune_refused(tmp_path, capsys, _tune_file(tmp_path), "--study-name", "///", "--out", str(tmp_path / "o"))
    assert "name '///' has no letters or digits" in err


@pytest.mark.parametrize("space, says", [({"alpha": [1, 1.0]}, "the choices repeat a value"),
                                         ({"alpha": [True, 1]}, None)])
def test_choices_equal_as_numbers_are_repeats_and_a_switch_is_not_a_number(space, says):
    from byot.jobs.tune.space import parse_space

    if says is None:
        assert parse_space(space)[0].choices == (True, 1)
        return
    with pytest.raises(ByotError, match=says):
        parse_space(space)


@pytest.mark.parametrize("flags, says", [(["--budget-flops", "inf", "--objective", "early-exit"], "--budget-flops must"),
                                         (["--max-drop", "nan", "--objective", "early-exit"], "--max-drop must")])
def test_early_exit_bounds_must_be_finite(tmp_path, capsys, flags, says):
    assert says in _tune_refused(tmp_path, capsys, _tune_file(tmp_path), *flags)


@pytest.mark.parametrize("arch, option, says", [
    ("multi_wrn16_4_kd", "depth=6000004", "asks for 3000000 residual blocks; byot builds at most 1000"),
    ("multi_resnet18_kd", "layers=[2, 2, 2, 2000]", "asks for 2006 residual blocks"),
])
def test_networks_deeper_than_any_published_are_refused_at_once(tmp_path, capsys, arch, option, says):
    start = time.perf_counter()
    assert main(["train", arch, *TINY, "--model-option", option, "--save-folder", str(tmp_path)]) == 2
    assert says in _one_line(capsys) and time.perf_counter() - start < 20


def test_grouped_convolutions_wider_than_any_published_are_refused():
    from byot.models.resnet import ResNetSpec
    from byot.models.resnext import ResNeXtSpec

    with pytest.raises(ByotError, match="cardinality and bottleneck_width must be at most 1024"):
        ResNeXtSpec(cardinality=5000)
    with pytest.raises(ByotError, match="groups and width_per_group must be at most 1024"):
        ResNetSpec(block="bottleneck", groups=4096)


@pytest.mark.parametrize("flag", ["--mixup", "--cutmix"])
def test_a_beta_parameter_numpy_cannot_draw_from_is_refused(tmp_path, capsys, flag):
    assert main(["train", ARCH, *TINY, flag, "1e308", "--save-folder", str(tmp_path)]) == 2
    assert f"{flag} must lie in [0, 1000]" in _one_line(capsys)


def test_predict_refuses_an_empty_path(digits_checkpoint, capsys):
    assert main(["predict", "--resume", str(digits_checkpoint), ""]) == 2
    assert "an empty PATH was given" in _one_line(capsys)


def test_the_onnx_example_refuses_a_model_that_is_not_a_byot_export(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    text = tmp_path / "text.onnx"
    text.write_text("not a model")
    bare = tmp_path / "bare.onnx"
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8, 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), bare)
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    for model, says in ((text, "is not an ONNX model onnxruntime can load"), (bare, "holds no byot metadata")):
        proc = _example(model, image)
        assert proc.returncode == 1 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
