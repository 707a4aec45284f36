"""``byot tune``: hyper-parameter search with Optuna over any ``byot train`` option.

Each trial is an ordinary ``byot train`` run in its own process and run directory under the study folder,
scored on the validation split only; the test split is evaluated once, for the best trial(s), at the end.
Pruners stop bad trials on their per-epoch validation accuracy. The study lives in an Optuna storage
(SQLite, PostgreSQL or MySQL through SQLAlchemy, or a journal file), so a study continues where it was
stopped, on several machines at once, and ``optuna-dashboard STORAGE`` shows it.

- ``byot.jobs.tune.space``: the search space and its checks; ``byot.jobs.tune.spec``: the tune file and objective;
- ``byot.jobs.tune.study``: storage, sampler, pruner, and which trials count or are retried;
- ``byot.jobs.tune.runner``: the workers and one trial's child process; ``byot.jobs.tune.report``: summary, best.yaml,
  trials.csv, plots and the one test evaluation.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from byot.errors import ByotError

EXTRA = "pip install 'byot[tune]'"


def optuna_module() -> Any:
    """Optuna, or one line naming the extra that installs it."""
    try:
        optuna = importlib.import_module("optuna")
    except ImportError as e:
        raise ByotError(f"byot tune needs Optuna: {EXTRA}") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # byot asks and tells trials itself (each trains in a process of its own) and records their heartbeats,
    # so Optuna's note that heartbeats are meant for Study.optimize does not apply; nor do the experimental
    # marks of the functions byot uses (stale trials, matplotlib plots)
    warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna
