"""Issue 16, "nothing lost, nothing run that should not run": one test per failure mode.

Each builds a small digits-sized project, breaks one thing on purpose and checks the tool
refuses with one clear line (or reports the file) before it deletes or writes anything.
docs/failure-modes.md lists every case.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import keras
import pytest

from pseudolabel.data.images import list_images
from pseudolabel.errors import PseudoLabelError
from pseudolabel.models import io as model_io
from pseudolabel.paths import Paths
from tests.conftest import REPO

CLASSES = [f"digit_{i}" for i in range(10)]


def _digest(folder: Path, images: bool = False) -> dict[str, str]:
    """Every file under `folder` (links not followed; `images`: the images only, not ingest's
    decoded copy) by relative path -> md5."""
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not (images and ".decoded" in p.parts)
    }


# --- 1. a metadata sidecar never turns Keras safe mode off ----------------------------------


def _lambda_teacher(path: Path, marker: Path) -> None:
    """A digits-shaped model whose Lambda layer writes `marker` when it runs, saved with a
    sidecar claiming safe_mode false (what an attacker would ship beside it)."""
    # Built from source text: Keras serialises the lambda's bytecode, not its closure.
    code = f"lambda x: (__import__('pathlib').Path({str(marker)!r}).write_text('ran'), x)[1]"
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Lambda(eval(code), name="payload")(inputs)  # noqa: S307
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(x))
    meta = model_io.ModelMeta(CLASSES, [8, 8], 1, safe_mode=False)
    model_io.save(keras.Model(inputs, outputs), path, meta)
    marker.unlink()  # building the model ran the lambda once, here in the test


def test_sidecar_cannot_turn_safe_mode_off(tmp_path, digits_data, smoke_cfg):
    from pseudolabel import PseudoLabelGenerator
    from pseudolabel.config import compose
    from pseudolabel.stages import pseudo_label, train_teacher

    marker = tmp_path / "pwned"
    model = tmp_path / "models" / "teacher.keras"
    _lambda_teacher(model, marker)
    assert json.loads(model_io.meta_path(model).read_text())["safe_mode"] is False

    # The facade, with its default allow_unsafe=False.
    gen = PseudoLabelGenerator(model_path=model, unlabeled_path=digits_data.unlabeled)
    with pytest.raises(PseudoLabelError, match="allow_unsafe"):
        gen._teacher()
    assert not marker.exists()
    # The pipeline: importing it as teacher.path, and labeling with it as models/teacher.keras.
    paths = Paths(tmp_path, data_root=digits_data.root)
    imported = compose(["+experiment=smoke", f"teacher.path={model}", "teacher.input_scale=0-255"])
    with pytest.raises(PseudoLabelError, match="allow_unsafe"):
        train_teacher(imported, paths)
    with pytest.raises(PseudoLabelError, match="allow_unsafe"):
        pseudo_label(smoke_cfg, paths)
    assert not marker.exists()
    assert not paths.csv.exists()

    # Only the user's own opt-in loads it (and so runs its code).
    loaded, meta = PseudoLabelGenerator(model_path=model, allow_unsafe=True)._teacher()
    assert meta.class_names == CLASSES and loaded.outputs[0].shape[-1] == 10
    assert marker.exists()


# --- 2. a poisoned pseudo-label CSV is refused before data/train_ssl is touched ---------------


@pytest.fixture
def merge_project(tmp_path, digits_data):
    """A project that has run up to merge once: digits images, the teacher's metadata, a valid
    outputs/data.csv and the data/train_ssl it gave, and params.yaml for the CLI."""
    import shutil

    import numpy as np

    from pseudolabel.config import compose_raw, to_yaml
    from pseudolabel.data.images import list_images
    from pseudolabel.merged_set import build_merged
    from pseudolabel.predicting import to_frame, write_csv

    root = tmp_path / "project"
    shutil.copytree(digits_data.root / "data", root / "data")
    paths = Paths(root)
    model_io.meta_path(paths.model("teacher")).parent.mkdir(parents=True)
    meta = model_io.ModelMeta(CLASSES, [8, 8], 1)
    model_io.meta_path(paths.model("teacher")).write_text(json.dumps(meta.__dict__))
    files = list_images(paths.unlabeled)[:60]
    probs = np.random.default_rng(0).dirichlet(np.full(10, 0.2), len(files))
    rel = [str(f.relative_to(paths.unlabeled)) for f in files]
    write_csv(to_frame(rel, probs, CLASSES), paths.csv)
    build_merged(
        paths.train, paths.unlabeled, to_frame(rel, probs, CLASSES)[:30], paths.merged, CLASSES
    )
    (root / "params.yaml").write_text(to_yaml(compose_raw(["+experiment=smoke"])))
    return paths


def _poison(csv: Path, how: str) -> None:
    lines = csv.read_text().splitlines()
    header = lines[0].split(",")
    col = {name: i for i, name in enumerate(header)}

    def edit(line_no: int, column: str, value: str) -> None:
        cells = lines[line_no].split(",")
        cells[col[column]] = value
        lines[line_no] = ",".join(cells)

    if how == "zero_bytes":
        csv.write_bytes(b"")
        return
    if how == "header_only":
        lines = lines[:1]
    elif how == "text":
        edit(3, "confidence", "high")
    elif how == "nan":
        edit(4, "prob_digit_3", "nan")
    elif how == "inf":
        edit(5, "confidence", "inf")
    elif how == "above_one":
        edit(6, "prob_digit_7", "1.5")
    elif how == "negative":
        edit(7, "confidence", "-0.1")
    elif how == "empty_path":
        edit(8, "path", "")
    elif how == "empty_label":
        edit(2, "label", "")
    elif how == "missing_column":
        drop = col["confidence"]
        lines = [",".join(c for i, c in enumerate(line.split(",")) if i != drop) for line in lines]
    elif how == "unknown_class":  # a confident row, so that merge would copy it
        edit(2, "label", "digit_x")
        edit(2, "confidence", "0.99")
    elif how == "outside_path":
        edit(2, "path", "../x.png")
        edit(2, "confidence", "0.99")
    csv.write_text("\n".join(lines) + "\n")


POISONS = {
    "zero_bytes": "empty file",
    "header_only": "no rows",
    "text": "column confidence has a value that is not a number on line 4",
    "nan": "column prob_digit_3 has an empty or NaN value on line 5",
    "inf": "column confidence has an infinite value on line 6",
    "above_one": r"column prob_digit_7 has a value outside \[0, 1\] on line 7",
    "negative": r"column confidence has a value outside \[0, 1\] on line 8",
    "empty_path": "empty path on line 9",
    "empty_label": "empty label on line 3",
    "missing_column": r"column\(s\) confidence missing",
    "unknown_class": "names unknown class\\(es\\) digit_x",
    "outside_path": "row '../x.png' is not a file inside",
}


@pytest.mark.parametrize("how", POISONS)
def test_poisoned_csv_is_refused_before_train_ssl_is_touched(merge_project, smoke_cfg, how):
    from pseudolabel.stages.merge import merge

    paths = merge_project
    before = _digest(paths.merged)
    _poison(paths.csv, how)
    with pytest.raises(PseudoLabelError, match=POISONS[how]) as err:
        merge(smoke_cfg, paths)
    assert "\n" not in str(err.value)
    assert _digest(paths.merged) == before
    assert not (paths.metrics / "merge.json").exists()


def test_poisoned_csv_cli_exits_2_with_one_line(merge_project):
    import subprocess
    import sys

    paths = merge_project
    before = _digest(paths.merged)
    _poison(paths.csv, "text")
    done = subprocess.run(
        [sys.executable, "-m", "pseudolabel.cli", "merge"],
        cwd=paths.root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors == [
        f"pseudolabel merge: error: {Path('outputs/data.csv')}: column confidence has a value "
        "that is not a number on line 4; re-run the pseudo_label stage (or restore the file)."
    ]
    assert _digest(paths.merged) == before


# --- 3. symbolic links are followed only where they stay inside their root --------------------


def test_merge_refuses_a_symlink_out_of_the_unlabeled_folder(merge_project, smoke_cfg, tmp_path):
    import numpy as np
    import pandas as pd

    from pseudolabel.predicting import read_csv, to_frame, write_csv
    from pseudolabel.stages.merge import merge

    paths = merge_project
    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(next(paths.unlabeled.rglob("*.png")).read_bytes())
    (paths.unlabeled / "innocent.png").symlink_to(secret)
    frame = read_csv(paths.csv)
    rows = to_frame(["innocent.png"], np.eye(10)[[3]], CLASSES)  # confidence 1: selected
    write_csv(pd.concat([frame, rows], ignore_index=True), paths.csv)
    before = _digest(paths.merged)
    with pytest.raises(PseudoLabelError, match="symlink_outside") as err:
        merge(smoke_cfg, paths)
    assert str(secret) in str(err.value) and "\n" not in str(err.value)
    assert _digest(paths.merged) == before


def test_merge_follows_links_into_the_folder_data_link_symlink_names(merge_project, tmp_path):
    """The same link is allowed when it points into data.unlabeled_root and the config says
    the view is made of links (data.source=folder, data.link=symlink): its bytes are copied."""
    import numpy as np
    import pandas as pd

    from pseudolabel.config import compose
    from pseudolabel.merged_set import copy_name
    from pseudolabel.predicting import read_csv, to_frame, write_csv
    from pseudolabel.stages.merge import merge

    paths = merge_project
    user = tmp_path / "user_unlabeled"
    photo = user / "photo.png"
    photo.parent.mkdir()
    photo.write_bytes(next(paths.unlabeled.rglob("*.png")).read_bytes())
    (paths.unlabeled / "photo.png").symlink_to(photo)
    frame = read_csv(paths.csv)
    rows = to_frame(["photo.png"], np.eye(10)[[3]], CLASSES)  # confidence 1: selected
    write_csv(pd.concat([frame, rows], ignore_index=True), paths.csv)
    cfg = compose(
        ["+experiment=smoke", "data=folder", "data.link=symlink"]
        + [f"data.labeled_root={tmp_path}", f"data.unlabeled_root={user}"]
    )
    merge(cfg, paths)
    copied = paths.merged / CLASSES[3] / copy_name("photo.png")
    assert not copied.is_symlink() and copied.read_bytes() == photo.read_bytes()


def _folder_cfg(user: Path, *extra: str):
    """The smoke config on the user folders under `user` (the folder-source tests' own)."""
    from tests.test_folder_source import _cfg

    return _cfg(user, *extra)


def _report(paths: Paths) -> dict[str, tuple[str, str]]:
    import csv

    with open(paths.ingest_report, newline="", encoding="utf-8") as f:
        return {row["path"]: (row["reason"], row["detail"]) for row in csv.DictReader(f)}


@pytest.fixture
def user_folders(tmp_path, digits_data):
    """The digits images as a user's folders (labeled train/val/test, 40 unlabeled), and an
    `outside` folder that links may point to."""
    import shutil

    user, outside = tmp_path / "user", tmp_path / "outside"
    shutil.copytree(digits_data.labeled, user / "labeled")
    (user / "unlabeled").mkdir(parents=True)
    for path in list_images(digits_data.unlabeled)[:40]:
        shutil.copyfile(path, user / "unlabeled" / path.name)
    outside.mkdir()
    return user, outside


def test_ingest_reports_links_out_of_the_root(user_folders, tmp_path):
    import os
    import shutil

    from pseudolabel.stages.ingest import ingest

    user, outside = user_folders
    unl = user / "unlabeled"
    # A file link, a linked folder and a file name that is not UTF-8, all in the unlabeled one.
    shutil.copyfile(next(unl.iterdir()), outside / "secret.png")
    (unl / "link.png").symlink_to(outside / "secret.png")
    (unl / "linked_dir").symlink_to(outside)
    bad_name = os.path.join(os.fsencode(unl), b"caf\xe9.png")  # Latin-1, not UTF-8
    with open(bad_name, "wb") as f:
        f.write(sorted(unl.glob("*.png"))[1].read_bytes())
    paths = Paths(tmp_path / "project")
    summary = ingest(_folder_cfg(user), paths)
    report = _report(paths)
    assert report[str(unl / "link.png")][0] == "symlink_outside"
    assert report[str(unl / "linked_dir")][0] == "symlink_outside"
    assert report[f"{unl}/caf\\xe9.png"][0] == "bad_name"
    assert summary["unlabeled"] == 40
    view = _digest(paths.unlabeled)
    assert not any("caf" in name or "link" in name for name in view)

    # A class folder that is a link to a folder outside the labeled root: every file in it is
    # reported, none followed into the view, and the class is refused as empty; the view built
    # before stays whole (the new one is built aside and swapped in only when complete).
    labeled_view = _digest(paths.labeled)
    val9 = user / "labeled" / "val" / "digit_9"
    shutil.move(val9, outside / "digit_9")
    val9.symlink_to(outside / "digit_9")
    with pytest.raises(PseudoLabelError, match="val/digit_9"):
        ingest(_folder_cfg(user), paths)
    reasons = {r for p, (r, _) in _report(paths).items() if "digit_9" in p}
    assert reasons == {"symlink_outside"}
    assert _digest(paths.labeled) == labeled_view and _digest(paths.unlabeled) == view
    assert sorted(p.name for p in paths.labeled.parent.iterdir()) == ["image_dataset", "unlabeled"]

    # A class folder whose name is not UTF-8 is refused in one line before the view is touched.
    val9.unlink()
    shutil.move(outside / "digit_9", val9)
    os.mkdir(os.path.join(os.fsencode(user / "labeled" / "train"), b"digit_\xff"))
    with pytest.raises(PseudoLabelError, match="not valid UTF-8"):
        ingest(_folder_cfg(user), paths)
    assert _digest(paths.unlabeled) == view


# --- 4. writes are atomic: a failure or a kill leaves the previous complete output ------------


def _kill_during_loop(
    tmp_path: Path, source: str, *args, landed, rounds: int = 2, after: float = 0.03, tries=8
):
    """Run `source` (a script that writes in a loop and prints a line per complete round) in a
    subprocess; after `rounds` complete rounds, watch for the next round's write to start
    (`landed()`: a temporary or a `.building` folder is there), wait up to `after` seconds into
    it and SIGKILL: a real kill mid-write. `landed()` then says from what the kill left that it
    struck mid-write; if the write had finished first, the loop is run and killed again, each
    time sooner after the write starts (the last try at once), up to `tries` times. Watching,
    not a fixed sleep, keeps the kill inside the write on a machine of any speed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "loop.py"
    script.write_text(source)
    for attempt in range(tries):
        proc = subprocess.Popen(
            [sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE, text=True
        )
        try:
            for _ in range(rounds):
                assert proc.stdout.readline(), "the write loop died"
            deadline = time.monotonic() + 60
            while not landed():
                assert proc.poll() is None, "the write loop died"
                assert time.monotonic() < deadline, "the write never started in 60 s"
                time.sleep(0.0005)
            time.sleep(after * (1 - (attempt + 1) / tries))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        if landed():
            return
    pytest.fail(f"no SIGKILL struck mid-write in {tries} tries")


def _hidden(folder: Path) -> list[str]:
    """Entries a killed write leaves in `folder`: `.<name>.building` folders, `.<name>.tmp`."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


_INGEST_LOOP = """
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[3])  # the repository: the folder-source tests' config builder
from pseudolabel.data.folder import ingest_folder
from pseudolabel.paths import Paths
from tests.test_folder_source import _cfg

user, paths = Path(sys.argv[1]), Paths(Path(sys.argv[2]))
cfg = _cfg(user)
while True:  # the ingest stage's write, again and again: a kill lands mid-build
    ingest_folder(cfg.data, cfg.seed, paths.labeled, paths.unlabeled, paths.ingest_report,
                  paths.ingest_cache)
    print("built", flush=True)
"""


def test_sigkill_during_ingest_leaves_whole_views(user_folders, tmp_path):
    """A real SIGKILL at any moment of the view's write leaves each view (labeled and
    unlabeled) whole, the last complete build's, and the next ingest clears the leftovers."""
    from pseudolabel.stages.ingest import ingest

    user, _ = user_folders
    cfg = _folder_cfg(user)
    expected = Paths(tmp_path / "expected")
    ingest(cfg, expected)
    paths = Paths(tmp_path / "project")
    data = paths.labeled.parent
    landed = lambda: bool(_hidden(data)) if data.is_dir() else False  # noqa: E731
    _kill_during_loop(tmp_path, _INGEST_LOOP, user, paths.root, REPO, landed=landed, after=0.023)
    # The images of each view are whole; its decoded copy (data.decoded) is written after the
    # view and renamed into place whole, so it is there or not: without it stages decode.
    assert _digest(paths.labeled, images=True) == _digest(expected.labeled, images=True)
    assert _digest(paths.unlabeled, images=True) == _digest(expected.unlabeled, images=True)
    ingest(cfg, paths)
    assert sorted(p.name for p in paths.labeled.parent.iterdir()) == ["image_dataset", "unlabeled"]
    assert _digest(paths.unlabeled) == _digest(expected.unlabeled)  # the copy too, once re-run


def test_failed_merge_build_leaves_the_old_folder_whole(merge_project, smoke_cfg, monkeypatch):
    from pseudolabel import merged_set
    from pseudolabel.stages.merge import merge

    paths = merge_project
    before = _digest(paths.merged)
    copies = []

    def copy_then_fail(src, dst):
        copies.append(dst)
        if len(copies) > 50:
            raise OSError(28, "No space left on device")
        return copy(src, dst)

    copy = merged_set.shutil.copyfile
    monkeypatch.setattr(merged_set.shutil, "copyfile", copy_then_fail)
    with pytest.raises(OSError, match="No space left"):
        merge(smoke_cfg, paths)
    assert _digest(paths.merged) == before
    assert sorted(p.name for p in paths.merged.parent.iterdir()) == sorted(
        ["image_dataset", "unlabeled", "train_ssl"]
    )  # no half-built folder left behind either


_MERGE_LOOP = """
import sys
from pathlib import Path

import pandas as pd

from pseudolabel.merged_set import build_merged
from pseudolabel.paths import Paths

paths, classes = Paths(Path(sys.argv[1])), sys.argv[2].split(",")
accepted = pd.read_csv(paths.csv)
while True:  # the merge stage's write, again and again: a kill lands mid-build
    build_merged(paths.train, paths.unlabeled, accepted, paths.merged, classes)
    print("built", flush=True)
"""


def test_sigkill_during_merge_leaves_a_whole_merged_folder(merge_project, tmp_path):
    """A real SIGKILL at any moment of the merged set's write (copies, manifest, swap) leaves
    data/train_ssl whole (the last complete build, which check_complete accepts), and the next
    build clears the killed one's leftovers."""
    from pseudolabel.merged_set import build_merged, check_complete
    from pseudolabel.predicting import read_csv

    paths = merge_project
    landed = lambda: bool(_hidden(paths.merged.parent))  # noqa: E731
    _kill_during_loop(
        tmp_path, _MERGE_LOOP, paths.root, ",".join(CLASSES), landed=landed, after=0.031
    )
    check_complete(paths.merged)  # the manifest and the files agree
    expected = tmp_path / "expected"
    build_merged(paths.train, paths.unlabeled, read_csv(paths.csv), expected, CLASSES)
    assert _digest(paths.merged) == _digest(expected)
    build_merged(paths.train, paths.unlabeled, read_csv(paths.csv), paths.merged, CLASSES)
    assert sorted(p.name for p in paths.merged.parent.iterdir()) == sorted(
        ["image_dataset", "unlabeled", "train_ssl"]
    )  # the killed build's sibling folders are gone


def test_student_refuses_an_incomplete_merged_folder(merge_project, smoke_cfg):
    from pseudolabel.merged_set import MANIFEST
    from pseudolabel.stages import train_student

    paths = merge_project
    stray = paths.merged / "digit_0" / "stray.png"
    stray.write_bytes(next(paths.merged.rglob("*.png")).read_bytes())
    with pytest.raises(PseudoLabelError, match=r"1 not in the manifest \(e.g. digit_0/stray.png\)"):
        train_student(smoke_cfg, paths)
    stray.unlink()
    next(paths.merged.rglob("u__*.png")).unlink()
    with pytest.raises(PseudoLabelError, match="1 listed but missing"):
        train_student(smoke_cfg, paths)
    (paths.merged / MANIFEST).unlink()
    with pytest.raises(PseudoLabelError, match="manifest not found"):
        train_student(smoke_cfg, paths)
    assert not paths.model("student").exists()


_SAVE_LOOP = """
import sys
from pathlib import Path

import keras

from pseudolabel.models import io as model_io
from pseudolabel.stages.common import write_json

out = Path(sys.argv[1])
inputs = keras.Input((8, 8, 1))
x = keras.layers.Flatten()(inputs)
for _ in range(6):
    x = keras.layers.Dense(256, activation="relu")(x)
model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
meta = model_io.ModelMeta([f"digit_{i}" for i in range(10)], [8, 8], 1)
metrics = {"values": list(range(200_000))}
n = 0
while True:
    model_io.save(model, out / "teacher.keras", meta)
    write_json(out / "teacher.json.metrics", {**metrics, "n": n})
    n += 1
    print(n, flush=True)
"""


def test_sigkill_during_saves_leaves_complete_files(tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    landed = lambda: bool(_hidden(out))  # noqa: E731
    _kill_during_loop(tmp_path, _SAVE_LOOP, out, rounds=3, landed=landed, after=0.03)
    model, meta = model_io.load(out / "teacher.keras")
    assert model.outputs[0].shape[-1] == 10 and meta.num_classes == 10
    assert json.loads((out / "teacher.json.metrics").read_text())["n"] >= 2
    leftovers = _hidden(out)  # the temporaries being written when it died, and only those
    assert 1 <= len(leftovers) <= 2 and all(".tmp" in name for name in leftovers), leftovers


# --- 5. decompression bombs are reported from their header, never decoded -------------------


def test_images_over_max_pixels_are_reported_not_decoded(user_folders, tmp_path):
    import io

    from PIL import Image

    from pseudolabel.stages.ingest import ingest

    user, _ = user_folders
    unl = user / "unlabeled"
    for name, size in (("warns.png", (120, 100)), ("bomb.png", (400, 300))):
        buffer = io.BytesIO()
        Image.new("L", size).save(buffer, format="PNG")  # zeros: a few hundred bytes
        (unl / name).write_bytes(buffer.getvalue())
    limit = Image.MAX_IMAGE_PIXELS
    paths = Paths(tmp_path / "project")
    # 12,000 pixels: over the limit (PIL warns); 120,000: over twice it (PIL raises).
    summary = ingest(_folder_cfg(user, "data.max_pixels=10000"), paths)
    report = _report(paths)
    assert report[str(unl / "warns.png")][0] == "too_many_pixels"
    assert report[str(unl / "bomb.png")][0] == "too_many_pixels"
    assert "10000" in report[str(unl / "warns.png")][1]
    assert summary["unlabeled"] == 40
    assert limit == Image.MAX_IMAGE_PIXELS  # PIL's global limit restored
    # The default (conf/data/_base.yaml) lets them through.
    assert _folder_cfg(user).data.max_pixels == 40_000_000
    assert ingest(_folder_cfg(user), Paths(tmp_path / "default"))["unlabeled"] == 42


def test_exif_orientation_is_applied_in_the_view_not_the_original(user_folders, tmp_path):
    import io

    import numpy as np
    from PIL import Image, ImageOps

    from pseudolabel.stages.ingest import ingest

    user, _ = user_folders
    # A phone photo: stored 40 wide x 20 high, bright in its top-left corner, with EXIF
    # Orientation 6 (a viewer turns it a quarter clockwise: 20 wide x 40 high, bright top-right).
    pixels = np.zeros((20, 40), np.uint8)
    pixels[:8, :12] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    photo = user / "unlabeled" / "phone.jpg"
    photo.write_bytes(buffer.getvalue())
    original = hashlib.md5(photo.read_bytes()).hexdigest()

    paths = Paths(tmp_path / "project")
    summary = ingest(_folder_cfg(user), paths)
    assert summary["unlabeled"] == 41
    view = paths.unlabeled / "phone.jpg.png"  # converted: the view holds the upright pixels
    seen = np.asarray(Image.open(view))
    assert seen.shape == (40, 20)
    assert seen[:12, -8:].mean() > 200 and seen[12:, :].mean() < 30  # bright top-right
    expected = np.asarray(ImageOps.exif_transpose(Image.open(photo)).convert("L"), np.int16)
    assert np.abs(seen.astype(np.int16) - expected).max() <= 8  # TF's decode vs PIL's
    assert _report(paths)[str(photo)] == (
        "warning_exif_rotated",
        "EXIF orientation 6; upright in phone.jpg.png",
    )
    assert hashlib.md5(photo.read_bytes()).hexdigest() == original  # the original untouched
    assert not (paths.unlabeled / "phone.jpg").exists()


# --- 6. refused up front: an unreachable tracking server, a negative seed ---------------------


def _cli_merge_fails(paths: Paths, tracking_uri: str) -> list[str]:
    """`pseudolabel merge` run against `tracking_uri`: it must fail within a minute with exit
    code 2, one `error:` line and no traceback; that line."""
    import os
    import subprocess
    import sys
    import time

    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pseudolabel.cli", "merge"],
        cwd=paths.root,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    assert time.monotonic() - start < 60
    return errors


def test_unreachable_tracking_server_fails_before_any_work(merge_project):
    import socket

    from pseudolabel.config import compose_raw, to_yaml

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    paths = merge_project
    params = compose_raw(["+experiment=smoke", "tracking.start_wait=3"])
    (paths.root / "params.yaml").write_text(to_yaml(params))
    before = _digest(paths.merged)
    errors = _cli_merge_fails(paths, f"http://127.0.0.1:{port}")
    assert "cannot be reached" in errors[0]
    assert _digest(paths.merged) == before
    assert not (paths.outputs / "selection").exists()


def test_negative_seed_is_refused_at_validation():
    from pseudolabel.config import compose

    with pytest.raises(PseudoLabelError, match="seed=-1 is invalid"):
        compose(["seed=-1"])


# --- 7. the MLflow store: damaged, killed runs, deleted ---------------------------------------


def test_damaged_mlflow_db_is_one_line_before_any_work(merge_project, smoke_cfg, monkeypatch):
    import os

    from pseudolabel import tracking

    paths = merge_project
    before = _digest(paths.merged)
    db = paths.root / "mlflow.db"
    db.write_bytes(b"this is not a database\n" * 100)  # a file overwritten by something else
    damaged = db.read_bytes()
    errors = _cli_merge_fails(paths, f"sqlite:///{db}")
    assert "cannot be opened (not an SQLite database)" in errors[0]
    assert f"mv {db} {db}.broken" in errors[0]
    assert _digest(paths.merged) == before and db.read_bytes() == damaged
    assert not (paths.metrics / "merge.json").exists()
    # An SQLite header over damaged pages: sqlite's own error, still one line.
    db.write_bytes(tracking.SQLITE_MAGIC + os.urandom(8192))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    with pytest.raises(PseudoLabelError, match="cannot be opened") as err:
        tracking.check_reachable(smoke_cfg)
    assert "\n" not in str(err.value)


def _stage_runs(db: Path, stage: str) -> dict[str, tuple[str, dict[str, str]]]:
    """Run id -> (status, tags) of a stage's runs, read from the sqlite store itself: MLflow's
    client would create the tables while the stage is creating them, and caches its engine."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        try:
            rows = con.execute(
                "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "WHERE t.key = 'stage' AND t.value = ?",
                (stage,),
            ).fetchall()
            tags = con.execute("SELECT run_uuid, key, value FROM tags").fetchall()
        except sqlite3.OperationalError:  # the tables are not created yet
            return {}
    return {run: (status, {k: v for r, k, v in tags if r == run}) for run, status in rows}


@pytest.mark.slow  # ~30 s: a real train_teacher subprocess, killed, then one in-process
def test_killed_stage_run_is_failed_next_time_and_a_deleted_store_is_reported(
    merge_project, smoke_cfg, monkeypatch, caplog
):
    import logging
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import mlflow

    from pseudolabel.config import compose_raw, to_yaml
    from pseudolabel.stages import train_teacher

    paths = merge_project
    db = paths.root / "mlflow.db"
    uri = f"sqlite:///{db}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    long = ["+experiment=smoke", "teacher.train.epochs=10000", "teacher.train.patience=10000"]
    (paths.root / "params.yaml").write_text(to_yaml(compose_raw(long)))
    # A real train_teacher, killed (SIGKILL) while its MLflow run is open.
    log_file = paths.root / "train_teacher.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pseudolabel.cli", "train_teacher"],
            cwd=paths.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while not (db.exists() and _stage_runs(db, "train_teacher")):
            assert proc.poll() is None, log_file.read_text()[-2000:]
            assert time.monotonic() < deadline, "no run was opened"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    ((killed, (status, _)),) = _stage_runs(db, "train_teacher").items()
    assert status == "RUNNING"  # what MLflow alone would leave forever
    # Had an epoch ended, its state (another config's) would be resumed or refused: gone here,
    # this test is about the run left open (tests/test_resume.py: what a state does).
    shutil.rmtree(paths.models / ".resume", ignore_errors=True)

    # The next start of the stage marks it FAILED, then runs.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    with caplog.at_level(logging.WARNING, logger="pseudolabel.tracking"):
        train_teacher(smoke_cfg, paths)
    runs = _stage_runs(db, "train_teacher")
    assert runs[killed][0] == "FAILED"
    assert "ended without closing" in runs[killed][1]["pseudolabel_failure"]
    assert [status for i, (status, _) in runs.items() if i != killed] == ["FINISHED"]
    assert f"{killed} (train_teacher) was left RUNNING" in caplog.text
    teacher_run = model_io.read_meta(paths.model("teacher")).run_id
    assert teacher_run in runs

    # The store deleted: the next stage recreates it and says the teacher's run is not there.
    db.unlink()
    done = subprocess.run(
        [sys.executable, "-m", "pseudolabel.cli", "pseudo_label"],
        cwd=paths.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if f"has no run {teacher_run}" in line]
    assert len(warnings) == 1 and "deleted, recreated or replaced" in warnings[0]
    assert list(_stage_runs(db, "pseudo_label").values())[0][0] == "FINISHED"


# --- 8. the smaller ones: names, folders, special files, mismatched models ------------------


def test_reserved_class_name_suggests_a_valid_one(user_folders, tmp_path):
    import shutil

    from pseudolabel.stages.ingest import ingest

    user, _ = user_folders
    paths = Paths(tmp_path / "project")
    ingest(_folder_cfg(user), paths)
    view = _digest(paths.labeled)
    for part in ("train", "val", "test"):
        shutil.move(user / "labeled" / part / "digit_3", user / "labeled" / part / "CON")
    with pytest.raises(PseudoLabelError, match=r"Rename the folder, e\.g\. to 'CON_class'\."):
        ingest(_folder_cfg(user), paths)
    assert _digest(paths.labeled) == view  # refused before the view was touched


def test_ingest_reports_a_fifo_instead_of_waiting_on_it(user_folders, tmp_path):
    import os
    import subprocess
    import sys

    user, _ = user_folders
    unl = user / "unlabeled"
    os.mkfifo(unl / "pipe.png")  # nobody ever writes to it: opening it would wait forever
    (unl / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (unl / "notes.txt").write_text("not an image")
    script = (
        "import sys; from pathlib import Path; from tests.test_faults import _folder_cfg; "
        "from pseudolabel.paths import Paths; from pseudolabel.stages.ingest import ingest; "
        "print(ingest(_folder_cfg(Path(sys.argv[1])), Paths(Path(sys.argv[2])))['unlabeled'])"
    )
    done = subprocess.run(  # a subprocess, so that a hang is a failure, not a stuck suite
        [sys.executable, "-c", script, str(user), str(tmp_path / "project")],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "40"
    report = _report(Paths(tmp_path / "project"))
    assert report[str(unl / "pipe.png")] == ("unreadable", "not a regular file (a FIFO)")
    assert report[str(unl / "logo.svg")][0] in ("not_an_image", "unsupported_format")
    assert report[str(unl / "notes.txt")][0] == "not_an_image"


def test_facade_lists_what_it_does_not_label(tmp_path, digits_data):
    import os
    import shutil

    import pandas as pd

    from pseudolabel import PseudoLabelGenerator

    unl = tmp_path / "unlabeled"
    unl.mkdir()
    for path in list_images(digits_data.unlabeled)[:5]:
        shutil.copyfile(path, unl / path.name)
    (unl / "x.jpg").mkdir()  # a folder named like an image
    os.mkfifo(unl / "pipe.png")
    (unl / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (unl / "notes.txt").write_text("not an image")
    from PIL import Image

    Image.new("L", (400, 300)).save(unl / "huge.png")  # over max_pixels below: never decoded
    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(inputs))
    model = tmp_path / "model.keras"
    model_io.save(keras.Model(inputs, outputs), model, model_io.ModelMeta(CLASSES, [8, 8], 1))

    gen = PseudoLabelGenerator(
        model_path=model,
        unlabeled_path=unl,
        output_folder=tmp_path / "out",
        calibrate=False,
        max_pixels=100_000,
    )
    predictions = gen.generate_pseudolabel_data()
    assert len(predictions) == 5
    errors = pd.read_csv(tmp_path / "out" / "errors.csv")
    reasons = dict(zip(errors["path"], errors["reason"], strict=True))
    assert sorted(reasons) == ["huge.png", "logo.svg", "notes.txt", "pipe.png", "x.jpg"]
    assert reasons["huge.png"].startswith("more pixels than max_pixels")
    assert reasons["huge.png"].endswith("300x400 = 120000 pixels > max_pixels=100000")
    assert reasons["x.jpg"].startswith("a folder, not an image")
    assert reasons["pipe.png"].startswith("not a regular file")
    assert reasons["logo.svg"].startswith("not an image extension (.svg")


def test_compose_refuses_a_data_root_that_does_not_exist(tmp_path, monkeypatch, capsys):
    from pseudolabel.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    out = tmp_path / "params.yaml"
    out.write_text("# the last good composition\n")
    (tmp_path / "unlabeled").mkdir()
    argv = [
        "compose",
        "data=folder",
        f"data.labeled_root={tmp_path / 'no_such_folder'}",
        f"data.unlabeled_root={tmp_path / 'unlabeled'}",
        "-o",
        str(out),
    ]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [
        f"pseudolabel compose: error: data.labeled_root={tmp_path / 'no_such_folder'}: folder "
        f"not found ({tmp_path / 'no_such_folder'}); create it or fix the path, then compose again."
    ]
    assert out.read_text() == "# the last good composition\n"
    (tmp_path / "no_such_folder").mkdir()
    assert main(argv) == 0 and "labeled_root" in out.read_text()


def test_imported_teacher_of_another_input_size_is_said(tmp_path, digits_data, caplog):
    import logging

    from pseudolabel.config import compose
    from pseudolabel.stages import train_teacher

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inputs, outputs).save(tmp_path / "rgb32.keras")
    paths = Paths(tmp_path / "project", data_root=digits_data.root)
    cfg = compose(["+experiment=smoke", f"teacher.path={tmp_path / 'rgb32.keras'}"])
    with caplog.at_level(logging.WARNING, logger="pseudolabel.stages.train"):
        train_teacher(cfg, paths)
    (line,) = [r.getMessage() for r in caplog.records if "expects" in r.getMessage()]
    assert "expects 32x32x3 images but the data is 8x8x1" in line
    assert "resized to 32x32 and its grey copied to 3 channels" in line


def test_only_runs_of_ended_processes_of_this_machine_are_failed(tmp_path):
    """close_orphaned_runs, against real processes: a run whose process has ended is marked
    FAILED; runs of a live process (a parallel sweep job), of another machine and of a pid
    that is alive but was reused by a later process are told apart (the last is FAILED)."""
    import subprocess
    import sys

    import mlflow

    from pseudolabel import tracking

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("orphans")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended_id = tracking.process_id(ended.pid)  # recorded while it runs, as a stage does
    ended.wait(timeout=60)
    try:
        host, boot, pid, started = tracking.process_id(live.pid).split("|")
        processes = {
            "live": tracking.process_id(live.pid),
            "ended": ended_id,
            "other_machine": "|".join([host + "-elsewhere", boot, str(ended.pid), started]),
            "pid_reused": "|".join([host, boot, pid, str(int(started) - 1)]),
        }
        runs = {
            name: client.create_run(experiment, tags={tracking.PROCESS_TAG: process}).info.run_id
            for name, process in processes.items()
        }
        closed = tracking.close_orphaned_runs(client)
        status = {name: client.get_run(run).info.status for name, run in runs.items()}
    finally:
        live.kill()
        live.wait(timeout=60)
    assert sorted(closed) == sorted([runs["ended"], runs["pid_reused"]])
    assert status == {
        "live": "RUNNING",
        "ended": "FAILED",
        "other_machine": "RUNNING",
        "pid_reused": "FAILED",
    }
