"""Image and video decoding in worker processes: each input under a memory ceiling and a time limit.

Image and video decoders (Pillow's codecs, PyAV's ffmpeg, decord) are native code fed untrusted
bytes. One that crashes (a segfault in a codec),
hangs (a pipe that never sends data, a pathological stream) or asks for more memory than the
machine has would take a whole run down with it if it ran in the scoring process. Here each
input is decoded and resized in a small pool of worker processes instead, and the worst one
input can do is cost its own row:

  * memory: each worker's address space is capped (``RLIMIT_AS``) at what the idle worker maps
    plus ``DIQA_DECODE_MEMORY_MB`` (default 4096 MiB, raised to 40 bytes a pixel of the pixel
    limit when that is larger). An allocation past it fails inside the worker: "decoder ran out
    of memory (limit 4096 MiB)".
  * time: ``DIQA_DECODE_TIMEOUT`` seconds (default 120) of wall-clock time per input, counted
    from when a worker takes it; past that the worker is killed: "decoding took longer than
    120 s". A video has that plus ``DIQA_DECODE_FRAME_TIMEOUT`` seconds (default 1) for each
    frame it plans to decode (its chosen frames and its clips' distinct frames, known once it has
    opened): GenzVQA's default 8 frames and 16 one-second clips of 32 frames make 120 + 520 s.
    One second a frame is far more than a frame takes to decode, and the 120 s cover opening,
    indexing and the seeking that sparse picks in long GOPs need. The
    time a worker waits for the consumer to take its parts does not count.
  * crashes: a worker that dies (a signal, ``os._exit``) gives "decoder crashed (signal 11)";
    SIGKILL adds that it is often the system running out of memory.
  A worker that was killed or died is replaced and the run goes on with the next input; an
  input it had taken but not started goes to another worker. A worker that cannot start at all
  (it exits before it is ready, or is not ready within 60 s) stops the run instead, with a
  ``DecoderStartError`` that names ``DIQA_DEBUG=1`` and ``DIQA_DECODE_ISOLATION=thread``: every
  input would fail the same way.

Workers are plain ``python -c`` processes reading tasks from a pipe, not multiprocessing's:
its "spawn" and "forkserver" start methods re-import the caller's ``__main__`` in every worker
(a script without an ``if __name__ == "__main__"`` guard would run again in each, or crash
each), and "fork" is unsafe once torch has started threads. They talk plain bytes, never
pickle: a worker parses untrusted files, so its answer is checked as data (dtype, shape,
length) and cannot run code here. Results come back already resized, uint8 (R, R, 3) for 8-bit
sources (a quarter of the float size) or float32 (3, R, R); the float conversion happens here.
A worker holds two inputs at a time so it never waits between them, and a manager thread keeps
them fed while the consumer works. Idle workers are kept for the next ``iter_images`` call of
the process.

Videos (``decode_video_in_processes``, called by ``videoio.video_parts``): the worker runs
``videoio.decode_for_model`` and sends each part as it comes, not the video in one piece: each
clip's uint8 crops, and the chosen frames already resized to the model's resolution as uint8, in
the model's batches (the float conversion happens here, so scores are bit-identical to decoding
in this process). A part is the JSON of its few numbers (the video's state, timestamps, each
array's dtype and shape), checked field by field, then the arrays' bytes, checked against the
request's shapes. At most ``_PARTS_AHEAD`` parts wait for the consumer; then the manager stops
reading that worker, whose pipe fills and makes it wait, so a long video never piles up here. The
pipe, not shared memory: GenzVQA's default plan on an 8 s 640x360 clip moves 45 MB, and reading it
costs the calling process 0.04 to 0.05 s of CPU against 0.69 to 0.73 s for decoding the video in
it (``bench/bench_decode.py``, three runs on 2 shared CPU cores, load average 6.6 to 8.9): the
isolated video took 0.85, 1.02 and 0.86 times the in-thread rate, the first call 0.5 to 0.9 s more
for the worker's start. Video workers import PyAV and decord before their address space is
capped, and are kept apart from image workers.

Cost (``bench/bench_decode.py``, four runs on 2 CPU cores shared with other jobs, load average
2.5 to 4.5, so noisy): the first call waits 0.16 to 0.28 s for its workers (a Python start plus
the numpy and Pillow imports; multiprocessing's spawn took 0.36 to 0.60 s, its forkserver 0.22 to
0.35 s first and 0.01 s later), a later call 0.015 s. Over 100 1024x768 JPEGs at 512 px with 2
workers, processes used about 10% more CPU than threads in all (reading answers through the
pipe, here) and ran at 0.73 to 0.97 of the threads' images/s on that CPU-starved machine. Where
a core is free, or the model is the bottleneck (as for every diffusion method), that is hidden,
so "process" is the default.

Workers write nothing to the terminal: their stdout and stderr go to ``/dev/null``, so codec
chatter that native libraries print straight to file descriptor 2 (libtiff's and libjpeg's
"Unsupported marker", "Using code not yet in table", Pillow's Python warnings) never mixes with
diqa's messages. Set ``DIQA_DEBUG=1`` to let their stderr through.

Workers start from a fresh interpreter: Pillow settings and plugins registered at run time in
this process (``pillow_heif.register_heif_opener()``, ``ImageFile.LOAD_TRUNCATED_IMAGES``) do
not reach them; diqa registers none, and decodes with Pillow's defaults on purpose.

``isolation="thread"`` (or ``DIQA_DECODE_ISOLATION=thread``) decodes in threads of this process
instead (a video in the thread that asks for it): no worker start-up and no copy through a pipe, but no memory ceiling, no time limit, no
protection from a crashing codec, and codec chatter reaches stderr. It is the mode for
platforms without worker processes.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import signal
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait

import numpy as np

from diqa_cli.errors import DiqaError, UsageError, one_line

__all__ = [
    "DEBUG_ENV",
    "DEFAULT_FRAME_TIMEOUT_S",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_TIMEOUT_S",
    "FRAME_TIMEOUT_ENV",
    "ISOLATION_ENV",
    "ISOLATION_MODES",
    "MEMORY_ENV",
    "TIMEOUT_ENV",
    "DecodeLimits",
    "DecoderStartError",
    "decode_in_processes",
    "decode_video_in_processes",
    "decode_limits",
    "isolation_mode",
]

ISOLATION_ENV = "DIQA_DECODE_ISOLATION"
MEMORY_ENV = "DIQA_DECODE_MEMORY_MB"
TIMEOUT_ENV = "DIQA_DECODE_TIMEOUT"
FRAME_TIMEOUT_ENV = "DIQA_DECODE_FRAME_TIMEOUT"
DEBUG_ENV = "DIQA_DEBUG"
ISOLATION_MODES = ("process", "thread")
DEFAULT_MEMORY_MB = 4096
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_FRAME_TIMEOUT_S = 1.0
# Bytes of address space a decode may need per pixel of the pixel limit: a 16-bit image goes
# through float64 and float32 copies of its three channels (see imageio._to_rgb).
_BYTES_PER_LIMIT_PIXEL = 40


class DecoderStartError(DiqaError):
    """Decoder processes cannot start here; nothing could be decoded."""


# Seconds a fresh worker may take to start (a Python start and the imports) before it counts as
# unable to; its inputs' time limit starts when it is ready.
_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DecodeLimits:
    """What one input may cost a worker: ``memory_mb`` MiB more than the idle worker maps, and
    ``timeout_s`` seconds of wall-clock time, plus ``frame_timeout_s`` for each frame a video
    plans to decode."""

    memory_mb: int
    timeout_s: float
    frame_timeout_s: float = DEFAULT_FRAME_TIMEOUT_S


def isolation_mode(isolation: str | None = None) -> str:
    """``isolation`` if given, else ``$DIQA_DECODE_ISOLATION``, else "process"."""
    source = "isolation"
    if isolation is None:
        isolation = os.environ.get(ISOLATION_ENV, "").strip() or "process"
        source = ISOLATION_ENV
    if isolation not in ISOLATION_MODES:
        raise UsageError(
            f"{source}={isolation!r} is not a decoding isolation mode; choose one of "
            f"{', '.join(ISOLATION_MODES)}"
        )
    return isolation


def decode_limits(
    memory_mb: int | None = None, timeout_s: float | None = None, frame_timeout_s: float | None = None, *,
    max_pixels: int,
) -> DecodeLimits:
    """The limits in force: the arguments if given, else ``$DIQA_DECODE_MEMORY_MB``,
    ``$DIQA_DECODE_TIMEOUT`` and ``$DIQA_DECODE_FRAME_TIMEOUT``, else the defaults (the memory
    default grows with ``max_pixels``)."""
    source = "memory_mb"
    if memory_mb is None:
        memory_mb, source = _env_number(MEMORY_ENV, int, "a whole number of MiB", DEFAULT_MEMORY_MB), MEMORY_ENV
    if memory_mb is None:
        memory_mb = max(DEFAULT_MEMORY_MB, math.ceil(_BYTES_PER_LIMIT_PIXEL * max_pixels / 2**20))
    elif memory_mb < 64:
        raise UsageError(f"{source}={memory_mb}: the decoder memory limit must be at least 64 MiB")
    if timeout_s is None:
        timeout_s = _env_number(TIMEOUT_ENV, float, "a number of seconds", DEFAULT_TIMEOUT_S)
    if timeout_s is None:
        timeout_s = DEFAULT_TIMEOUT_S
    elif not (math.isfinite(timeout_s) and timeout_s > 0):
        raise UsageError(f"timeout_s={timeout_s}: the decoding time limit must be a positive number of seconds")
    if frame_timeout_s is None:
        frame_timeout_s = _env_number(FRAME_TIMEOUT_ENV, float, "a number of seconds", DEFAULT_FRAME_TIMEOUT_S)
    if frame_timeout_s is None:
        frame_timeout_s = DEFAULT_FRAME_TIMEOUT_S
    elif not (math.isfinite(frame_timeout_s) and frame_timeout_s > 0):
        raise UsageError(f"frame_timeout_s={frame_timeout_s}: the time a video frame may take to decode must be a "
                         "positive number of seconds")
    return DecodeLimits(memory_mb=int(memory_mb), timeout_s=float(timeout_s), frame_timeout_s=float(frame_timeout_s))


def _env_number(name, kind, what, example):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not (math.isfinite(value) and value > 0):
        raise UsageError(f"{name}={raw!r} is not {what}; set it like {name}={example:g} or unset it")
    return value


# --------------------------------------------------------------------------- the protocol
#
# Plain bytes on two pipes, no pickle: a worker parses untrusted files, so what it sends back is
# checked as data (status, dtype, shape, length; JSON for a video part's few numbers), never run
# as code in this process.
#   task   (parent -> worker): _TASK (kind, body length) + body: for an image (kind 0)
#          _IMAGE_TASK (resolution, method, limit) + os.fsencode(path); for a video (kind 1) the
#          JSON of its VideoRequest and path
#   answer (worker -> parent): _ANSWER (status, dtype, d0, d1, d2) + payload:
#          status 0: an image's array (dtype, shape d0 x d1 x d2), its bytes
#          status 1: the input failed; d0 = length of the UTF-8 reason
#          status 3: a part of a video (its input goes on): d0 bytes of JSON (kind, the video's
#                    state, timestamps, and the dtype and shape of each array), then d1 bytes of
#                    arrays, d2 of them
#          status 4: the video is done: d0 bytes of JSON (its final state)
# A worker sends one answer with status 2 and no payload when it is ready to serve, and stops
# when its task pipe reaches end of file.

_TASK = struct.Struct("<BI")
_IMAGE_TASK = struct.Struct("<IIQ")
_ANSWER = struct.Struct("<BBIII")
_DTYPES = {0: np.dtype(np.uint8), 1: np.dtype(np.float32)}
_MAX_REASON = 4096
_MAX_META = 1 << 20  # a part's JSON: state and one batch's timestamps
_MAX_ARRAYS = 4096
_IMAGE, _VIDEO = 0, 1


def _answer_ok(array: np.ndarray) -> bytes:
    code = next(k for k, v in _DTYPES.items() if v == array.dtype)
    return _ANSWER.pack(0, code, *array.shape) + np.ascontiguousarray(array).tobytes()


def _answer_error(reason: str) -> bytes:
    text = reason.encode("utf-8", "replace")[:_MAX_REASON]
    return _ANSWER.pack(1, 0, len(text), 0, 0) + text


def _answer_part(status: int, meta: dict, arrays: list[np.ndarray]) -> list:
    """A video part (status 3) or its end (status 4) as buffers to write one after the other
    (the arrays are not copied into one bytes object)."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    meta["arrays"] = [[next(k for k, v in _DTYPES.items() if v == a.dtype), *a.shape] for a in arrays]
    text = json.dumps(meta).encode()
    views = [memoryview(a).cast("B") for a in arrays]
    return [_ANSWER.pack(status, 0, len(text), sum(v.nbytes for v in views), len(views)) + text, *views]


