"""Everything downstream of the model, per family and kind of block (small configurations, see
test_models.TINY) on real CIFAR-100 images: train one epoch + exact resume, the real cascade equals the
simulated policy, ONNX export matches PyTorch under onnxruntime; and DDP with 2 gloo processes for every
registered entry."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_cascade_is_the_policy
from test_models import tiny as tiny_options

from byot.config import build_config
from byot.deploy.run import export_checkpoint
from byot.models import list_models, model_spec
from byot.training.build import build_trained, load_data
from byot.training.checkpoint import load_checkpoint
from byot.training.fit import fit


def tiny(name: str) -> dict:
    """test_models' small configuration, with the ResNets' stages at one block each (block type, groups and
    widths stay the entry's): the 152-layer trunk alone takes 30 s to export to ONNX on the 2-core CPU."""
    options = tiny_options(name)
    return {**options, "layers": [1, 1, 1, 1]} if "width_per_group" in model_spec(name).__dataclass_fields__ \
        else options


def _config(name: str, data_dir: Path, folder: Path, epochs: int, **extra) -> object:
    return build_config({}, {"arch": name, "data_dir": str(data_dir), "model_options": tiny(name), "epochs": epochs,
                             "batch_size": 100, "lr": 0.05, "amp": "off", "save_folder": str(folder),
                             "progress": False, "workers": 0, **extra})


# one entry per family and kind of block (an ONNX export takes 5-20 s on the 2-core CPU; the entries of a family
# differ only in depth and width, which test_models.py's forward tests cover for every one): the ResNets' bottleneck
# through resnext50_32x4d's (the same block, grouped); multi_resnet18_kd's export (the basic block) is tested on a
# trained model in test_deploy.py
ONNX_ENTRIES = ["multi_resnext50_32x4d_kd", "multi_vgg16_kd", "multi_wrn16_4_kd",
                "multi_resnext29_8x64d_kd", "multi_pyramidnet110_48_kd", "multi_mobilenetv2_kd"]
# training, resume and the cascade run through each family's code the same way whatever its depth and width (the
# forward of every entry is tested in test_models.py, and every entry under DDP below): one entry per family and
# kind of block, with the ResNets' basic block (the default arch) besides the bottleneck
FAMILY_ENTRIES = ["multi_resnet18_kd", *ONNX_ENTRIES]


@pytest.fixture(scope="module")
def runs(cifar100_small, tmp_path_factory) -> dict[str, Path]:
    """Per entry: a 2-epoch run, and a run of 1 epoch resumed for the second; the folders they wrote."""
    root = tmp_path_factory.mktemp("families")
    folders = {}
    for name in FAMILY_ENTRIES:
        straight, resumed = root / name / "straight", root / name / "resumed"
        fit(_config(name, cifar100_small, straight, 2), overwrite=True)
        fit(_config(name, cifar100_small, resumed, 2), overwrite=True, stop_after=1)
        latest = resumed / name / "checkpoint_latest.pth.tar"
        cfg = _config(name, cifar100_small, resumed, 2, resume=str(latest))
        fit(cfg, load_checkpoint(latest))
        folders[name] = root / name
    return folders


@pytest.mark.parametrize("name", FAMILY_ENTRIES)
def test_one_epoch_then_resume_equals_two_epochs(runs, name):
    straight = load_checkpoint(runs[name] / "straight" / name / "checkpoint_latest.pth.tar")
    resumed = load_checkpoint(runs[name] / "resumed" / name / "checkpoint_latest.pth.tar")
    assert straight["epoch"] == resumed["epoch"] == 2
    assert straight["model_spec"]["exits"] == resumed["model_spec"]["exits"]
    different = [k for k, v in straight["model"].items() if not torch.equal(v, resumed["model"][k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"


@pytest.mark.parametrize("name", FAMILY_ENTRIES)
def test_real_cascade_equals_the_simulated_policy(runs, cifar100_small, name):
    path = runs[name] / "straight" / name / "checkpoint_latest.pth.tar"
    checkpoint = load_checkpoint(path)
    cfg = _config(name, cifar100_small, runs[name] / "straight", 2, resume=str(path))
    model, runtime = build_trained(cfg, checkpoint, torch.device("cpu"))
    assert_cascade_is_the_policy(model, runtime, load_data(cfg, torch.device("cpu")).test)




@pytest.mark.parametrize("name", ONNX_ENTRIES)
def test_onnx_export_of_every_exit_matches_pytorch_under_onnxruntime(runs, cifar100_small, tmp_path, name):
    pytest.importorskip("onnxruntime")
    path = runs[name] / "straight" / name / "checkpoint_latest.pth.tar"
    checkpoint = load_checkpoint(path)
    cfg = _config(name, cifar100_small, runs[name] / "straight", 2, resume=str(path))
    result = export_checkpoint(cfg, checkpoint, "all", "onnx", tmp_path / "all.onnx")
    assert result["exits"] == checkpoint["model_spec"]["exits"]
    assert result["max_abs_diff"] < 1e-4


DDP_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    sys.path.insert(0, sys.argv[1])
    from test_models import tiny
    from byot.training.distributed import shutdown
    from byot.losses import SelfDistillLoss
    from byot.models import create_model, list_models

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    for name in list_models():
        torch.manual_seed(1)
        model = create_model(name, 5, 32, **tiny(name)).eval()  # eval: BatchNorm on running statistics
        reference = create_model(name, 5, 32, **tiny(name)).eval()
        reference.load_state_dict(model.state_dict())
        ddp = DistributedDataParallel(model)
        part = slice(rank * 4, rank * 4 + 4)
        # beta 0: DDP averages the processes' gradients, and the label and KD means of two halves average to
        # the whole batch's (the hint is a sum, which byot's engine weights by the process count itself)
        SelfDistillLoss(beta=0.0)(ddp(images[part]), labels[part])["loss"].backward()
        SelfDistillLoss(beta=0.0)(reference(images), labels)["loss"].backward()
        for (n, p), q in zip(model.named_parameters(), reference.parameters()):
            # the same gradient up to rounding (summed in another order; deep nets carry it to the stem)
            assert (p.grad - q.grad).norm() <= 1e-3 * q.grad.norm() + 1e-8, (name, n)
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        gathered = [torch.empty_like(grads) for _ in range(world)]
        dist.all_gather(gathered, grads)
        assert torch.equal(gathered[0], gathered[1]), name  # every process holds the same averaged gradient
        if rank == 0:
            print("ok", name, flush=True)
    del ddp  # the engine's way out: DDP's reference cycles freed before the process group, not at exit
    shutdown()
""")


def test_ddp_with_two_gloo_processes_runs_every_model(tmp_path):
    script = tmp_path / "ddp_every_model.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(Path(__file__).parent)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok")] == list_models()
