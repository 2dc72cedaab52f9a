"""A decoded copy of an image folder, so that later stages read pixels instead of decoding files.

`build` (run by ingest) writes every image of a folder as `decode_image` returns it, rounded to
uint8, into one array file inside the folder's hidden `.decoded/` sub-folder:

    data/unlabeled/.decoded/28x28x1.npy    (N, 28, 28, 1) uint8, rows in `list_images` order
    data/unlabeled/.decoded/28x28x1.json   image size, channels, each row's relative path and size

Being inside the folder, the copy is versioned by DVC with the folder (the same stage output, the
same hash), travels with it through `dvc push`/`pull`, and can never be paired with another
folder's images; `list_images` and the class-folder listing skip hidden entries, so nothing else
sees it. A user's own files are never touched: ingest writes it into the view it builds.

`open_rows` gives a reader the array and the row of each requested file, or None (decode the files
as before) when there is no copy at the wanted size, or when the folder no longer holds the files
it was made from (a name or a size differs: images edited by hand after ingest).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DIRNAME = ".decoded"


def _stem(image_size: Sequence[int], channels: int) -> str:
    return f"{int(image_size[0])}x{int(image_size[1])}x{int(channels)}"


def relative_path(path: Path | str, folder: Path | str) -> str:
    """`path` relative to `folder`, with / separators. Files listed from `folder` start with it,
    so a prefix is cut (os.path.relpath resolves both paths on every call: a fifth of labeling's
    time on 20,000 images)."""
    path, prefix = str(path), str(folder).rstrip(os.sep) + os.sep
    rel = path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, folder)
    return rel.replace(os.sep, "/")


def build(folder: Path, image_size: Sequence[int], channels: int, batch_size: int = 256) -> int:
    """Decode every image under `folder` once into `folder/.decoded/`; the number of images (0,
    and no copy, when the folder is empty or a file does not decode). Written atomically: the
    array and its index are renamed into place only when complete."""
    from pseudolabel.data.images import list_images, path_image_dataset

    files = list_images(folder)
    out = folder / DIRNAME
    stem = _stem(image_size, channels)
    for stale in out.glob(f"{stem}.*"):
        stale.unlink()
    if not files:
        return 0
    out.mkdir(exist_ok=True)
    shape = (len(files), int(image_size[0]), int(image_size[1]), int(channels))
    tmp = out / f".{stem}.npy.tmp"
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    done = 0
    wanted = [str(f) for f in files]
    for paths, images in path_image_dataset(wanted, image_size, channels, batch_size):
        got = [p.decode() for p in paths.numpy()]
        if got != wanted[done : done + len(got)]:  # a file failed to decode: no copy
            break
        array[done : done + len(got)] = np.clip(np.round(images.numpy()), 0, 255)
        done += len(got)
    array.flush()
    del array
    if done != len(files):
        tmp.unlink()
        log.warning("%s: a file did not decode; no decoded copy (stages decode the files)", folder)
        return 0
    index = {
        "image_size": list(shape[1:3]),
        "channels": shape[3],
        "files": [[relative_path(f, folder), f.stat().st_size] for f in files],
    }
    index_tmp = out / f".{stem}.json.tmp"
    index_tmp.write_text(json.dumps(index), encoding="utf-8")
    os.replace(tmp, out / f"{stem}.npy")
    os.replace(index_tmp, out / f"{stem}.json")
    return len(files)


class Rows:
    """The decoded array of a folder (memory-mapped, read in slices: memory stays flat however
    many images) and the rows of the files a caller asked for, in its order."""

    def __init__(self, array_path: Path, rows: np.ndarray) -> None:
        self.path = array_path
        self.rows = rows
        self._array = np.load(array_path, mmap_mode="r")
        self.shape = self._array.shape

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, start: int, stop: int) -> np.ndarray:
        """The images of requested files start..stop-1, uint8 (a copy, not a view)."""
        rows = self.rows[start:stop]
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
            # One contiguous read from the file: no page of the map stays resident.
            count = len(rows) * int(np.prod(self.shape[1:]))
            offset = self._array.offset + int(rows[0]) * int(np.prod(self.shape[1:]))
            flat = np.fromfile(self.path, dtype=np.uint8, count=count, offset=offset)
            return flat.reshape((len(rows), *self.shape[1:]))
        return np.asarray(self._array[rows])

    def batches(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, images) for consecutive batches of the requested files."""
        for start in range(0, len(self.rows), batch_size):
            yield start, self.read(start, min(start + batch_size, len(self.rows)))

    def dataset(self, batch_size: int = 1024):
        """A tf.data stream of the requested files' uint8 images, in order (read in batches)."""
        import tensorflow as tf

        spec = tf.TensorSpec((None, *self.shape[1:]), tf.uint8)
        batches = lambda: (images for _, images in self.batches(batch_size))  # noqa: E731
        ds = tf.data.Dataset.from_generator(batches, output_signature=spec).unbatch()
        # A generator's length is unknown to tf.data; Keras would warn "ran out of data" at the
        # end of every pass and show no total.
        return ds.apply(tf.data.experimental.assert_cardinality(len(self.rows)))

    def image(self, position):
        """tf.data map function: the uint8 image of requested file `position` (a scalar tensor),
        read alone from the file; for streams shuffled before they are read."""
        import tensorflow as tf

        read = lambda i: self.read(int(i), int(i) + 1)[0]  # noqa: E731
        image = tf.numpy_function(read, [position], tf.uint8, stateful=False)
        return tf.ensure_shape(image, self.shape[1:])


def open_rows(
    folder: Path, files: Sequence[str | Path], image_size: Sequence[int], channels: int
) -> Rows | None:
    """The decoded copy's rows for `files` (all under `folder`), or None to decode them."""
    stem = _stem(image_size, channels)
    array_path, index_path = folder / DIRNAME / f"{stem}.npy", folder / DIRNAME / f"{stem}.json"
    if not (array_path.is_file() and index_path.is_file()):
        return None
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        known = {rel: (row, size) for row, (rel, size) in enumerate(index["files"])}
        rows = np.empty(len(files), dtype=np.int64)
        for i, f in enumerate(files):
            row, size = known[relative_path(f, folder)]
            if os.stat(f).st_size != size:
                raise KeyError(f)
            rows[i] = row
        found = Rows(array_path, rows)
    except (KeyError, OSError, ValueError, TypeError):
        log.warning(
            "%s: the decoded copy in %s/ no longer matches the images (edited after ingest?); "
            "decoding the files instead. `dvc repro ingest` rebuilds it.",
            folder,
            DIRNAME,
        )
        return None
    if found.shape[0] != len(index["files"]):
        log.warning("%s: decoded copy incomplete; decoding the files instead", array_path)
        return None
    log.info("reading %d decoded images from %s", len(files), array_path)
    return found


def find(paths: Sequence[str], image_size: Sequence[int], channels: int) -> Rows | None:
    """`open_rows` for files anywhere under a folder with a decoded copy: the files' common folder
    or one of its three parents (e.g. data/image_dataset/train for train/<class>/<file>)."""
    if not len(paths):
        return None
    common = Path(os.path.commonpath([os.path.abspath(p) for p in paths]))
    index = f"{DIRNAME}/{_stem(image_size, channels)}.json"
    for folder in (common, *list(common.parents)[:3]):
        if (folder / index).is_file():
            return open_rows(folder, [os.path.abspath(p) for p in paths], image_size, channels)
    return None
