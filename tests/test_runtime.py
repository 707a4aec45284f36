"""The runtime's choices: mixed precision per device, and channels-last kept away from layers that crash oneDNN."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from byot.errors import ByotError
from byot.models import create_model
from byot.training import runtime as rt

CPU = torch.device("cpu")


def test_amp_auto_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(rt, "cpu_has_fast_bf16", lambda: True)
    assert rt.resolve_amp("auto", CPU) == "bf16"
    monkeypatch.setattr(rt, "cpu_has_fast_bf16", lambda: False)
    assert rt.resolve_amp("auto", CPU) == "off"
    assert rt.resolve_amp("off", CPU) == "off"
    with pytest.raises(ByotError, match="fp16 needs a CUDA GPU"):
        rt.resolve_amp("fp16", CPU)


@pytest.mark.parametrize(("arch", "width", "safe"), [
    ("multi_resnet18_kd", 4, False),  # 4-channel convolutions
    ("multi_resnet18_kd", 8, False),  # the stage-2 shortcut: a strided 1x1 reading 8 channels
    ("multi_resnet18_kd", 12, False),
    ("multi_resnet18_kd", 16, True),
    ("multi_resnet18_kd", 64, True),
    ("multi_resnet50_kd", 8, True),  # bottleneck stages expand x4: its strided 1x1s read 32 or more
])
def test_channels_last_safety_rule(arch, width, safe):
    model = create_model(arch, 10, width=width, image_size=32)
    assert rt.channels_last_is_safe(model, CPU) is safe
    runtime = rt.make_runtime(CPU, (0.5,) * 3, (0.5,) * 3, "off", True, model)
    assert runtime.channels_last is safe
    inference = rt.make_runtime(CPU, (0.5,) * 3, (0.5,) * 3, "off", True, model, training=False)
    assert inference.channels_last  # only backward passes crashed: inference keeps the fast format


TRAIN_ODD_BATCHES = """
import torch
from byot.training.runtime import make_runtime
from byot.losses import SelfDistillLoss
from byot.models import create_model
torch.manual_seed(0)
model = create_model("multi_resnet18_kd", 10, width=8, image_size=32)
runtime = make_runtime(torch.device("cpu"), (0.5,) * 3, (0.5,) * 3, "off", True, model)
model = runtime.place(model)
for batch in (67, 3, 33):  # odd sizes: channels-last crashed here with torch 2.14.1's oneDNN
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    out = model(runtime.inputs(images))
    SelfDistillLoss()(out, torch.randint(0, 10, (batch,)))["loss"].backward()
print("trained")
"""


def test_narrow_nets_train_on_odd_batches_without_crashing():
    # in a child process: the bug this guards against kills the process (segfault, abort)
    proc = subprocess.run([sys.executable, "-c", TRAIN_ODD_BATCHES], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0 and "trained" in proc.stdout, proc.stderr[-2000:]
