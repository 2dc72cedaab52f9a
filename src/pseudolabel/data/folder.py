"""The `folder` source: the user's own images -> the normalised, DVC-tracked view.

The user's folders are only read. Usable files reach data/image_dataset/{train,val,test}/<class>/
and data/unlabeled/ as copies, hard links or symbolic links (`data.link`); every other file is
listed in the report with its reason. The unlabeled folder is streamed in chunks (memory does
not grow with its size); the labeled set is listed in memory. Checks run on a thread pool
(TensorFlow's decoders release the GIL), PNG and JPEG files decoded in batches by
`validate.check_files`, and their results are cached in SQLite next to the report, keyed by
path, size and modification time, so a re-run re-checks only changed files.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from stat import S_ISLNK

import numpy as np
from PIL import Image
from tqdm import tqdm

from pseudolabel.data import validate
from pseudolabel.data.validate import FileCheck
from pseudolabel.errors import PseudoLabelError
from pseudolabel.paths import swap_folder

log = logging.getLogger(__name__)

PARTS = ("train", "val", "test")
CHUNK = 512  # files listed, checked and reported at a time (bounds memory)
BATCH = 128  # files per thread-pool task (decoded together by validate.check_files)
COMMIT_EVERY_S = 5.0  # how often the check cache is written to disk
# Characters that are not valid in a folder name on some common file system (Windows, macOS),
# so a class called that could not be checked out everywhere.
_BAD_NAME = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10))}
_RESERVED |= {f"lpt{i}" for i in range(10)}


@dataclass
class Outcome:
    """What ingest did: kept images per part and class, and the report's counts by reason."""

    per_class: dict[str, dict[str, int]] = field(default_factory=dict)
    unlabeled: int = 0
    converted: int = 0
    reasons: Counter = field(default_factory=Counter)


# --- the labeled layout -------------------------------------------------------------------


def _require_dir(folder: Path, what: str, fix: str) -> None:
    if not folder.is_dir():
        raise PseudoLabelError(f"{folder}: {what} folder not found. {fix}")


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and validate.is_visible(p.name))


def check_class_name(folder: Path) -> None:
    """A class name becomes a folder and a CSV label: it must be valid on every file system."""
    name = folder.name
    if not validate.utf8_name(name):
        raise PseudoLabelError(
            f"{validate.printable(folder)}: the class folder's name is not valid UTF-8, so it "
            "cannot be a label in the CSV. Rename the folder (e.g. to plain ASCII)."
        )
    if (
        _BAD_NAME.search(name)
        or name != name.strip()
        or name.endswith(".")
        or name.split(".")[0].lower() in _RESERVED
    ):
        raise PseudoLabelError(
            f"{folder}: {name!r} is not a valid class folder name on every file system "
            '(no <>:"/\\|?* or control characters, no leading/trailing space or trailing dot, '
            f"not a reserved name like CON). Rename the folder, e.g. to {_valid_name(name)!r}."
        )


def _valid_name(name: str) -> str:
    """A name like `name` that check_class_name accepts (what its error suggests)."""
    valid = _BAD_NAME.sub("_", name).strip().rstrip(".") or "class_1"
    stem, dot, rest = valid.partition(".")
    if stem.lower() in _RESERVED:  # CON -> CON_class
        valid = f"{stem}_class{dot}{rest}"
    return valid


def _labeled_part(root: Path, part: str, classes: list[str] | None) -> dict[str, list[Path]]:
    folder = root / part
    found = _class_folders(folder)
    for name in found:
        check_class_name(folder / name)
    if classes is None and len(found) < 2:
        raise PseudoLabelError(
            f"{folder}: {len(found)} class folder(s) ({', '.join(found) or 'none'}); a classifier "
            f"needs at least two. Put the images of each class in {folder}/<class name>/."
        )
    if classes is not None and found != classes:
        raise PseudoLabelError(
            f"{folder}: classes {found} differ from {root / 'train'}: {classes}. Give {part}/ "
            "exactly one folder per training class (same names)."
        )
    files = {name: list(validate.walk_files(folder / name)) for name in found}
    empty = [name for name, paths in files.items() if not paths]
    if empty:
        raise PseudoLabelError(
            f"{folder}: class folder(s) {', '.join(empty)} are empty. Add images or remove them."
        )
    return files


