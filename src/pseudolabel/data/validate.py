"""One user file at a time: can training use it, decoded exactly as training decodes it?

`check_file` never writes: it reads the bytes once, hashes them (exact duplicates), decodes them
with `tf.io.decode_image(..., expand_animations=False)` like `images.decode_image`, and computes a
64-bit difference hash (near duplicates). The result names a reason when the file is unusable.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISBLK, S_ISCHR, S_ISFIFO, S_ISLNK, S_ISREG, S_ISSOCK
from typing import NamedTuple

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

from pseudolabel.data.images import IMAGE_EXTENSIONS

# Reason ids (CSV / metrics keys) -> what they mean. Files with these are left out of the view,
# except the warning, which is reported and kept.
REASONS = {
    "zero_byte": "empty file (0 bytes)",
    "not_an_image": "not an image file",
    "unsupported_format": "an image format TensorFlow does not decode (use JPEG/PNG/BMP/GIF/WebP)",
    "corrupt": "truncated or corrupt image that TensorFlow cannot decode",
    "too_small": "smaller than data.min_size",
    "symlink_outside": "symbolic link (or a file inside a linked folder) pointing outside its "
    "folder",
    "bad_name": "file name is not valid UTF-8 (rename it: it could not be written to a CSV)",
    "too_many_pixels": "more pixels than data.max_pixels (a possible decompression bomb)",
    "unreadable": "cannot be read (permissions, broken or looping link)",
    "leak_duplicate": "unlabeled copy of a val/test image (excluded: it would leak the test set)",
    "leak_near_duplicate": "unlabeled near-copy of a val/test image (excluded: leak)",
    "duplicate": "duplicate inside the unlabeled folder (the first copy is kept)",
    "warning_train_duplicate": "warning: train image identical to a val/test image (kept)",
    "warning_exif_rotated": "warning: EXIF orientation applied, the view holds the upright "
    "image as a PNG (kept; the original is untouched)",
}
WARNINGS = ("warning_train_duplicate", "warning_exif_rotated")

# Magic bytes of the formats TensorFlow's decode_image reads.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
_EXTENSION = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp"}


@dataclass(frozen=True)
class FileCheck:
    """What one file is: usable (reason None) or why not, plus what dedup and the view need."""

    path: str
    size: int = 0
    mtime_ns: int = 0
    reason: str | None = None
    detail: str = ""
    sha256: str = ""
    height: int = 0
    width: int = 0
    dhash: int | None = None  # perceptual hash, signed 64-bit; only with near_duplicates
    fmt: str = ""
    # TensorFlow decodes it only as RGB (GIF/BMP/WebP/CMYK JPEG with channels=1): the view then
    # holds a PNG converted by TensorFlow, so training and labeling decode the same pixels.
    convert: bool = False
    # The EXIF Orientation tag (1: upright, 2-8: flipped/rotated, as phones save photos).
    # TensorFlow's decoders ignore it, so an oriented file is converted (see `upright`).
    orientation: int = 1


def sniff(head: bytes) -> str | None:
    """The format TensorFlow would recognise from the first bytes, or None."""
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def view_name(name: str, check: FileCheck) -> str:
    """File name in the normalised view: a PNG when converted; an image extension always."""
    if check.convert:
        return name + ".png"
    if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
        return name
    return name + _EXTENSION[check.fmt]


@dataclass(frozen=True)
class Fingerprint:
    height: int
    width: int
    dhash: int | None  # 64-bit difference hash as a signed int (SQLite's INTEGER)
    converted: bool  # decoded as RGB and converted to grey (see FileCheck.convert)


def _png_size(raw: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk (always the first), or None when malformed."""
    if raw[8:16] != b"\x00\x00\x00\rIHDR" or len(raw) < 24:
        return None
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


# PIL reads a PNG's EXIF (and XMP orientation) only from these chunks; a PNG without them is
# upright, and PIL would decode the whole image to find that out.
_PNG_METADATA = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")


