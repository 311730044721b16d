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


def autoscaler_max_resources() -> dict | None:
    """The most of each resource the cluster's autoscaler may bring up (its node types' ``max_workers``
    x resources, capped by ``max_workers``), or None without an autoscaler. Read the way Ray Train and
    Ray Data read it (``ray._private.state``: no public API in Ray 2.60); any failure reads as None."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: never let it fail the job
        return None


def unplaceable(asks: list[tuple[str, float, float]], nodes: list[dict]) -> str | None:
    """What is wrong with the first ask (``(config key, CPUs, GPUs)`` of one worker) that no node can hold,
    or None: Ray would queue such an actor or task forever, however many CPUs and GPUs the cluster has in
    all (2 GPUs an actor on nodes of 1), so a job checks first and names the key.

    Args:
        nodes: each live node's resources (``ray.nodes()``' ``Resources``). Pass none on an autoscaling
            cluster, whose node types may be larger than its nodes now.
    """
    for key, cpus, gpus in asks:
        if not any(float(n.get("CPU", 0)) + 1e-9 >= cpus and float(n.get("GPU", 0)) + 1e-9 >= gpus for n in nodes):
            largest = max(nodes, key=lambda n: (float(n.get("GPU", 0)), float(n.get("CPU", 0))))
            return (f"{key} asks each of its workers for {cpus:g} CPUs and {gpus:g} GPUs, but no node of this "
                    f"cluster has that much (the largest: {float(largest.get('CPU', 0)):g} CPUs, "
                    f"{float(largest.get('GPU', 0)):g} GPUs): lower {key}.num_cpus / num_gpus, or add such a node")
    return None


def cluster_capacity(current: dict, autoscaler_max: dict | None) -> tuple[float, float]:
    """``(CPUs, GPUs)`` a job's pools can count on: what the cluster has now, or on an autoscaling cluster the
    most its autoscaler may add (the pools' actors then bring the nodes up: ``cluster.yaml`` scales its
    GPU workers from zero)."""
    maximum = autoscaler_max or {}
    return (max(float(current.get("CPU", 0.0)), float(maximum.get("CPU", 0) or 0)),
            max(float(current.get("GPU", 0.0)), float(maximum.get("GPU", 0) or 0)))


def cluster_layout() -> tuple[float, float, list[dict] | None]:
    """``(CPUs, GPUs, nodes)`` a job can plan with (:func:`cluster_capacity`), and each live node's resources,
    or None on an autoscaling cluster, whose node types, not its nodes now, bound an actor's size."""
    import ray

    maximum = autoscaler_max_resources()
    cpus, gpus = cluster_capacity(ray.cluster_resources(), maximum)
    return cpus, gpus, (None if maximum is not None else [n["Resources"] for n in ray.nodes() if n.get("Alive")])


SHARED_FS_ENV = "TESSERA_SHARED_FS"  # "1": local paths are a mount every node of the cluster shares


def check_paths_for_cluster(written: dict[str, str | None], read: dict[str, str | None]) -> None:
    """Refuse local paths a job's tasks write to when the cluster has more than one node.

    A local path is each node's own disk: the parts a task writes land on whichever node ran it, and the
    driver, which lists and tallies them on the head, finds only the head's (the embedding job encoded
    the whole corpus, then exited 4 saying parts were lost, on every rerun). Keys read through local
    paths only get a warning: they work if every node holds the same files. Nothing is checked with
    ``TESSERA_SHARED_FS=1`` (the paths are a mount every node shares, e.g. NFS), or on one node without an
    autoscaler.

    Args:
        written: config key -> URI the job's tasks write (None: not set).
        read: config key -> URI the job's tasks read.

    Raises:
        ConfigError: naming every written key with a local path, and the cluster's node count.
    """
    import os
    import sys

    import ray

    from tessera.config import ConfigError
    from tessera.storage import parse_uri

    def local(paths: dict[str, str | None]) -> list[str]:
        out = []
        for k, v in paths.items():
            try:
                if v and parse_uri(v).scheme == "file":
                    out.append(f"{k}={v}")
            except ValueError as err:  # S3://, s3a://: the key named, before any work (exit 2)
                raise ConfigError(f"{k}: {err}") from None
        return out

    written_local, read_local = local(written), local(read)
    if not (written_local or read_local) or os.environ.get(SHARED_FS_ENV) == "1":
        return
    if not ray.is_initialized():  # the job starts a local Ray later: one node
        return
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    scaling = autoscaler_max_resources() is not None  # a head alone now, workers brought up for the tasks
    if nodes <= 1 and not scaling:
        return
    cluster = f"this Ray cluster has {nodes} nodes" + (" and an autoscaler" if scaling else "")
    if written_local:
        raise ConfigError(f"{', '.join(written_local)}: a local path, but {cluster}: each node's tasks would write "
                          "to their own disk, and the driver sees only its own. Use an s3:// URI, or set "
                          f"{SHARED_FS_ENV}=1 if the path is a mount every node shares")
    print(f"warning: {', '.join(read_local)}: a local path, but {cluster}; tasks on other nodes read their own "
          f"disk there (set {SHARED_FS_ENV}=1 if it is a mount every node shares)", file=sys.stderr)
