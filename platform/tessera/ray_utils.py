"""Small pieces of Ray wiring shared by the jobs."""

from __future__ import annotations

import os


def init_ray(**kwargs) -> None:
    """Connect to the cluster a job was submitted to, or start a local Ray when there is none.

    Inside ``ray job submit`` the driver finds its cluster by itself; ``RAY_ADDRESS`` (as set by
    ``.tessera/env.sh``) points a plain ``python -m jobs.<name>`` at the embedded head. Without either,
    a local Ray is started in-process.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith("http"):
        # RAY_ADDRESS names the dashboard for the Jobs CLI; a driver connects to the GCS instead.
        address = "auto"
    ray.init(address=address or None, log_to_driver=True, **kwargs)
