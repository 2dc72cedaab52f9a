"""pseudolabel: make an image classifier better with unlabelled images."""

from pseudolabel.errors import PseudoLabelError

__all__ = ["PseudoLabelError", "PseudoLabelGenerator"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily: `import pseudolabel` stays fast and TensorFlow-free until needed.
    if name == "PseudoLabelGenerator":
        from pseudolabel.generator import PseudoLabelGenerator

        return PseudoLabelGenerator
    raise AttributeError(name)
