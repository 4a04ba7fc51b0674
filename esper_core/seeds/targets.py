"""Which modules of a model get wrapped: name globs, regexes and type patterns."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn

WRAPPABLE = (nn.Linear, nn.Conv2d)


class TargetMismatch(ValueError):
    """Pattern number ``index`` matched no wrappable module."""

    def __init__(self, index: int, pattern: str, candidates: list[str], message: str | None = None) -> None:
        shown = ", ".join(candidates[:40]) + (" ..." if len(candidates) > 40 else "")
        self.index, self.pattern = index, pattern
        self.message = message or f"pattern {pattern!r} matches no Linear or Conv2d module (matchable: {shown or 'none'})"
        super().__init__(self.message)


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith("type:"):
        wanted = pattern[5:]
        return any(cls.__name__ == wanted for cls in type(module).__mro__)
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def match_targets(model: nn.Module, targets: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """Names of the wrappable modules selected by ``targets`` minus ``exclude``, in model order.

    Every target pattern must select at least one module: a pattern that matches nothing is almost
    always a typo, and silently wrapping zero layers is how a growth run quietly becomes a static one.
    """
    candidates = [(n, m) for n, m in model.named_modules() if n and isinstance(m, WRAPPABLE)]
    names = [n for n, _ in candidates]
    for i, pattern in enumerate(targets):
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise TargetMismatch(i, pattern, names, f"invalid regular expression: {exc}") from None
        if not any(_matches(pattern, n, m) for n, m in candidates):
            raise TargetMismatch(i, pattern, names)
    return [n for n, m in candidates
            if any(_matches(p, n, m) for p in targets) and not any(_matches(p, n, m) for p in exclude)]
