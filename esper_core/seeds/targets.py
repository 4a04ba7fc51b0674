"""Which modules of a model get wrapped: name globs, regexes and type patterns.

Patterns select modules by name (``features.*``), regular expression (``re:...``) or type
(``type:Linear``, subclasses match). Every pattern must select something: a ``targets`` or ``exclude``
pattern that matches nothing is almost always a typo (an unmatched ``exclude`` quietly puts seeds on
the classifier head). A selected module that cannot host seeds is an error naming it, unless it has
no parameters of its own (activations, dropout, containers whose children are selected too).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn

from esper_core.blueprints.host import SUPPORTED, is_transformers_conv1d


class TargetMismatch(ValueError):
    """Pattern number ``index`` of ``which`` (``targets`` or ``exclude``) is at fault."""

    def __init__(self, index: int, pattern: str, candidates: list[str], message: str | None = None,
                 which: str = "targets") -> None:
        shown = ", ".join(candidates[:40]) + (" ..." if len(candidates) > 40 else "")
        self.index, self.pattern, self.which = index, pattern, which
        self.message = message or (f"pattern {pattern!r} matches no module that can host seeds ({SUPPORTED}); "
                                   f"matchable: {shown or 'none'}")
        super().__init__(self.message)


def wrappable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or is_transformers_conv1d(module)


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith("type:"):
        wanted = pattern[5:]
        return any(cls.__name__ == wanted for cls in type(module).__mro__)
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _check_regex(patterns: Sequence[str], names: list[str], which: str) -> None:
    for i, pattern in enumerate(patterns):
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise TargetMismatch(i, pattern, names, f"invalid regular expression: {exc}", which) from None


def match_targets(model: nn.Module, targets: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """Names of the modules selected by ``targets`` minus ``exclude``, in model order."""
    modules = [(n, m) for n, m in model.named_modules() if n]
    candidates = [(n, m) for n, m in modules if wrappable(m)]
    names = [n for n, _ in candidates]
    _check_regex(targets, names, "targets")
    _check_regex(exclude, names, "exclude")
    for i, pattern in enumerate(targets):
        matched = [(n, m) for n, m in modules if _matches(pattern, n, m)]
        unsupported = [(n, m) for n, m in matched if not wrappable(m) and any(True for _ in m.parameters(recurse=False))]
        if unsupported:
            name, module = unsupported[0]
            raise TargetMismatch(i, pattern, names, f"selects {name!r}, a {type(module).__name__}, which cannot "
                                 f"host seeds (supported: {SUPPORTED})")
        if not any(wrappable(m) for _, m in matched):
            raise TargetMismatch(i, pattern, names)
    for i, pattern in enumerate(exclude):
        if not any(_matches(pattern, n, m) for n, m in modules):
            raise TargetMismatch(i, pattern, [n for n, _ in modules],
                                 f"pattern {pattern!r} excludes nothing: it matches no module (modules: "
                                 f"{', '.join(n for n, _ in modules[:40])}{' ...' if len(modules) > 40 else ''})",
                                 "exclude")
    return [n for n, m in candidates
            if any(_matches(p, n, m) for p in targets) and not any(_matches(p, n, m) for p in exclude)]
