"""Read YAML safely and remember the line of every value.

Recipes and override values come from users, so parsing is defensive: only ``yaml.SafeLoader``
(no Python object tags), a cap on the file size and on the length of integers, and a cap on the size of
the document *after*
aliases are expanded (a few lines of nested aliases -- the "billion laughs" -- would otherwise
expand to billions of values in whatever walks the data next). Duplicate keys and non-string keys
are rejected instead of silently resolved, because YAML quietly keeps the last duplicate and reads
``on:``/``no:`` as booleans. The node graph is kept long enough to map every dotted path
(``trainer.lr``, ``seeds.targets.0``) to its line, so validation errors can say where to look.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from esper_core.errors import ConfigError, Problem
from esper_core.safe_read import NotRegular, UnsafeInput, open_regular

MAX_FILE_BYTES = 1 << 20
MAX_EXPANDED_NODES = 100_000
MAX_INT_CHARS = 40
"""Longest integer literal read (2**64 has 20 digits). Python refuses to parse integers of more than
4,300 digits with a ValueError, and nothing in a recipe needs more than 20."""
_INT_TAG = "tag:yaml.org,2002:int"

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True)
class YamlDocument:
    """Parsed data plus ``lines``: dotted path -> 1-based line (of the value; of the key when the
    value is a mapping or a list, since that is where the user wrote it). ``""`` is the document."""

    data: Any
    lines: dict[str, int]


def read_yaml_file(path: Path, source: str) -> YamlDocument:
    """Read a recipe-like file whose top level must be a mapping; an empty file is an empty mapping.

    ``source`` is how problems name the file (the path as the user typed it). Anything but a regular file
    (a directory, a FIFO, a device, a socket) is refused before it is read, naming what it is.
    """
    try:  # checked on the opened descriptor: a FIFO would block a plain open forever, a device never ends
        descriptor = open_regular(path, follow_links=True)
    except FileNotFoundError:
        raise ConfigError(Problem(source, "file not found")) from None
    except NotRegular as exc:
        raise ConfigError(Problem(source, f"is {exc.kind}, not a YAML file")) from None
    except UnsafeInput as exc:
        raise ConfigError(Problem(source, str(exc))) from None
    try:
        with os.fdopen(descriptor, "rb") as stream:  # bounded read: the size on disk may change
            raw = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(Problem(source, f"cannot read file ({exc.strerror})")) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(Problem(source, f"file is larger than the limit of {MAX_FILE_BYTES} bytes"))
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(Problem(source, f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                                  line=raw.count(b"\n", 0, exc.start) + 1)) from None
    doc = parse_yaml(text, source)
    if doc.data is None:
        return YamlDocument({}, {})
    if not isinstance(doc.data, dict):
        kind = "a list" if isinstance(doc.data, list) else f"a single value ({doc.data!r})"
        raise ConfigError(Problem(source, f"the top level must be a mapping of sections, not {kind}",
                                  line=doc.lines[""]))
    return doc


def parse_yaml(text: str, source: str) -> YamlDocument:
    """Parse one YAML document of any shape with the safety checks above; ``None`` if it is empty."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:  # unprintable characters, found before any parsing
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(Problem(source, f"invalid YAML: {exc.reason} (character #x{exc.character:04x})",
                                  line=line)) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return YamlDocument(None, {})
        _check_structure(node, source)
        data = loader.construct_document(node)  # flattens `<<` merge keys in the node graph
        lines = {"": node.start_mark.line + 1}
        _record_lines(node, "", lines)
        return YamlDocument(data, lines)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(_syntax_problem(exc, source)) from None
    except RecursionError:
        raise ConfigError(Problem(source, "invalid YAML: nested too deeply")) from None
    finally:
        loader.dispose()


def _syntax_problem(exc: yaml.MarkedYAMLError, source: str) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    message = f"invalid YAML: {exc.problem or exc.context}"
    if exc.problem and exc.context:
        message += f" ({exc.context}"
        if exc.context_mark is not None and mark is not exc.context_mark:
            message += f" started on line {exc.context_mark.line + 1}"
        message += ")"
    return Problem(source, message, line=None if mark is None else mark.line + 1)


def _check_structure(root: Node, source: str) -> None:
    """Reject oversized alias expansion (at once) and bad keys (all of them, together).

    Aliases compose to the *same* node object, so sizes are memoised by node identity: the check
    costs time proportional to the text, not to the expansion it guards against.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    problems: list[Problem] = []

    def size(node: Node, path: str) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(Problem(source, "an alias refers to a node that contains it",
                                      line=node.start_mark.line + 1, field=path or None))
        open_nodes.add(key)
        total = 1
        if isinstance(node, MappingNode):
            problems.extend(_key_problems(node, path, source))
            for key_node, value in node.value:
                total += size(key_node, path) + size(value, _join(path, key_node.value))
        elif isinstance(node, SequenceNode):
            total += sum(size(item, _join(path, str(i))) for i, item in enumerate(node.value))
        elif node.tag == _INT_TAG and len(node.value) > MAX_INT_CHARS:
            problems.append(Problem(source, f"an integer of {len(node.value)} characters is too large (at most "
                                    f"{MAX_INT_CHARS})", node.start_mark.line + 1, path or None))
        if total > MAX_EXPANDED_NODES:
            raise ConfigError(Problem(source, f"more than {MAX_EXPANDED_NODES} values once aliases are "
                                      "expanded (an alias bomb?)", line=node.start_mark.line + 1,
                                      field=path or None))
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root, "")
    if problems:
        raise ConfigError(problems)


def _key_problems(node: MappingNode, path: str, source: str) -> list[Problem]:
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    for key_node, _ in node.value:
        line = key_node.start_mark.line + 1
        if key_node.tag == _MERGE_TAG:
            continue
        if not isinstance(key_node, ScalarNode):
            kind = "mapping" if isinstance(key_node, MappingNode) else "list"
            problems.append(Problem(source, f"a key must be a string, not a {kind}", line, path or None))
        elif key_node.tag != _STR_TAG:
            kind = key_node.tag.rsplit(":", 1)[-1]
            problems.append(Problem(source, f"key {key_node.value!r} is read as {kind}, not a string; quote it",
                                    line, _join(path, key_node.value)))
        elif key_node.value in first_line:
            problems.append(Problem(source, f"duplicate key (first defined on line {first_line[key_node.value]})",
                                    line, _join(path, key_node.value)))
        else:
            first_line[key_node.value] = line
    return problems


def _record_lines(node: Node, path: str, lines: dict[str, int]) -> None:
    """Fill ``lines`` by walking the (already size-checked) graph, aliases expanded."""
    if isinstance(node, MappingNode):
        children = [(_join(path, k.value), k, v) for k, v in node.value]
    elif isinstance(node, SequenceNode):
        children = [(_join(path, str(i)), item, item) for i, item in enumerate(node.value)]
    else:
        return
    for child_path, key_node, value in children:
        anchor = value if isinstance(value, ScalarNode) else key_node
        lines[child_path] = anchor.start_mark.line + 1
        _record_lines(value, child_path, lines)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