def discover(labeled_root: Path) -> tuple[list[str], dict[str, dict[str, list[Path]]]]:
    """Class names and the files of each part present on disk (train/ always; val/, test/
    when there). Raises one clear error for every layout problem, before anything is written."""
    _require_dir(
        labeled_root,
        "labeled",
        "Set data.labeled_root to a folder holding train/<class>/ (and optionally val/, test/).",
    )
    _require_dir(
        labeled_root / "train",
        "training",
        f"Create {labeled_root}/train/<class name>/ with the labeled images of each class.",
    )
    train = _labeled_part(labeled_root, "train", None)
    classes = sorted(train)
    parts = {"train": train}
    for part in ("val", "test"):
        if (labeled_root / part).is_dir():
            parts[part] = _labeled_part(labeled_root, part, classes)
    return classes, parts


def split_train(
    kept: dict[str, list[FileCheck]], missing: list[str], fractions: dict[str, float], seed: int
) -> dict[str, dict[str, list[FileCheck]]]:
    """Seeded per-class split of the usable train files into train + the missing parts.

    Only names are assigned; no user file moves. Every part gets at least one image per class.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[FileCheck]]] = {p: {} for p in ["train", *missing]}
    for name, checks in kept.items():
        order = rng.permutation(len(checks))
        sizes = {p: max(1, round(len(checks) * fractions[p])) for p in missing}
        if len(checks) < sum(sizes.values()) + 1:
            raise PseudoLabelError(
                f"class {name!r} has {len(checks)} usable training image(s), too few to split off "
                f"{', '.join(missing)} and keep one for training. Add images, or provide "
                f"{'/'.join(missing)}/ folders yourself."
            )
        start = 0
        for part in missing:
            out[part][name] = [checks[i] for i in order[start : start + sizes[part]]]
            start += sizes[part]
        out["train"][name] = [checks[i] for i in sorted(order[start:])]
    return out


# --- the cache ------------------------------------------------------------------------------

_COLUMNS = [f for f in FileCheck.__dataclass_fields__ if f != "path"]
TABLE = "checks_v2"  # v2: FileCheck.orientation (EXIF), and oriented files are converted


class CheckCache:
    """Check results by path, valid while size, mtime and channels are unchanged (SQLite;
    the table name carries the schema version, so a new FileCheck layout starts afresh).
    With `perceptual`, a result without a perceptual hash counts as missing."""

    def __init__(self, path: Path, channels: int, perceptual: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.channels, self.perceptual = channels, perceptual
        self.hits = 0  # results answered from the cache in this session
        self.committed = time.monotonic()
        self.db.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (path TEXT PRIMARY KEY, channels INTEGER, "
            + ", ".join(_COLUMNS)
            + ")"
        )

    def get(self, path: Path) -> FileCheck | None:
        return self.get_many([path])[path]

    def get_many(self, paths: list[Path]) -> dict[Path, FileCheck | None]:
        """The cached result of each path, or None (one query for all of them)."""
        found: dict[Path, FileCheck | None] = dict.fromkeys(paths)
        stats = {}
        for path in paths:
            if not validate.utf8_name(path):
                continue  # SQLite text cannot hold it; check_file reports it
            try:
                stat = os.lstat(path)
            except OSError:
                continue
            if not S_ISLNK(stat.st_mode):  # where a link points is not in its size/mtime
                stats[str(path)] = (path, stat)
        names = list(stats)
        rows = []
        for start in range(0, len(names), 500):  # SQLite's limit on parameters is 999 or more
            part = names[start : start + 500]
            rows += self.db.execute(
                f"SELECT path, {', '.join(_COLUMNS)} FROM {TABLE} "
                f"WHERE channels=? AND path IN ({', '.join('?' * len(part))})",
                (self.channels, *part),
            ).fetchall()
        for row in rows:
            path, stat = stats[row[0]]
            check = FileCheck(*row)
            if (check.size, check.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                continue
            if self.perceptual and check.reason is None and check.dhash is None:
                continue
            self.hits += 1
            found[path] = replace(check, convert=bool(check.convert))
        return found

    def put(self, checks: Iterable[FileCheck]) -> None:
        # Unreadable files can become readable without a new mtime (chmod): never cached.
        rows = [
            (c.path, self.channels, *(getattr(c, k) for k in _COLUMNS))
            for c in checks
            # ...nor results that depend on settings outside the key (data.max_pixels).
            if c.reason not in ("unreadable", "symlink_outside", "bad_name", "too_many_pixels")
        ]
        self.db.executemany(
            f"INSERT OR REPLACE INTO {TABLE} VALUES ({', '.join('?' * (len(_COLUMNS) + 2))})",
            rows,
        )
        # A commit syncs the file to disk, which costs more than checking a chunk of small
        # images: commit every few seconds (a killed run loses only those results).
        if time.monotonic() - self.committed > COMMIT_EVERY_S:
            self.commit()

    def commit(self) -> None:
        self.db.commit()
        self.committed = time.monotonic()

    def close(self) -> None:
        self.commit()
        self.db.close()


def check_all(
    files: Iterable[Path],
    root: Path,
    cache: CheckCache,
    pool: ThreadPoolExecutor,
    desc: str,
    max_pixels: int | None = None,
) -> Iterator[FileCheck]:
    """Check results in file order, `CHUNK` files at a time on the pool, cached ones skipped.
    The next chunk is looked up (links, cache) while the pool checks the current one."""

    def check(batch: list[Path]) -> list[FileCheck]:
        channels, perceptual = cache.channels, cache.perceptual
        return validate.check_files(batch, root, channels, perceptual, max_pixels, placed=True)

    resolved: dict = {}  # folders -> where they resolve to, for where_problem

    def start(chunk: list[Path]) -> tuple:
        # A bad name or a link out of the root first (never cached), then the cache.
        cached = {p: validate.where_problem(p, root, resolved) for p in chunk}
        cached.update(cache.get_many([p for p, c in cached.items() if c is None]))
        todo = [p for p, c in cached.items() if c is None]
        # Tasks of BATCH files: one task per file spends its time on the pool's locks.
        tasks = [pool.submit(check, todo[i : i + BATCH]) for i in range(0, len(todo), BATCH)]
        return chunk, cached, todo, tasks

    def finish(chunk, cached, todo, tasks) -> Iterator[FileCheck]:
        fresh = dict(zip(todo, (c for task in tasks for c in task.result()), strict=True))
        cache.put(fresh.values())
        bar.update(len(chunk))
        for path in chunk:
            yield cached[path] or fresh[path]

    files = iter(files)
    with tqdm(desc=desc, unit="file", mininterval=2) as bar:
        running = None
        while chunk := list(islice(files, CHUNK)):
            started = start(chunk)
            if running:
                yield from finish(*running)
            running = started
        if running:
            yield from finish(*running)


# --- the report and the view ----------------------------------------------------------------


class Report:
    """outputs/ingest_report.csv, written row by row: path, part, reason, detail."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self.writer = csv.writer(self.file)
        self.writer.writerow(["path", "part", "reason", "detail"])
        self.counts: Counter = Counter()

    def add(self, path: str, part: str, reason: str, detail: str = "") -> None:
        self.writer.writerow([validate.printable(path), part, reason, validate.printable(detail)])
        self.counts[reason] += 1

    def close(self) -> None:
        self.file.close()


