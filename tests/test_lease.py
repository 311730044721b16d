"""Run leases on the real S3 store and on local folders: one attempt holds a run at a time."""

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tessera.lease import LeaseHeldError, LeaseLostError, RunLease
from tessera.storage import Storage, join_uri


@pytest.fixture(params=["s3", "local"])
def lease_uri(request, bucket_uri, tmp_path):
    return join_uri(bucket_uri if request.param == "s3" else str(tmp_path), "run", "_LEASE.json")


def _holder(storage, uri) -> dict:
    return json.loads(storage.read_bytes(uri))


def test_conditional_writes_compare_and_swap(storage, lease_uri):
    tag = storage.create_exclusive(lease_uri, b"first")
    assert tag and storage.create_exclusive(lease_uri, b"second") is None
    data, read_tag, age = storage.read_versioned(lease_uri)
    assert (data, read_tag) == (b"first", tag) and 0 <= age < 30
    new = storage.replace_if(lease_uri, b"third", tag)
    assert new and new != tag
    assert storage.replace_if(lease_uri, b"fourth", tag) is None  # a stale tag loses
    assert storage.read_bytes(lease_uri) == b"third"
    assert not storage.delete_if(lease_uri, tag) and storage.exists(lease_uri)  # a stale tag deletes nothing
    assert storage.delete_if(lease_uri, new) and not storage.exists(lease_uri)
    assert storage.replace_if(lease_uri, b"fifth", new) is None and not storage.exists(lease_uri)
    assert not storage.delete_if(lease_uri, new)  # nothing there
    with pytest.raises(FileNotFoundError):
        storage.read_versioned(lease_uri)


def test_each_renewal_is_a_new_version_so_a_taker_holding_an_older_tag_loses(storage, lease_uri):
    """An S3 ETag is the content's MD5: were a renewal's body the same, a taker that read the lease just
    before it would still match the renewed lease with If-Match and replace it."""
    lease = RunLease(storage, lease_uri, ttl_s=60)
    lease.acquire()
    _, seen_by_taker, _ = storage.read_versioned(lease_uri)
    lease.renew()
    assert storage.replace_if(lease_uri, b'{"token": "taker"}', seen_by_taker) is None
    lease.check()
    assert _holder(storage, lease_uri)["writes"] == 2


def test_a_second_attempt_is_refused_naming_the_holder_until_the_first_ends(storage, lease_uri):
    with RunLease(storage, lease_uri, ttl_s=60, what="run-1") as first:
        holder = _holder(storage, lease_uri)
        assert holder["token"] == first.token and holder["pid"] == os.getpid()
        with pytest.raises(LeaseHeldError, match=rf"run-1 is being written by another attempt \(host "
                                                  rf"{socket.gethostname()}, pid {os.getpid()}.*--break-lease"):
            RunLease(storage, lease_uri, ttl_s=60, what="run-1").acquire()
        first.check()
    assert not storage.exists(lease_uri)  # released
    with RunLease(storage, lease_uri, ttl_s=60) as second:
        assert _holder(storage, lease_uri)["token"] == second.token


def test_of_attempts_starting_together_exactly_one_gets_the_lease(storage, lease_uri):
    uri = lease_uri
    barrier, outcomes = threading.Barrier(8), []

    def attempt():
        lease = RunLease(Storage(storage.config), uri, ttl_s=60)
        barrier.wait()
        try:
            lease.acquire()
            outcomes.append(lease.token)
        except LeaseHeldError:
            outcomes.append(None)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [t for t in outcomes if t]
    assert len(outcomes) == 8 and len(winners) == 1
    assert _holder(storage, uri)["token"] == winners[0]


def test_a_lease_not_renewed_for_its_ttl_is_taken_over(storage, lease_uri, caplog):
    """A killed attempt on another host leaves its lease behind: stale once its ttl has passed (the
    store's clock counts, to the second)."""
    # the store's times are whole seconds, so an age is known to about 1 s: a ttl of 3 is fresh at once, even
    # on a slow machine, and stale 4.5 s later
    storage.write_bytes(lease_uri, json.dumps({"token": "old", "host": "elsewhere", "pid": 1, "ttl_s": 3}).encode())
    with pytest.raises(LeaseHeldError, match="host elsewhere, pid 1"):  # still fresh
        RunLease(storage, lease_uri, ttl_s=60).acquire()
    time.sleep(4.5)
    with caplog.at_level(logging.WARNING, logger="tessera.lease"), RunLease(storage, lease_uri, ttl_s=60) as lease:
        assert _holder(storage, lease_uri)["token"] == lease.token
    assert "taken over from host elsewhere, pid 1: not renewed for" in caplog.text


