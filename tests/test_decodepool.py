"""Decoding in worker processes (diqa_cli.decodepool): a decoder that crashes, hangs, runs out of
memory or chatters on stderr costs only its own input. Every file is made here in tmp_path."""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

import imagecraft
from diqa_cli import decodepool
from diqa_cli.errors import UsageError
from diqa_cli.imageio import InputItem, iter_images

# Run in each worker before it serves: inputs whose name says so make the decoder die the way a
# broken codec would, or answer with bytes that are not an answer.
CRASHING_DECODER = """
import os, signal
from diqa_cli import decodepool, imageio
_load = imageio._load
def _crashing_load(path, limit):
    name = os.path.basename(path)
    if name.startswith("segv"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("sigkill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if name.startswith("exit"):
        os._exit(3)
    return _load(path, limit)
imageio._load = _crashing_load
_ok = decodepool._answer_ok
def _garbled(array):
    if array.shape[0] == 5:  # not an answer at all
        return b"\\x07" * 64
    if array.shape[0] == 6:  # a well-formed header announcing 30 GB
        return decodepool._ANSWER.pack(0, 0, 100_000, 100_000, 3)
    return _ok(array)
decodepool._answer_ok = _garbled
"""


def good_png(path, color=(10, 200, 30), size=(12, 9)):
    Image.new("RGB", size, color).save(path)
    return path


def rows_for(paths, resolution=8, **kwargs):
    kwargs.setdefault("workers", 2)
    return list(iter_images([InputItem(str(p)) for p in paths], resolution, **kwargs))


@pytest.fixture
def crashing_decoder(monkeypatch):
    monkeypatch.setattr(decodepool, "_worker_prelude", CRASHING_DECODER)


def test_process_and_thread_isolation_give_the_same_arrays(tmp_path):
    paths = [good_png(tmp_path / "a.png"), tmp_path / "b.jpg", tmp_path / "c.tif"]
    paths[1].write_bytes(imagecraft.encoded("JPEG", size=(40, 30)))
    Image.fromarray(np.array([[0, 30000], [65535, 12]], np.uint16)).save(paths[2])  # float path
    by_process = rows_for(paths, 16, isolation="process")
    by_thread = rows_for(paths, 16, isolation="thread")
    for (_, a, ea), (_, b, eb) in zip(by_process, by_thread):
        assert ea is eb is None
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b)


@pytest.mark.parametrize(
    "name,reason",
    [
        ("segv.png", "decoder crashed (signal 11)"),
        ("sigkill.png", "decoder crashed (signal 9: killed, often by the system running out of memory)"),
        ("exit.png", "decoder crashed (exit status 3)"),
    ],
)
def test_a_crashing_decoder_costs_only_its_input(tmp_path, crashing_decoder, name, reason):
    paths = [good_png(tmp_path / "first.png"), good_png(tmp_path / name), good_png(tmp_path / "after.png"),
             good_png(tmp_path / "last.png")]
    rows = rows_for(paths, workers=1, prefetch=4)  # one worker: the inputs behind the crash wait in it
    assert [row[0].path for row in rows] == [str(p) for p in paths]
    assert [row[2] for row in rows] == [None, reason, None, None]
    assert all(row[1].shape == (3, 8, 8) for row in rows if row[2] is None)


@pytest.mark.parametrize("resolution", [5, 6])  # the hook garbles answers at these sizes
def test_an_answer_that_is_not_one_is_refused_not_trusted(tmp_path, crashing_decoder, resolution):
    paths = [good_png(tmp_path / "a.png"), good_png(tmp_path / "b.png")]
    started = time.monotonic()
    rows = rows_for(paths, resolution=resolution, workers=1, timeout_s=30)
    assert [row[2] for row in rows] == ["decoder sent a malformed answer"] * 2
    assert time.monotonic() - started < 15  # refused on sight, not after waiting for 30 GB


def test_a_hanging_input_times_out_and_the_run_goes_on(tmp_path):
    fifo = tmp_path / "never.png"
    os.mkfifo(fifo)  # nobody ever writes: open() blocks in the decoder
    paths = [good_png(tmp_path / "a.png"), fifo, good_png(tmp_path / "b.png")]
    started = time.monotonic()
    rows = rows_for(paths, workers=2, timeout_s=1.0)
    assert time.monotonic() - started < 20
    assert [row[2] for row in rows] == [None, "decoding took longer than 1 s", None]


def test_an_input_over_the_memory_ceiling_fails_alone(tmp_path):
    big = tmp_path / "big16.png"  # 16-bit: decoded through float copies, about 200 MB
    Image.fromarray(np.zeros((3000, 3000), np.uint16)).save(big)
    paths = [good_png(tmp_path / "a.png"), big, good_png(tmp_path / "b.png")]
    rows = rows_for(paths, workers=1, memory_mb=100)
    assert [row[2] for row in rows] == [None, "decoder ran out of memory (limit 100 MiB)", None]
    assert rows_for([big], memory_mb=1024)[0][2] is None  # the same file fits a bigger ceiling


