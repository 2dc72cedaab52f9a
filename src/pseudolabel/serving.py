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

Bad input is refused with an MlflowException of INVALID_PARAMETER_VALUE, which the scoring
server answers with a 400 whose message says which image and why (not an image, a pixel array
of an unusable shape, an image over MAX_PIXELS, no images, more than the request limit), and
no stack trace: `PSEUDOLABEL_SERVING_MAX_IMAGES` (default 256) caps the images per request.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

# Decompression bombs: an image with more pixels than this is refused before it is decoded.
MAX_PIXELS = 40_000_000
COLUMN = "image"
MAX_IMAGES_ENV = "PSEUDOLABEL_SERVING_MAX_IMAGES"
MAX_IMAGES = 256  # images per request, unless MAX_IMAGES_ENV says otherwise


class BadInput(MlflowException, ValueError):
    """A request the model cannot answer: the scoring server's 400, with this message only."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


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
        self.max_images = int(os.environ.get(MAX_IMAGES_ENV, MAX_IMAGES))

    def predict(self, context, model_input: pd.DataFrame, params=None):
        items = _items(model_input)
        if not items:
            raise BadInput(f"no images in the request: send one or more in the {COLUMN!r} column")
        if len(items) > self.max_images:
            raise BadInput(
                f"{len(items)} images in one request: at most {self.max_images} "
                f"(the server's {MAX_IMAGES_ENV}); split the request"
            )
        pixels = []
        for i, item in enumerate(items):
            try:
                pixels.append(self._pixels(item))
            except BadInput as error:
                raise BadInput(f"image {i}: {error.message}") from None
        images = np.stack(pixels)
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
        """One image as float32 H x W x C raw 0..255 pixels of the model's size; any size and
        channel count Pillow converts (grey, RGB, RGBA, palette) is resized and converted."""
        from PIL import Image, UnidentifiedImageError

        mode = "L" if self.channels == 1 else "RGB"
        if isinstance(item, list):  # pixels sent as nested JSON lists
            try:
                item = np.asarray(item, dtype=np.uint8)
            except (ValueError, TypeError, OverflowError):
                raise BadInput("a pixel list must be H x W (x C) integers 0..255") from None
        if isinstance(item, np.ndarray) and item.dtype != object:
            shape = item.shape
            if (
                item.dtype != np.uint8
                or item.ndim not in (2, 3)
                or min(shape[:2], default=0) < 1
                or (item.ndim == 3 and shape[2] not in (1, 3, 4))
            ):
                raise BadInput(
                    f"a pixel array must be uint8 H x W or H x W x 1, 3 or 4, got {item.dtype} "
                    f"{shape}"
                )
            if shape[0] * shape[1] > MAX_PIXELS:
                raise BadInput(f"{shape[1]}x{shape[0]} pixels: over {MAX_PIXELS:,}")
            image = Image.fromarray(item if item.ndim == 2 or item.shape[2] > 1 else item[:, :, 0])
            pixels = np.asarray(image.convert(mode), dtype="float32")
        else:
            data = _bytes(item)
            try:
                image = Image.open(io.BytesIO(data))
                if image.width * image.height > MAX_PIXELS:  # the header only: not decoded
                    raise BadInput(
                        f"an image of {image.width}x{image.height} pixels: over {MAX_PIXELS:,} "
                        "(a decompression bomb?)"
                    )
                pixels = np.asarray(image.convert(mode), dtype="float32")
            except Image.DecompressionBombError:
                raise BadInput("an image over Pillow's decompression-bomb limit") from None
            except UnidentifiedImageError:
                raise BadInput(
                    f"{len(data):,} bytes that are not an image file Pillow reads (PNG, JPEG, ...)"
                ) from None
            except (OSError, SyntaxError, ValueError) as error:
                if isinstance(error, BadInput):
                    raise
                raise BadInput(f"a truncated or corrupt image file ({len(data):,} bytes)") from None
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
        data = bytes(item)
    elif isinstance(item, str):
        try:
            data = base64.b64decode(item, validate=True)
        except binascii.Error:
            raise BadInput("an image string must be base64 of a PNG/JPEG file") from None
    else:
        raise BadInput(f"cannot read an image from a {type(item).__name__}")
    if not data:
        raise BadInput("an empty image (0 bytes)")
    return data


if __name__ != "pseudolabel.serving":  # run as the logged model's code, not imported by us
    mlflow.models.set_model(ImageClassifier())
