import gzip
import struct

import numpy as np
import pytest

from pseudolabel.data import sources
from pseudolabel.data.images import class_names_from, list_images, require_images
from pseudolabel.data.layout import split_indices
from pseudolabel.errors import PseudoLabelError


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", n) for n in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_debian_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 12)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    source = sources.fashion_mnist(tmp_path)
    assert source.train_images.shape == (30, 28, 28) and source.test_images.shape == (12, 28, 28)
    assert list(source.train_labels[:3]) == [0, 1, 2]
    assert source.class_names[0] == "tshirt_top" and len(source.class_names) == 10


def test_missing_fashion_mnist_names_both_fixes(tmp_path, monkeypatch):
    import keras

    def offline():
        raise OSError("no network")

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(PseudoLabelError, match="apt-get install dataset-fashion-mnist"):
        sources.fashion_mnist(tmp_path)


def test_split_is_balanced_seeded_and_disjoint():
    source = sources.digits()
    split = split_indices(source, 5, 3, 4, 300, seed=1)
    again = split_indices(source, 5, 3, 4, 300, seed=1)
    assert np.array_equal(split.unlabeled, again.unlabeled)
    parts = [split.train, split.val, split.test, split.unlabeled]
    assert sum(map(len, parts)) == len(np.unique(np.concatenate(parts)))  # no overlap
    assert np.bincount(source.train_labels[split.train]).tolist() == [5] * 10
    assert len(split.unlabeled) == 300


def test_split_asks_for_too_much():
    with pytest.raises(PseudoLabelError, match="data.unlabeled"):
        split_indices(sources.digits(), 10, 10, 10, 5000, seed=0)


def test_ingest_writes_the_seed_layout(digits_data, smoke_cfg):
    for part in ("train", "val", "test"):
        assert class_names_from(digits_data.labeled / part) == [f"digit_{i}" for i in range(10)]
    assert len(list_images(digits_data.train)) == 10 * smoke_cfg.data.train_per_class
    unlabeled = list_images(digits_data.unlabeled)
    assert len(unlabeled) == smoke_cfg.data.unlabeled
    # Unlabeled file names must not leak the class.
    assert all(p.parent == digits_data.unlabeled and "digit" not in p.name for p in unlabeled)


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(PseudoLabelError, match="not found"):
        class_names_from(tmp_path / "missing")
    (tmp_path / "train").mkdir()
    with pytest.raises(PseudoLabelError, match="no class folders"):
        class_names_from(tmp_path / "train")
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    with pytest.raises(PseudoLabelError, match="cat"):
        class_names_from(tmp_path / "train")
    with pytest.raises(PseudoLabelError, match="no images"):
        require_images(tmp_path / "train", "unlabeled")


def test_mixup_blends_images_and_targets_of_a_batch():
    import tensorflow as tf

    from pseudolabel.data.images import with_mixup

    images = np.stack([np.full((4, 4, 1), 10.0 * i, np.float32) for i in range(16)])
    targets = np.eye(4, dtype=np.float32)[np.arange(16) % 4]
    ds = tf.data.Dataset.from_tensor_slices((images, targets)).batch(16)
    x, y = (t.numpy() for t in next(iter(with_mixup(ds, 0.4, seed=1))))
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)
    assert (y.max(axis=1) < 1.0 - 1e-4).any()  # some targets are blends
    assert x.min() >= 0.0 and x.max() <= 150.0 and not np.allclose(x, images)


