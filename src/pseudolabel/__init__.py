"""pseudolabel: make an image classifier better with unlabeled images."""

import os
import platform
import sys
import warnings

# Quiet TensorFlow's C++ start-up chatter: the one place it is set. This runs before any
# pseudolabel module, so before TensorFlow in every entry point (CLI, sweep, facade, tests).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's oneDNN kernels on every x86 CPU. TensorFlow turns them on by itself only on CPUs
# with AVX-512 VNNI/BF16 or AMX; on an AVX2-only CPU its Eigen kernels took 3x the CPU time a
# consistency step needs, 44 % of it in the kernel serving page faults (docs/speed.md). Set
# TF_ENABLE_ONEDNN_OPTS=0 to keep TensorFlow's own choice.
# (x86 only: on Arm, oneDNN runs through other libraries; nothing was measured there.)
# TensorFlow reads the variable once, when it loads: imported before pseudolabel, it keeps its
# own choice, and a warning says so where that choice is Eigen.


def onednn_enabled() -> bool | None:
    """Whether TensorFlow runs its oneDNN CPU kernels (None: its private API did not answer).
    Loads TensorFlow. Benchmark rows record it: the kernels change the trained weights."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except Exception:  # a private TensorFlow API
        return None


if platform.machine().lower() in ("x86_64", "amd64") and "TF_ENABLE_ONEDNN_OPTS" not in os.environ:
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
    if "tensorflow" in sys.modules and onednn_enabled() is False:
        warnings.warn(
            "TensorFlow was imported before pseudolabel, so its oneDNN kernels stay off on "
            "this CPU and training takes about 3x the CPU time (docs/speed.md): import "
            "pseudolabel first, or set TF_ENABLE_ONEDNN_OPTS=1 before TensorFlow loads",
            RuntimeWarning,
            stacklevel=2,
        )

from pseudolabel.errors import PseudoLabelError  # noqa: E402

__all__ = ["PseudoLabelError", "PseudoLabelGenerator"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily: `import pseudolabel` stays fast and TensorFlow-free until needed.
    if name == "PseudoLabelGenerator":
        from pseudolabel.generator import PseudoLabelGenerator

        return PseudoLabelGenerator
    raise AttributeError(name)
