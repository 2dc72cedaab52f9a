"""Built-in labeled sources as arrays: Fashion-MNIST (Debian's IDX files) and sklearn digits."""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pseudolabel.errors import PseudoLabelError

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)


@dataclass
class ArraySource:
    """Images as uint8 arrays (N, H, W), integer labels, and class names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    class_names: tuple[str, ...]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(idx_dir: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (idx_dir / name).is_file():
            return idx_dir / name
    return None


def fashion_mnist(idx_dir: str | Path) -> ArraySource:
    """Fashion-MNIST from IDX files; falls back to Keras's download when they are absent."""
    idx_dir = Path(idx_dir)
    stems = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    files = [_find_idx(idx_dir, stem) for stem in stems]
    if all(files):
        arrays = [_read_idx(f) for f in files]  # type: ignore[arg-type]
    else:
        log.info("No IDX files in %s; trying keras.datasets.fashion_mnist (network)", idx_dir)
        try:
            import keras

            (x, y), (xt, yt) = keras.datasets.fashion_mnist.load_data()
            arrays = [x, y, xt, yt]
        except Exception as exc:  # any network / download failure
            raise PseudoLabelError(
                f"Fashion-MNIST not found in {idx_dir} and the download failed ({exc}). Fix: "
                "`apt-get install dataset-fashion-mnist` (Debian), or allow network access for "
                "keras.datasets.fashion_mnist, or set data.idx_dir to a folder with the IDX files."
            ) from None
    return ArraySource(
        arrays[0],
        arrays[1].astype(np.int64),
        arrays[2],
        arrays[3].astype(np.int64),
        FASHION_MNIST_CLASSES,
    )


def digits() -> ArraySource:
    """scikit-learn's 8x8 digits, scaled from 0..16 to 0..255; no separate test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    names = tuple(f"digit_{i}" for i in range(10))
    return ArraySource(images, bunch.target.astype(np.int64), None, None, names)


def load(source: str, idx_dir: str | Path) -> ArraySource:
    if source == "fashion_mnist":
        return fashion_mnist(idx_dir)
    if source == "digits":
        return digits()
    raise PseudoLabelError(f"data.source={source!r}: unknown; use fashion_mnist or digits.")
