"""``byot models``: every registered model with its family, options, parameters and FLOPs per exit, counted
on the model itself (on the meta device: shapes only, no memory, a few seconds for the whole registry)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from byot.models.cost import exit_costs
from byot.models.factory import create_model
from byot.models.registry import list_models, model_entry


def model_rows(num_classes: int = 100, image_size: int = 32, head: str = "bottleneck",
               names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per registered name (or per name of ``names``, library models too): family, options, plain-backbone and multi-exit parameters, exits and
    FLOPs (2 x multiply-adds) per exit for one image of ``image_size`` px. A name training would refuse (a
    library model byot cannot split into stages) is the same ByotError here."""
    rows = []
    own = set(list_models())
    for name in names or list_models():
        entry = model_entry(name)
        # a library model (timm/NAME, tv/NAME) is built as training builds it, on the CPU: its split into stages
        # is checked by running one image through it, which the meta device skips (it has shapes, not values),
        # so a model training refuses is refused here with the same line
        with torch.device("meta" if name in own else "cpu"):
            model = create_model(name, num_classes, image_size, head=head)
        with torch.device("meta"):
            plain = create_model(name, num_classes, image_size, exits=False)
        costs = exit_costs(model, image_size)
        rows.append({"arch": name, "family": entry.family.name, "summary": entry.family.summary,
                     "options": dataclasses.asdict(model.spec),
                     "plain_params": sum(p.numel() for p in plain.parameters()),
                     "params": sum(p.numel() for p in model.parameters()),
                     "exits": model.exit_stages, "flops": [c["flops"] for c in costs]})
    return rows


def format_models(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The rows as a markdown table (the README's) or aligned text."""
    head = ["arch", "family options", "plain params", "BYOT params", "exits", "GFLOPs per exit"]
    lines = []
    for r in rows:
        options = ", ".join(f"{k} {_short(v)}" for k, v in r["options"].items())
        flops = " / ".join(f"{f / 1e9:.2f}" for f in r["flops"])
        lines.append([r["arch"], options, f"{r['plain_params'] / 1e6:.2f}M", f"{r['params'] / 1e6:.2f}M",
                      ",".join(map(str, r["exits"])), flops])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
                         + ["| `" + cells[0] + "` | " + " | ".join(cells[1:]) + " |" for cells in lines])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [head, *lines])


def _short(value: Any) -> str:
    if isinstance(value, tuple):
        return "-".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)
