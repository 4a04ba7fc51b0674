"""The `esper` command: one thin module per subcommand, registered here."""

from __future__ import annotations

import typer

from esper_cli import compile, inspect_cache, report, resume, train

app = typer.Typer(
    name="esper",
    help="Morphogenetic training for PyTorch: networks that grow seeds where they need capacity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("train")(train.train)
app.command("resume")(resume.resume)
app.command("compile")(compile.compile_)
app.command("inspect-cache")(inspect_cache.inspect_cache)
app.command("report")(report.report)
