import hashlib

import numpy as np
import pandas as pd
import pytest

from pseudolabel.data.images import list_images
from pseudolabel.errors import PseudoLabelError
from pseudolabel.merged_set import build_merged, select
from pseudolabel.predicting import read_csv, to_frame, write_csv

CLASSES = [f"digit_{i}" for i in range(10)]


def _digest(folder):
    return {p: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def _frame(paths, confidences, labels):
    probs = np.full((len(paths), 10), 0.0)
    for row, (conf, label) in enumerate(zip(confidences, labels, strict=True)):
        probs[row] = (1 - conf) / 9
        probs[row, CLASSES.index(label)] = conf
    return to_frame(paths, probs, CLASSES)


def test_frame_has_name_confidence_and_probabilities():
    frame = _frame(["b.png", "a.png"], [0.9, 0.5], ["digit_1", "digit_2"])
    assert list(frame.columns[:3]) == ["path", "label", "confidence"]
    assert list(frame["path"]) == ["a.png", "b.png"]  # sorted by path
    assert [c for c in frame.columns if c.startswith("prob_")] == [f"prob_{c}" for c in CLASSES]
    assert np.allclose(frame.filter(like="prob_").sum(axis=1), 1.0)


def test_select_threshold_and_null_keeps_all():
    frame = _frame(["a", "b", "c"], [0.2, 0.8, 0.95], ["digit_0"] * 3)
    assert list(select(frame, 0.8)["path"]) == ["b", "c"]
    assert len(select(frame, None)) == 3


def test_csv_round_trip_is_atomic(tmp_path):
    frame = _frame(["x/1.png"], [0.7], ["digit_3"])
    write_csv(frame, tmp_path / "data.csv")
    assert not list(tmp_path.glob("*.tmp"))
    assert read_csv(tmp_path / "data.csv")["label"].tolist() == ["digit_3"]


def test_merge_copies_never_touches_originals_and_rebuilds(digits_data, tmp_path):
    unlabeled = list_images(digits_data.unlabeled)[:6]
    rel = [p.name for p in unlabeled]
    frame = _frame(rel, [0.99, 0.9, 0.5, 0.95, 0.99, 0.1], ["digit_1"] * 6)
    before = _digest(digits_data.labeled) | _digest(digits_data.unlabeled)
    out = tmp_path / "train_ssl"
    (out / "digit_1").mkdir(parents=True)
    (out / "digit_1" / "stale.png").write_bytes(b"old")
    counts = build_merged(
        digits_data.train, digits_data.unlabeled, select(frame, 0.9), out, CLASSES
    )
    assert _digest(digits_data.labeled) | _digest(digits_data.unlabeled) == before
    assert not (out / "digit_1" / "stale.png").exists()
    assert counts["digit_1"]["pseudo"] == 4 and counts["digit_0"]["pseudo"] == 0
    assert len(list_images(out / "digit_1")) == counts["digit_1"]["labeled"] + 4
    assert all(unl.exists() for unl in unlabeled)  # copied, not moved


def test_merge_never_overwrites_a_name_twice(tmp_path):
    train = tmp_path / "train"
    unlabeled = tmp_path / "unlabeled"
    for folder in (train / "digit_0", unlabeled / "a", unlabeled / "a__b"):
        folder.mkdir(parents=True)
    (train / "digit_0" / "x.png").write_bytes(b"labeled")
    (unlabeled / "a" / "b__x.png").write_bytes(b"one")
    (unlabeled / "a__b" / "x.png").write_bytes(b"two")  # flattens to the same name
    frame = _frame(["a/b__x.png", "a__b/x.png"], [0.9, 0.9], ["digit_0", "digit_0"])
    build_merged(train, unlabeled, frame, tmp_path / "out", CLASSES[:1] + [])
    contents = sorted(p.read_bytes() for p in (tmp_path / "out" / "digit_0").iterdir())
    assert contents == [b"labeled", b"one", b"two"]


@pytest.mark.parametrize(
    ("path", "label", "match"),
    [("../outside.png", "digit_0", "not a file inside"), ("x.png", "cat", "unknown class")],
)
def test_merge_refuses_a_hand_edited_csv(tmp_path, path, label, match):
    (tmp_path / "train" / "digit_0").mkdir(parents=True)
    (tmp_path / "unlabeled").mkdir()
    (tmp_path / "outside.png").write_bytes(b"x")
    (tmp_path / "unlabeled" / "x.png").write_bytes(b"x")
    frame = pd.DataFrame({"path": [path], "label": [label], "confidence": [0.9]})
    with pytest.raises(PseudoLabelError, match=match):
        build_merged(
            tmp_path / "train", tmp_path / "unlabeled", frame, tmp_path / "out", ["digit_0"]
        )
    assert not (tmp_path / "out").exists()  # nothing written


def test_merge_refuses_to_write_over_its_inputs(digits_data):
    with pytest.raises(PseudoLabelError, match="overlaps"):
        build_merged(
            digits_data.train, digits_data.unlabeled, _frame([], [], []), digits_data.train, CLASSES
        )
