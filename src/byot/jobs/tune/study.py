"""The Optuna side of a study: its storage (SQLite, any SQLAlchemy URL, or a journal file), the sampler and
pruner, and the bookkeeping that makes a study survive crashes: which trials count towards ``--trials``,
and which were cut short and are retried.

Every trial a worker starts carries user attributes (set while it runs, as Optuna allows): ``run_dir``
(relative to the study folder), ``worker`` (host, PID, process start time) and ``byot_state``:

- ``running`` until it ends; a trial still RUNNING whose worker is gone (kill -9, a power loss: its PID is
  dead on this host, or its heartbeat stopped, with an RDB storage) is marked FAIL and keeps ``running``;
- ``done`` / ``pruned`` (COMPLETE / PRUNED), ``error`` (FAIL: training failed; counted, not retried),
  ``interrupted`` (FAIL: Ctrl-C or SIGTERM), ``surplus`` (FAIL: asked after the study had its trials).

A FAIL trial that was cut short (``running``, ``interrupted``) is retried once: a WAITING trial with the
same parameters and ``retry_of`` its number, which resumes the same run directory from its checkpoint. It
counts in its place, so nothing is lost and nothing is counted twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import json
import logging
import os
import socket
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from byot.errors import ByotError, describe_os_error
from byot.jobs.tune import optuna_module
from byot.jobs.tune.spec import Tune
from byot.runs.atomic import write_text_atomic
from byot.runs.rundir import pid_alive

log = logging.getLogger("byot")

STATE = "byot_state"
HEARTBEAT_SECONDS = 20  # RDB storages: a running trial's heartbeat; another machine may retry it after GRACE
GRACE_SECONDS = 90
MAX_KILLS = 3  # a trial whose worker died this often is not retried again (it may be what kills it)
IDENTITY = "byot_tune"  # study user attribute: the settings it was created with (Tune.identity)
MACHINE = "byot_tune_machine"  # ... and the options of the machine that created it (data_dir, workers, ...)
STUDY_ID = "byot_study_id"  # ... a random id, also written in its folder (STUDY_FILE): a folder serves one study
DATA = "byot_data"  # ... and the fingerprint of the data it trains on (byot.data.fingerprint)
STUDY_FILE = "study.json"
SEED_MODULUS = 2**32  # Optuna's samplers seed numpy, which takes seeds below 2**32
SQLITE_HEADER = b"SQLite format 3\x00"


def storage_url(text: str) -> str:
    """A --storage value as Optuna takes it: an SQLAlchemy URL as given; a file path ending in .db, .sqlite or
    .sqlite3 as an SQLite URL; any other path stays a path (a journal file)."""
    if "://" in text:
        return text
    if not text.strip():
        raise ByotError("--storage is empty; give a file (e.g. runs/tune/study.db) or a database URL")
    if Path(text).suffix in (".db", ".sqlite", ".sqlite3"):
        try:
            return f"sqlite:///{Path(text).expanduser().resolve()}"
        except (RuntimeError, OSError) as e:  # a symlink loop
            raise ByotError(f"--storage {text}: cannot resolve the path ({e})") from e
    return text


def storage_file(url: str) -> Path | None:
    """The file a storage lives in (SQLite or journal), None for a database server."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):]).expanduser()
    return None if "://" in url else Path(url).expanduser()


def _check_sqlite(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        header = f.read(16)
    if header != SQLITE_HEADER:
        raise ByotError(f"--storage {path} is not an SQLite database (an Optuna study storage); give a new file "
                        "or the one a study wrote")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("select name from sqlite_master where type = 'table'")}
    except sqlite3.Error as e:
        raise ByotError(f"--storage {path}: cannot read the database ({e})") from e
    if tables and "studies" not in tables:
        raise ByotError(f"--storage {path} is an SQLite database of something else (tables "
                        f"{', '.join(sorted(tables)[:5])}), not an Optuna study storage")