# --------------------------------------------------------------------------- the worker


def _serve(task_fd: int, answer_fd: int, memory_mb: int, video: bool = False) -> None:
    """A decoder process's main loop (``python -c`` from ``_Worker``): one answer per image
    task, a stream of parts and an end per video task."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    import warnings

    from PIL import Image

    from diqa_cli import imageio

    # This process decodes nothing else, so a process-wide filter races with no one: a Pillow
    # bomb warning on a path diqa's own size check does not cover becomes a refusal.
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    imageio._install_size_check()
    if video:
        # Mapped before the cap, so that the ceiling is what decoding a video adds, as for images.
        import av  # noqa: F401

        try:
            import decord  # noqa: F401
        except ImportError:
            pass
    _cap_address_space(memory_mb)
    tasks = open(task_fd, "rb")
    answers = open(answer_fd, "wb")
    answers.write(_ANSWER.pack(2, 0, 0, 0, 0))
    answers.flush()
    while True:
        header = tasks.read(_TASK.size)
        if len(header) < _TASK.size:
            return  # the parent closed the pipe or is gone
        kind, length = _TASK.unpack(header)
        body = tasks.read(length)
        replies = _video_answers(body, memory_mb) if kind == _VIDEO else [_image_answer(body, memory_mb)]
        try:
            for reply in replies:
                for buffer in reply if isinstance(reply, list) else [reply]:
                    answers.write(buffer)
                answers.flush()
        except OSError:
            return


def _image_answer(body: bytes, memory_mb: int) -> bytes:
    from PIL import Image

    from diqa_cli import imageio
    from diqa_cli.errors import InputError

    resolution, method, limit = _IMAGE_TASK.unpack_from(body)
    path = os.fsdecode(body[_IMAGE_TASK.size:])
    try:
        return _answer_ok(imageio._decode_resized(path, resolution, Image.Resampling(method), limit))
    except InputError as exc:
        return _answer_error(exc.reason)
    except MemoryError:
        return _answer_error(f"decoder ran out of memory (limit {memory_mb} MiB)")
    except Image.DecompressionBombWarning as exc:
        return _answer_error(f"too many pixels: {one_line(exc)}")
    except Exception as exc:  # a bug, not the file: say what it was
        return _answer_error(f"decoder failed: {type(exc).__name__}: {one_line(exc)}")


def _video_answers(body: bytes, memory_mb: int) -> Iterator:
    """One video task's answers: a part per ``videoio.decode_for_model`` part, then the end; or,
    once it fails, its state so far and the reason."""
    from diqa_cli import videoio
    from diqa_cli.errors import InputError

    state = videoio.DecodeReport()
    try:
        spec = json.loads(body)
        path = spec.pop("path")
        for kind, value in videoio.decode_for_model(path, videoio.VideoRequest(**spec), state):
            meta, arrays = {"kind": kind, "state": _state_fields(state)}, []
            if kind == "open":
                meta["planned"] = value
            elif kind == "clip":
                arrays = [value]
            else:
                times, resized, originals = value
                meta["times"] = times.tolist()
                arrays = [resized, *(originals or [])]
            yield _answer_part(3, meta, arrays)
        yield _answer_part(4, {"kind": "done", "state": _state_fields(state)}, [])
        return
    except InputError as exc:
        reason = exc.reason
    except MemoryError:
        reason = f"decoder ran out of memory (limit {memory_mb} MiB)"
    except Exception as exc:  # a bug, not the file: say what it was
        reason = f"decoder failed: {type(exc).__name__}: {one_line(exc)}"
    yield _answer_part(3, {"kind": "state", "state": _state_fields(state)}, [])
    yield _answer_error(reason)


def _state_fields(state) -> dict:
    return {
        "decoder": state.decoder,
        "duration": state.duration,
        "frames_sampled": state.frames_sampled,
        "frame_stats": [state.frame_stats.requested, state.frame_stats.decoded],
        "clip_stats": [state.clip_stats.requested, state.clip_stats.decoded],
    }


def _cap_address_space(memory_mb: int) -> None:
    try:
        import resource
    except ImportError:  # not on Windows: the time limit and crash isolation still hold
        return
    base = _mapped_bytes()
    if base is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = base + (memory_mb << 20)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft == resource.RLIM_INFINITY or cap < soft:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _mapped_bytes() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- the pool


class _Slot:
    """One input in the window: its row once known; for a video, the parts received and not yet
    taken, and the latest state the worker reported."""

    __slots__ = ("item", "row", "parts", "state")

    def __init__(self, item):
        self.item = item
        self.row = None if item.error is None else (item, None, item.error)
        self.parts: deque = deque()
        self.state: dict | None = None


# Tasks a worker holds at once: the one it decodes and the next, so that it never waits for the
# manager between two inputs.
_DEPTH = 2

# Parts of a video read ahead of the consumer. Past this many the manager stops reading that
# worker's pipe, which fills and makes the worker wait: memory stays bounded whatever the video,
# and its time limit stops counting until the consumer catches up.
_PARTS_AHEAD = 2

# Test hook: extra Python run in each worker before it serves (tests/test_decodepool.py).
_worker_prelude = ""


class _Worker:
    """A decoder process started with ``python -c``: not multiprocessing, whose "spawn" and
    "forkserver" re-import the caller's ``__main__`` in every worker (an unguarded script would
    run again, or kill each worker) and pickle results back."""

    def __init__(self, memory_mb: int, debug: bool, video: bool = False):
        import subprocess

        task_read, task_write = os.pipe()
        answer_read, answer_write = os.pipe()
        # The worker imports this very diqa_cli: its folder goes first on the path unless the
        # path has it already (site-packages must not come before the standard library).
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (f"import sys\nroot = {root!r}\nif root not in sys.path: sys.path.insert(0, root)\n"
                f"{_worker_prelude}\nfrom diqa_cli.decodepool import _serve\n"
                f"_serve({task_read}, {answer_write}, {memory_mb}, {video})")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # the parent's stdout is the data stream
                stderr=None if debug else subprocess.DEVNULL,
                pass_fds=(task_read, answer_write),
                env=_worker_env(),
            )
        finally:
            os.close(task_read)
            os.close(answer_write)
        self.tasks_fd = task_write
        self.answers_fd = answer_read
        os.set_blocking(answer_read, False)
        self.buffer = bytearray()
        self.tasks: deque[_Slot] = deque()  # sent, not answered, in the order the worker takes them
        self.deadline = math.inf  # for tasks[0]
        self.allowance = 0.0  # tasks[0]'s time limit in seconds, and how it was made
        self.allowance_note = ""
        self.held_since: float | None = None  # not read while its video's consumer catches up
        self.started = time.monotonic()
        self.ready = False
        self.key = (memory_mb, debug, video, _worker_prelude)
        self.owner = os.getpid()

    def start_clock(self, timeout_s: float) -> None:
        """tasks[0] starts now, with ``timeout_s`` seconds to run."""
        self.deadline = time.monotonic() + timeout_s
        self.allowance, self.allowance_note = timeout_s, ""

    def send(self, task: bytes) -> None:
        view = memoryview(task)
        while view:
            view = view[os.write(self.tasks_fd, view):]

    def read_answers(self, max_payload: int) -> tuple[list, bool]:
        """The answers complete in the pipe so far, as (status, dtype, shape, payload), and
        whether the pipe has ended (the worker is gone, perhaps right after answering). An
        answer announcing more than ``max_payload`` bytes is malformed: nothing is buffered
        beyond what a real answer can hold."""
        ended = False
        while True:
            try:
                chunk = os.read(self.answers_fd, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                ended = True
                break
            self.buffer += chunk
        answers = []
        while len(self.buffer) >= _ANSWER.size:
            status, code, d0, d1, d2 = _ANSWER.unpack_from(self.buffer)
            if status == 2:
                size = 0
            elif status == 1 and d0 <= _MAX_REASON:
                size = d0
            elif status == 0 and code in _DTYPES:
                size = d0 * d1 * d2 * _DTYPES[code].itemsize
            elif status in (3, 4) and d0 <= _MAX_META and d2 <= _MAX_ARRAYS:
                size = d0 + d1
            else:
                raise _Malformed()
            if size > max_payload:
                raise _Malformed()
            if len(self.buffer) < _ANSWER.size + size:
                break
            payload = bytes(self.buffer[_ANSWER.size:_ANSWER.size + size])
            del self.buffer[:_ANSWER.size + size]
            answers.append((status, code, (d0, d1, d2), payload))
        return answers, ended

    def stop(self, *, kill: bool = False, wait_s: float = 1.0) -> None:
        """Close its task pipe, which an idle worker takes as the sign to leave, and kill it if
        ``kill`` (its input is no longer wanted) or if it has not left after ``wait_s``."""
        for fd in (self.tasks_fd, self.answers_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        if kill or self.tasks:
            self.process.kill()
        try:
            self.process.wait(wait_s)
        except Exception:  # subprocess.TimeoutExpired
            self.process.kill()
            self.process.wait()


class _Malformed(Exception):
    """A worker sent bytes that are not an answer."""


def _worker_env() -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, "1")  # numpy's BLAS threads would only reserve memory
    return env


# Idle workers kept for the next iter_images call of this process, by (memory_mb, debug, prelude):
# starting one costs a Python start and the numpy and Pillow imports.
_spare_lock = threading.Lock()
_spare: dict[tuple, list[_Worker]] = {}


def _take_spare(key) -> _Worker | None:
    with _spare_lock:
        while _spare.get(key):
            worker = _spare[key].pop()
            if worker.owner == os.getpid() and worker.process.poll() is None:
                return worker
    return None


def _keep_spare(worker: _Worker, limit: int) -> bool:
    if worker.tasks or worker.buffer or worker.process.poll() is not None or worker.owner != os.getpid():
        return False
    with _spare_lock:
        kept = _spare.setdefault(worker.key, [])
        if len(kept) >= limit:
            return False
        kept.append(worker)
    return True


@atexit.register
def _stop_spares() -> None:
    with _spare_lock:
        workers = [w for kept in _spare.values() for w in kept if w.owner == os.getpid()]
        _spare.clear()
    for worker in workers:
        worker.stop(wait_s=0.5)


class _Manager(threading.Thread):
    """Feeds the workers and settles rows, on its own thread, so decoding runs on while the
    consumer is busy with the rows it has: hands queued inputs out, takes answers as they come
    (a full pipe would stall a worker), enforces deadlines and replaces dead workers.

    Video tasks answer in parts (``part_of`` reads each one); a video's parts wait in its slot
    for the consumer (``next_part``), at most ``_PARTS_AHEAD`` of them."""

    def __init__(self, size: int, limits: DecodeLimits, task_of, finish, max_payload: int, *,
                 part_of=None, video: bool = False):
        super().__init__(name="diqa-decode-manager", daemon=True)
        self.size = size
        self.max_payload = max_payload
        self.limits = limits
        self.task_of = task_of
        self.finish = finish
        self.part_of = part_of
        self.config = (limits.memory_mb, os.environ.get(DEBUG_ENV, "") not in ("", "0"), video)
        self.key = (*self.config, _worker_prelude)
        self.changed = threading.Condition()  # guards queue, stopping, error and every slot's row, parts, state
        self.queue: deque[_Slot] = deque()
        self.stopping = False
        self.error: BaseException | None = None
        self.workers: list[_Worker] = []
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)

    # called from the consumer's thread
    def submit(self, slot: _Slot) -> None:
        with self.changed:
            self.queue.append(slot)
        self._wake()

    def wait_for(self, slot: _Slot):
        with self.changed:
            self.changed.wait_for(lambda: slot.row is not None or self.error is not None)
            if slot.row is None:
                self._raise_error()
            return slot.row

    def next_part(self, slot: _Slot):
        """The video's next part, or None once it has ended (its row is then set): parts still
        waiting are dropped when it failed, which makes it fail at once."""
        with self.changed:
            self.changed.wait_for(lambda: slot.parts or slot.row is not None or self.error is not None)
            if slot.row is not None and slot.row[2] is not None:
                slot.parts.clear()
                return None
            if slot.parts:
                part = slot.parts.popleft()
            elif slot.row is not None:
                return None
            else:
                self._raise_error()
        self._wake()  # there is room for the next part now
        return part

    def _raise_error(self):
        if isinstance(self.error, DecoderStartError):
            raise self.error
        raise RuntimeError("the decoding manager failed") from self.error

    def shutdown(self) -> None:
        with self.changed:
            self.stopping = True
        self._wake()
        self.join()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    # the manager's thread
    def run(self) -> None:
        try:
            while True:
                with self.changed:
                    if self.stopping:
                        return
                self._dispatch()
                self._collect()
        except BaseException as exc:  # never leave the consumer waiting
            with self.changed:
                self.error = exc
                self.changed.notify_all()
        finally:
            for worker in self.workers:
                if not _keep_spare(worker, self.size):
                    worker.stop(kill=bool(worker.tasks))
            self.workers = []

    def _dispatch(self) -> None:
        while True:
            with self.changed:
                if not self.queue:
                    return
            worker = min(self.workers, key=lambda w: len(w.tasks), default=None)
            if worker is None or (worker.tasks and len(self.workers) < self.size):
                worker = _take_spare(self.key) or _Worker(*self.config)
                self.workers.append(worker)
            if len(worker.tasks) >= _DEPTH:
                return
            with self.changed:
                slot = self.queue.popleft()
            try:
                worker.send(self.task_of(slot))
            except OSError:  # it died: `_collect` sees the end of its answers and settles
                with self.changed:
                    self.queue.appendleft(slot)
                return
            if not worker.tasks:
                if worker.ready:
                    worker.start_clock(self.limits.timeout_s)
                else:
                    worker.deadline = worker.started + _START_TIMEOUT_S
            worker.tasks.append(slot)

    def _listening(self, now: float) -> list[_Worker]:
        """The workers whose answers are read now: not those whose video has ``_PARTS_AHEAD``
        parts waiting for the consumer. A worker's deadline moves on by the time it was held."""
        listening = []
        with self.changed:
            for worker in self.workers:
                held = bool(worker.tasks) and len(worker.tasks[0].parts) >= _PARTS_AHEAD
                if held and worker.held_since is None:
                    worker.held_since = now
                elif not held and worker.held_since is not None:
                    worker.deadline += now - worker.held_since
                    worker.held_since = None
                if not held:
                    listening.append(worker)
        return listening

    def _collect(self) -> None:
        listening = self._listening(time.monotonic())
        busy = [w for w in listening if w.tasks]
        deadline = min((w.deadline for w in busy), default=math.inf)
        timeout = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
        ready = set(wait([self._wake_read] + [w.answers_fd for w in listening], timeout))
        if self._wake_read in ready:
            os.read(self._wake_read, 4096)
        now = time.monotonic()
        for worker in listening:
            if worker.answers_fd in ready:
                reason = self._take_answers(worker)
                if reason is None:
                    continue
            elif worker.tasks and now >= worker.deadline:
                if not worker.ready:
                    worker.stop(kill=True)
                    raise self._start_error(f"not ready after {_START_TIMEOUT_S:g} s")
                reason = f"decoding took longer than {worker.allowance:g} s{worker.allowance_note}"
            else:
                continue
            self._retire(worker, reason)

    def _start_error(self, what: str) -> DecoderStartError:
        return DecoderStartError(
            f"the decoder processes do not start ({what}); run with DIQA_DEBUG=1 to see "
            f"their error, or set {ISOLATION_ENV}=thread to decode in this process"
        )

    def _take_answers(self, worker: _Worker) -> str | None:
        """Settle the answers waiting; the reason to retire the worker, if there is one."""
        try:
            answers, ended = worker.read_answers(self.max_payload)
        except _Malformed:
            return "decoder sent a malformed answer"
        for answer in answers:
            if answer[0] == 2:  # ready
                if worker.ready:
                    return "decoder sent a malformed answer"
                worker.ready = True
                if worker.tasks:
                    worker.start_clock(self.limits.timeout_s)
                continue
            if not worker.tasks or not worker.ready:
                return "decoder sent a malformed answer"
            if answer[0] in (3, 4):
                try:
                    self._take_part(worker, answer)
                except _Malformed:
                    return "decoder sent a malformed answer"
                if answer[0] == 3:
                    continue
            self._settle(worker, answer)
        if ended and not worker.ready:
            raise self._start_error(_how_it_ended(worker.process))
        return _death_reason(worker.process) if ended else None

    def _take_part(self, worker: _Worker, answer) -> None:
        """A video's part (status 3) or end (status 4): its state, and its part for the consumer."""
        if self.part_of is None:
            raise _Malformed()
        slot = worker.tasks[0]
        part, state, extra_s, note = self.part_of(slot, answer[0], answer[2], answer[3])
        if extra_s:
            worker.deadline += extra_s
            worker.allowance += extra_s
            worker.allowance_note = note
        with self.changed:
            slot.state = state
            if part is not None:
                slot.parts.append(part)
            self.changed.notify_all()

    def _settle(self, worker: _Worker, answer) -> None:
        slot = worker.tasks.popleft()
        if worker.tasks:
            worker.start_clock(self.limits.timeout_s)
        else:
            worker.deadline = math.inf
        status, code, shape, payload = answer
        if status == 1:
            row = self.finish(slot, None, payload.decode("utf-8", "replace"))
        elif status == 4:
            row = self.finish(slot, None, None)
        else:
            row = self.finish(slot, np.frombuffer(payload, _DTYPES[code]).reshape(shape), None)
        with self.changed:
            slot.row = row
            self.changed.notify_all()

    def _retire(self, worker: _Worker, reason: str) -> None:
        """The worker died, overran or broke the protocol: its current input gets ``reason``,
        inputs it had not started go back to the front of the queue, and it is replaced when
        work remains."""
        self.workers.remove(worker)
        current = worker.tasks.popleft() if worker.tasks else None
        pending = list(worker.tasks)
        worker.tasks.clear()
        worker.stop(kill=True)
        if current is not None:
            row = self.finish(current, None, reason)
            with self.changed:
                current.row = row
                self.changed.notify_all()
        with self.changed:
            self.queue.extendleft(reversed(pending))


