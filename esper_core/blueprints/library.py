"""Finding and loading blueprints: the builtin library plus user directories.

Blueprint files go through the same YAML reader and the same error locator as recipes, so a bad
blueprint is reported as ``file:line: field: message`` like any other input.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from esper_core.blueprints.resolve import ResolveError, expression_errors
from esper_core.blueprints.ir import OP_NAMES, Blueprint
from esper_core.errors import ConfigError, Problem
from esper_core.recipe.diagnostics import Locator, validation_problems
from esper_core.recipe.yaml_source import read_yaml_file

BUILTIN_DIR = Path(__file__).parent / "library"


@dataclass(frozen=True)
class BlueprintFile:
    """A validated blueprint and the line map of the file it came from (for later errors)."""

    blueprint: Blueprint
    path: Path
    source: str
    lines: dict[str, int]

    def problem(self, error: ResolveError) -> Problem:
        """Locate a resolution error (a dim that does not resolve, a size mismatch) in the file."""
        locator = Locator(self.source, self.lines, ())
        return locator.problem(tuple(error.field.split(".")), error.message)


def load_blueprint(path: str | Path) -> BlueprintFile:
    source = str(path)
    resolved = Path(path).expanduser().resolve()
    document = read_yaml_file(Path(path).expanduser(), source)  # as named: /dev/stdin resolves to no file
    if not document.data:  # one line, not one "Field required" per required key
        raise ConfigError(Problem(source, "the file is empty: a blueprint needs at least name, host and ops", line=1))
    try:
        blueprint = Blueprint.model_validate(document.data)
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc, Locator(source, document.lines, ()), Blueprint, OP_NAMES)) from None
    loaded = BlueprintFile(blueprint, resolved, source, document.lines)
    errors = expression_errors(blueprint)
    if errors:  # a defect of the file whatever the host: it does not validate (exit 2), it is not a failed compile
        raise ConfigError([loaded.problem(error) for error in errors])
    return loaded


@dataclass
class BlueprintLibrary:
    """Blueprints by name: builtins first, then each extra directory. A user file may replace a builtin
    of its name; two user files of one name are an error."""

    files: dict[str, BlueprintFile] = field(default_factory=dict)

    @classmethod
    def discover(cls, extra_dirs: Iterable[Path] = ()) -> "BlueprintLibrary":
        """Load every ``*.yaml`` and ``*.yml`` of the builtin library and of ``extra_dirs``. Two user files that claim
        one ``name`` are refused rather than resolved by file order: a copied file whose name was not
        changed would otherwise silently decide which blueprint a recipe's name means. Every file that
        does not load is reported, not only the first, so a directory is fixed in one pass."""
        library, problems = cls(), []
        for directory in (BUILTIN_DIR, *extra_dirs):
            if not directory.is_dir():
                raise ConfigError(Problem(str(directory), "blueprint directory not found"))
            # `.yml` too: `esper compile my.yml` accepts one, so a recipe must find it as well
            for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
                try:
                    loaded = load_blueprint(path)
                except ConfigError as exc:
                    problems.extend(exc.problems)
                    continue
                earlier = library.files.get(loaded.blueprint.name)
                if earlier is not None and earlier.path.parent != BUILTIN_DIR.resolve() and earlier.path != loaded.path:
                    problems.append(loaded.problem(ResolveError(
                        "name", f"blueprint {loaded.blueprint.name!r} is also defined in {earlier.source}; "
                        "give one of them another name")))
                library.files[loaded.blueprint.name] = loaded
        if problems:
            raise ConfigError(problems)
        return library

    def get(self, name: str) -> BlueprintFile:
        try:
            return self.files[name]
        except KeyError:
            raise KeyError(f"unknown blueprint {name!r} (known: {', '.join(sorted(self.files))})") from None

    def names(self) -> list[str]:
        return sorted(self.files)
