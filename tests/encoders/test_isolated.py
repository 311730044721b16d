"""Media preprocessing in a child process: the same model inputs as in-process, and a decoder that
crashes or hangs fails its own item only.

The crash and the hang come from ``tests.encoders.faulty`` (no real file known crashes this machine's
decoders); the isolation is what is under test here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tessera.encoders.audio import AudioEncoderConfig, AudioPreprocessor
from tessera.encoders.errors import MediaError
from tessera.encoders.image import ImageEncoderConfig, ImagePreprocessor
from tessera.encoders.isolated import IsolatedDecoder
from tests.encoders.faulty import FaultyImagePreprocessor


@pytest.fixture(scope="module")
def decoder():
    d = IsolatedDecoder(timeout_s=20)
    yield d
    d.close()


def test_the_child_gives_the_same_inputs_and_errors_as_in_process(decoder, image_weights, audio_weights,
                                                                   grocery_jpegs, fsdd_wavs):
    image = ImagePreprocessor(ImageEncoderConfig(weights=str(image_weights)))
    audio = AudioPreprocessor(AudioEncoderConfig(weights=str(audio_weights), clip_seconds=0.5))
    jpegs = [p.read_bytes() for p in grocery_jpegs[:2]]
    wav = fsdd_wavs[0].read_bytes()
    items = [*jpegs, jpegs[0][: len(jpegs[0]) // 2], b"", b"RIFF0000WAVEjunk"]
    isolated, direct = decoder.map(image, items), image.map(items)
    for a, b in zip(isolated, direct, strict=True):
        if isinstance(b, MediaError):
            assert isinstance(a, MediaError) and str(a) == str(b)
        else:
            assert a.dtype == b.dtype and np.array_equal(a, b)
    [a], [b] = decoder.map(audio, [wav]), audio.map([wav])  # two preprocessors share the child
    assert np.array_equal(a, b)
    assert decoder.restarts == 0


def test_a_crash_or_a_hang_fails_its_item_alone_and_a_fresh_child_takes_the_next(image_weights, grocery_jpegs,
                                                                                  caplog):
    decoder = IsolatedDecoder(timeout_s=5)
    prep = FaultyImagePreprocessor(ImageEncoderConfig(weights=str(image_weights)))
    jpeg = grocery_jpegs[0].read_bytes()
    try:
        decoder.start(prep)  # the child's start-up (imports) is not charged to an item's 5 s
        out = decoder.map(prep, [jpeg, b"CRASH", jpeg, b"HANG", jpeg])
    finally:
        decoder.close()
    expected = ImagePreprocessor(ImageEncoderConfig(weights=str(image_weights))).map([jpeg])[0]
    for i in (0, 2, 4):
        assert np.array_equal(out[i], expected)
    assert isinstance(out[1], MediaError) and str(out[1]) == "corrupt: the decoder crashed on this input"
    assert isinstance(out[3], MediaError) and str(out[3]) == "corrupt: decoding took over 5 s"
    assert decoder.restarts == 2
    assert "the decoding process died on one item" in caplog.text


def test_a_decoder_killed_by_sigkill_gets_its_item_once_more(image_weights, grocery_jpegs, tmp_path, caplog):
    """SIGKILL is what the kernel's OOM killer sends: most often the node's memory, not the input. Such an
    item used to be failed for good as 'crashed on this input'; now it is tried once more in a new child,
    and failed (saying so) only when that is killed too."""
    decoder = IsolatedDecoder(timeout_s=20)
    prep = FaultyImagePreprocessor(ImageEncoderConfig(weights=str(image_weights)))
    jpeg = grocery_jpegs[0].read_bytes()
    once = b"OOM" + str(tmp_path / "killed-once").encode() + b"\0" + jpeg
    try:
        decoder.start(prep)
        out = decoder.map(prep, [once, b"OOM\0" + jpeg, jpeg])
    finally:
        decoder.close()
    expected = ImagePreprocessor(ImageEncoderConfig(weights=str(image_weights))).map([jpeg])[0]
    assert np.array_equal(out[0], expected) and np.array_equal(out[2], expected)  # the retry decoded it
    assert isinstance(out[1], MediaError) and str(out[1]) == (
        "corrupt: the decoder was killed on this input twice (SIGKILL: out of memory?)")
    assert decoder.restarts == 3 and "trying it once more" in caplog.text


def test_a_child_answering_what_it_never_writes_is_not_taken_for_an_oom_kill(image_weights, grocery_jpegs,
                                                                              monkeypatch, caplog):
    """The parent kills a child that answers garbage (here: a reply over the size limit) with SIGKILL
    itself; that exit status is not the OOM killer's, so the item is not decoded again."""
    import tessera.encoders.isolated as isolated

    decoder = IsolatedDecoder(timeout_s=20)
    prep = ImagePreprocessor(ImageEncoderConfig(weights=str(image_weights)))
    try:
        decoder.start(prep)
        monkeypatch.setattr(isolated, "MAX_REPLY_BYTES", 1000)  # an image input is ~200 kB
        [out] = decoder.map(prep, [grocery_jpegs[0].read_bytes()])
    finally:
        decoder.close()
    assert isinstance(out, MediaError) and str(out) == "corrupt: the decoder crashed on this input"
    assert decoder.restarts == 1 and "trying it once more" not in caplog.text


