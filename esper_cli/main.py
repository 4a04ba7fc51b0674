"""The `esper` command: global options here, one thin module per subcommand, each imported on demand.

Why on demand: the commands that train or compile import PyTorch (seconds), and ``esper --help``,
``esper --version`` and shell completion should not wait for it. The group below lists the commands
from :data:`COMMANDS` (name, module, short help) and imports a command's module only when that
command runs, completes or shows its own help. A test checks that each short help here is the first
line of the command's own docstring, so the two cannot drift apart.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from esper_cli.errors import exit_with, option_error
from esper_core import DISTRIBUTION, __version__

COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("esper_cli.train", "train", "Train (and grow) a model as the recipe says."),
    "resume": ("esper_cli.resume", "resume", "Continue a run exactly where its checkpoint left it."),
    "compile": ("esper_cli.compile", "compile_", "Build, export, validate, characterise and store kernels: "
                "one per blueprint and target."),
    "inspect-cache": ("esper_cli.inspect_cache", "inspect_cache", "Show the kernel cache tiers and their "
                      "entries; verify or prune them."),
    "report": ("esper_cli.report", "report", "Write a compliance report of a run, or compare two runs."),
    "export": ("esper_cli.export", "export", "Export a run's trained model (merged weights, torch.export program or "
               "ONNX) and check its outputs."),
    "sync": ("esper_cli.sync", "sync", "Upload what is missing of a run to its artifact store (compared by sha256)."),
    "blueprints": ("esper_cli.blueprints", "app", "List the built-in blueprints, or show one resolved for an "
                   "example host."),
    "schema": ("esper_cli.schema", "schema", "Write the recipe JSON Schema (for editors and validators)."),
}
"""Subcommand -> (module, attribute: a command function or a Typer group, short help for ``esper --help``)."""

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _Listed(TyperCommand):
    """What ``esper --help`` and completion see of a command that is not imported yet: its name and help."""


class LazyGroup(TyperGroup):
    """A Typer group whose subcommands are imported when they are resolved, not when they are listed."""

    def list_commands(self, ctx: Any) -> list[str]:
        return [*super().list_commands(ctx), *(name for name in COMMANDS if name not in self.commands)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in COMMANDS:
            short = COMMANDS[cmd_name][2]
            return _Listed(name=cmd_name, help=short, short_help=short)
        return command

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        if isinstance(command, _Listed):
            command = self.commands[name] = load_command(name)
        return name, command, rest

    def invoke(self, ctx: Any) -> Any:
        """Run the command; a value the parser refuses (``--rank -1``, ``--samples abc``) ends as every other
        bad input does, one ``error:`` line and exit 2, not click's usage block. A missing argument (the
        subclass MissingParameter) keeps the usage block: it shows what was left out."""
        try:
            return super().invoke(ctx)
        except typer.BadParameter as exc:
            if type(exc) is not typer.BadParameter:
                raise
            exit_with(option_error(exc))


def load_command(name: str) -> Any:
    """Import subcommand ``name`` and build its click command with the root app's settings."""
    module, attribute, _ = COMMANDS[name]
    target = getattr(importlib.import_module(module), attribute)
    if isinstance(target, typer.Typer):
        return typer.main.get_command(target)
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    single.command(name)(target)
    return typer.main.get_command(single)


app = typer.Typer(
    name="esper",
    cls=LazyGroup,
    help="Morphogenetic training for PyTorch: networks that grow seeds where they need capacity.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help: rich markup would eat text in square brackets ("[default: RUN/report]"), and
    # click's own layout wraps at word boundaries on any terminal width.
    rich_markup_mode=None,
    context_settings={"show_default": True, "help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        print(f"{DISTRIBUTION} {__version__}")
        raise typer.Exit()


def configure_logging(quiet: bool, verbose: int) -> int:
    """Send Esper's log records (storage tiers, kernel cache, compiler) to stderr at the chosen level:
    WARNING by default, ERROR with ``-q``, INFO with ``-v``, DEBUG with ``-vv``. Returns the level."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    # urllib3 warns about every retry of a connection that failed (an MLflow server nothing listens on gave two
    # "Retrying (Retry(total=1, ...))" lines before Esper's own one-line warning that tracking is off): Esper
    # reports what finally failed itself, so the retries show with -v only.
    logging.getLogger("urllib3").setLevel(level if verbose else max(level, logging.ERROR))
    return level


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help=f"Print the distribution name ({DISTRIBUTION}) and version, and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log errors only."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="Log more: -v info, -vv debug."),
) -> None:
    """Morphogenetic training for PyTorch: networks that grow seeds where they need capacity."""
    if quiet and verbose:
        raise typer.BadParameter("choose one of --quiet and --verbose", param_hint="--quiet/--verbose")
    configure_logging(quiet, verbose)
    logging.getLogger(__name__).debug("%s %s on Python %s", DISTRIBUTION, __version__, sys.version.split()[0])