def exif_orientation(raw: bytes) -> int:
    """The EXIF Orientation tag of image bytes (1 when absent or unreadable), from the header
    only: nothing is decoded."""
    if raw.startswith(b"\x89PNG") and not any(chunk in raw for chunk in _PNG_METADATA):
        return 1
    try:
        with Image.open(io.BytesIO(raw)) as img:
            value = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - no readable EXIF: upright
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(image: np.ndarray, orientation: int) -> np.ndarray:
    """An (H, W, C) image as a viewer shows it: the EXIF orientation applied, as PIL's
    ImageOps.exif_transpose does."""
    transpose = lambda a: a.transpose(1, 0, 2)  # noqa: E731 - swap rows and columns
    turn = {
        2: lambda a: a[:, ::-1],  # mirrored left-right
        3: lambda a: a[::-1, ::-1],  # upside down
        4: lambda a: a[::-1],  # mirrored top-bottom
        5: transpose,
        6: lambda a: np.rot90(a, -1),  # a quarter turn clockwise
        7: lambda a: transpose(a)[::-1, ::-1],
        8: lambda a: np.rot90(a, 1),  # a quarter turn counter-clockwise
    }.get(orientation)
    return np.ascontiguousarray(turn(image)) if turn else image


def _decode(raw: bytes, channels: int) -> np.ndarray:
    return tf.io.decode_image(raw, channels=channels, expand_animations=False).numpy()


def difference_hash(grey: np.ndarray) -> int:
    """64-bit dHash of a grey (H, W, 1) uint8 image, as a signed int (SQLite's INTEGER)."""
    small = Image.fromarray(grey[..., 0]).resize((9, 8), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.int16)
    packed = np.packbits((pixels[:, 1:] > pixels[:, :-1]).ravel()).tobytes()
    return int(np.frombuffer(packed, dtype=">i8")[0])


def fingerprint(
    raw: bytes, channels: int, perceptual: bool = True, orientation: int = 1
) -> Fingerprint:
    """Size (and perceptual hash) of image bytes as training decodes them, upright (the EXIF
    `orientation` applied); raises tf.errors.OpError when TensorFlow cannot decode them. Eager
    ops: a tf.function call costs more than decoding a small image."""
    converted = orientation != 1  # the view holds the upright PNG
    try:
        image = _decode(raw, channels)
    except tf.errors.OpError:
        if channels != 1:
            raise
        image, converted = _decode(raw, 3), True
    image = upright(image, orientation)
    dhash = None
    if perceptual:
        grey = image if image.shape[-1] == 1 else tf.image.rgb_to_grayscale(image).numpy()
        dhash = difference_hash(grey)
    return Fingerprint(int(image.shape[0]), int(image.shape[1]), dhash, converted)


def encode_png(raw: bytes, channels: int) -> bytes:
    """The PNG the view holds for a converted file: TensorFlow's RGB decode, upright (EXIF
    orientation applied), made grey when `channels` is 1."""
    rgb = upright(_decode(raw, 3), exif_orientation(raw))
    image = tf.image.rgb_to_grayscale(rgb) if channels == 1 else rgb
    return tf.io.encode_png(image).numpy()


def _unidentified_reason(raw: bytes) -> str:
    """A file with no TensorFlow image signature: another image format, or not an image."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            return "unsupported_format" if img.format else "not_an_image"
    except (UnidentifiedImageError, OSError, ValueError):
        return "not_an_image"


def _symlink_problem(path: Path, root: Path) -> FileCheck | None:
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        return FileCheck(str(path), reason="unreadable", detail=f"broken link: {exc}")
    if not target.is_relative_to(root.resolve()):
        return FileCheck(str(path), reason="symlink_outside", detail=f"-> {target}")
    return None


def utf8_name(path: Path | str) -> bool:
    """False for a name that was not valid UTF-8 on disk (Python keeps its bytes as surrogate
    escapes, which no UTF-8 CSV, SQLite text or later stage can hold)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(path: Path | str) -> str:
    """A path as text any UTF-8 file can hold: undecodable bytes shown as \\xNN."""
    raw = os.fsencode(str(path))
    return raw.decode("utf-8", errors="backslashreplace")


def _outside(path: Path, root: Path) -> FileCheck | None:
    """A file that resolves outside `root` through any linked folder on the way (a link to a
    class folder elsewhere, say), not only a link of its own."""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None  # the open below reports it
    if not target.is_relative_to(root.resolve()):
        return FileCheck(str(path), reason="symlink_outside", detail=f"-> {target}")
    return None


