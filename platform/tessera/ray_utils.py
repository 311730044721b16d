"""Small pieces of Ray wiring shared by the jobs."""

from __future__ import annotations


def init_ray(**kwargs) -> None:
    """Connect to the cluster a job was submitted to, or start a local Ray when there is none.

    Inside ``ray job submit`` the driver finds its cluster by itself; ``RAY_ADDRESS`` (as set by
    ``.tessera/env.sh``) points a plain ``python -m jobs.<name>`` at the embedded head. Without either,
    a local Ray is started in-process.
    """
    import ray

    if not ray.is_initialized():
        ray.init(**kwargs)
