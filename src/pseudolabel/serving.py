"""The student as an MLflow pyfunc model that takes raw images (logged as code by evaluate).

This file is copied into the logged model and run by `mlflow.pyfunc.load_model` / `mlflow models
serve`: it imports nothing from this project, only numpy, pandas, Pillow, Keras and MLflow, so
the model loads wherever those are installed.

Input: a DataFrame whose first column (`image`) holds encoded PNG/JPEG/... files, as bytes
(`mlflow models serve` decodes the base64 strings a JSON request carries for this binary
column), base64 strings, or uint8 pixel arrays (H x W or H x W x C). Each image is decoded
with Pillow to the model's channels and resized (bilinear, as in training) to its image size,
both read from the model's metadata (`student.json`); the Keras model scales pixels itself.
Output: one row per image: `class` (name), `confidence` and `probabilities` ({class: p}).
"""

from __future__ import annotations

import base64
import binascii
import io
import json

import mlflow
import numpy as np
import pandas as pd

# Decompression bombs: an image with more pixels than this is refused before it is decoded.
MAX_PIXELS = 40_000_000
COLUMN = "image"


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import keras

        with open(context.artifacts["meta"], encoding="utf-8") as f:
            meta = json.load(f)
        self.class_names = [str(name) for name in meta["class_names"]]
        self.image_size = [int(v) for v in meta["image_size"]]
        self.channels = int(meta["channels"])
        # Safe mode: a model file that would run arbitrary Python code (Lambda layers) is refused.
        self.model = keras.saving.load_model(
            context.artifacts["model"], compile=False, safe_mode=True
        )

    def predict(self, context, model_input, params=None):
        images = np.stack([self._pixels(item) for item in _items(model_input)])
        probs = np.asarray(self.model.predict(images, verbose=0), dtype="float64")
        best = probs.argmax(axis=1)
        return pd.DataFrame(
            {
                "class": [self.class_names[i] for i in best],
                "confidence": probs[np.arange(len(best)), best],
                "probabilities": [
                    dict(zip(self.class_names, row.tolist(), strict=True)) for row in probs
                ],
            }
        )

    def _pixels(self, item) -> np.ndarray:
        """One image as float32 H x W x C raw 0..255 pixels of the model's size."""
        from PIL import Image

        mode = "L" if self.channels == 1 else "RGB"
        if isinstance(item, list):  # pixels sent as nested JSON lists
            item = np.asarray(item, dtype=np.uint8)
        if isinstance(item, np.ndarray) and item.dtype != object:
            if item.dtype != np.uint8 or item.ndim not in (2, 3):
                raise ValueError(
                    f"a pixel array must be uint8 H x W (x C), got {item.dtype} {item.shape}"
                )
            image = Image.fromarray(item if item.ndim == 2 or item.shape[2] > 1 else item[:, :, 0])
        else:
            data = _bytes(item)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(f"image of {image.width}x{image.height} pixels: over {MAX_PIXELS}")
        pixels = np.asarray(image.convert(mode), dtype="float32")
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        import keras

        # keras.ops's bilinear resize without antialiasing: what tf.image.resize does in training.
        resized = keras.ops.image.resize(
            pixels, tuple(self.image_size), interpolation="bilinear", antialias=False
        )
        return np.asarray(keras.ops.convert_to_numpy(resized), dtype="float32")


def _items(model_input) -> list:
    if isinstance(model_input, pd.DataFrame):
        column = COLUMN if COLUMN in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, dict):
        return list(model_input.get(COLUMN, next(iter(model_input.values()))))
    if isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8:
        return (
            [model_input]
            if model_input.ndim in (2, 3) and model_input.shape[-1] <= 4
            else list(model_input)
        )
    return list(model_input)


def _bytes(item) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str):
        try:
            return base64.b64decode(item, validate=True)
        except binascii.Error:
            raise ValueError("an image string must be base64 of a PNG/JPEG file") from None
    raise ValueError(f"cannot read an image from {type(item).__name__}")


if __name__ != "pseudolabel.serving":  # run as the logged model's code, not imported by us
    mlflow.models.set_model(ImageClassifier())
