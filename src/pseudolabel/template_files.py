"""Which of this repository's top-level files make the default project `pseudolabel init`
writes, and under which name the package keeps each (no imports: setup.py reads it by path).

There is one copy of each in git, the top-level file. setup.py copies them into the package's
`project_template/` when the wheel is built; a source checkout (an editable install, the
tests) reads them from the repository itself (pseudolabel.project.template_dir).

Hidden files are kept under visible names (package-data globs and some tools skip dotfiles),
and dvc.yaml under another one: DVC collects every dvc.yaml in a repository, and would run the
package's copy as a second pipeline.
"""

# top-level path (a file or folder) -> its name in project_template/
TEMPLATE_FILES = {
    "conf": "conf",
    "params.yaml": "params.yaml",
    "dvc.yaml": "dvc.yaml.in",
    ".dvcignore": "dvcignore",
    ".dvc/config": "dvc_config",
}
