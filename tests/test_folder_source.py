"""data=folder: a poisoned copy of the digits data set goes through the whole pipeline."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, PngImagePlugin

from pseudolabel.config import compose
from pseudolabel.data import folder, validate
from pseudolabel.data.images import list_images
from pseudolabel.errors import PseudoLabelError
from pseudolabel.paths import Paths

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _image(seed: int, size: int = 8) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _snapshot(root: Path) -> dict[str, tuple]:
    """Content hash, mode and mtime of every entry under `root`, links not followed."""
    out = {}
    for folder_, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder_) / name
            st = path.lstat()
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path), st.st_mode)
            elif path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path)] = (digest, st.st_mode, st.st_mtime_ns)
            else:
                out[str(path)] = ("dir", st.st_mode)
    return out


def _plant(user: Path, outside: Path) -> dict[str, str]:
    """Bad (and tricky-but-valid) files; returns {path: expected reason}."""
    labeled, unlabeled = user / "labeled", user / "unlabeled"
    val_image = sorted((labeled / "val" / "digit_3").iterdir())[0]
    test_image = sorted((labeled / "test" / "digit_5").iterdir())[0]
    some_unlabeled = sorted(unlabeled.rglob("*.png"))[0]
    bad = unlabeled / "bad"
    bad.mkdir()
    good_png = _encode(Image.fromarray(_image(1)), "PNG")
    good_jpeg = _encode(Image.fromarray(_image(2)), "JPEG")
    files = {
        "empty.png": (b"", "zero_byte"),
        "notes.jpg": (b"this is a text file, not a photo\n" * 4, "not_an_image"),
        "readme.txt": (b"hello", "not_an_image"),
        "page.html.png": (b"<html><body>404</body></html>", "not_an_image"),
        "scan.tif": (_encode(Image.fromarray(_image(3)), "TIFF"), "unsupported_format"),
        "truncated.png": (good_png[: len(good_png) // 2], "corrupt"),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "corrupt"),
        "garbage.png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2, "corrupt"),
        "tiny.png": (_encode(Image.fromarray(_image(4, size=2)), "PNG"), "too_small"),
        "leak_val.png": (val_image.read_bytes(), "leak_duplicate"),
        "dup_of_unlabeled.png": (some_unlabeled.read_bytes(), "duplicate"),
    }
    expected = {}
    for name, (content, reason) in files.items():
        (bad / name).write_bytes(content)
        expected[str(bad / name)] = reason
    deep = unlabeled / "deep" / "er"
    deep.mkdir(parents=True)
    (deep / "leak_test.png").write_bytes(test_image.read_bytes())
    expected[str(deep / "leak_test.png")] = "leak_duplicate"
    # A near-copy of a val image: one pixel changed by one grey level.
    near = np.array(Image.open(val_image)).copy()
    near[0, 0] = near[0, 0] + 1 if near[0, 0] < 255 else 254
    (bad / "near_val.png").write_bytes(_encode(Image.fromarray(near), "PNG"))
    expected[str(bad / "near_val.png")] = "leak_near_duplicate"
    # Links: outside the folder, a folder outside, dangling, a loop.
    (outside / "secret.png").write_bytes(good_png)
    (outside / "elsewhere").mkdir()
    (outside / "elsewhere" / "x.png").write_bytes(good_png)
    for name, target in {
        "link_out.png": outside / "secret.png",
        "linked_dir": outside / "elsewhere",
        "dangling.png": bad / "missing.png",
        "loop_a.png": bad / "loop_b.png",
        "loop_b.png": bad / "loop_a.png",
    }.items():
        (bad / name).symlink_to(target)
    expected[str(bad / "link_out.png")] = "symlink_outside"
    expected[str(bad / "linked_dir")] = "symlink_outside"
    for name in ("dangling.png", "loop_a.png", "loop_b.png"):
        expected[str(bad / name)] = "unreadable"
    locked = bad / "locked.png"
    locked.write_bytes(_encode(Image.fromarray(_image(5)), "PNG"))
    locked.chmod(0)
    if not IS_ROOT:  # root reads any file: the dangling link and the loop cover "unreadable"
        expected[str(locked)] = "unreadable"
    # Hidden files and folders are ignored, not reported.
    (unlabeled / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (unlabeled / ".ipynb_checkpoints").mkdir()
    (unlabeled / ".ipynb_checkpoints" / "x.png").write_bytes(b"")
    # Labeled side: a train copy of a val image (a warning, kept) and a bad train file.
    (labeled / "train" / "digit_3" / "copy_of_val.png").write_bytes(val_image.read_bytes())
    expected[str(labeled / "train" / "digit_3" / "copy_of_val.png")] = "warning_train_duplicate"
    (labeled / "train" / "digit_1" / "broken.jpg").write_bytes(b"not a jpeg")
    expected[str(labeled / "train" / "digit_1" / "broken.jpg")] = "not_an_image"
    return expected


def _plant_valid(unlabeled: Path) -> list[str]:
    """Formats and modes that must pass (converted where TensorFlow reads them only as RGB)."""
    fmt = unlabeled / "formats"
    fmt.mkdir()
    rgb = Image.fromarray(_image(6))
    frames = [Image.fromarray(_image(7)).convert("P"), Image.fromarray(_image(8)).convert("P")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    grey16 = (_image(9)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    files = {
        "animated.gif": buffer.getvalue(),
        "bitmap.bmp": _encode(rgb, "BMP"),
        "web.webp": _encode(rgb, "WEBP"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "deep16.png": _encode(Image.fromarray(grey16), "PNG"),
        "rgba.png": _encode(rgb.convert("RGBA"), "PNG"),
        "palette.png": _encode(rgb.convert("P"), "PNG"),
        "jpeg_named.png": _encode(rgb, "JPEG"),
        "no_extension": _encode(rgb, "JPEG", quality=70),
        "UPPER.JPG": _encode(rgb, "JPEG", quality=60),
    }
    for name, content in files.items():
        (fmt / name).write_bytes(content)
    return [str(fmt / name) for name in files]


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, digits_data):
    user = tmp_path_factory.mktemp("user")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(digits_data.labeled, user / "labeled")
    for i, path in enumerate(list_images(digits_data.unlabeled)[:300]):
        sub = user / "unlabeled" / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, sub / path.name)
    expected = _plant(user, outside)
    valid = _plant_valid(user / "unlabeled")
    return user, expected, valid


def _cfg(user: Path, *extra: str):
    return compose(
        [
            "+experiment=smoke",
            "data=folder",
            f"data.labeled_root={user / 'labeled'}",
            f"data.unlabeled_root={user / 'unlabeled'}",
            "data.image_size=[8,8]",
            "data.min_size=4",
            "data.workers=2",
            *extra,
        ]
    )


def _report(paths: Paths) -> dict[str, str]:
    with open(paths.ingest_report, newline="", encoding="utf-8") as f:
        return {row["path"]: row["reason"] for row in csv.DictReader(f)}


@pytest.mark.slow  # ~25 s: the whole pipeline on a poisoned folder
def test_poisoned_folder_runs_the_whole_pipeline(poisoned, tmp_path, tracking_uri):
    from pseudolabel.stages import STAGES

    user, expected, valid = poisoned
    before = _snapshot(user)
    # 8x8 digits are so alike that only an identical perceptual hash is a sure near-copy.
    cfg = _cfg(
        user,
        "data.near_duplicates=true",
        "data.near_duplicate_distance=0",
        "pseudo_label.threshold=null",  # keep every pseudo-label: all of them reach train_ssl
    )
    paths = Paths(tmp_path / "project")
    for stage in STAGES.values():
        stage(cfg, paths)

    report = _report(paths)
    assert len(expected) >= 15 and len(set(expected.values())) >= 11
    for path, reason in expected.items():
        assert report.get(path) == reason, path
    # Beyond the planted files, only the data set's own (near-)copies may be reported.
    for path in set(report) - set(expected):
        assert Path(path).name.startswith("train_"), path
        assert report[path] in {"duplicate", "leak_near_duplicate", "warning_train_duplicate"}
    metrics = json.loads((paths.metrics / "ingest.json").read_text())
    assert sum(metrics["reported"].values()) == len(report)
    assert metrics["converted_to_png"] >= 4  # GIF, BMP, WebP, CMYK JPEG at channels=1

    # The view holds exactly the usable files; the valid oddities made it, all decodable.
    view = sorted(p for p in paths.unlabeled.rglob("*") if p.is_file())
    copied = {str(p.relative_to(paths.unlabeled)) for p in view}
    for path in valid:
        rel = str(Path(path).relative_to(user / "unlabeled"))
        assert any(c == rel or c.startswith(rel + ".") for c in copied), rel
    excluded = {
        str(Path(p).relative_to(user / "unlabeled")) for p in expected if "/unlabeled/" in p
    }
    assert not copied & excluded

    # No bad or leaking image reached the student's training set.
    eval_hashes = {
        hashlib.sha256(p.read_bytes()).hexdigest()
        for part in ("val", "test")
        for p in (paths.labeled / part).rglob("*")
        if p.is_file()
    }
    pseudo = [p for p in paths.merged.rglob("u__*") if p.is_file()]
    assert pseudo
    for path in pseudo:
        assert hashlib.sha256(path.read_bytes()).hexdigest() not in eval_hashes, path
        tf.io.decode_image(path.read_bytes(), channels=1, expand_animations=False)
    assert not any("broken" in p.name for p in paths.merged.rglob("*"))

    assert _snapshot(user) == before, "a user file changed"

    # A re-run answers from the cache: same report, no file re-decoded.
    cache = folder.CheckCache(paths.ingest_cache, cfg.data.channels)
    cached = cache.db.execute(f"SELECT COUNT(*) FROM {folder.TABLE}").fetchone()[0]
    cache.close()
    assert cached > 300
    STAGES["ingest"](cfg, paths)
    assert _report(paths) == report
    assert _snapshot(user) == before


def test_link_modes_keep_user_files_and_train_alone_is_split(poisoned, tmp_path):
    from pseudolabel.stages.ingest import ingest

    user, _, _ = poisoned
    labeled = tmp_path / "labeled"
    shutil.copytree(user / "labeled" / "train", labeled / "train")
    before = _snapshot(user)
    for link in ("hardlink", "symlink"):
        cfg = _cfg(user, f"data.link={link}", f"data.labeled_root={labeled}")
        paths = Paths(tmp_path / link)
        summary = ingest(cfg, paths)
        assert summary["val"] > 0 and summary["test"] > 0 and summary["train"] > 0
        sample = next(p for p in paths.unlabeled.rglob("*.png") if "formats" not in str(p))
        assert sample.is_symlink() == (link == "symlink")
    # The split is seeded and only assigns names: same seed, same split.
    first = sorted(p.name for p in (tmp_path / "hardlink" / "data/image_dataset/val").rglob("*"))
    again = sorted(p.name for p in (tmp_path / "symlink" / "data/image_dataset/val").rglob("*"))
    assert first == again
    assert _snapshot(user) == before


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda r: shutil.rmtree(r / "labeled" / "train"), "training folder not found"),
        (lambda r: (r / "labeled" / "train" / "empty_class").mkdir(), "empty"),
        (lambda r: (r / "labeled" / "train" / "bad:name").mkdir(), "not a valid class folder"),
        (lambda r: shutil.rmtree(r / "labeled" / "val" / "digit_9"), "differ from"),
        (
            lambda r: [
                shutil.rmtree(p) for p in (r / "labeled" / "train").iterdir() if p.name != "digit_0"
            ],
            "at least two",
        ),
        (lambda r: shutil.rmtree(r / "unlabeled"), "unlabeled folder not found"),
    ],
)
def test_bad_layouts_fail_with_one_clear_error(digits_data, tmp_path, make, match):
    from pseudolabel.stages.ingest import ingest

    shutil.copytree(digits_data.labeled, tmp_path / "labeled")
    (tmp_path / "unlabeled").mkdir()
    shutil.copyfile(list_images(digits_data.unlabeled)[0], tmp_path / "unlabeled" / "x.png")
    make(tmp_path)
    with pytest.raises(PseudoLabelError, match=match):
        ingest(_cfg(tmp_path), Paths(tmp_path / "project"))


def test_no_usable_unlabeled_image_fails_after_the_report(digits_data, tmp_path, tracking_uri):
    from pseudolabel.stages.ingest import ingest

    shutil.copytree(digits_data.labeled, tmp_path / "labeled")
    (tmp_path / "unlabeled").mkdir()
    (tmp_path / "unlabeled" / "a.jpg").write_text("nope")
    paths = Paths(tmp_path / "project")
    with pytest.raises(PseudoLabelError, match="no usable unlabeled image"):
        ingest(_cfg(tmp_path), paths)
    assert _report(paths) == {str(tmp_path / "unlabeled" / "a.jpg"): "not_an_image"}


def test_view_overlapping_a_user_folder_is_refused(digits_data, tmp_path):
    from pseudolabel.stages.ingest import ingest

    paths = Paths(tmp_path)
    shutil.copytree(digits_data.labeled, tmp_path / "labeled")
    shutil.copytree(digits_data.unlabeled, paths.unlabeled)
    cfg = compose(
        [
            "+experiment=smoke",
            "data=folder",
            f"data.labeled_root={tmp_path / 'labeled'}",
            f"data.unlabeled_root={paths.unlabeled}",
        ]
    )
    with pytest.raises(PseudoLabelError, match="overlaps"):
        ingest(cfg, paths)
    assert any(paths.unlabeled.iterdir())


def test_cache_rechecks_only_changed_files(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path / "images"
    root.mkdir()
    for i in range(6):
        (root / f"{i}.png").write_bytes(_encode(Image.fromarray(_image(i)), "PNG"))

    def run() -> tuple[int, list]:
        cache = folder.CheckCache(tmp_path / "cache.sqlite", channels=1)
        with ThreadPoolExecutor(2) as pool:
            checks = list(folder.check_all(validate.walk_files(root), root, cache, pool, "t"))
        cache.close()
        return cache.hits, checks

    assert run()[0] == 0
    (root / "2.png").write_bytes(b"now broken")
    hits, checks = run()
    assert hits == 5
    assert [c.reason for c in checks] == [None, None, "not_an_image", None, None, None]


def test_perceptual_hash_finds_near_copies_only():
    image = _image(10, size=32)
    shifted = image.copy()
    shifted[0, 0] //= 2
    a, b, other = (
        validate.fingerprint(_encode(Image.fromarray(x), "PNG"), 1).dhash
        for x in (image, shifted, _image(11, size=32))
    )
    values = np.array([a], dtype=np.int64)
    assert validate.hamming_min(values, a) == 0
    assert validate.hamming_min(values, b) <= 4
    assert validate.hamming_min(values, other) > 10


def test_checks_in_batches_match_one_file_at_a_time(poisoned, tmp_path):
    """check_files (a batch decode, PNG headers read without PIL) gives check_file's results,
    bad files included, and PNGs whose EXIF or XMP chunks turn them still count as turned."""
    user, _, _ = poisoned
    turned = user / "unlabeled" / "turned"
    turned.mkdir(exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    picture = Image.fromarray(_image(9, 12)[:6])
    (turned / "exif.png").write_bytes(_encode(picture, "PNG", exif=exif.tobytes()))
    xmp = PngImagePlugin.PngInfo()
    xmp.add_itxt("XML:com.adobe.xmp", '<rdf:Description tiff:Orientation="8"/>')
    (turned / "xmp.png").write_bytes(_encode(picture, "PNG", pnginfo=xmp))
    for channels, perceptual, max_pixels in ((1, False, 10_000), (3, False, None), (1, True, 50)):
        for root in (user / "labeled", user / "unlabeled"):
            files = list(validate.walk_files(root))
            one = [validate.check_file(p, root, channels, perceptual, max_pixels) for p in files]
            batch = validate.check_files(files, root, channels, perceptual, max_pixels)
            assert batch == one
    checks = validate.check_files(list(validate.walk_files(turned)), turned, 1)
    orientation = {Path(c.path).name: c.orientation for c in checks}
    assert orientation["exif.png"] == 6 and orientation["xmp.png"] == 8
