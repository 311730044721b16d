"""A lease on a job's output: one attempt of a run writes it at a time.

Two attempts of the same embedding run at once (a retried ``ray job submit`` while the first still
runs, two people, a scheduler firing twice) each skip what was written before they started and then
write every remaining item in parts of their own grouping: the run ends up with duplicates. The lease
is a small JSON object beside the output (``<run>/_LEASE.json``) that an attempt creates before it
writes, renews from a background thread while it runs and deletes when it ends:

- created with a conditional write (``If-None-Match: *``, see :meth:`Storage.create_exclusive`): of two
  attempts starting together exactly one gets it;
- renewed every ``ttl_s / 4`` with ``If-Match`` on the version it last wrote: an attempt whose lease
  was taken over learns it at its next renewal (:attr:`RunLease.lost`) and stops;
- a lease not renewed for ``ttl_s`` (on the store's clock) is stale: its holder was killed or cut off,
  and the next attempt takes it over, again by a conditional write, so two attempts cannot both;
- a lease held by a process that has exited, on this machine and in this pid namespace (host name,
  boot id, pid namespace, pid and start time recorded), is taken over at once: the usual "killed it,
  start it again" needs no waiting;
- every write of the lease differs from the last (a write counter), so ``If-Match`` on an S3 ETag (the
  content's MD5) tells versions apart;
- released with a conditional delete (``If-Match``), so an attempt that lost its lease never deletes
  the one that took it over.

Example::

    with RunLease(storage, "s3://bucket/embeddings/run-1/_LEASE.json", ttl_s=60) as lease:
        for batch in work:
            lease.check()          # raises LeaseLostError once another attempt holds the run
            write(batch)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tessera.storage import Storage

logger = logging.getLogger(__name__)


class LeaseHeldError(RuntimeError):
    """Another attempt holds the lease, and it is live."""


class LeaseLostError(RuntimeError):
    """The lease this attempt held was taken over (it was not renewed for its ttl)."""


def _process_started(pid: int) -> float | None:
    """Start time of a local process, None if there is none with that pid."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _machine() -> dict:
    """What tells this machine and process-id namespace apart: the host name alone does not (containers
    with host networking share it, each with its own pids; cloned VMs keep the default name)."""
    def read(get) -> str | None:
        try:
            return get()
        except OSError:  # not Linux: the holder is never judged gone, the ttl decides
            return None

    return {"host": socket.gethostname(),
            "boot_id": read(lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip()),
            "pid_ns": read(lambda: os.readlink("/proc/self/ns/pid"))}


def _holder_gone(holder: dict) -> bool:
    """Whether the lease's holder is a process on this machine, in this pid namespace, that no longer
    runs (its pid is free, or reused by a process that started later). Unknowable elsewhere: False."""
    here = _machine()
    if None in here.values() or any(holder.get(k) != v for k, v in here.items()):
        return False
    if not isinstance(holder.get("pid"), int):
        return False
    started, recorded = _process_started(holder["pid"]), holder.get("pid_started")
    return started is None or (isinstance(recorded, (int, float)) and abs(started - recorded) > 1.0)