def chattering_tiff() -> bytes:
    """A JPEG-compressed TIFF with damaged bytes: it still decodes, while libjpeg inside libtiff
    complains straight to file descriptor 2."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "TIFF", compression="jpeg")
    data = bytearray(out.getvalue())
    for at in range(200, min(len(data), 900), 7):
        data[at] ^= 0x55
    return bytes(data)


def test_native_decoder_chatter_does_not_reach_stderr(tmp_path, capfd, monkeypatch):
    path = tmp_path / "chatty.tif"
    path.write_bytes(chattering_tiff())
    rows_for([path], isolation="thread")
    if not capfd.readouterr().err:
        pytest.skip("this libtiff/libjpeg build prints nothing for the damaged TIFF")
    (row,) = rows_for([path], isolation="process")
    assert capfd.readouterr().err == ""
    monkeypatch.setenv("DIQA_DEBUG", "1")
    rows_for([path], isolation="process")
    assert capfd.readouterr().err != ""  # --debug lets it through


def test_stopping_early_kills_a_busy_worker_and_returns_promptly(tmp_path):
    fifo = tmp_path / "never.png"
    os.mkfifo(fifo)
    rows = iter_images([InputItem(str(good_png(tmp_path / "a.png"))), InputItem(str(fifo))], 8,
                       workers=1, timeout_s=60)
    next(rows)
    started = time.monotonic()
    rows.close()
    assert time.monotonic() - started < 10
    assert not [t for t in threading.enumerate() if t.name.startswith("diqa-decode")]


def test_idle_workers_are_reused_by_the_next_call(tmp_path):
    path = good_png(tmp_path / "a.png")
    rows_for([path])
    started = time.monotonic()
    rows_for([path])
    assert time.monotonic() - started < 5  # no fresh Python start needed (a loose bound)
    assert decodepool._spare  # kept for the next call


def test_workers_that_cannot_start_stop_the_run_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(decodepool, "_worker_prelude", "raise SystemExit(4)")
    with pytest.raises(decodepool.DecoderStartError, match="exit status 4.*DIQA_DEBUG=1.*DIQA_DECODE_ISOLATION=thread"):
        rows_for([good_png(tmp_path / "a.png")])


@pytest.mark.parametrize(
    "env,value,message",
    [
        ("DIQA_DECODE_TIMEOUT", "soon", "DIQA_DECODE_TIMEOUT='soon' is not a number of seconds"),
        ("DIQA_DECODE_TIMEOUT", "-1", "DIQA_DECODE_TIMEOUT='-1'"),
        ("DIQA_DECODE_MEMORY_MB", "lots", "DIQA_DECODE_MEMORY_MB='lots' is not a whole number of MiB"),
        ("DIQA_DECODE_MEMORY_MB", "32", "DIQA_DECODE_MEMORY_MB=32: the decoder memory limit must be at least 64 MiB"),
        ("DIQA_DECODE_ISOLATION", "container", "choose one of process, thread"),
    ],
)
def test_bad_limits_in_the_environment_name_the_variable_and_the_fix(monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        iter_images([], 8)


def test_limits_come_from_arguments_then_environment_then_defaults(monkeypatch):
    monkeypatch.delenv("DIQA_DECODE_MEMORY_MB", raising=False)
    monkeypatch.delenv("DIQA_DECODE_TIMEOUT", raising=False)
    assert decodepool.decode_limits(max_pixels=100_000_000) == decodepool.DecodeLimits(4096, 120.0)
    assert decodepool.decode_limits(max_pixels=400_000_000).memory_mb == 15259  # 40 bytes a pixel
    monkeypatch.setenv("DIQA_DECODE_MEMORY_MB", "512")
    monkeypatch.setenv("DIQA_DECODE_TIMEOUT", "2.5")
    assert decodepool.decode_limits(max_pixels=10) == decodepool.DecodeLimits(512, 2.5)
    assert decodepool.decode_limits(256, 9, max_pixels=10) == decodepool.DecodeLimits(256, 9.0)


def test_ctrl_c_in_the_terminal_is_left_to_the_parent(tmp_path):
    # The terminal sends SIGINT to the whole foreground group; workers ignore it, the parent decides.
    decodepool._stop_spares()
    rows_for([good_png(tmp_path / "a.png")], workers=1)
    (worker,) = [w for kept in decodepool._spare.values() for w in kept]
    os.kill(worker.process.pid, signal.SIGINT)
    time.sleep(0.3)
    assert worker.process.poll() is None
    assert rows_for([good_png(tmp_path / "b.png")], workers=1)[0][2] is None
    assert [w for kept in decodepool._spare.values() for w in kept] == [worker]  # the same one served
