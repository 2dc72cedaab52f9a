"""A generated block of a docs page (the text between two HTML-comment markers): rewritten from
committed benchmark JSON, or checked against it (tests/test_docs.py runs each script's --check)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path


def replace(doc: str, start: str, end: str, body: str) -> str:
    """`doc` with the text between the markers `start` and `end` replaced by `body`."""
    first, last = doc.index(start) + len(start), doc.index(end)
    return doc[:first] + "\n" + body + "\n" + doc[last:]


def write_or_check(page: Path, start: str, end: str, body: str, check: bool, command: str) -> bool:
    """Write the block into `page`; with `check`, only say whether it is up to date (printing
    `command`, what regenerates it, when it is not). True: written, or up to date."""
    doc = page.read_text(encoding="utf-8")
    new = replace(doc, start, end, body)
    if check:
        if new != doc:
            print(f"{page} is out of date: run {command}", file=sys.stderr)
        return new == doc
    page.write_text(new, encoding="utf-8")
    return True


def from_json(
    results: Path, page: Path, start: str, end: str, render: Callable[[dict], str], check: bool
) -> int:
    """A script's `--render` / `--check`: its block of `page` is `render` of the committed
    `results` JSON. The exit code: 0 written or up to date, 1 stale."""
    body = render(json.loads(results.read_text(encoding="utf-8")))
    command = f"python benchmarks/{Path(sys.argv[0]).name} --render"
    return 0 if write_or_check(page, start, end, body, check, command) else 1
