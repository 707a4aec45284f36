"""torchrun with 2 CPU processes (gloo): the same steps as one process, each test image scored once,
files from rank 0 only, resume across world sizes. Each launch is a real `torchrun -m byot train`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import metrics

from byot.data.batches import Shard, batch_bounds
from byot.training.checkpoint import load_checkpoint

ARCH = "multi_resnet18_kd"
# lr 0.01: a width-4 net at lr 0.1 is chaotic enough that one process with 1 or 2 threads drifts apart
# within 3 steps (rounding alone); at 0.01 the trajectories agree for the first several steps
RUN = ["--dataset", "digits", "--image-size", "16", "--width", "4", "--batch-size", "64", "--val-split", "0.2",
       "--no-progress", "--print-freq", "1", "--amp", "off", "--sync-bn", "--lr", "0.01"]


def train(folder: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("BYOT_FAULT", None)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                 "-m", "byot"] if processes > 1 else [sys.executable, "-m", "byot"])
    proc = subprocess.run([*launcher, "train", ARCH, *RUN, "--save-folder", str(folder), *extra], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def step_losses(folder: Path) -> list[float]:
    log = (folder / ARCH / "log_train.txt").read_text()
    return [float(m) for m in re.findall(r"epoch 1 step \d+/\d+ loss ([\d.]+)", log)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    train(one, "--epochs", "1")
    train(two, "--epochs", "1", processes=2)
    return {"one": one, "two": two}


def test_two_processes_take_the_steps_one_process_takes(runs):
    one, two = step_losses(runs["one"]), step_losses(runs["two"])
    assert len(one) == len(two) == 18  # the global batch of 64 is the batch: 18 steps either way
    # the same loss, step by step, up to rounding: gloo's all-reduce sums in another order, the log prints 4
    # decimals, and an AVX2-only CPU drifted by 3e-4 at step 5 (AVX-512 ones by less); a wrong shard or
    # batch moves the loss by 1e-2 or more
    assert two[:5] == pytest.approx(one[:5], abs=5e-4)


def test_per_image_augmentation_and_adaptation_layers_take_the_same_steps_on_two_processes(tmp_path):
    # the journal recipe's AutoAugment, Cutout and grey padding are drawn for the global batch and applied to
    # each process's part; its adaptation layers train under DistributedDataParallel (beta 0: the feature
    # distance of a part is not a part of the whole batch's, so the step losses compare exactly without it)
    extra = ("--epochs", "1", "--recipe", "journal", "--beta", "0", "--lr", "0.01")
    train(tmp_path / "one", *extra)
    train(tmp_path / "two", *extra, processes=2)
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert len(one) == len(two) == 18
    assert two[:5] == pytest.approx(one[:5], abs=5e-4)


def test_only_rank_0_writes(runs):
    run = runs["two"] / ARCH
    assert len(list(run.glob("events.out.tfevents*"))) == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    log = (run / "log_train.txt").read_text()
    assert log.count("epoch 1 step 1/18 ") == 1 and log.count("test split, evaluated once") == 1
    assert sorted(p.name for p in run.iterdir() if p.suffix in (".tar", ".json", ".yaml")) == [
        "checkpoint_latest.pth.tar", "config.yaml", "model_best.pth.tar", "test_result.json"]
    assert load_checkpoint(run / "checkpoint_latest.pth.tar")["world_size"] == 2


def test_evaluation_scores_every_test_image_exactly_once(runs, capsys):
    from byot.cli import main

    run = runs["two"] / ARCH
    sharded = json.loads((run / "test_result.json").read_text())
    assert sharded["num_images"] == 359  # odd: the processes score 180 and 179 of them
    assert main(["test", ARCH, "--resume", str(run / "model_best.pth.tar"), "--amp", "off", "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert [e["top1"] for e in sharded["exits"]] == [e["top1"] for e in single["exits"]]
    assert sharded["ensemble"] == {k: single["ensemble"][k] for k in ("top1", "top5")}


def test_resume_under_two_processes_and_across_world_sizes(runs, tmp_path):
    import shutil

    folder = tmp_path / "resumed"
    shutil.copytree(runs["one"], folder)  # a 1-process run ...
    latest = folder / ARCH / "checkpoint_latest.pth.tar"
    proc = train(folder, "--epochs", "2", "--resume", str(latest), "--accum-steps", "2", "--allow-changes",
                 processes=2)  # ... goes on, with a larger effective batch: a change it records
    assert "resuming a run of 1 process(es) on 2" in proc.stderr
    records = metrics(folder / ARCH)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["config_changes"] == {"epochs": [1, 2], "accum_steps": [1, 2]}
    assert load_checkpoint(latest)["epoch"] == 2 and torch.isfinite(torch.tensor(records[-1]["losses"]["loss"]))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_every_batch_exactly_once(world):
    for n in range(40):
        parts = [Shard(r, world).part(n) for r in range(world)]
        assert [i for lo, hi in parts for i in range(lo, hi)] == list(range(n))
        assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1
    # the batches do not depend on the number of processes: a last training batch under half a batch joins
    # the one before it (so each of up to 16 processes keeps 2 images of a batch of 64); evaluation keeps it
    assert batch_bounds(130, 64, train=True) == [(0, 64), (64, 130)]
    assert batch_bounds(130, 64, train=False) == [(0, 64), (64, 128), (128, 130)]


def test_a_global_batch_too_small_for_the_processes_is_refused(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "byot", "train", ARCH, *RUN, "--batch-size", "6", "--save-folder", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode != 0 and "must be at least 8 (4 images per process)" in proc.stderr


def test_a_nonfinite_step_is_skipped_once_for_all_processes(tmp_path):
    # the fault makes every process's loss NaN at step 5: one skipped step, not one per process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BYOT_FAULT": "nonfinite_loss:5"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "byot", "train", ARCH, *RUN, "--epochs", "1", "--skip-nonfinite", "1",
                           "--save-folder", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped the update of 1 non-finite step(s) in epoch 1 (first: step 5, kd/exit2); 1 of" in proc.stderr
    record = json.loads((tmp_path / ARCH / "metrics.jsonl").read_text())
    assert record["nonfinite_steps"] == 1
