"""Classify images with a model from `byot export --format onnx`, without byot or torch installed.

    pip install onnxruntime numpy pillow
    python onnx_predict.py model.onnx image1.jpg [image2.png ...] [folder ...]

Everything the file needs beyond the graph (class names, image size, crop rule) is read from the "byot"
metadata entry that byot export writes into the ONNX file. Folders are searched recursively for image
files. Prints one JSON list of {"path", "class", "probability", "exit"}: the deepest exported exit's answer
for each image.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
BATCH = 64  # images per onnxruntime call, so a large folder needs little memory


def image_files(paths: list[str]) -> list[str]:
    """Files as given; folders expanded to the image files below them, sorted."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            found.append(str(path))
        else:
            sys.exit(f"no such file or folder: {path}")
    return found


def preprocess(path: str, size: int, resize_ratio: float) -> np.ndarray:
    """An image file -> float32 (3, size, size) RGB in [0, 1], as byot's test split is prepared."""
    with Image.open(path) as raw:
        image = raw.convert("RGB")
    short = round(size / resize_ratio)
    scale = short / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0


def main(model_path: str, image_paths: list[str]) -> list[dict]:
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["byot"])
    paths = image_files(image_paths)
    temperature = (meta.get("temperatures") or [1.0])[-1]
    results = []
    for start in range(0, len(paths), BATCH):
        chunk = paths[start:start + BATCH]
        batch = np.stack([preprocess(p, meta["image_size"], meta["resize_ratio"]) for p in chunk])
        z = session.run(None, {"images": batch})[-1] / temperature  # (B, K): the deepest exported exit
        probs = np.exp(z - z.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        results += [{"path": p, "class": meta["classes"][int(row.argmax())], "probability": float(row.max()),
                     "exit": meta["exits"][-1]} for p, row in zip(chunk, probs)]
    return results


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(json.dumps(main(sys.argv[1], sys.argv[2:])))
