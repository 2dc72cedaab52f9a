"""pseudolabel: make an image classifier better with unlabeled images."""

import os

# Quiet TensorFlow's C++ start-up chatter: the one place it is set. This runs before any
# pseudolabel module, so before TensorFlow in every entry point (CLI, sweep, facade, tests).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pseudolabel.errors import PseudoLabelError  # noqa: E402

__all__ = ["PseudoLabelError", "PseudoLabelGenerator"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily: `import pseudolabel` stays fast and TensorFlow-free until needed.
    if name == "PseudoLabelGenerator":
        from pseudolabel.generator import PseudoLabelGenerator

        return PseudoLabelGenerator
    raise AttributeError(name)
