"""Shared ``main`` of the generated reference pages (recipe keys, blueprint ops): write the page, or
with ``--check`` exit 1 when the file on disk differs from what the code generates now (the tests
and CI run the check, so a page cannot go stale)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def generated_page_main(prog: str, description: str, default_path: Path, render: Callable[[], str],
                        argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date; write nothing")
    parser.add_argument("--output", type=Path, default=default_path, help="file to write or check")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
        if current != text:
            print(f"{args.output} is out of date; run {prog}", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0
