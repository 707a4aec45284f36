"""``byot export``: the network up to exit K (or every exit) as one standalone file.

The exported network takes float32 RGB images in [0, 1], (B, 3, S, S), and normalises them itself, so
the only preprocessing a user repeats outside byot is "resize, centre-crop to S, divide by 255". What a
runtime needs beyond the graph (class names, image size, resize rule, temperatures) travels inside the
file: ONNX metadata properties, a TorchScript extra file, or safetensors metadata, all under "byot".
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from byot.errors import ByotError, describe_os_error
from byot.models import MultiExitNet

FORMATS = ("onnx", "torchscript", "safetensors")  # the --format choices
METADATA_KEY = "byot"  # the metadata entry (a JSON string) in every format
ONNX_OPSET = 18


class ExitNetwork(nn.Module):
    """Normalisation, then the model's ``subnet`` of the chosen exits: the stem, the stages up to the deepest
    chosen exit and the chosen heads; nothing else."""

    def __init__(self, model: MultiExitNet, exits: Sequence[int], mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__()
        try:
            self.net = model.subnet(exits)
        except ByotError as e:
            raise ByotError(f"--exit {', '.join(map(str, exits)) or '(none)'}: this model's exits are "
                            f"{', '.join(map(str, model.exit_stages))} (or 'all')") from e
        self.exit_numbers = list(self.net.exit_stages)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """images: float32 (B, 3, S, S) in [0, 1] -> (B, K) logits, or a tuple of them shallow to deep."""
        outputs = self.net((images - self.mean) / self.std).logits
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def output_names(net: ExitNetwork) -> list[str]:
    return [f"logits_exit{k}" for k in net.exit_numbers]


def export(net: ExitNetwork, fmt: str, out: Path, image_size: int, metadata: dict[str, Any]) -> dict[str, Any]:
    """Write ``net`` (eval mode, CPU, fp32) to ``out``; returns {"path", "format", "bytes"} and, for ONNX
    and TorchScript, "max_abs_diff": the largest difference from PyTorch on a check batch."""
    if fmt not in FORMATS:
        raise ByotError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    net = net.eval().cpu().float().to(memory_format=torch.contiguous_format)
    text = json.dumps(metadata)
    # written under a temporary name beside ``out`` and renamed once complete and checked: a failed
    # export (a full disk, an exporter error) leaves an existing ``out`` as it was and no partial file
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{out.suffix}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        result = _export_to(net, fmt, tmp, image_size, text)
        os.replace(tmp, out)
    except OSError as e:
        raise ByotError(f"cannot write --out {out}: {describe_os_error(e)}") from e
    except RuntimeError as e:  # torch.jit.save and the exporters report a failed write (a full disk) so
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByotError(f"cannot write --out {out}: {first}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "format": fmt, "bytes": out.stat().st_size, **result}


def _export_to(net: ExitNetwork, fmt: str, path: Path, image_size: int, text: str) -> dict[str, Any]:
    example = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    if fmt == "safetensors":
        _export_safetensors(net, path, text)
        return {}
    run = _export_onnx(net, path, example, text) if fmt == "onnx" else _export_torchscript(net, path, example, text)
    check = torch.rand(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))  # another batch size
    return {"max_abs_diff": max_abs_diff(net, run, check)}


def max_abs_diff(net: ExitNetwork, run: Any, images: torch.Tensor) -> float:
    """Largest |PyTorch - exported| over every output for float32 ``images`` (B, 3, S, S) in [0, 1]."""
    with torch.inference_mode():
        expected = net(images)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    got = run(images)
    return max(float((e - torch.as_tensor(g)).abs().max()) for e, g in zip(expected, got))


def _export_onnx(net: ExitNetwork, out: Path, example: torch.Tensor, text: str) -> Any:
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ByotError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
                        "pip install 'byot[export]'") from e
    batch = torch.export.Dim("batch")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates its steps on stdout
            torch.onnx.export(net, (example,), str(out), dynamo=True, input_names=["images"],
                              output_names=output_names(net), dynamic_shapes={"images": {0: batch}},
                              opset_version=ONNX_OPSET, external_data=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByotError(f"ONNX export failed: {first}") from e
    model = onnx.load(str(out))
    onnx.helper.set_model_props(model, {METADATA_KEY: text})
    onnx.save(model, str(out))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images.numpy()})


def _export_torchscript(net: ExitNetwork, out: Path, example: torch.Tensor, text: str) -> Any:
    with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; it still runs everywhere torch does
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(net, example, check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={f"{METADATA_KEY}.json": text})
        loaded = torch.jit.load(str(out))

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            y = loaded(images)
        return [y] if isinstance(y, torch.Tensor) else list(y)

    return run


def _export_safetensors(net: ExitNetwork, out: Path, text: str) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError as e:
        raise ByotError("safetensors export needs the safetensors package: pip install 'byot[export]'") from e
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out), metadata={METADATA_KEY: text})
