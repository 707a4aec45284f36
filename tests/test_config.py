"""The run configuration: YAML files read safely and within bounds, every numeric option range-checked."""

from __future__ import annotations

import math
import time
from dataclasses import fields

import pytest

from byot.cli import main
from byot.config import RANGES, TrainConfig, build_config, check_range, load_yaml
from byot.errors import ByotError

ARCH = "multi_resnet18_kd"


def billion_laughs(levels: int = 9) -> str:
    """The classic alias bomb: ~400 bytes that expand to 9**levels strings."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    assert bomb.stat().st_size < 500
    start = time.perf_counter()
    with pytest.raises(ByotError, match=r"bomb.yaml: its aliases expand to more than 100,000 values"):
        load_yaml(bomb)
    assert time.perf_counter() - start < 0.5


def test_aliases_within_the_bound_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("common: &c {lr: 0.05, epochs: 3}\nrun:\n  <<: *c\n  width: 8\nsame: *c\n")
    assert load_yaml(path) == {"common": {"lr": 0.05, "epochs": 3}, "run": {"lr": 0.05, "epochs": 3, "width": 8},
                               "same": {"lr": 0.05, "epochs": 3}}


def test_an_alias_to_itself_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("a: &a [1, *a]\n")
    with pytest.raises(ByotError, match="refers to itself"):
        load_yaml(path)


def test_values_nested_too_deeply_are_one_error_not_a_recursion_traceback(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("width: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(ByotError, match="deep.yaml nests its values too deeply"):
        load_yaml(path)


def test_a_non_utf8_byte_names_the_file_and_where(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("epochs: 3\ndata_dir: /data/caf\xe9\n".encode("latin-1"))
    with pytest.raises(ByotError, match=r"latin1.yaml is not UTF-8 text: byte 0xe9 at line 2, column 20"):
        load_yaml(path)


def test_a_utf8_file_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufeffdata_dir: /data/café\n".encode())
    assert load_yaml(path) == {"data_dir": "/data/café"}


def test_a_non_utf8_config_is_one_line_through_the_cli(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"epochs: 3\xff\n")
    assert main(["train", ARCH, "--dataset", "digits", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("byot: error: config") and "UTF-8" in err and "\n" not in err


NAN, INF = float("nan"), float("inf")
BAD = [("momentum", -5.0), ("momentum", 1.0), ("momentum", NAN), ("weight_decay", -1e-4), ("weight_decay", INF),
       ("lr", 0.0), ("lr", -0.1), ("lr", NAN), ("lr", INF), ("temperature", 0.0), ("temperature", NAN),
       ("alpha", 1.5), ("alpha", -0.1), ("alpha", NAN), ("beta", -1.0), ("beta", INF),
       ("width", 0), ("width", 100000), ("image_size", 4), ("image_size", 5000), ("epochs", 0), ("epochs", 10**6),
       ("batch_size", 0), ("batch_size", 70000), ("workers", -1), ("workers", 1000), ("accum_steps", 0),
       ("accum_steps", 2000), ("seed", -1), ("seed", 2**32), ("val_split", 1.0), ("val_split", -0.1),
       ("val_split", NAN), ("print_freq", 0), ("skip_nonfinite", -1)]


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_out_of_range_values_are_refused_naming_the_flag(name, value):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ByotError, match=f"^{flag} must "):
        build_config({}, {name: value})


WRONG_KIND = [("epochs", INF), ("epochs", NAN), ("width", True), ("lr", False), ("lr", "fast"), ("epochs", 2.5),
              ("distill", "flase"), ("distill", 2), ("arch", ["multi_resnet18_kd"]), ("data_dir", {"a": 1})]


@pytest.mark.parametrize(("name", "value"), WRONG_KIND, ids=[f"{n}={v}" for n, v in WRONG_KIND])
def test_values_of_the_wrong_kind_are_refused(name, value):
    with pytest.raises(ByotError, match=f"option {name}: cannot use"):
        build_config({}, {name: value})


def test_a_yaml_word_read_as_a_boolean_says_to_quote_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("amp: off\n")
    with pytest.raises(ByotError, match="option amp: cannot use False as str; YAML reads on/off"):
        build_config({}, load_yaml(path))
    path.write_text("amp: 'off'\n")
    assert build_config({}, load_yaml(path)).amp == "off"


def test_the_bounds_themselves_and_lenient_spellings_are_accepted():
    cfg = build_config({}, {"momentum": 0.0, "alpha": 1.0, "beta": 0.0, "width": 1024, "image_size": 4096,
                            "seed": 2**32 - 1, "val_split": 0.0, "workers": 0, "epochs": "3", "lr": "0.05",
                            "distill": "off", "compile": 1, "batch_size": 64.0})
    assert (cfg.width, cfg.seed, cfg.epochs, cfg.lr, cfg.distill, cfg.compile, cfg.batch_size) == (
        1024, 2**32 - 1, 3, 0.05, False, True, 64)
    assert build_config({}, {"image_size": None}).image_size is None


def test_every_numeric_option_has_a_range():
    numeric = {f.name for f in fields(TrainConfig) if str(f.type).split(" |")[0] in ("int", "float")}
    assert set(RANGES) == numeric


def test_other_commands_check_their_flags_with_the_same_table():
    check_range("batch_size", 64)
    check_range("image_size", None)
    with pytest.raises(ByotError, match=r"^--width must lie in \[1, 1024\], not 100000"):
        check_range("width", 100000)
    with pytest.raises(ByotError, match=r"^--batch-size must"):
        check_range("batch_size", 0)
    assert math.isinf(RANGES["lr"].high)


TINY = ["--dataset", "digits", "--image-size", "16", "--width", "4", "--epochs", "1", "--no-progress"]


@pytest.mark.parametrize("flags", [["--momentum", "-5"], ["--lr", "nan"], ["--weight-decay", "inf"],
                                   ["--workers", "100000"]], ids=lambda f: f[0])
def test_bad_flags_stop_byot_train_with_one_line(tmp_path, capsys, flags):
    code = main(["train", ARCH, *TINY, "--save-folder", str(tmp_path), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"byot: error: {flags[0]} must") and "\n" not in err
    assert not (tmp_path / ARCH).exists()  # refused before the run directory is made


def test_the_same_model_spelled_otherwise_is_the_same_model():
    from byot.config import build_config, check_same_model

    old = build_config({}, {"width": 64, "stem": "auto"})  # what byot 0.1 wrote into every config
    check_same_model(old, build_config({}), "ckpt")  # the family's defaults
    check_same_model(old, build_config({}, {"exits": "3,1,2"}), "ckpt")  # the natural exits, in any order
    check_same_model(old, build_config({}, {"exits": [1, 2, 3, 4]}), "ckpt")  # a YAML list, the deepest named
    wrn = build_config({}, {"arch": "multi_wrn16_4_kd"})
    check_same_model(wrn, build_config({}, {"arch": "multi_wrn16_4_kd", "model_options": {"widen": "4"}}), "ckpt")
    with pytest.raises(ByotError, match=r"--model-option widen=2 \(checkpoint: 4\)"):
        check_same_model(wrn, build_config({}, {"arch": "multi_wrn16_4_kd", "model_options": {"widen": 2}}), "ckpt")
    with pytest.raises(ByotError, match=r"--exits .*\(checkpoint: \(1, 2, 3\)\)"):
        check_same_model(old, build_config({}, {"exits": "2"}), "ckpt")
    with pytest.raises(ByotError, match="--exits 5,1: this network has 4 stages"):
        build_config({}, {"exits": "5,1"})  # checked when the config is built, not after the data loaded