def _death_reason(process) -> str:
    return f"decoder crashed ({_how_it_ended(process)})"


def _how_it_ended(process) -> str:
    try:
        code = process.wait(1.0)
    except Exception:  # subprocess.TimeoutExpired: it closed its pipe but runs on
        return "it closed its pipe but runs on"
    if code < 0:
        if -code == signal.SIGKILL:
            return f"signal {-code}: killed, often by the system running out of memory"
        return f"signal {-code}"
    return f"exit status {code}"


def decode_in_processes(
    items: Iterable,
    resolution: int,
    method,
    limit: int,
    *,
    workers: int,
    prefetch: int,
    limits: DecodeLimits,
) -> Iterator[tuple]:
    """``imageio.iter_images`` in worker processes: rows in input order, at most ``prefetch``
    inputs taken ahead of the consumer, every input exactly one row."""
    from diqa_cli.imageio import _model_input

    expected = {np.dtype(np.uint8): (resolution, resolution, 3), np.dtype(np.float32): (3, resolution, resolution)}

    def task_of(slot):
        path = os.fsencode(os.path.abspath(slot.item.path))  # a spare worker may have another cwd
        body = _IMAGE_TASK.pack(resolution, int(method), limit) + path
        return _TASK.pack(_IMAGE, len(body)) + body

    def finish(slot, resized, reason):
        if reason is not None:
            return slot.item, None, reason
        if expected.get(resized.dtype) != resized.shape:
            return slot.item, None, "decoder sent a malformed answer"
        return slot.item, _model_input(resized), None

    source = iter(items)
    window: deque[_Slot] = deque()  # taken, not yet yielded, in input order
    manager: _Manager | None = None
    exhausted = False
    try:
        while True:
            while not exhausted and len(window) < prefetch:
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                slot = _Slot(item)
                window.append(slot)
                if slot.row is None:
                    if manager is None:
                        manager = _Manager(workers, limits, task_of, finish, 4 * 3 * resolution * resolution)
                        manager.start()
                    manager.submit(slot)
            if not window:
                return
            head = window.popleft()
            yield head.row if head.row is not None else manager.wait_for(head)
    finally:
        if manager is not None:
            manager.shutdown()


