"""The Ray cluster a stage works on (ray.address): joined, or started locally, once."""

from __future__ import annotations

import logging


def connect(address: str | None) -> bool:
    """Join the cluster at `address` (None: start a local Ray instance); True when this call
    started the connection and so must close it (ray.shutdown)."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    return True
