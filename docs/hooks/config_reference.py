"""MkDocs hook: adds reference/config.md, generated from the config on every build.

Nothing is written into docs/: the page is a generated file of the build (MkDocs >= 1.6), so it
always shows the defaults of the code being documented (`python -m pseudolabel.docs`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File

# The checkout's own package, even when the environment has another copy installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from pseudolabel import docs  # noqa: E402

PAGE = "reference/config.md"


def on_files(files, config):
    files.append(File.generated(config, PAGE, content=docs.render()))
    return files
