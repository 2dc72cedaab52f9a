"""pseudolabel: make an image classifier better with unlabeled images."""

import os
import platform

# Quiet TensorFlow's C++ start-up chatter: the one place it is set. This runs before any
# pseudolabel module, so before TensorFlow in every entry point (CLI, sweep, facade, tests).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's oneDNN kernels on every x86 CPU. TensorFlow turns them on by itself only on CPUs
# with AVX-512 VNNI/BF16 or AMX; on an AVX2-only CPU its Eigen kernels took 3x the CPU time a
# consistency step needs, 44 % of it in the kernel serving page faults (docs/speed.md). Set
# TF_ENABLE_ONEDNN_OPTS=0 to keep TensorFlow's own choice.
# (x86 only: on Arm, oneDNN runs through other libraries; nothing was measured there.)
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from pseudolabel.errors import PseudoLabelError  # noqa: E402

__all__ = ["PseudoLabelError", "PseudoLabelGenerator"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily: `import pseudolabel` stays fast and TensorFlow-free until needed.
    if name == "PseudoLabelGenerator":
        from pseudolabel.generator import PseudoLabelGenerator

        return PseudoLabelGenerator
    raise AttributeError(name)
