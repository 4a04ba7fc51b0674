"""User-facing errors.

Anything a user can get wrong (a recipe, a blueprint, a checkpoint, a cache entry, a CLI argument)
raises an :class:`EsperError` carrying one :class:`Problem` per mistake. The CLI prints the problems,
one per line as ``file:line: field: message``, and exits with ``exit_code``; it never shows a
traceback for these. Internal bugs stay ordinary exceptions so they are not disguised as user errors.
"""

from __future__ import annotations

from dataclasses import dataclass


RECIPE_FIELD = "<recipe>"
"""Source of a problem with a recipe field found by code that does not know the recipe's file; the
trainer re-locates such problems to the field's line (see ``LoadedRecipe.locate``)."""

CONTROLLER_FIELD = "GrowthController"
"""Source of a problem with an argument of the growth controller. In a user's own loop there is no
recipe, and ``<recipe>`` would send them looking for one; its ``seeds``, ``policy`` and ``governor``
are the recipe sections of the same names, so where a recipe made them (``esper train``) the trainer
re-locates these problems to the field's line as it does ``RECIPE_FIELD``'s."""


def one_line(error: BaseException) -> str:
    """An exception in one line: its type and the first line of its message (library errors such as
    torch's run to many lines; a user sees one)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


@dataclass(frozen=True)
class Problem:
    """One mistake, located as precisely as the input allows."""

    source: str
    message: str
    line: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class EsperError(Exception):
    """An error caused by the user's input; ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1
    consequence: bool = False
    """Under torchrun: this rank failed only because another rank did (it lost contact with it), so the
    launcher shows the other rank's error first and passes on its exit code."""

    def __init__(self, problems: list[Problem] | Problem | str, *, source: str = "esper") -> None:
        if isinstance(problems, str):
            problems = [Problem(source=source, message=problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ConfigError(EsperError):
    """A recipe, blueprint or command-line override that does not validate."""

    exit_code = 2


class CheckpointError(EsperError):
    """A checkpoint that is missing, incomplete or fails verification."""

    exit_code = 3