def where_problem(path: Path, root: Path, resolved: dict | None = None) -> FileCheck | None:
    """What is wrong with a file's name or location, before its bytes are read: a name that is
    not UTF-8, or a link (its own, or a linked folder on the way) out of `root`. Never cached:
    the file's size and mtime do not change when a link does.

    `resolved`: where folders resolve to, filled in as it goes, for checking many files of the
    same folders in one pass (a file that is not a link is where its folder resolves to)."""
    if not utf8_name(path):
        return FileCheck(str(path), reason="bad_name", detail=printable(path))
    if resolved is None:
        if path.is_symlink():
            return _symlink_problem(path, root)
        return _outside(path, root)
    try:
        if S_ISLNK(os.lstat(path).st_mode):
            return _symlink_problem(path, root)
        if root not in resolved:
            resolved[root] = os.path.realpath(root)
        folder, name = os.path.split(path)
        if folder not in resolved:
            resolved[folder] = os.path.realpath(folder, strict=True)
    except (OSError, RuntimeError):
        return _outside(path, root)  # gone or unreadable: decided as without `resolved`
    target, inside = os.path.join(resolved[folder], name), resolved[root]
    if not target.startswith(inside if inside.endswith(os.sep) else inside + os.sep):
        return FileCheck(str(path), reason="symlink_outside", detail=f"-> {target}")
    return None


def too_many_pixels(raw: bytes, max_pixels: int | None, key: str = "data.max_pixels") -> str | None:
    """A detail when the image's header declares more than `max_pixels` pixels (the setting
    `key`), read by PIL without decoding (a decompression bomb would exhaust memory in
    TensorFlow's decoder)."""
    if max_pixels is None:
        return None
    size = _png_size(raw) if raw.startswith(b"\x89PNG") else None
    pil_limit = Image.MAX_IMAGE_PIXELS or max_pixels
    if size and size[0] * size[1] <= min(max_pixels, pil_limit):
        return None  # what PIL would answer, without its parser's cost
    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"{exc}"[:200]
    except Exception:  # noqa: BLE001 - PIL cannot read the header: TensorFlow's decode decides
        return None
    if width * height > max_pixels:
        return f"{height}x{width} = {width * height} pixels > {key}={max_pixels}"
    return None


