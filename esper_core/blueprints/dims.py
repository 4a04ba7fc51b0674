"""Symbolic dimension expressions (``in``, ``out * 2``, ``max(4, out // 4)``).

Blueprints are written once and applied to hosts of any width, so sizes are small integer
expressions over names the builder supplies. They are evaluated by walking the Python AST with an
explicit whitelist — never ``eval`` — because blueprint files may come from other people.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping

MAX_EXPR_CHARS = 200
_IN_WORD = re.compile(r"\bin\b")
_FUNCS = {"min": min, "max": max}
_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
}


class DimError(ValueError):
    """An expression that cannot be evaluated; the message says why in user terms."""


def evaluate(expr: int | str, env: Mapping[str, int]) -> int:
    """Evaluate one dim expression to an int using the names in ``env``."""
    if isinstance(expr, bool):
        raise DimError("a dimension must be an integer or an expression, not a boolean")
    if isinstance(expr, int):
        return expr
    if len(expr) > MAX_EXPR_CHARS:
        raise DimError(f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        # `in` is the natural name for a host's input size but a Python keyword: parse it as `in_`.
        tree = ast.parse(_IN_WORD.sub("in_", expr.strip()), mode="eval")
    except SyntaxError:
        raise DimError(f"cannot parse expression {expr!r}") from None
    return _eval(tree.body, env, expr)


def check(expr: int | str, names: set[str]) -> None:
    """Raise :class:`DimError` for what no host could make evaluate: bad syntax, an unknown name.
    (It evaluates with every name at 1; only a division by zero can depend on the real sizes.)"""
    try:
        evaluate(expr, dict.fromkeys(names, 1))
    except DimError as exc:
        if not str(exc).startswith("division by zero"):
            raise


def _eval(node: ast.AST, env: Mapping[str, int], expr: str) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Name):
        name = "in" if node.id == "in_" else node.id
        if name not in env:
            known = ", ".join(sorted(env)) or "none"
            raise DimError(f"unknown dimension {name!r} in {expr!r} (known: {known})")
        return env[name]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, env, expr)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left, env, expr), _eval(node.right, env, expr)
        if isinstance(node.op, ast.FloorDiv) and right == 0:
            raise DimError(f"division by zero in {expr!r}")
        return _BINOPS[type(node.op)](left, right)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and node.args and not node.keywords):
        return _FUNCS[node.func.id](*(_eval(a, env, expr) for a in node.args))
    raise DimError(f"unsupported syntax in {expr!r}: only integers, names, + - * //, min() and max() are allowed")
