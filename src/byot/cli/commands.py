"""One function per ``byot`` subcommand: each a short list of calls into the library, then what it prints
(the only place that prints)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from byot.errors import ByotError

if TYPE_CHECKING:
    from byot.config import TrainConfig
from byot.cli.formats import format_bench, format_table, format_variants
from byot.cli.parser import DEMO


def _given(args: argparse.Namespace, *drop: str) -> dict[str, Any]:
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config_file", *drop)}
    if "model_options" in given:  # [(key, value), ...] from repeated --model-option
        given["model_options"] = dict(given["model_options"])
    return given



def _setup_logging(progress_bar: bool, quiet: bool = False) -> None:
    """Log lines on stderr (step lines too, unless a progress bar shows them); ``quiet``: warnings only."""
    root = logging.getLogger("byot")
    root.setLevel(logging.DEBUG)
    root.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO if progress_bar else logging.DEBUG)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    root.propagate = False



def _run_training(given: dict[str, Any], config_file: str | None, overwrite: bool, allow_changes: bool = False) -> int:
    from byot.runs.rundir import LATEST
    from byot.runs.signals import Interrupted, handle_signals, signal_name
    from byot.training.distributed import launched_by_torchrun
    from byot.training.fit import fit
    from byot.training.resolve import resolve_config

    main_process = launched_by_torchrun().is_main  # under torchrun only rank 0 logs, prints and writes
    show_bar = given.get("progress", True) and sys.stderr.isatty() and main_process
    _setup_logging(show_bar, quiet=not main_process)
    cfg, checkpoint = resolve_config(given, config_file, allow_changes=allow_changes)
    show_bar = cfg.progress and show_bar
    cfg = dataclasses.replace(cfg, progress=show_bar)
    try:
        with handle_signals():
            records = fit(cfg, checkpoint, overwrite=overwrite)
    except (KeyboardInterrupt, Interrupted) as e:
        code = e.exit_code if isinstance(e, Interrupted) else 130
        if not main_process:
            return code
        latest = cfg.run_dir / LATEST
        where = (f"continue with --resume {latest} (or --resume auto)" if latest.exists()
                 else "no epoch had finished, so there is nothing to resume")
        name = signal_name(e.signum) if isinstance(e, Interrupted) else "Ctrl-C"
        print(f"byot: interrupted ({name}); every finished epoch is saved: {where}", file=sys.stderr)
        return code
    if not main_process:
        return 0
    if records and "final_test" in records[-1]:
        final = records[-1]["final_test"]
        print(f"test split, evaluated once with model_best (epoch {final['epoch']}, selected on validation):")
        print(format_table(final["exits"], final["ensemble"], None))
    elif records:
        print(f"last epoch, {records[-1]['eval_split']} split:")
        print(format_table(records[-1]["exits"], records[-1]["ensemble"], None))
    if records:
        print(f"run directory: {cfg.run_dir}")
    return 0



def cmd_train(args: argparse.Namespace) -> int:
    from byot.config import load_yaml

    overwrite, config_file = getattr(args, "overwrite", False), getattr(args, "config_file", None)
    allow_changes = getattr(args, "allow_changes", False)
    given = _given(args, "overwrite", "allow_changes")
    if given.get("arch") is None:
        given.pop("arch", None)
        named = "arch" in load_yaml(config_file) if config_file else False
        if not named and not given.get("resume"):
            raise ByotError("byot train needs ARCH (e.g. multi_resnet18_kd), or a --config file that names arch")
    return _run_training(given, config_file, overwrite, allow_changes)



def cmd_demo(args: argparse.Namespace) -> int:
    print("byot demo: multi_resnet18_kd (width 16) with self-distillation on scikit-learn's 8x8 digits, "
          "upscaled to 32 px", file=sys.stderr)
    return _run_training({**DEMO, **_given(args, "overwrite")}, None, getattr(args, "overwrite", False))



def cmd_test(args: argparse.Namespace) -> int:
    from byot.jobs.testing import test_checkpoint

    cfg, checkpoint = _trained(args, "json", "per_class")
    per_class = getattr(args, "per_class", False)
    result = test_checkpoint(cfg, checkpoint, per_class, _ema(args))
    if getattr(args, "json", False):
        print(json.dumps(result))
        return 0
    weights = ", weight average (EMA)" if result["weights"] == "ema" else ""
    print(f"{cfg.arch} on {cfg.dataset} test split ({result['num_images']} images), "
          f"checkpoint epoch {result['epoch']}{weights}, evaluated in {result['precision']}")
    print(format_table(result["exits"], result["ensemble"], result["exits"]))
    if per_class:
        from byot.jobs.reports import format_per_class

        print(format_per_class(result["per_class"], [e["exit"] for e in result["exits"]], result["class_counts"]))
        print("wrote " + ", ".join(result["confusion_files"]))
    return 0



def cmd_sweep(args: argparse.Namespace) -> int:
    """Exit 0 when every run finished, 1 when some failed (their logs are named)."""
    from byot.jobs.sweep import format_results, load_sweep, run_sweep, summarise, write_results

    _setup_logging(False)
    sweep = load_sweep(args.config, {"data_dir": args.data_dir} if args.data_dir else None)
    sweep = dataclasses.replace(sweep, runs_dir=Path(args.runs_dir or sweep.runs_dir), out=Path(args.out or sweep.out))
    statuses = run_sweep(sweep, dry_run=args.dry_run)
    if args.dry_run:
        for st in statuses:
            print(f"{st.row}, seed {st.seed}: {'finished' if st.state == 'done' else st.detail}")
        return 0
    summary = summarise(sweep, statuses)
    paths = write_results(summary, sweep.out)
    print(json.dumps(summary) if args.json else format_results(summary) + "\nwrote " + ", ".join(map(str, paths)))
    failed = [st for st in statuses if st.state == "failed"]
    for st in failed:
        print(f"byot: {st.row}, seed {st.seed} failed: {st.detail} (see {st.run_dir.parent / 'sweep.log'})",
              file=sys.stderr)
    return 1 if failed else 0



TUNE_SETTINGS = ("trials", "storage", "study_name", "out", "jobs", "objective", "budget_flops", "max_drop", "pruner",
                 "sampler", "sampler_seed", "summary", "json", "config")



def cmd_tune(args: argparse.Namespace) -> int:
    """Exit 0 when the study has its trials, 130 / 143 when a signal stopped it (rerun to continue)."""
    from byot.jobs.tune.report import format_summary, write_outputs
    from byot.jobs.tune.study import load_existing, open_storage

    _setup_logging(False)
    settings = {k: getattr(args, k, None) for k in TUNE_SETTINGS}
    given = _given(args, *TUNE_SETTINGS)
    refused = sorted({"resume", "save_folder", "config_file", "overwrite", "final_test"} & set(vars(args)))
    if refused:
        raise ByotError(f"byot tune sets {', '.join('--' + r.replace('_', '-') for r in refused)} of each trial "
                        "itself; leave it out")
    if settings["jobs"] < 1:
        raise ByotError("--jobs must be at least 1")
    if settings["summary"] and given:
        raise ByotError("--summary trains nothing: leave out "
                        + ", ".join("--" + k.replace("_", "-") for k in sorted(given)))
    tune = None
    if settings["config"]:
        from byot.jobs.tune.spec import load_tune, replace_name

        tune = replace_name(load_tune(settings["config"], given, {k: settings[k] for k in (
            "trials", "objective", "budget_flops", "max_drop", "pruner", "sampler", "sampler_seed")}),
            settings["study_name"])
    elif not settings["summary"]:
        raise ByotError("byot tune needs a tune file (TUNE.yaml), or --summary --storage URL")
    name = tune.name if tune else settings["study_name"]
    from byot.jobs.tune.study import check_study_folder
    from byot.runs.trainchild import slug

    storage_text = settings["storage"] or (f"runs/tune/{slug(name)}.db" if name else None)
    if storage_text is None:
        raise ByotError("byot tune --summary needs --storage (the study's storage)")
    training = tune is not None and not settings["summary"]
    if training:  # before the storage creates a study: a folder it cannot use is named now
        check_study_folder(_study_folder(settings["out"], storage_text, tune.name), storage_text)
    storage = open_storage(storage_text, create=not settings["summary"])
    if training:
        from byot.jobs.tune.runner import run_study
        from byot.runs.children import StoppedBySignal
        from byot.runs.signals import signal_name

        try:
            study = run_study(tune, storage, _study_folder(settings["out"], storage_text, tune.name), settings["jobs"])
        except StoppedBySignal as e:
            name = signal_name(e.signum)
            print(f"byot: interrupted ({name}); the trials in progress stopped at their last saved epoch: rerun the "
                  "same command to continue the study (they resume from there)", file=sys.stderr)
            return int(e.code)
    else:
        study = load_existing(storage, name)
    out = _study_folder(settings["out"], storage_text, study.study_name)
    summary = write_outputs(study, out)
    print(json.dumps(summary) if settings["json"] else format_summary(summary, tune.trials if tune else None))
    if training and summary["counts"]["complete"] == 0:
        print(f"byot: no trial of study {study.study_name!r} completed; see the failed trials' tune.log under {out}",
              file=sys.stderr)
        return 1
    return 0



def _study_folder(out: str | None, storage: str, name: str) -> Path:
    """--out, or a folder named after the study beside the storage file (runs/tune/NAME for a server)."""
    from byot.jobs.tune.study import storage_file, storage_url
    from byot.runs.trainchild import slug

    if out:
        return Path(out).expanduser().resolve()
    path = storage_file(storage_url(storage))
    return ((path.parent if path is not None else Path("runs/tune")) / slug(name)).resolve()



POLICY_OPTIONS = ("threshold", "final", "calibration")



def _trained(args: argparse.Namespace, *drop: str) -> tuple[TrainConfig, dict]:
    """The run configuration and checkpoint of a command that works on a trained model; its --ema (run the
    weight average) is no training option, so it stays out of the configuration and is checked here, before
    any data is read."""
    from byot.training.build import trained_weights
    from byot.training.resolve import resolve_config

    _setup_logging(False)
    cfg, checkpoint = resolve_config(_given(args, "ema", *drop), getattr(args, "config_file", None))
    if checkpoint is None:
        raise ByotError(f"byot {args.command} needs --resume CHECKPOINT (a .pth.tar file a byot run wrote)")
    if _ema(args):
        trained_weights(checkpoint, True, cfg.resume or "the checkpoint")
    return cfg, checkpoint


def _ema(args: argparse.Namespace) -> bool:
    """--ema of a command on a trained model: the weight average byot train --ema saved, not the weights."""
    return bool(getattr(args, "ema", False))



def cmd_calibrate(args: argparse.Namespace) -> int:
    from byot.deploy.run import calibrate
    from byot.deploy.tables import format_calibration

    cfg, checkpoint = _trained(args, "json")
    result = calibrate(cfg, checkpoint, _ema(args))
    print(json.dumps(result) if getattr(args, "json", False) else format_calibration(result))
    return 0



def cmd_early_exit(args: argparse.Namespace) -> int:
    from byot.deploy.run import early_exit
    from byot.deploy.tables import format_early_exit

    options = ("json", "budget_flops", "max_drop", "time", "out", *POLICY_OPTIONS)
    cfg, checkpoint = _trained(args, *options)
    o = {k: getattr(args, k, None) for k in options}
    out = Path(o["out"]) if o["out"] else None
    result = early_exit(cfg, checkpoint, out, o["final"] or "deepest", o["budget_flops"], o["max_drop"],
                        o["threshold"], getattr(args, "calibration", True), bool(o["time"]), _ema(args))
    print(json.dumps(result) if o["json"] else format_early_exit(result))
    return 0



def cmd_export(args: argparse.Namespace) -> int:
    from byot.deploy.run import export_checkpoint
    from byot.deploy.tables import format_export

    cfg, checkpoint = _trained(args, "exit_number", "fmt", "out", "json", "force")
    result = export_checkpoint(cfg, checkpoint, args.exit_number, args.fmt, Path(args.out),
                               getattr(args, "force", False), _ema(args))
    print(json.dumps(result) if getattr(args, "json", False) else format_export(result))
    return 0



def cmd_predict(args: argparse.Namespace) -> int:
    """Exit 0 when every file was classified, 1 when some could not be read (listed on stderr)."""
    from byot.deploy.predict import predict_paths
    from byot.deploy.tables import format_predictions

    cfg, checkpoint = _trained(args, "paths", "json", *POLICY_OPTIONS)
    rows, errors = predict_paths(cfg, checkpoint, args.paths, getattr(args, "threshold", None),
                                 getattr(args, "final", None), getattr(args, "calibration", True), _ema(args))
    for line in errors:
        print(f"byot: {line}", file=sys.stderr)
    if not rows:
        raise ByotError(f"none of the {len(errors)} file(s) could be read as an image")
    print(json.dumps(rows) if getattr(args, "json", False) else format_predictions(rows))
    return 1 if errors else 0



def cmd_split(args: argparse.Namespace) -> int:
    from byot.data.split import format_split_table, split_folder

    _setup_logging(False)
    report = split_folder(Path(args.src), Path(args.out), args.test_ratio, args.seed, args.mode, args.force)
    print(format_split_table(report))
    print(f"wrote {args.out}/train, {args.out}/test and {report.manifest}")
    return 0



def cmd_check_data(args: argparse.Namespace) -> int:
    """Exit 0 when every image decodes, 1 when some do not (for scripts), 2 for a bad folder."""
    from byot.data.scan import format_scan, scan_folder

    _setup_logging(False)
    reports = scan_folder(Path(args.dir), args.workers)
    print(format_scan(reports))
    return 1 if any(r.corrupt for r in reports.values()) else 0



def cmd_bench(args: argparse.Namespace) -> int:
    from byot.config import check_range
    from byot.jobs.bench import BenchSpec, run_bench, run_variants

    for name in ("batch_size", "width", "image_size"):  # the ranges byot train checks, from the same table
        check_range(name, getattr(args, name))
    if args.steps < 1 or args.warmup < 0:
        raise ByotError("--steps must be at least 1 and --warmup at least 0")
    spec = BenchSpec(args.arch, args.device, args.batch_size, args.image_size, args.steps, args.warmup, args.amp,
                     args.channels_last, args.compile, args.width, head=args.head,
                     model_options=tuple(args.model_options), augment=args.augment, cutout=args.cutout)
    if args.variants:
        rows = run_variants(spec)
        print(json.dumps(rows) if args.json else format_variants(rows))
        return 0
    result = run_bench(spec)
    print(json.dumps(result) if args.json else format_bench(result))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from byot.config import check_range
    from byot.models.table import format_models, model_rows

    check_range("image_size", args.image_size)
    if args.num_classes < 1:
        raise ByotError("--num-classes must be at least 1")
    rows = model_rows(args.num_classes, args.image_size, args.head, args.names or None)
    print(json.dumps(rows) if args.json else format_models(rows, markdown=args.markdown))
    return 0