def _check_journal(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        with open(path, "rb") as f:
            first = json.loads(f.readline())
        if not isinstance(first, dict) or "op_code" not in first:
            raise ValueError
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise ByotError(f"--storage {path} is not an Optuna journal file; give a new file, an SQLite file (.db) "
                        "or a database URL") from e


def _check_storage_text(text: str, url: str, path: Path | None) -> None:
    """Refuse a storage that would lose the study (in memory) or hang or fail on open (a FIFO, a device)."""
    if url.rstrip("/") in ("sqlite:", "sqlite:/") or url.endswith(":memory:"):
        raise ByotError(f"--storage {text} is an in-memory database: the study would be lost when byot tune "
                        "ends; give a file (e.g. runs/tune/study.db) or a database server's URL")
    if path is not None and path.exists() and not path.is_dir() and not path.is_file():
        raise ByotError(f"--storage {text} is not a regular file (a pipe or a device); give a file a study wrote, "
                        "or a new one")


def open_storage(text: str, create: bool = True) -> Any:
    """The Optuna storage of ``--storage``: RDB (with heartbeats, so that a dead machine's trial is retried
    elsewhere) or a journal file (Optuna's JournalFileBackend; one machine, or a shared file system).
    ``create=False`` (a summary): a storage file that does not exist is an error, not a new file."""
    optuna = optuna_module()
    url = storage_url(text)
    path = storage_file(url)
    _check_storage_text(text, url, path)
    if create and path is not None and path.is_file() and not (
            os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)):
        raise ByotError(f"--storage {text} is read-only here (the file or its folder, or a read-only file system); "
                        "a study writes its trials there: give a writable copy")
    if not create and path is not None and not path.exists():
        raise ByotError(f"--storage {text}: no such file; give the storage a study wrote")
    try:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        if "://" in url:
            if path is not None:
                _check_sqlite(path)
            engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
            keyword = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback"
                       in inspect.signature(optuna.storages.RDBStorage).parameters else "failed_trial_callback")
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_SECONDS,
                                              grace_period=GRACE_SECONDS, **{keyword: None})
        _check_journal(path)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    except ByotError:
        raise
    except ImportError as e:
        raise ByotError(f"--storage {text}: {e} (a PostgreSQL URL needs pip install psycopg2-binary, MySQL "
                        "pip install pymysql)") from e
    except Exception as e:  # SQLAlchemy's and Optuna's own errors: a bad URL, a server not reached
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ByotError(f"cannot open --storage {text}: {first}") from e


def study_names(storage: Any) -> list[str]:
    optuna = optuna_module()
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def make_sampler(tune: Tune, seed: int) -> Any:
    samplers = optuna_module().samplers
    if tune.sampler == "random":
        return samplers.RandomSampler(seed=seed)
    if tune.sampler == "nsga2":
        return samplers.NSGAIISampler(seed=seed)
    startup = min(10, max(2, tune.trials // 4))  # random trials first; a short study leaves TPE the rest
    return samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True)


def make_pruner(tune: Tune) -> Any:
    pruners = optuna_module().pruners
    spec = tune.pruner
    factor = spec.get("reduction_factor", 3)
    epochs: Any = "auto" if any(p.name == "epochs" for p in tune.params) else tune.base_config.epochs
    if spec["type"] == "median":
        return pruners.MedianPruner(n_startup_trials=spec.get("startup_trials", 5),
                                    n_warmup_steps=spec.get("warmup_epochs", 1))
    if spec["type"] == "hyperband":
        return pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=factor)
    if spec["type"] == "successive-halving":
        return pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=factor)
    return pruners.NopPruner()


def _differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in wanted.items() if stored.get(k) != v]


