"""`python -m rayimgcls.train`: the flags of `rayimgcls train`, e.g. under `ray job submit`. An entry point,
so it may import the CLI; nothing else in rayimgcls.train does."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import typer

    from rayimgcls.cli import _setup_logging, app

    _setup_logging()
    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    command.main(args=sys.argv[1:] if argv is None else argv, prog_name="python -m rayimgcls.train")


if __name__ == "__main__":
    main()
