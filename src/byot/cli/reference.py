"""docs/OPTIONS.md, generated from the options' one definition (``byot.config``): ``python -m
byot.cli.reference > docs/OPTIONS.md``. A test keeps the committed file equal to this output."""

from __future__ import annotations

from typing import Any


def _default(value: Any, option: Any) -> str:
    if dict(option.extra).get("action") in ("store_true", "store_false"):
        return "off"  # the flag's own default: not given
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if value == {}:
        return "-"
    return f"`{value}`"


def options_markdown() -> str:
    """Every training option, by section: its flags, default, range or choices, and help text."""
    from byot.config import SECTIONS, default_of, options

    lines = ["# Options", "",
             "Every option of `byot train` (and of `byot tune`'s base and space, `--config` files and sweep files,",
             "where it is written with underscores: `batch_size: 64`). This page is generated from the options'",
             "one definition (`byot.config.TrainConfig`): `python -m byot.cli.reference > docs/OPTIONS.md`.",
             "The model, data and run options are also taken by `test`, `calibrate` and `early-exit`."]
    for section, title in SECTIONS.items():
        lines += ["", f"## {title[0].upper()}{title[1:]}", "", "| flag | default | values | meaning |",
                  "| --- | --- | --- | --- |"]
        for name, (field, option) in options().items():
            if option.section != section or option.flags == ("arch",):
                continue
            flags = ", ".join(f"`{f}`" for f in (option.flags or ("--" + name.replace("_", "-"),)))
            default = default_of(field)
            values = (", ".join(option.choices) if option.choices else
                      option.range.describe().replace("lie in ", "") if option.range else "")
            lines.append(f"| {flags} | {_default(default, option)} | {values} | "
                         f"{option.help.format(default=default).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(options_markdown(), end="")