def open_study(tune: Tune, storage: Any) -> Any:
    """The study ``tune.name`` in ``storage``: created with the tune's settings, or loaded when it exists and
    was created with the same ones (a study continues only what it started)."""
    optuna = optuna_module()
    identity = json.loads(json.dumps(tune.identity()))  # as the storage gives it back (JSON)
    existing = tune.name in study_names(storage)
    probe = optuna.load_study(study_name=tune.name, storage=storage) if existing else None
    count = len(probe.trials) if probe is not None else 0
    others = bool(probe and any(t.state.name == "RUNNING" for t in probe.trials))
    # a study run in one process from its start repeats its proposals; workers that join it draw their own
    seed = (tune.sampler_seed + 7919 * count + (os.getpid() if others else 0)) % SEED_MODULUS
    sampler, pruner = make_sampler(tune, seed), make_pruner(tune)
    if probe is None:
        study = optuna.create_study(study_name=tune.name, storage=storage, directions=tune.objective.directions,
                                    sampler=sampler, pruner=pruner, load_if_exists=True)
        if IDENTITY not in study.user_attrs:
            study.set_user_attr(IDENTITY, identity)
            study.set_user_attr(MACHINE, json.loads(json.dumps(tune.machine_options())))
        stored = study.user_attrs[IDENTITY]
    else:
        study = optuna.load_study(study_name=tune.name, storage=storage, sampler=sampler, pruner=pruner)
        stored = study.user_attrs.get(IDENTITY)
        if stored is None:
            raise ByotError(f"the storage's study {tune.name!r} was not made by byot tune; give another name "
                            "(--study-name) or another --storage")
    changes = _differences(stored, identity)
    if changes:
        raise ByotError(f"study {tune.name!r} was started with other settings ({'; '.join(changes)}); continue it "
                        "with its own tune file, or start another with --study-name NAME")
    return study


def load_existing(storage: Any, name: str | None) -> Any:
    """A study byot tune made, for --summary: ``name``, or the storage's only study."""
    optuna = optuna_module()
    names = study_names(storage)
    if name is None:
        if len(names) != 1:
            raise ByotError(f"the storage holds {len(names)} studies ({', '.join(names) or 'none'}): name one "
                            "with --study-name")
        name = names[0]
    if name not in names:
        raise ByotError(f"the storage holds no study {name!r} (it holds: {', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=name, storage=storage)
    if IDENTITY not in study.user_attrs:
        raise ByotError(f"study {name!r} was not made by byot tune")
    return study


# --- which trials count, which are retried -------------------------------------------------------------

def counted(trial: Any) -> bool:
    """Towards --trials: finished (complete, pruned, failed in training) or on its way (running, waiting)."""
    state = trial.state.name
    return state in ("COMPLETE", "PRUNED", "RUNNING", "WAITING") or (
        state == "FAIL" and trial.user_attrs.get(STATE) == "error")


def cut_short(trial: Any) -> bool:
    """A FAIL trial that did not fail by itself: its worker died, or a signal stopped it."""
    return trial.state.name == "FAIL" and trial.user_attrs.get(STATE) not in ("error", "surplus")


def this_worker() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}


def _start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux), which tells a reused PID from the same one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def worker_alive(worker: dict[str, Any]) -> bool:
    pid = int(worker.get("pid", -1))
    if not pid_alive(pid):
        return False
    started = worker.get("started")
    return started is None or _start_time(pid) in (None, started)