def decode_video_in_processes(path: str, request, state, *, limits: DecodeLimits) -> Iterator[tuple[str, object]]:
    """``videoio.video_parts`` in a decoder process: ``videoio.decode_for_model``'s parts for one
    video, read as the worker sends them, and ``state`` kept up to date from its reports. A video
    whose decoder fails, crashes, overruns its time limit or sends what is not an answer raises
    ``InputError(path, reason)`` (after the parts that came before it, but none that were
    waiting: a failed video fails at once)."""
    from dataclasses import asdict

    from diqa_cli.errors import InputError
    from diqa_cli.imageio import InputItem

    body = json.dumps({**asdict(request), "path": os.path.abspath(path)}).encode()
    pixels = request.resolution**2 * 3
    clip_bytes = (request.clip_len or 0) * request.crop_size**2 * 3
    originals = request.batch * request.max_pixels * 3 if request.keep_frames else 0
    max_payload = _MAX_META + max(clip_bytes, request.batch * pixels + originals)

    def task_of(slot):
        return _TASK.pack(_VIDEO, len(body)) + body

    def finish(slot, array, reason):
        if array is not None:  # an image's answer to a video task
            return slot.item, None, "decoder sent a malformed answer"
        return slot.item, None, reason

    def part_of(slot, status, dims, payload):
        meta, arrays = _read_part(dims, payload)
        fields = _checked_state(meta.get("state"))
        kind = meta.get("kind")
        if status == 4:
            if kind != "done" or arrays:
                raise _Malformed()
            return None, fields, 0.0, ""
        if kind == "state" and not arrays:
            return None, fields, 0.0, ""
        if kind == "open" and not arrays:
            planned = meta.get("planned")
            if type(planned) is not int or planned < 0:
                raise _Malformed()
            extra = planned * limits.frame_timeout_s
            note = f" ({limits.timeout_s:g} s + {limits.frame_timeout_s:g} s for each of {planned} frames)"
            return ("open", planned), fields, extra, note
        if kind == "clip" and len(arrays) == 1:
            (crops,) = arrays
            if crops.dtype == np.uint8 and crops.shape == (request.clip_len, request.crop_size, request.crop_size, 3):
                return ("clip", crops), fields, 0.0, ""
        if kind == "frames" and arrays:
            times, resized, kept = meta.get("times"), arrays[0], arrays[1:]
            count = len(times) if isinstance(times, list) else 0
            if (0 < count <= request.batch and all(type(t) is float for t in times)
                    and resized.dtype == np.uint8 and resized.shape == (count, request.resolution, request.resolution, 3)
                    and len(kept) == (count if request.keep_frames else 0)
                    and all(f.dtype == np.uint8 and f.ndim == 3 and f.shape[2] == 3
                            and f.shape[0] * f.shape[1] <= request.max_pixels for f in kept)):
                value = (np.asarray(times, dtype=np.float64), resized, kept if request.keep_frames else None)
                return ("frames", value), fields, 0.0, ""
        raise _Malformed()

    slot = _Slot(InputItem(str(path)))
    manager = _Manager(1, limits, task_of, finish, max_payload, part_of=part_of, video=True)
    manager.start()
    manager.submit(slot)
    try:
        while True:
            part = manager.next_part(slot)
            if slot.state is not None:
                _apply_state(state, slot.state)
            if part is None:
                break
            yield part
        reason = slot.row[2]
        if reason is not None:
            raise InputError(path, reason)
    finally:
        manager.shutdown()