def place(check: FileCheck, target: Path, link: str, channels: int) -> None:
    """Put one usable file into the view; the source is only ever read."""
    source = Path(check.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if check.convert:
        target.write_bytes(validate.encode_png(source.read_bytes(), channels))
    elif link == "symlink":
        target.symlink_to(source.resolve())
    elif link == "hardlink":
        try:
            os.link(source.resolve(), target)
        except OSError as exc:  # another file system, or links not allowed: copy instead
            log.debug("hard link failed for %s (%s); copying", source, exc)
            shutil.copyfile(source, target)
    else:
        shutil.copyfile(source, target)


def guard_overlap(user_roots: Iterable[Path], view_roots: Iterable[Path]) -> None:
    """The view is rebuilt from scratch: it must never contain, or sit inside, a user folder."""
    for user in user_roots:
        for view in view_roots:
            u, v = user.resolve(), view.resolve()
            if u == v or u.is_relative_to(v) or v.is_relative_to(u):
                raise PseudoLabelError(
                    f"{user}: your folder overlaps {view}, which ingest rebuilds from scratch. "
                    "Keep your images elsewhere (e.g. data/user/labeled and data/user/unlabeled) "
                    "and point data.labeled_root / data.unlabeled_root there."
                )


def _usable(check: FileCheck, data) -> str | None:
    if check.reason is None and min(check.height, check.width) < data.min_size:
        return "too_small"
    if check.reason is None and check.height * check.width > data.max_pixels:
        return "too_many_pixels"  # cached before data.max_pixels was lowered
    return check.reason


class _Ingest:
    """One run: the pool, the cache, the report and the duplicate index, shared by the parts."""

    def __init__(self, data, cache: CheckCache, report: Report, pool: ThreadPoolExecutor):
        self.data, self.cache, self.report, self.pool = data, cache, report, pool
        self.db = cache.db
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS eval (sha TEXT PRIMARY KEY, path TEXT)")
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS seen (sha TEXT PRIMARY KEY, path TEXT)")
        self.eval_dhash = np.zeros(0, dtype=np.int64)
        self.outcome = Outcome()

    def checked(self, files: Iterable[Path], root: Path, part: str) -> Iterator[FileCheck]:
        """Usable files only; the rest go to the report."""
        desc = f"ingest: checking {part}"
        limit = self.data.max_pixels
        for check in check_all(files, root, self.cache, self.pool, desc, limit):
            reason = _usable(check, self.data)
            if reason:
                detail = check.detail or {
                    "too_small": f"{check.height}x{check.width} < {self.data.min_size}",
                    "too_many_pixels": f"{check.height}x{check.width} > {limit} pixels",
                }.get(reason, "")
                self.report.add(check.path, part, reason, detail)
            else:
                yield check

    def check_labeled(
        self, per_class: dict[str, list[Path]], root: Path, part: str
    ) -> dict[str, list[FileCheck]]:
        """Usable files of one labeled part by class (one progress bar per part)."""
        owner = {str(path): name for name, paths in per_class.items() for path in paths}
        kept: dict[str, list[FileCheck]] = {name: [] for name in per_class}
        for check in self.checked((p for ps in per_class.values() for p in ps), root, part):
            kept[owner[check.path]].append(check)
        return kept

    def index_eval(self, parts: dict[str, dict[str, list[FileCheck]]]) -> None:
        rows = [(c.sha256, c.path) for p in ("val", "test") for cs in parts[p].values() for c in cs]
        self.db.executemany("INSERT OR IGNORE INTO eval VALUES (?, ?)", rows)
        if self.data.near_duplicates:
            self.eval_dhash = np.array(
                [c.dhash for p in ("val", "test") for cs in parts[p].values() for c in cs],
                dtype=np.int64,
            )

    def eval_copy(self, check: FileCheck) -> tuple[str, str] | None:
        """(reason, detail) when `check` is an exact (or, if enabled, near) copy of val/test."""
        row = self.db.execute("SELECT path FROM eval WHERE sha=?", (check.sha256,)).fetchone()
        if row:
            return "leak_duplicate", f"same bytes as {row[0]}"
        if self.data.near_duplicates:
            distance = validate.hamming_min(self.eval_dhash, check.dhash)
            if distance <= self.data.near_duplicate_distance:
                return "leak_near_duplicate", f"perceptual hash {distance} bits from val/test"
        return None

    def write_labeled(self, parts: dict[str, dict[str, list[FileCheck]]], view: Path) -> None:
        for part, per_class in parts.items():
            self.outcome.per_class[part] = {}
            for name, checks in per_class.items():
                if part == "train":
                    for check in checks:
                        copy = self.eval_copy(check)
                        if copy:
                            self.report.add(check.path, part, "warning_train_duplicate", copy[1])
                used = set()
                for check in checks:
                    target = view / part / name / validate.view_name(Path(check.path).name, check)
                    while target.name in used:  # same name from different sub-folders
                        target = target.with_name("_" + target.name)
                    used.add(target.name)
                    self.place(check, target, part)
                self.outcome.per_class[part][name] = len(checks)

    def place(self, check: FileCheck, target: Path, part: str) -> None:
        place(check, target, self.data.link, self.data.channels)
        self.outcome.converted += check.convert
        if check.orientation != 1:  # phone photos: reported, so nobody wonders why
            detail = f"EXIF orientation {check.orientation}; upright in {target.name}"
            self.report.add(check.path, part, "warning_exif_rotated", detail)

    def write_unlabeled(self, root: Path, view: Path) -> None:
        for check in self.checked(validate.walk_files(root), root, "unlabeled"):
            copy = self.eval_copy(check)
            if copy:
                self.report.add(check.path, "unlabeled", *copy)
                continue
            cur = self.db.execute(
                "INSERT OR IGNORE INTO seen VALUES (?, ?)", (check.sha256, check.path)
            )
            if cur.rowcount == 0:
                first = self.db.execute(
                    "SELECT path FROM seen WHERE sha=?", (check.sha256,)
                ).fetchone()[0]
                self.report.add(check.path, "unlabeled", "duplicate", f"same bytes as {first}")
                continue
            rel = Path(check.path).relative_to(root)
            target = view / rel.parent / validate.view_name(rel.name, check)
            self.place(check, target, "unlabeled")
            self.outcome.unlabeled += 1


def ingest_folder(
    data,
    seed: int,
    labeled_view: Path,
    unlabeled_view: Path,
    report_path: Path,
    cache_path: Path,
) -> Outcome:
    """Validate the user's folders and write the normalised view; see the module docstring.

    Raises PseudoLabelError for layout problems (before writing), for a class left without
    usable images, and for an unlabeled folder with no usable image (after the report).
    """
    labeled_root, unlabeled_root = Path(data.labeled_root), Path(data.unlabeled_root)
    classes, files = discover(labeled_root)
    _require_dir(
        unlabeled_root,
        "unlabeled",
        "Set data.unlabeled_root to the folder of images to pseudo-label (any nesting).",
    )
    guard_overlap([labeled_root, unlabeled_root], [labeled_view, unlabeled_view])
    # The new view is built beside the old one and swapped in only when complete: a class left
    # without usable images, an error or a kill half-way leaves the previous view whole.
    building = {
        view: view.with_name(f".{view.name}.building") for view in (labeled_view, unlabeled_view)
    }
    for folder in building.values():
        if folder.exists():
            shutil.rmtree(folder)  # a killed run's leftovers
    try:
        outcome = _ingest(
            data,
            seed,
            labeled_root,
            unlabeled_root,
            files,
            building[labeled_view],
            building[unlabeled_view],
            report_path,
            cache_path,
        )
    except BaseException:
        for folder in building.values():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    for view, new in building.items():
        swap_folder(new, view)
    log.info("ingest: %d classes %s; report: %s", len(classes), classes, dict(outcome.reasons))
    return outcome


def _ingest(
    data,
    seed,
    labeled_root,
    unlabeled_root,
    files,
    labeled_view,
    unlabeled_view,
    report_path,
    cache_path,
) -> Outcome:
    """Check every file and write the view into `labeled_view` / `unlabeled_view`."""
    cache = CheckCache(cache_path, data.channels, data.near_duplicates)
    report = Report(report_path)
    workers = data.workers or os.cpu_count() or 1
    # PIL's own bomb guard at the same limit (it warns above it, raises above twice it);
    # validate.too_many_pixels turns both into a report reason. Restored afterwards.
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, data.max_pixels
    try:
        with ThreadPoolExecutor(workers) as pool:
            run = _Ingest(data, cache, report, pool)
            kept = {part: run.check_labeled(pc, labeled_root, part) for part, pc in files.items()}
            _require_usable(kept, labeled_root)
            missing = [p for p in ("val", "test") if p not in kept]
            if missing:
                fractions = {"val": data.val_fraction, "test": data.test_fraction}
                kept = {**kept, **split_train(kept["train"], missing, fractions, seed)}
            run.index_eval(kept)
            run.write_labeled({p: kept[p] for p in PARTS}, labeled_view)
            run.write_unlabeled(unlabeled_root, unlabeled_view)
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
        report.close()
        cache.close()
    run.outcome.reasons = report.counts
    if run.outcome.unlabeled == 0:
        raise PseudoLabelError(
            f"{unlabeled_root}: no usable unlabeled image (see {report_path} for why each file "
            "was left out). Add JPEG/PNG/BMP/GIF/WebP images there."
        )
    return run.outcome


def _require_usable(kept: dict[str, dict[str, list[FileCheck]]], root: Path) -> None:
    empty = [f"{part}/{name}" for part, pc in kept.items() for name, cs in pc.items() if not cs]
    if empty:
        raise PseudoLabelError(
            f"{root}: no usable image in {', '.join(empty)} (see the ingest report for why). "
            "Add valid images to those class folders."
        )