def _fail(study: Any, trial: Any) -> bool:
    optuna = optuna_module()
    try:
        return bool(study._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:  # another worker got there first
        return False


def recover(study: Any) -> list[str]:
    """Fail the running trials whose worker is gone and queue one retry of every trial cut short; what was
    done, as lines for the log."""
    optuna = optuna_module()
    notes = []
    optuna.storages.fail_stale_trials(study)  # RDB: trials whose heartbeat stopped (another machine's)
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        if worker.get("host") == host and not worker_alive(worker) and _fail(study, t):
            notes.append(f"trial {t.number}: its tuner (PID {worker.get('pid')}) is gone; it will be retried")
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if not cut_short(t) or t.number in retried:
            continue
        kills = t.user_attrs.get("kills", 0) + (t.user_attrs.get(STATE) != "interrupted")
        if kills > MAX_KILLS:
            continue  # logged when it ended: its worker died MAX_KILLS times running it
        study.enqueue_trial(t.params, user_attrs={"run_dir": t.user_attrs.get("run_dir"), "retry_of": t.number,
                                                  "kills": kills})
        notes.append(f"trial {t.number} was cut short: queued again, to resume its run directory")
    return notes


def surplus(trial_number: int, attrs: dict[str, Any], trials: list[Any], wanted: int) -> bool:
    """Whether a trial just asked is one too many: the study had its ``wanted`` trials before it, or it is a
    second retry of the same trial (two workers queued it at once)."""
    earlier = [t for t in trials if t.number < trial_number]
    if "retry_of" in attrs:
        return any(t.user_attrs.get("retry_of") == attrs["retry_of"] and counted(t) for t in earlier)
    return sum(counted(t) for t in earlier) >= wanted


_threads = threading.Lock()


@contextlib.contextmanager
def bookkeeping(folder: Path) -> Iterator[None]:
    """One worker at a time, on this machine, reads and changes which trials run (threads and processes)."""
    folder.mkdir(parents=True, exist_ok=True)
    with _threads, open(folder / ".tune.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- the study's folder and data ---------------------------------------------------------------------------

def check_study_folder(out: Path, storage_text: str) -> None:
    """Refuse a study folder that cannot hold one: a file (the storage itself included) or a folder this
    process cannot write. Called before the storage creates the study, so nothing is left behind."""
    storage = storage_file(storage_url(storage_text))
    if storage is not None and out.resolve() == storage.expanduser().resolve():
        raise ByotError(f"--out {out} is the storage file itself; give a folder for the trials' run directories")
    if out.exists() and not out.is_dir():
        raise ByotError(f"--out {out} is a file, not a folder; give a folder for the trials' run directories")
    existing = out
    while not existing.exists() and existing != existing.parent:  # nothing is created here: a bad storage
        existing = existing.parent  # or tune file found later leaves no folder behind
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ByotError(f"cannot write to the study folder {out} ({existing} is not a writable folder); give "
                        "another --out")


def refuse_taken_folder(out: Path, name: str) -> None:
    """Before a new study is created: a folder that holds another study's id or run directories is refused,
    so that the refusal leaves no empty study in the storage."""
    marker = out / STUDY_FILE
    if marker.is_file() or any(p.is_dir() for p in (out / "trials").glob("trial-*")):
        owner = ""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            owner = f" (study {json.loads(marker.read_text()).get('study')!r})"
        raise ByotError(f"the study folder {out} holds another study's runs{owner}, and study {name!r} is new; "
                        "give it its own --out, or continue that study with its own name and storage")


def bind_folder(study: Any, out: Path) -> None:
    """Tie ``out`` to ``study``: its id, written in ``out/study.json`` by the study's first run, must match.
    A folder that holds trials but no id (another study's, or a byot 0.5.0 study's) is taken only by a study
    that already has trials of its own there."""
    ident = study.user_attrs.get(STUDY_ID)
    if ident is None:  # a study byot 0.5.0 created: it gets its id now
        ident = uuid.uuid4().hex
        study.set_user_attr(STUDY_ID, ident)
    marker = out / STUDY_FILE
    if marker.is_file():
        try:
            stored = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            raise ByotError(f"{marker} is unreadable ({e}); it ties {out} to one study: restore it or give another "
                            "--out") from e
        if stored.get("id") != ident:
            raise ByotError(f"the study folder {out} belongs to study {stored.get('study')!r} (another storage or "
                            f"another study of this name); give this study its own --out, or --study-name NAME")
        return
    own = {t.user_attrs.get("run_dir") for t in study.get_trials(deepcopy=False)}
    found = [p for p in sorted((out / "trials").glob("trial-*")) if p.is_dir()]
    foreign = [p for p in found if p.relative_to(out).as_posix() not in own]
    if foreign:
        raise ByotError(f"the study folder {out} holds run directories of another study ({foreign[0].name}, "
                        f"{len(foreign)} in all) and no {STUDY_FILE}; give this study its own --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ByotError(f"cannot make the study folder {out}: {describe_os_error(e)}; give another --out") from e
    write_text_atomic(marker, json.dumps({"id": ident, "study": study.study_name}, indent=1) + "\n")


def check_data(study: Any, fingerprint: dict[str, Any]) -> None:
    """The study trains on one data set: a fingerprint other than the stored one is refused, naming what
    differs; the same data at another path passes. A study without one (byot 0.5.0) stores this one."""
    from byot.data.fingerprint import fingerprint_differences

    stored = study.user_attrs.get(DATA)
    if stored is None:
        study.set_user_attr(DATA, fingerprint)
        return
    differences = fingerprint_differences(stored, fingerprint)
    if differences:
        raise ByotError(f"study {study.study_name!r} trains on other data than this --data-dir gives "
                        f"({'; '.join(differences)}); continue it on its own data, or start another study with "
                        "--study-name NAME")