def _read_part(dims, payload: bytes) -> tuple[dict, list[np.ndarray]]:
    """A video part's JSON and arrays, checked against what its header announced."""
    meta_size, _, count = dims
    try:
        meta = json.loads(payload[:meta_size])
    except ValueError:  # UnicodeDecodeError and JSONDecodeError
        raise _Malformed() from None
    specs = meta.get("arrays") if isinstance(meta, dict) else None
    if not isinstance(specs, list) or len(specs) != count:
        raise _Malformed()
    arrays, at = [], meta_size
    for spec in specs:
        if not (isinstance(spec, list) and 1 < len(spec) <= 5 and all(type(n) is int and n >= 0 for n in spec)
                and spec[0] in _DTYPES):
            raise _Malformed()
        dtype, shape = _DTYPES[spec[0]], tuple(spec[1:])
        size = math.prod(shape) * dtype.itemsize
        if at + size > len(payload):
            raise _Malformed()
        arrays.append(np.frombuffer(payload, dtype, math.prod(shape), at).reshape(shape))
        at += size
    if at != len(payload):
        raise _Malformed()
    return meta, arrays


def _checked_state(fields) -> dict:
    """A worker's report of a video's state (``_state_fields``), refused unless it is one."""
    counts = ("frame_stats", "clip_stats")
    if not (isinstance(fields, dict) and set(fields) == {"decoder", "duration", "frames_sampled", *counts}
            and (fields["decoder"] is None or (isinstance(fields["decoder"], str) and len(fields["decoder"]) <= 64))
            and (fields["duration"] is None or type(fields["duration"]) in (int, float))
            and type(fields["frames_sampled"]) is int and fields["frames_sampled"] >= 0
            and all(isinstance(fields[k], list) and len(fields[k]) == 2
                    and all(type(n) is int and n >= 0 for n in fields[k]) for k in counts)):
        raise _Malformed()
    return fields


def _apply_state(state, fields: dict) -> None:
    from diqa_cli.videoio import DecodeStats

    state.decoder = fields["decoder"]
    state.duration = None if fields["duration"] is None else float(fields["duration"])
    state.frames_sampled = fields["frames_sampled"]
    state.frame_stats = DecodeStats(*fields["frame_stats"])
    state.clip_stats = DecodeStats(*fields["clip_stats"])
