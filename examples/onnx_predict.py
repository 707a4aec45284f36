"""Classify images with a model from `byot export --format onnx`, without byot or torch installed.

    pip install onnxruntime numpy pillow
    python onnx_predict.py model.onnx image1.jpg [image2.png ...]

Everything the file needs beyond the graph (class names, image size, crop rule) is read from the "byot"
metadata entry that byot export writes into the ONNX file. Prints one JSON list of
{"path", "class", "probability", "exit"}: the deepest exported exit's answer for each image.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime
from PIL import Image


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
    batch = np.stack([preprocess(p, meta["image_size"], meta["resize_ratio"]) for p in image_paths])
    logits = session.run(None, {"images": batch})[-1]  # (B, K): the deepest exported exit
    temperature = (meta.get("temperatures") or [1.0])[-1]
    z = logits / temperature
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return [{"path": p, "class": meta["classes"][int(row.argmax())], "probability": float(row.max()),
             "exit": meta["exits"][-1]} for p, row in zip(image_paths, probs)]


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(json.dumps(main(sys.argv[1], sys.argv[2:])))
