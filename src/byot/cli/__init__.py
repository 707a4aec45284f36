"""The ``byot`` command: parse, run the subcommand, turn a ByotError or a Ctrl-C into one line.

Nothing here imports torch at module level: a Ctrl-C during the seconds torch takes to import then arrives
inside main(), which turns it into one line, not a traceback."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence

from byot.cli.commands import (
    cmd_bench,
    cmd_calibrate,
    cmd_check_data,
    cmd_demo,
    cmd_early_exit,
    cmd_export,
    cmd_models,
    cmd_predict,
    cmd_split,
    cmd_sweep,
    cmd_test,
    cmd_train,
    cmd_tune,
)
from byot.cli.parser import build_parser
from byot.errors import ENVIRONMENT_EXIT, ByotError, describe_os_error, environment_failure

COMMANDS = {"train": cmd_train, "test": cmd_test, "demo": cmd_demo, "bench": cmd_bench, "split": cmd_split,
            "check-data": cmd_check_data, "calibrate": cmd_calibrate, "early-exit": cmd_early_exit,
            "export": cmd_export, "predict": cmd_predict, "sweep": cmd_sweep, "models": cmd_models,
            "tune": cmd_tune}



def main(argv: Sequence[str] | None = None) -> int:
    from byot.runs.signals import stop_with_parent_if_asked

    _tolerant_output()
    stop_with_parent_if_asked()
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except ByotError as e:
        print(f"byot: error: {_one_line(e)}", file=sys.stderr)
        return ENVIRONMENT_EXIT if environment_failure(e) else 2
    except OSError as e:
        if not environment_failure(e):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"byot: error: {where}{describe_os_error(e)}", file=sys.stderr)
        return ENVIRONMENT_EXIT
    except KeyboardInterrupt:  # training says how to resume itself; elsewhere nothing is left half-done
        print("byot: interrupted (Ctrl-C)", file=sys.stderr)
        return 130



def _tolerant_output() -> None:
    """Names that are not valid UTF-8 (a class folder named in Latin-1) reach the terminal escaped
    (``\\xe9``) instead of stopping the command with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")



def _one_line(error: Exception) -> str:
    """The message; errors raised in DataLoader workers arrive wrapped in a traceback: keep the user's line.
    A message may continue on indented lines (a list of files)."""
    text = str(error).strip()
    if "Traceback" in text:
        return [line for line in text.splitlines() if line.strip()][-1].split("ByotError: ", 1)[-1]
    return text