def _ray_job() -> str | None:
    """The Ray job this process drives (its submission id under ``ray job submit``), if any."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if config:
        try:
            submission = json.loads(config).get("metadata", {}).get("job_submission_id")
        except (ValueError, AttributeError):
            submission = None
        if submission:
            return submission
    try:
        import ray

        return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
    except (ImportError, RuntimeError, AttributeError):  # no Ray, or no job context: the process only
        return None


@dataclass(frozen=True)
class LeaseRef:
    """What a task writing on a lease holder's behalf needs to check that it still holds: picklable, with
    no renewal of its own (:attr:`RunLease.ref`)."""

    uri: str
    token: str
    what: str

    def verify(self, storage: Storage) -> None:
        """Raise :class:`LeaseLostError` unless the lease still holds this token: call it just before a
        write that must not land over another attempt's (the holder's driver may be hung while its
        tasks go on, or its lease broken, and another attempt write the same names meanwhile)."""
        found = _read_holder(storage, self.uri)
        if found is None or found[0].get("token") != self.token:
            raise LeaseLostError(_lost_message(self.what, self.uri, found) + "; this attempt stopped writing")


def _read_holder(storage: Storage, uri: str) -> tuple[dict, str, float] | None:
    """The lease at ``uri``: ``(holder, version tag, age in seconds)``, the holder ``{}`` when unreadable;
    None when there is none."""
    try:
        data, tag, age = storage.read_versioned(uri)
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(data)
    except ValueError:
        holder = {}
    return (holder if isinstance(holder, dict) else {}), tag, age


def _lost_message(what: str, uri: str, found: tuple[dict, str, float] | None) -> str:
    """How an attempt that no longer holds the lease ``found`` at ``uri`` (:func:`_read_holder`) says so."""
    return (f"{what}: the lease {uri} was " + (f"taken over by {_describe(found[0])}" if found else "deleted")
            + " while this attempt ran")


class RunLease:
    """Hold ``uri`` as a lease for as long as the ``with`` block runs (see the module docstring).

    Args:
        storage: where ``uri`` is (``s3://`` or a local path).
        uri: the lease object, e.g. ``<run_uri>/_LEASE.json``.
        ttl_s: a lease not renewed for this long is stale and may be taken over.
        what: how errors name the thing leased (e.g. the run's URI).
        break_lease: take the lease over even if its holder looks live (the operator knows it is gone).
    """

    def __init__(self, storage: Storage, uri: str, ttl_s: float = 60.0, what: str | None = None,
                 break_lease: bool = False):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.storage, self.uri, self.ttl_s = storage, uri, float(ttl_s)
        self.what = what or uri
        self.break_lease = break_lease
        self.token = uuid.uuid4().hex
        self._holder: dict | None = None
        self._writes = 0
        self._tag: str | None = None
        self._renewed = 0.0  # time.monotonic() of the last write that held the lease
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the lease's content ---------------------------------------------------------------
    def _body(self) -> bytes:
        # every write differs (``writes``): S3's ETag is the content's MD5, and If-Match on an unchanged
        # body would let a taker holding the tag read before a renewal replace the renewed lease
        self._writes += 1
        if self._holder is None:
            self._holder = {"token": self.token, **_machine(), "pid": os.getpid(),
                            "pid_started": _process_started(os.getpid()), "ttl_s": self.ttl_s, "ray_job": _ray_job()}
        return json.dumps({**self._holder, "writes": self._writes, "written_at": time.time()}, sort_keys=True).encode()

    def _read(self, store: Storage | None = None) -> tuple[dict, str, float] | None:
        return _read_holder(store or self.storage, self.uri)

    def _mine(self, store: Storage | None = None) -> str | None:
        """The lease's tag if it holds this attempt's token, else None. (A conditional write whose answer
        was lost is retried and refused, although the first try landed: reading tells.)"""
        found = self._read(store)
        return found[1] if found is not None and found[0].get("token") == self.token else None

    # --- acquire / renew / release ---------------------------------------------------------
    def acquire(self) -> None:
        """Take the lease, or raise :class:`LeaseHeldError` naming its live holder."""
        for _ in range(5):  # each pass takes the lease or finds it changed under us
            sent = time.monotonic()
            if tag := self.storage.create_exclusive(self.uri, self._body()) or self._mine():
                self._held(tag, sent)
                return
            found = self._read()
            if found is None:
                continue  # released between our create and our read: try again
            holder, tag, age = found
            stale = age > float(holder.get("ttl_s", self.ttl_s))
            if not (stale or self.break_lease or _holder_gone(holder)):
                raise LeaseHeldError(self._held_message(holder, age))
            why = ("broken on request (--break-lease)" if self.break_lease
                   else f"not renewed for {age:.0f}s" if stale else "its process has exited")
            sent = time.monotonic()
            if new := self.storage.replace_if(self.uri, self._body(), tag) or self._mine():
                logger.warning("lease on %s taken over from %s: %s", self.what, _describe(holder), why)
                self._held(new, sent)
                return
        raise LeaseHeldError(f"{self.what}: the lease {self.uri} kept changing hands; another attempt is "
                             "starting at the same time")

    def _held(self, tag: str, sent: float) -> None:
        """Record the lease as ours at version ``tag``, written no earlier than ``sent`` (the store
        counts its age from when it got the write, which may be long before a retried call returned)."""
        self._tag, self._renewed = tag, sent

    def _held_message(self, holder: dict, age: float) -> str:
        ttl = float(holder.get("ttl_s", self.ttl_s))
        return (f"{self.what} is being written by another attempt ({_describe(holder)}; lease {self.uri} "
                f"renewed {age:.0f}s ago). Wait for it to finish, or, if it is gone, for the lease to go "
                f"stale ({max(0.0, ttl - age):.0f}s more), or take it over now with --break-lease")

    def renew(self) -> None:
        """Rewrite the lease if it is still ours; record it as lost (see :meth:`check`) if not."""
        sent = time.monotonic()
        if tag := self.storage.replace_if(self.uri, self._body(), self._tag or "") or self._mine():
            self._held(tag, sent)
            return
        self._lost = _lost_message(self.what, self.uri, self._read())

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if a renewal found the lease taken over, or none succeeded for
        ``ttl_s`` (another attempt may have taken it over since)."""
        if self._lost is None and time.monotonic() - self._renewed > self.ttl_s:
            self._lost = (f"{self.what}: the lease {self.uri} could not be renewed for {self.ttl_s:g}s (the store "
                          "unreachable?), so another attempt may have taken the run over")
        if self._lost:
            raise LeaseLostError(self._lost + "; this attempt stopped writing")

    def confirm(self) -> None:
        """Renew the lease now and :meth:`check` it: before a write that must not come from an attempt
        whose lease was just taken over (a renewal ago at most, the holder's view may be stale)."""
        self.renew()
        self.check()

    @property
    def ref(self) -> LeaseRef:
        return LeaseRef(self.uri, self.token, self.what)

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def release(self) -> None:
        """Stop renewing, and delete the lease if it is still ours and was renewed within its ttl. Best
        effort: with the store unreachable the lease stays, and goes stale after its ttl (the error this
        attempt is ending with, if any, is not replaced by a storage error)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)  # a renewal stuck on a store outage is left to its daemon thread
        from botocore.exceptions import BotoCoreError, ClientError

        # a few quick tries: an attempt ending with the store down should not wait out the retry window
        store = Storage(self.storage.config.model_copy(update={"retry_window_s": 5.0, "max_attempts": 2}))
        # Renewals failing for ttl_s: another attempt may hold the lease now, and on a store that ignores
        # If-Match on DELETE (AWS honours it only since 2025-09; some S3-compatible stores never) a delete
        # would remove *its* lease. Ours, if still there, is stale already: the next attempt takes it over.
        overdue = time.monotonic() - self._renewed > self.ttl_s
        try:
            if not (self._lost or overdue) and self._tag is not None and not store.delete_if(self.uri, self._tag):
                if tag := self._mine(store):  # our last renewal's answer was lost
                    store.delete_if(self.uri, tag)
        except (OSError, BotoCoreError, ClientError) as err:
            logger.warning("lease on %s: not released (%s: %s); it goes stale in %gs", self.what,
                           type(err).__name__, err, self.ttl_s)

    def _heartbeat(self) -> None:
        interval = self.ttl_s / 4
        while not self._stop.wait(interval):
            try:
                self.renew()
            except Exception as err:  # a store outage: keep trying; the ttl decides when it is lost
                logger.warning("lease on %s: renewal failed (%s: %s)", self.what, type(err).__name__, err)
            if self._lost:
                logger.error("%s", self._lost)
                return

    def __enter__(self) -> RunLease:
        """Acquire the lease (unless :meth:`acquire` already did) and renew it from a thread."""
        if self._tag is None:
            self.acquire()
        self._thread = threading.Thread(target=self._heartbeat, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(holder: dict) -> str:
    job = f", Ray job {holder['ray_job']}" if holder.get("ray_job") else ""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{job}"
