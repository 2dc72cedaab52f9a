"""Model builders (Keras functional API). Every model takes raw 0..255 pixels and scales them
itself, and carries its augmentation as layers that are active only while training."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from pseudolabel.errors import PseudoLabelError


def augmentation_layers(augment) -> list[keras.Layer]:
    """Keras preprocessing layers for the configured noise (identity at inference)."""
    out: list[keras.Layer] = []
    if augment.flip:
        out.append(layers.RandomFlip("horizontal"))
    if augment.translate:
        out.append(
            layers.RandomTranslation(augment.translate, augment.translate, fill_mode="constant")
        )
    if augment.rotate:
        out.append(layers.RandomRotation(augment.rotate, fill_mode="constant"))
    if augment.zoom:
        out.append(layers.RandomZoom(augment.zoom, fill_mode="constant"))
    if augment.contrast:
        out.append(layers.RandomContrast(augment.contrast, value_range=(0, 255)))
    return out


def small_cnn(inputs, model_cfg, num_classes: int):
    """`depth` blocks of two conv-BN-ReLU layers and max pooling, then pooling and softmax."""
    x = inputs
    for block in range(model_cfg.depth):
        filters = model_cfg.width * 2**block
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            # momentum 0.9: moving statistics settle within the few steps small data gives.
            x = layers.BatchNormalization(momentum=0.9)(x)
            x = layers.ReLU()(x)
        if min(x.shape[1], x.shape[2]) >= 2:
            x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(model_cfg.dropout)(x)
    return layers.Dense(num_classes, activation="softmax", name="predictions")(x)


BUILDERS = {"small_cnn": small_cnn}


def build_model(
    model_cfg, augment, num_classes: int, image_size: Sequence[int], channels: int, name: str
) -> keras.Model:
    """Raw pixels -> augmentation (training only) -> rescaling -> backbone -> softmax."""
    if model_cfg.name not in BUILDERS:
        raise PseudoLabelError(
            f"model.name={model_cfg.name!r} is unknown; valid: {', '.join(sorted(BUILDERS))}."
        )
    inputs = keras.Input(shape=(*image_size, channels), name="image")
    x = inputs
    for layer in augmentation_layers(augment):
        x = layer(x)
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
    outputs = BUILDERS[model_cfg.name](x, model_cfg, num_classes)
    return keras.Model(inputs, outputs, name=name)
