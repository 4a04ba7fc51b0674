"""How the CLI shows user errors: one line per problem on stderr, no traceback, the error's exit code."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import NoReturn, ParamSpec, TypeVar

import typer

from esper_core.errors import ConfigError, EsperError, Problem

P = ParamSpec("P")
R = TypeVar("R")


def exit_with(error: EsperError) -> NoReturn:
    """Print ``error``'s problems, one ``error: ...`` line each, on stderr and exit with its code: how every
    command ends on a user error, whether its own code or the command-line parser found it."""
    _say([f"error: {problem}" for problem in error.problems], error.exit_code, error.consequence)
    raise typer.Exit(error.exit_code) from None


def _say(lines: list[str], exit_code: int, consequence: bool = False) -> None:
    """Print ``lines`` on stderr; under ``esper ... --nproc-per-node`` hand them to the launcher instead,
    which prints each distinct line once for all ranks (every rank finds the same recipe error, and
    Ctrl-C reaches every rank)."""
    if os.environ.get("RANK") is not None:
        from esper_core.distributed.launch import relay_error  # a torchrun worker: PyTorch is loaded already

        if relay_error(lines, exit_code, consequence):
            return
    for line in lines:
        print(line, file=sys.stderr)


def option_error(error: typer.BadParameter) -> ConfigError:
    """An option or argument value the parser refused (out of range, not a number) as the ConfigError the
    commands raise for their own checks of the command line (``error: command line: --rank: ...``, exit 2):
    the parser's own report is a usage block, not the one line every other bad input gets."""
    param = error.param
    if isinstance(error.param_hint, str):
        field = error.param_hint
    elif error.param_hint is not None:
        field = "/".join(error.param_hint)
    elif param is not None and param.param_type_name == "option":
        field = max(param.opts, key=len)  # --rank rather than -r
    else:
        field = (param.name or "value").upper() if param is not None else "value"
    message = error.message[:1].lower() + error.message[1:]
    return ConfigError(Problem("command line", message, field=field))


def reported(command: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except EsperError as exc:
            exit_with(exc)
        except KeyboardInterrupt:  # before a run's own handlers are installed (they checkpoint and say so)
            _say(["interrupted"], 130)
            raise typer.Exit(130) from None
    return run
