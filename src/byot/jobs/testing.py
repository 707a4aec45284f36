"""``byot test``: a checkpoint evaluated on the test split, per exit and ensemble, with each exit's cost."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path
from typing import Any

from byot.config import (
    TrainConfig,
)
from byot.jobs.reports import class_counts, per_class_table, write_confusion
from byot.models.cost import exit_costs
from byot.training.build import build_trained, check_checkpoint_fits, load_data, weights_name
from byot.training.evaluate import evaluate
from byot.training.runtime import (
    precision_name,
    resolve_device,
)

log = logging.getLogger("byot")


def test_checkpoint(cfg: TrainConfig, checkpoint: dict, per_class: bool = False,
                    ema: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint on the test split: per-exit and ensemble accuracy plus per-exit cost; ``ema``:
    the weight average it holds (``byot train --ema``) instead of its weights ("weights" says which).

    ``per_class`` adds "per_class" ({class: [accuracy per exit]}) and writes confusion_exit<k>.png/.csv
    beside the checkpoint ("confusion_files" lists them).
    """
    device = resolve_device(cfg.device)
    data = load_data(cfg, device)
    check_checkpoint_fits(checkpoint, data, cfg.resume or "the checkpoint")
    model, runtime = build_trained(cfg, checkpoint, device, ema)
    result = evaluate(model, data.test, runtime, model.exit_stages, confusion=per_class)
    confusions = result.pop("confusion", None)
    if confusions is not None:
        result["per_class"] = per_class_table(data.classes, confusions, model.exit_stages)
        out_dir = Path(cfg.resume).expanduser().parent if cfg.resume else cfg.run_dir
        result["confusion_files"] = [str(p) for k, m in zip(model.exit_stages, confusions)
                                     for p in write_confusion(m, data.classes, k, out_dir)]
        result["class_counts"] = class_counts(confusions[0])
    costs = exit_costs(model, data.image_size)
    full = costs[-1]["flops"]
    for e, c in zip(result["exits"], costs):
        e.update(flops=c["flops"], params=c["params"], compute_share=c["flops"] / full)
    return {"arch": cfg.arch, "dataset": cfg.dataset, "epoch": checkpoint.get("epoch"),
            "weights": weights_name(ema), "precision": precision_name(runtime), **result}