def test_training_images_are_decoded_once_in_the_same_shuffled_order(
    digits_data, smoke_cfg, monkeypatch
):
    """A shuffled training set is kept decoded in memory after the first pass, and its batches
    (order and pixels, epoch after epoch) are those of reading ingest's decoded copy every pass
    and of decoding the files every pass."""
    from pseudolabel.data import decoded as decoded_copy
    from pseudolabel.data import images

    class_names = sorted(p.name for p in digits_data.train.iterdir() if p.is_dir())
    files, labels = images.labeled_files(digits_data.train, class_names)

    def two_epochs():
        size, channels = list(smoke_cfg.data.image_size), smoke_cfg.data.channels
        ds = images.labeled_dataset(files, labels, len(class_names), size, channels, 16, True, 7)
        return [(x.numpy(), y.numpy()) for _ in range(2) for x, y in ds]

    cached = two_epochs()  # ingest's decoded copy, read in order, kept in memory
    monkeypatch.setattr(images, "CACHE_BYTES", 0)  # too big: read again every pass
    streamed = two_epochs()  # rows of the decoded copy, read one by one in shuffled order
    monkeypatch.setattr(decoded_copy, "DIRNAME", ".no-copy")
    decoded = two_epochs()  # no copy: the files decoded every pass
    assert len(cached) == len(streamed) == len(decoded) > 2
    for (xa, ya), (xb, yb), (xc, yc) in zip(cached, streamed, decoded, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(xa, xc)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(ya, yc)
    half = len(cached) // 2
    epoch1 = np.concatenate([x for x, _ in cached[:half]])
    epoch2 = np.concatenate([x for x, _ in cached[half:]])
    assert not np.array_equal(epoch1, epoch2)  # reshuffled each epoch, in both ways alike


def test_ingest_decodes_each_folder_once_and_a_stale_copy_is_not_used(
    digits_data, smoke_cfg, tmp_path, caplog
):
    """ingest writes a uint8 copy of every folder's images (data.decoded) inside the folder,
    hidden from every listing; after a hand edit (a file replaced, one removed) readers decode the
    files instead, with a warning."""
    import shutil

    from PIL import Image

    from pseudolabel.data import decoded
    from pseudolabel.data.images import decode_image

    size, channels = list(smoke_cfg.data.image_size), smoke_cfg.data.channels
    for part in (digits_data.train, digits_data.val, digits_data.test, digits_data.unlabeled):
        files = list_images(part)
        rows = decoded.open_rows(part, files, size, channels)
        assert rows is not None and len(rows) == len(files)
        assert not any(decoded.DIRNAME in str(f) for f in files)
        first = decode_image(str(files[0]), size, channels).numpy()
        np.testing.assert_array_equal(rows.read(0, 1)[0], first.astype(np.uint8))
        assert rows.dataset().cardinality().numpy() == len(files)  # Keras sees the length
    assert class_names_from(digits_data.train) == [f"digit_{i}" for i in range(10)]

    folder = tmp_path / "unlabeled"
    shutil.copytree(digits_data.unlabeled, folder)
    files = list_images(folder)
    backwards = decoded.open_rows(folder, files[::-1], size, channels)  # any order, any subset
    np.testing.assert_array_equal(
        backwards.read(0, 2),
        decoded.open_rows(folder, files, size, channels).read(len(files) - 2, len(files))[::-1],
    )
    Image.new("L", (8, 8), 255).save(files[3])  # edited by hand: another size on disk
    with caplog.at_level("WARNING"):
        assert decoded.open_rows(folder, list_images(folder), size, channels) is None
    assert "no longer matches" in caplog.text
    assert decoded.build(folder, size, channels) == len(files)  # rebuilt: used again
    files[5].unlink()
    assert decoded.open_rows(folder, list_images(folder), size, channels) is not None  # a subset
    (folder / "extra.png").write_bytes(files[3].read_bytes())  # a file the copy never saw
    assert decoded.open_rows(folder, list_images(folder), size, channels) is None


def test_labeling_reads_the_decoded_copy_and_writes_the_same_predictions(
    digits_data, smoke_cfg, tmp_path, caplog
):
    import shutil

    import keras

    from pseudolabel import predicting
    from pseudolabel.data import decoded
    from pseudolabel.models.io import ModelMeta

    size, channels = list(smoke_cfg.data.image_size), smoke_cfg.data.channels
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((*size, channels)), keras.layers.Flatten(), keras.layers.Dense(10, "softmax")]
    )
    meta = ModelMeta([f"digit_{i}" for i in range(10)], size, channels)
    with caplog.at_level("INFO"):
        read, failed = predicting.predict_folder(model, meta, digits_data.unlabeled, 64)
    assert not failed and "decoded images from" in caplog.text
    folder = tmp_path / "unlabeled"
    shutil.copytree(digits_data.unlabeled, folder)
    shutil.rmtree(folder / decoded.DIRNAME)
    again, failed = predicting.predict_folder(model, meta, folder, 64)
    assert not failed
    assert read.equals(again)


def test_no_decoded_copy_when_switched_off(tmp_path):
    from pseudolabel.config import compose
    from pseudolabel.data import decoded
    from pseudolabel.paths import Paths
    from pseudolabel.stages.ingest import ingest

    paths = Paths(tmp_path)
    ingest(compose(["+experiment=smoke", "data.decoded_copy=false"]), paths)
    assert list_images(paths.unlabeled)
    assert not list(paths.root.rglob(decoded.DIRNAME))


def test_consistency_streams_read_the_same_batches_in_memory_or_not(
    digits_data, smoke_cfg, monkeypatch
):
    """The consistency student's endless streams: kept in memory (what fits), or with only
    names / rows in the shuffle buffer and each image read as drawn (sets beyond memory), from
    the decoded copy or the files: the same batches in the same order."""
    from pseudolabel import consistency
    from pseudolabel.data import decoded

    files = [str(p) for p in list_images(digits_data.unlabeled)]
    n = len(files)
    size, channels = list(smoke_cfg.data.image_size), smoke_cfg.data.channels
    rng = np.random.default_rng(0)
    teacher = rng.dirichlet(np.ones(10), n)
    accepted, truth = rng.random(n) > 0.5, rng.integers(0, 10, n)

    def batches():
        ds = consistency.unlabeled_stream(
            files, teacher, accepted, truth, size, channels, 64, seed=3
        )
        return [[t.numpy() for t in batch] for batch in ds.take(2 * n // 64 + 2)]

    kept = batches()
    monkeypatch.setattr(consistency, "fits_in_memory", lambda *a: False)
    drawn = batches()
    monkeypatch.setattr(decoded, "DIRNAME", ".no-copy")
    decoded_files = batches()
    for a, b, c in zip(kept, drawn, decoded_files, strict=True):
        for x, y, z in zip(a, b, c, strict=True):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(x, z)
