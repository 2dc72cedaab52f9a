"""The build's one step beyond pyproject.toml: the default project `pseudolabel init` writes is
this repository's own conf/, params.yaml, dvc.yaml, .dvcignore and .dvc/config, copied into the
package (pseudolabel/project_template/) when the wheel is built, so git holds one copy of each
(src/pseudolabel/template_files.py lists them)."""

import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
FILES = runpy.run_path(str(ROOT / "src" / "pseudolabel" / "template_files.py"))["TEMPLATE_FILES"]


class BuildPyWithTemplate(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the repository's files in place
            return
        target = Path(self.build_lib) / "pseudolabel" / "project_template"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for source, name in FILES.items():
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(path, target / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, target / name)


setup(cmdclass={"build_py": BuildPyWithTemplate})