def _kind(mode: int) -> str:
    for test, name in (
        (S_ISFIFO, "a FIFO"),
        (S_ISSOCK, "a socket"),
        (S_ISCHR, "a character device"),
        (S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a file"


class _Read(NamedTuple):
    """A file read and sniffed, waiting for its decode."""

    base: dict
    raw: bytes
    fmt: str
    orientation: int


def _read_bytes(path: Path, size: int) -> bytes:
    """A file's bytes, to its end (os.read: a buffered file object costs more than reading a
    small image)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = []
        while part := os.read(fd, max(size, 1 << 16) + 1):
            parts.append(part)
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read(path: Path, max_pixels: int | None) -> FileCheck | _Read:
    """Everything before the decode: stat, read, sniff, the pixel limit, EXIF orientation."""
    path_str = str(path)
    try:
        stat = path.stat()
        if not S_ISREG(stat.st_mode):  # opening a FIFO would wait for a writer forever
            return FileCheck(
                path_str, reason="unreadable", detail=f"not a regular file ({_kind(stat.st_mode)})"
            )
        raw = _read_bytes(path, stat.st_size)
    except OSError as exc:
        return FileCheck(path_str, reason="unreadable", detail=exc.strerror or str(exc))
    base = {"path": path_str, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if not raw:
        return FileCheck(**base, reason="zero_byte")
    fmt = sniff(raw[:16])
    if fmt is None:
        return FileCheck(**base, reason=_unidentified_reason(raw))
    bomb = too_many_pixels(raw, max_pixels)
    if bomb:
        return FileCheck(**base, reason="too_many_pixels", detail=bomb, fmt=fmt)
    return _Read(base, raw, fmt, exif_orientation(raw))


def _decoded(read: _Read, found: Fingerprint) -> FileCheck:
    return FileCheck(
        **read.base,
        sha256=hashlib.sha256(read.raw).hexdigest(),
        height=found.height,
        width=found.width,
        dhash=found.dhash,
        fmt=read.fmt,
        convert=found.converted,
        orientation=read.orientation,
    )


def _finish(read: _Read, channels: int, perceptual: bool) -> FileCheck:
    """The decode of one read file, as training decodes it (eager, one file)."""
    try:
        found = fingerprint(read.raw, channels, perceptual, read.orientation)
    except tf.errors.OpError as exc:
        detail = exc.message.strip().splitlines()[-1][:200] if exc.message else ""
        return FileCheck(
            **read.base, reason="corrupt", detail=f"{read.fmt}: {detail}", fmt=read.fmt
        )
    return _decoded(read, found)


def check_file(
    path: Path,
    root: Path,
    channels: int,
    perceptual: bool = False,
    max_pixels: int | None = None,
) -> FileCheck:
    """Check one file under `root` (the user folder it belongs to); never raises for bad data.
    `perceptual`: also compute the perceptual hash (for near-duplicate checks). `max_pixels`:
    refuse larger images from their header, before anything decodes them."""
    problem = where_problem(path, root)
    if problem:
        return problem
    read = _read(path, max_pixels)
    return read if isinstance(read, FileCheck) else _finish(read, channels, perceptual)


_GRAPH_BATCH = 64  # images per graph call (a shorter list is padded)


@functools.cache
def _sizes_of(channels: int):
    """A graph that decodes `_GRAPH_BATCH` images and returns their (height, width): the same
    decoder as `_decode`, without eager dispatch per file, which costs more than decoding a
    small image. One decode node per image, not a loop: the graph runs them side by side."""

    @tf.function(input_signature=[tf.TensorSpec([_GRAPH_BATCH], tf.string)])
    def sizes(raws: tf.Tensor) -> tf.Tensor:
        decode = functools.partial(tf.io.decode_image, channels=channels, expand_animations=False)
        return tf.stack([tf.shape(decode(raws[i]))[:2] for i in range(_GRAPH_BATCH)])

    return sizes


def _sizes(raws: list[bytes], channels: int) -> list[tuple[int, int] | None]:
    """(height, width) of each image, None for every image of a graph call that failed."""
    out: list = []
    for start in range(0, len(raws), _GRAPH_BATCH):
        part = raws[start : start + _GRAPH_BATCH]
        padded = part + part[-1:] * (_GRAPH_BATCH - len(part))
        try:
            out += _sizes_of(channels)(tf.constant(padded)).numpy()[: len(part)].tolist()
        except tf.errors.OpError:
            out += [None] * len(part)  # one fails: each is decoded alone, for its own reason
    return out


def check_files(
    paths: list[Path],
    root: Path,
    channels: int,
    perceptual: bool = False,
    max_pixels: int | None = None,
    placed: bool = False,
) -> list[FileCheck]:
    """`check_file` for many files, with the same results: upright PNG and JPEG files that need
    only their size are decoded together in one graph call; the rest, and every file of a batch
    in which one does not decode, one at a time as `check_file` does. `placed`: `where_problem`
    already found nothing for each of `paths`."""
    resolved: dict = {}
    out: list[FileCheck | _Read] = []
    for path in paths:
        problem = None if placed else where_problem(path, root, resolved)
        out.append(problem or _read(path, max_pixels))
    together = [
        i
        for i, r in enumerate(out)
        if isinstance(r, _Read)
        and not perceptual
        and r.orientation == 1
        and r.fmt in ("PNG", "JPEG")
    ]
    sizes = _sizes([out[i].raw for i in together], channels) if together else []
    for i, size in zip(together, sizes, strict=True):
        if size is not None:
            out[i] = _decoded(out[i], Fingerprint(*size, None, False))
    return [r if isinstance(r, FileCheck) else _finish(r, channels, perceptual) for r in out]


def hamming_min(values: np.ndarray, value: int) -> int:
    """Smallest bit distance between `value` and any 64-bit hash in `values` (int64)."""
    if values.size == 0:
        return 64
    differing = values.astype(np.int64) ^ np.int64(value)
    return int(np.unpackbits(differing.view(np.uint8).reshape(-1, 8), axis=1).sum(1).min())


def is_visible(name: str) -> bool:
    """Hidden files and folders (.DS_Store, .ipynb_checkpoints, dot-files) are ignored."""
    return not name.startswith(".")


def walk_files(root: Path):
    """Every visible file (and file symlink) under `root`, any depth, in a stable order; a
    streaming walk, so memory does not grow with the number of files."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if is_visible(d))
        for name in sorted(files):
            if is_visible(name):
                yield Path(folder) / name
        for name in dirs:
            # os.walk lists a symlinked folder but does not enter it: one that points elsewhere
            # is yielded so that it is reported, not silently skipped.
            link = Path(folder) / name
            if link.is_symlink() and _symlink_problem(link, root):
                yield link
