"""``--batch-size auto``: the largest batch that fits the free memory of the model's device, from
a per-image footprint measured on the model itself.

The footprint is what one forward pass adds to memory above what was held before it:

* CUDA: ``torch.cuda.max_memory_allocated`` around a pass of one image and of two (after one
  unmeasured pass that builds the model's caches); the difference is the per-image cost, the
  rest the per-batch cost. Free memory: ``torch.cuda.mem_get_info``.
* CPU (and MPS): the process's resident memory, sampled every millisecond during one pass of one
  image, less what it was before; all of it is taken as per-image (an upper bound, since a CPU
  pass costs seconds and a second probe would double that). Free memory: the system's available
  memory (``MemAvailable``).

The batch is ``(free * 0.8 - per_batch) // per_image``, at least 1, at most the cap (CUDA 64;
the CPU 8, diqa's default batch, since larger CPU batches use memory without adding speed).
Measured footprints are kept in ``DIQA_HOME/batch_footprints.json``, keyed by method, backbone
weights, resolution, device and dtype, so only the first run on a machine pays the probe.
Torch is imported only when a size is resolved.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref

from diqa_cli.errors import UsageError

__all__ = ["AUTO", "parse_batch_size", "auto_batch_size", "resolve_batch_size"]

AUTO = "auto"
_CAPS = {"cuda": 64}
_CPU_CAP = 8
_HEADROOM = 0.8  # share of free memory a batch may take (fragmentation, decoding buffers)
_FILE = "batch_footprints.json"
log = logging.getLogger("diqa")
_resolved: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> batch size


def parse_batch_size(value) -> int | str:
    """``auto`` or a whole number of at least 1 (the ``--batch-size`` text), else a usage error."""
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise UsageError(f"--batch-size {value!r}: give a whole number of at least 1, or auto (fit the free memory)")
    return number


def resolve_batch_size(value, model) -> int:
    """``value`` as a number: itself, or :func:`auto_batch_size` for ``auto`` (once per model)."""
    value = parse_batch_size(value)
    if value != AUTO:
        return value
    if model not in _resolved:
        _resolved[model] = auto_batch_size(model)
    return _resolved[model]


def auto_batch_size(model) -> int:
    """The largest batch of ``model``'s inputs that fits its device's free memory (see the module
    docstring); logged on the "diqa" logger."""
    device = model.device
    per_batch, per_image = _footprint(model)
    free = _free_bytes(device)
    cap = _CAPS.get(device.type, _CPU_CAP)
    fits = int((free * _HEADROOM - per_batch) // max(per_image, 1))
    size = max(1, min(cap, fits))
    log.info(
        "--batch-size auto: %d (%.0f MiB free on %s, %.0f MiB per image, %.0f MiB per batch, cap %d)",
        size, free / 2**20, device, per_image / 2**20, per_batch / 2**20, cap,
    )
    return size


def _key(model) -> str:
    import torch

    from diqa_cli import __version__

    device = model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    backbone = model.backbone.identity if model.backbone is not None else "none"
    return "|".join(
        str(part)
        for part in (model.method_name, backbone, model.resolution, name, str(model.dtype), __version__,
                     json.dumps(model.config, sort_keys=True, default=str))
    )


def _footprint(model) -> tuple[int, int]:
    """(per-batch bytes, per-image bytes), from the kept measurements or measured now."""
    from diqa_cli.files import atomic_write_text
    from diqa_cli.home import diqa_home

    path = diqa_home() / _FILE
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    key = _key(model)
    if key in known:
        return int(known[key]["per_batch"]), int(known[key]["per_image"])
    per_batch, per_image = _measure(model)
    known[key] = {"per_batch": per_batch, "per_image": per_image}
    atomic_write_text(path, json.dumps(known, indent=1, sort_keys=True))
    return per_batch, per_image


def _probe(model, images: int) -> None:
    import torch

    side = model.resolution
    pixels = torch.zeros(images, 3, side, side, device=model.device, dtype=model.dtype)
    with torch.no_grad():
        model(pixels)


def _measure(model) -> tuple[int, int]:
    import torch

    device = model.device
    model.eval()
    log.info("--batch-size auto: measuring %s's memory per image on %s", model.method_name, device)
    if device.type == "cuda":
        _probe(model, 1)  # caches, kernel workspaces: held before every later batch too
        peaks = []
        for images in (1, 2):
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            _probe(model, images)
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        per_image = max(peaks[1] - peaks[0], 1)
        return max(peaks[0] - per_image, 0), per_image
    with _RssPeak() as rss:
        _probe(model, 1)
    return 0, max(rss.peak - rss.start, 1)


def _free_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(_psutil().virtual_memory().available)


def _rss() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return int(_psutil().Process().memory_info().rss)


def _psutil():
    """Memory figures where /proc is missing (macOS, Windows) come from psutil, if installed."""
    try:
        import psutil
    except ImportError:
        raise UsageError(
            "--batch-size auto on this system needs psutil to read free and used memory "
            "(pip install psutil), or give a number"
        ) from None
    return psutil


class _RssPeak:
    """Highest resident memory of this process while the block runs, sampled every millisecond."""

    def __enter__(self) -> _RssPeak:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="diqa-rss", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