def test_a_preprocessor_that_cannot_set_up_raises_as_in_process(decoder, tmp_path, grocery_jpegs):
    broken = ImagePreprocessor(ImageEncoderConfig(weights=str(tmp_path)))  # no preprocessor_config.json
    with pytest.raises(FileNotFoundError):
        broken.map([grocery_jpegs[0].read_bytes()])
    with pytest.raises(FileNotFoundError):
        decoder.map(broken, [grocery_jpegs[0].read_bytes()])


def test_a_child_killed_between_items_is_replaced_without_failing_the_next_item(image_weights, grocery_jpegs):
    """The replacement's start-up (seconds: torch's import) is charged to its setup, not to the next item's
    timeout, which is shorter here than a start-up."""
    import psutil

    decoder = IsolatedDecoder(timeout_s=1.0)
    prep = ImagePreprocessor(ImageEncoderConfig(weights=str(image_weights)))
    jpeg = grocery_jpegs[0].read_bytes()
    try:
        decoder.start(prep)
        assert not isinstance(decoder.map(prep, [jpeg])[0], MediaError)
        child = psutil.Process(decoder.pid)
        child.kill()  # as the OOM killer would, while it waits for work
        child.wait(10)
        assert np.array_equal(decoder.map(prep, [jpeg])[0], prep.map([jpeg])[0])
        assert decoder.restarts == 1 and decoder.pid != child.pid
    finally:
        decoder.close()


@pytest.mark.parametrize("item", [b"HANG", b"SPIN"])
def test_the_child_exits_when_its_parent_is_killed_even_mid_item(tmp_path, image_weights, item):
    """Killed while its child decodes (an item that hangs, or one that spins in C holding the GIL, so no
    thread of the child can run), the parent closes no pipe the child is reading: the kernel's death
    signal ends it (the child's watch thread alone would wait for the GIL, for hours)."""
    import psutil

    script = tmp_path / "parent.py"  # no main guard: the child must not re-run the parent's script
    script.write_text(
        "import os, sys, threading, time\n"
        "from tessera.encoders.image import ImageEncoderConfig\n"
        "from tessera.encoders.isolated import IsolatedDecoder\n"
        "from tests.encoders.faulty import FaultyImagePreprocessor\n"
        "prep = FaultyImagePreprocessor(ImageEncoderConfig(weights=sys.argv[1]))\n"
        "d = IsolatedDecoder(timeout_s=600)\n"
        "d.start(prep)\n"
        f"threading.Thread(target=d.map, args=(prep, [{item!r}]), daemon=True).start()\n"
        "time.sleep(3)\n"
        "import psutil\n"
        "print(d.pid, d.restarts, psutil.Process(d.pid).cpu_times().user, flush=True)\n"
        "os.kill(os.getpid(), 9)\n")
    parent = subprocess.run([sys.executable, str(script), str(image_weights)], capture_output=True, text=True,
                            timeout=180, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert parent.returncode == -9, parent.stderr
    pid, restarts, cpu_s = parent.stdout.split()
    assert restarts == "0"  # the child killed is the one busy with the item, not a fresh idle one
    if item == b"SPIN":
        assert float(cpu_s) > 1.0  # it was spinning (the GIL held), not waiting
    try:
        child = psutil.Process(int(pid))
    except psutil.NoSuchProcess:
        return  # already gone
    child.wait(10)  # raises TimeoutExpired if the orphan lingers in its hang


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_asks_the_kernel_for_sigkill_when_its_parent_dies():
    code = ("import ctypes, os; from tessera.encoders.isolated import _die_with_parent\n"
            "assert _die_with_parent(os.getppid())\n"
            "sig = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)\n"
            "print(sig.value)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    assert out.strip() == str(int(signal.SIGKILL))


def test_the_parent_reads_plain_frames_only_and_never_unpickles_what_the_child_writes():
    import json
    import pickle

    from tessera.encoders.isolated import MAX_REPLY_BYTES, _ChildGone, _read_reply, _result

    def reply(*parts: bytes, length: int | None = None, deadline_s: float = 5.0):
        r, w = os.pipe()
        try:
            data = b"".join(parts)
            os.write(w, (len(data) if length is None else length).to_bytes(8, "little") + data)
            if length is None:
                os.close(w)
                w = -1
            return _read_reply(r, time.monotonic() + deadline_s)
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    head = json.dumps({"array": "float32", "shape": [2, 3]}).encode() + b"\n"
    got = _result(reply(head, arr.tobytes()))
    assert got.dtype == np.float32 and np.array_equal(got, arr) and got.flags.writeable
    err = _result(reply(b'{"media_error": "corrupt", "detail": "bad"}\n'))
    assert isinstance(err, MediaError) and str(err) == "corrupt: bad"

    class Boom:
        def __reduce__(self):
            return (os.abort, ())

    for bad in (pickle.dumps(Boom()),  # a pickle is not a reply: never loaded
                json.dumps({"array": "object", "shape": [1]}).encode() + b"\n",
                json.dumps({"array": "float32", "shape": [4]}).encode() + b"\n" + b"\0" * 8,
                json.dumps({"media_error": "not-a-kind"}).encode() + b"\n"):
        with pytest.raises(_ChildGone):
            _result(reply(bad))
    with pytest.raises(_ChildGone):  # an absurd length is refused, not allocated
        reply(length=MAX_REPLY_BYTES + 1)
    with pytest.raises(TimeoutError):  # a reply that never comes
        reply(length=100, deadline_s=0.2)