def test_a_lease_whose_holder_on_this_host_exited_is_taken_over_at_once(storage, lease_uri):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(gone.stdout)
    from tessera.lease import _machine

    storage.write_bytes(lease_uri, json.dumps({**_machine(), "token": "old", "pid": pid,
                                               "pid_started": time.time() - 5, "ttl_s": 600}).encode())
    with RunLease(storage, lease_uri, ttl_s=60) as lease:
        assert _holder(storage, lease_uri)["token"] == lease.token
    # a live process on this machine (this one) is not taken over
    RunLease(storage, lease_uri, ttl_s=600).acquire()
    with pytest.raises(LeaseHeldError):
        RunLease(storage, lease_uri, ttl_s=600).acquire()


def test_an_exited_pid_in_another_pid_namespace_or_boot_is_not_taken_for_gone(storage, lease_uri):
    """Containers with host networking share the host name, each with its own pids: a pid that is free
    here may be the live holder there."""
    from tessera.lease import _machine

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    for other in ({"pid_ns": "pid:[1]"}, {"boot_id": "another-boot"}):
        storage.write_bytes(lease_uri, json.dumps({**_machine(), **other, "token": "old", "pid": int(gone.stdout),
                                                   "pid_started": time.time() - 5, "ttl_s": 600}).encode())
        with pytest.raises(LeaseHeldError):
            RunLease(storage, lease_uri, ttl_s=60).acquire()


def test_a_broken_lease_is_lost_by_its_holder_which_stops_and_leaves_the_new_lease(storage, lease_uri):
    first = RunLease(storage, lease_uri, ttl_s=60, what="run-1")
    first.acquire()
    first.renew()
    first.check()  # renewing its own lease keeps it
    second = RunLease(storage, lease_uri, ttl_s=60, break_lease=True)
    second.acquire()
    first.renew()
    assert first.lost
    with pytest.raises(LeaseLostError, match=rf"run-1: the lease .* was taken over by host .*pid {os.getpid()}"):
        first.check()
    first.release()  # does not delete the lease it lost
    assert _holder(storage, lease_uri)["token"] == second.token
    second.release()
    assert not storage.exists(lease_uri)


def test_an_attempt_that_cannot_renew_for_its_ttl_counts_its_lease_as_lost(storage, lease_uri):
    lease = RunLease(storage, lease_uri, ttl_s=0.5)
    lease.acquire()  # no heartbeat thread: as if the store had been unreachable since
    time.sleep(0.7)
    with pytest.raises(LeaseLostError, match=r"could not be renewed for 0.5s \(the store unreachable\?\)"):
        lease.check()


def test_the_heartbeat_keeps_a_short_lease_fresh(storage, bucket_uri):
    uri = join_uri(bucket_uri, "beat", "_LEASE.json")
    # ttl 4 (renewed every second): a renewal a second late, and the store's whole-second times, stay inside it
    with RunLease(storage, uri, ttl_s=4) as lease:
        time.sleep(8)  # two ttls: without renewals the lease would be stale
        lease.check()
        with pytest.raises(LeaseHeldError):
            RunLease(storage, uri, ttl_s=4).acquire()


def test_release_with_the_store_unreachable_logs_and_leaves_the_lease_to_go_stale(storage, bucket_uri, caplog):
    from tessera.storage import StorageConfig

    uri = join_uri(bucket_uri, "outage", "_LEASE.json")
    lease = RunLease(storage, uri, ttl_s=60, what="run-1")
    lease.acquire()
    lease.storage = Storage(StorageConfig(endpoint_url="http://127.0.0.1:9", max_attempts=1, retry_window_s=0,
                                          connect_timeout_s=1))
    with caplog.at_level(logging.WARNING, logger="tessera.lease"):
        lease.release()  # an attempt ending on its own error is not made to end on this one
    assert "lease on run-1: not released" in caplog.text and storage.exists(uri)


def test_a_lease_acquired_first_is_entered_without_a_second_acquire(storage, bucket_uri):
    uri = join_uri(bucket_uri, "twice", "_LEASE.json")
    lease = RunLease(storage, uri, ttl_s=60)
    lease.acquire()
    _, tag, _ = storage.read_versioned(uri)
    with lease:
        assert storage.read_versioned(uri)[1] == tag  # not written again
        assert [t.name for t in threading.enumerate()].count("run-lease") == 1
    assert not storage.exists(uri)


def test_a_lease_not_renewed_for_its_ttl_is_not_deleted_on_release(storage, lease_uri):
    """Another attempt may have taken it over meanwhile, and a store that ignores If-Match on DELETE
    would then lose that attempt's lease; left in place, ours is stale and the next attempt takes it."""
    lease = RunLease(storage, lease_uri, ttl_s=1)
    lease.acquire()  # no heartbeat thread: as if the store had been unreachable since
    time.sleep(2.5)  # past the ttl by the store's clock too, which counts to the second
    lease.release()
    assert _holder(storage, lease_uri)["token"] == lease.token
    nxt = RunLease(storage, lease_uri, ttl_s=60)
    nxt.acquire()
    nxt.release()
    assert not storage.exists(lease_uri)
