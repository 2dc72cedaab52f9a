"""Model builders (Keras functional API).

Every model takes raw 0..255 pixels of the data's size and channels and does the rest inside
itself: augmentation (active only while training), resizing to the backbone's input size,
grey -> RGB for ImageNet backbones, and rescaling. So no caller can feed it the wrong pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import keras
from keras import layers

from pseudolabel.config import BACKBONES, MODEL_NAMES, check_input_size, input_size
from pseudolabel.errors import PseudoLabelError

log = logging.getLogger(__name__)

# BACKBONES (config.py, the zoo): name -> keras.applications constructor. These models scale
# raw 0..255 pixels themselves (their first layers are Rescaling/Normalization), so nothing here
# rescales before them.
# keras.applications builds every EfficientNet with this drop-connect (stochastic depth) rate,
# rising linearly over the blocks; `model.drop_connect_rate` rescales those layers.
KERAS_DROP_CONNECT = 0.2


# Pixel work stays float32 under mixed precision (some image layers have no float16 kernels).
PIXELS = "float32"


def augmentation_layers(augment) -> list[keras.Layer]:
    """Keras preprocessing layers for the configured noise (identity at inference)."""
    out: list[keras.Layer] = []
    if augment.flip:
        out.append(layers.RandomFlip("horizontal", dtype=PIXELS))
    if augment.translate:
        shift = augment.translate
        out.append(layers.RandomTranslation(shift, shift, fill_mode="constant", dtype=PIXELS))
    if augment.rotate:
        out.append(layers.RandomRotation(augment.rotate, fill_mode="constant", dtype=PIXELS))
    if augment.zoom:
        out.append(layers.RandomZoom(augment.zoom, fill_mode="constant", dtype=PIXELS))
    if augment.contrast:
        out.append(layers.RandomContrast(augment.contrast, value_range=(0, 255), dtype=PIXELS))
    if augment.randaugment_ops:
        out.append(
            layers.RandAugment(
                value_range=(0, 255),
                num_ops=augment.randaugment_ops,
                factor=augment.randaugment_magnitude,
                dtype=PIXELS,
            )
        )
    if augment.erasing:
        out.append(layers.RandomErasing(augment.erasing, value_range=(0, 255), dtype=PIXELS))
    return out


def small_cnn(x, model_cfg):
    """`depth` blocks of two conv-BN-ReLU layers and max pooling; returns the feature map."""
    for block in range(model_cfg.depth):
        filters = model_cfg.width * 2**block
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            # momentum 0.9: moving statistics settle within the few steps small data gives.
            x = layers.BatchNormalization(momentum=0.9)(x)
            x = layers.ReLU()(x)
        if min(x.shape[1], x.shape[2]) >= 2:
            x = layers.MaxPooling2D()(x)
    return x


def resnet(x, model_cfg):
    """A pre-activation ResNet for small images (He et al. 2016, "Identity Mappings in Deep
    Residual Networks"; the CIFAR-style layout of the WRNs semi-supervised papers train): a 3x3
    stem of `width` filters, then `depth` stages of two residual blocks, each BN-ReLU-conv3x3
    twice beside the identity (a 1x1 convolution where the shape changes). Each stage after the
    first doubles the filters and halves the map with its first convolution's stride; BN-ReLU
    closes the last. Returns the feature map."""
    x = layers.Conv2D(model_cfg.width, 3, padding="same", use_bias=False, name="stem")(x)
    for stage in range(model_cfg.depth):
        filters = model_cfg.width * 2**stage
        for block in range(2):
            prefix = f"stage{stage + 1}_block{block + 1}"
            stride = 2 if stage and not block and min(x.shape[1], x.shape[2]) >= 2 else 1
            # momentum 0.9 as in small_cnn: moving statistics settle within few steps
            y = layers.BatchNormalization(momentum=0.9, name=f"{prefix}_bn1")(x)
            y = layers.ReLU(name=f"{prefix}_relu1")(y)
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:  # projected from the activated input
                shortcut = layers.Conv2D(
                    filters, 1, strides=stride, use_bias=False, name=f"{prefix}_shortcut"
                )(y)
            y = layers.Conv2D(
                filters, 3, strides=stride, padding="same", use_bias=False, name=f"{prefix}_conv1"
            )(y)
            y = layers.BatchNormalization(momentum=0.9, name=f"{prefix}_bn2")(y)
            y = layers.ReLU(name=f"{prefix}_relu2")(y)
            y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{prefix}_conv2")(y)
            x = layers.Add(name=f"{prefix}_add")([shortcut, y])
    x = layers.BatchNormalization(momentum=0.9, name="final_bn")(x)
    return layers.ReLU(name="final_relu")(x)


# The models built here from the config alone (no keras.applications backbone).
OWN_BUILDERS = {"small_cnn": small_cnn, "resnet": resnet}


def head(features, model_cfg, num_classes: int):
    """Global pooling, dropout, an optional hidden layer, softmax (kept float32)."""
    pooling = {"avg": layers.GlobalAveragePooling2D, "max": layers.GlobalMaxPooling2D}
    x = pooling[model_cfg.pooling](name="pool")(features)
    x = layers.Dropout(model_cfg.dropout, name="head_dropout")(x)
    if model_cfg.hidden_units:
        x = layers.Dense(model_cfg.hidden_units, activation="relu", name="hidden")(x)
        x = layers.Dropout(model_cfg.dropout, name="hidden_dropout")(x)
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)


def keras_backbone(model_cfg, size: Sequence[int], role: str) -> keras.Model:
    """The keras.applications model without its top, with weights and drop-connect as set."""
    weights = model_cfg.weights
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise PseudoLabelError(
            f"{role}.model.weights={weights!r}: no such weights file; give the path of a "
            "Keras weights file (.h5) for this backbone, `imagenet`, or null."
        )
    constructor = getattr(keras.applications, BACKBONES[model_cfg.name])
    try:
        backbone = constructor(include_top=False, weights=weights, input_shape=(*size, 3))
    except Exception as exc:  # get_file raises a bare Exception when it cannot download
        if weights != "imagenet":
            raise PseudoLabelError(
                f"{role}.model.weights={weights!r}: cannot load these weights into "
                f"{model_cfg.name} ({type(exc).__name__}: {exc})."
            ) from None
        raise PseudoLabelError(
            f"{role}: cannot get the ImageNet weights of {model_cfg.name} ({exc}). Without "
            "network access, download that file on another machine and copy it into "
            "~/.keras/models/ (or $KERAS_HOME/models/), or set "
            f"{role}.model.weights to the path of the weights file, or use "
            f"{role}.model.weights=null to train from random initialisation."
        ) from None
    set_drop_connect(backbone, model_cfg.drop_connect_rate)
    return backbone


def set_drop_connect(backbone: keras.Model, rate: float) -> None:
    """Scale the EfficientNet's stochastic-depth Dropout layers (named `*drop`) to `rate`."""
    for layer in backbone.layers:
        if isinstance(layer, layers.Dropout) and layer.name.endswith("drop"):
            layer.rate = layer.rate * rate / KERAS_DROP_CONNECT


def backbone_of(model: keras.Model) -> keras.Model | None:
    """The pretrained backbone nested in a model built here, or None (small_cnn, resnet)."""
    return next((layer for layer in model.layers if isinstance(layer, keras.Model)), None)


def build_model(
    model_cfg, augment, num_classes: int, image_size: Sequence[int], channels: int, name: str
) -> keras.Model:
    """Raw pixels -> augmentation (training only) -> resize -> scale -> backbone -> head.

    `name` is the role (teacher or student): it names the model and the keys in errors."""
    if model_cfg.name not in MODEL_NAMES:
        raise PseudoLabelError(
            f"{name}.model.name={model_cfg.name!r} is unknown; valid: {', '.join(MODEL_NAMES)}."
        )
    size = input_size(model_cfg, image_size)
    check_input_size(model_cfg.name, size, f"{name}.model")
    inputs = keras.Input(shape=(*image_size, channels), name="image")
    x = inputs
    for layer in augmentation_layers(augment):
        x = layer(x)
    if list(size) != list(image_size):
        x = layers.Resizing(*size, name="resize", dtype=PIXELS)(x)
    if model_cfg.name in BACKBONES:
        if channels == 1:  # ImageNet backbones take RGB
            x = layers.Concatenate(name="grey_to_rgb", dtype=PIXELS)([x, x, x])
        features = keras_backbone(model_cfg, size, name)(x)  # it rescales pixels itself
    else:
        x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
        features = OWN_BUILDERS[model_cfg.name](x, model_cfg)
    return keras.Model(inputs, head(features, model_cfg, num_classes), name=name)
