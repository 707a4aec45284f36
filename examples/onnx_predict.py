"""Classify images with a model from `byot export --format onnx`, without byot or torch installed.

    pip install onnxruntime numpy pillow
    python onnx_predict.py model.onnx image1.jpg [image2.png ...] [folder ...]

Everything the file needs beyond the graph (class names, image size, crop rule) is read from the "byot"
metadata entry that byot export writes into the ONNX file. Folders are searched recursively for image
files, as `byot predict` does. Prints one JSON list of {"path", "class", "probability", "exit"}: the deepest
exported exit's answer for each readable image; unreadable files are listed on stderr and make the exit code 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # as byot's folder reader
BATCH = 64  # images per onnxruntime call, so a large folder needs little memory


def image_files(paths: list[str]) -> list[Path]:
    """Files as given; folders searched recursively for image files (sorted, hidden ones skipped),
    as ``byot predict`` does."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            found.append(path)
        else:
            sys.exit(f"{path} is neither an image file nor a folder")
    if not found:
        sys.exit(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(paths)}")
    return found


def preprocess(path: Path, size: int, resize_ratio: float) -> np.ndarray:
    """An image file -> float32 (3, size, size) RGB in [0, 1], as byot's test split is prepared."""
    with Image.open(path) as raw:
        image = ImageOps.exif_transpose(raw).convert("RGB")
    short = round(size / resize_ratio)
    scale = short / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0


def main(model_path: str, image_paths: list[str]) -> tuple[list[dict], list[str]]:
    """(one answer per readable image, one line per unreadable file)."""
    if not Path(model_path).is_file():
        sys.exit(f"no ONNX file at {model_path}")
    try:
        session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  onnxruntime raises its own kinds for a file that is not ONNX
        sys.exit(f"{model_path} is not an ONNX model onnxruntime can load ({str(e).splitlines()[0][:200]})")
    if "byot" not in session.get_modelmeta().custom_metadata_map:
        sys.exit(f"{model_path} holds no byot metadata: export it with byot export")
    meta = json.loads(session.get_modelmeta().custom_metadata_map["byot"])
    temperature = (meta.get("temperatures") or [1.0])[-1]
    results, errors, ready = [], [], []
    for path in image_files(image_paths):
        try:
            ready.append((path, preprocess(path, meta["image_size"], meta["resize_ratio"])))
        except Exception as e:  # noqa: BLE001  PIL raises many kinds for truncated, corrupt or non-image files
            errors.append(f"{path}: cannot read image ({e})")
        if len(ready) == BATCH:
            results += classify(session, meta, temperature, ready)
            ready = []
    if ready:
        results += classify(session, meta, temperature, ready)
    return results, errors


def classify(session: onnxruntime.InferenceSession, meta: dict, temperature: float,
             ready: list[tuple[Path, np.ndarray]]) -> list[dict]:
    z = session.run(None, {"images": np.stack([x for _, x in ready])})[-1] / temperature  # (B, K): deepest exit
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return [{"path": str(p), "class": meta["classes"][int(row.argmax())], "probability": float(row.max()),
             "exit": meta["exits"][-1]} for (p, _), row in zip(ready, probs)]


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    answers, unreadable = main(sys.argv[1], sys.argv[2:])
    print(json.dumps(answers))
    for line in unreadable:
        print(line, file=sys.stderr)
    sys.exit(1 if unreadable else 0)
