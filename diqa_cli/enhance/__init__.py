"""``diqa enhance``: image enhancement by MAP estimation in EDICT-inverted diffusion latents.

The pieces, one concern each:
  * :mod:`diqa_cli.enhance.edict`  the exactly invertible coupled DDIM process (EDICT);
  * :mod:`diqa_cli.enhance.nlpd`   the NLPD fidelity distance;
  * :mod:`diqa_cli.enhance.map`    the MAP loop (:class:`~diqa_cli.enhance.map.MapEnhancer`);
  * this module                    files in and out: where outputs go, how the result returns
                                   to the input's size and colour mode, the atomic write.

Outputs
  Without ``-o`` or ``--out-dir``, each result is written beside its input as
  ``<stem>.enhanced<ext>`` (``photo.jpg`` -> ``photo.enhanced.jpg``), never over the input.
  ``-o PATH`` names the output of a single input. ``--out-dir DIR`` takes several inputs; each is
  written as ``DIR/<input file name>``, and when inputs from different folders share a file name
  the later ones become ``<stem>-2<ext>``, ``<stem>-3<ext>``… in input order. The format follows
  the output's extension (Pillow); JPEG and WebP are written at quality 95. An existing file is
  never replaced, the input least of all, unless ``overwrite`` is set. Files are written to a
  temporary name in the same folder and renamed, so a reader never sees half an image.

Size and colour mode
  The model works at the backbone's square resolution R (the input is resized to R x R,
  aspect ratio ignored, as for scoring). The result returns to the input's exact size and colour
  mode by one of two compositions:
  * ``residual`` (default): the enhancement is the difference between the optimised image and
    the input's own reconstruction (encode, invert, generate, decode, no optimisation), both at
    R; that difference is resized to the input's size (bicubic) and added to the original
    pixels. Detail the VAE and the resize to R would lose stays, and zero iterations give back
    the input (to 8-bit rounding).
  * ``decoded``: the optimised image itself, resized to the input's size; everything is
    regenerated, at the cost of the VAE's and the resize's losses.
  Modes: RGB, L, P (re-quantised to an adaptive palette), 1, CMYK and the other Pillow modes
  come back through Pillow's conversion from the RGB result; an alpha channel (RGBA, LA, PA,
  transparent palette) is kept exactly, and the colour under it is enhanced (the model sees the
  image composited over white, as scoring does); 16-bit and float greyscale (I;16, I, F) are
  written back at full precision with the input's own scaling. EXIF orientation is applied on
  reading, so the output is stored upright with its orientation tag reset; the ICC profile and
  the other EXIF fields are carried over.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from diqa_cli.files import atomic_write
from diqa_cli.errors import InputError, UsageError, one_line

__all__ = [
    "OUTPUT_MODES",
    "OutputPlan",
    "SourceImage",
    "plan_outputs",
    "read_source",
    "compose",
    "to_input_mode",
    "save_atomic",
    "write_report",
    "enhance_file",
]

OUTPUT_MODES = ("residual", "decoded")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow's convert("L")
_GREY_HIGH_PRECISION = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_LOSSY_QUALITY = {"JPEG": 95, "WEBP": 95}
_EXIF_ORIENTATION = 0x0112


# --------------------------------------------------------------------------- where outputs go


@dataclass(frozen=True)
class OutputPlan:
    """One input and where its result goes; ``error`` is set when it cannot be done."""

    input: str
    output: str | None
    error: str | None = None


def _writable_format(path: Path) -> str | None:
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    return fmt if fmt in Image.SAVE else None


def _output_problem(input_path: str, output: Path, overwrite: bool) -> str | None:
    if _writable_format(output) is None:
        return f"cannot write images with the extension {output.suffix or '(none)'!r}; use .png, .jpg, .webp or .tif"
    if output.is_dir():
        return f"output {str(output)!r} is a directory"
    if overwrite or not output.exists():
        return None
    try:
        same = os.path.samefile(input_path, output)
    except OSError:
        same = False
    if same:
        return "the output is the input itself; pass --overwrite to replace it, or choose another output"
    return f"output {str(output)!r} exists; pass --overwrite to replace it"


def plan_outputs(items, *, output: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                 overwrite: bool = False) -> list[OutputPlan]:
    """Decide each input's output path (see the module docstring).

    ``items`` are :class:`diqa_cli.imageio.InputItem`. With ``output`` (``-o``) there must be
    exactly one input and every problem with the output is a :class:`UsageError`; with
    ``out_dir``, or with neither (results beside their inputs), a problem is that input's error,
    and the other inputs go on.
    """
    items = list(items)
    if output is not None and out_dir is not None:
        raise UsageError("-o names one output and --out-dir a folder for several; give one of them")
    if output is None and out_dir is None:
        plans = []
        for item in items:
            if item.error is not None:
                plans.append(OutputPlan(item.path, None, item.error))
                continue
            source = Path(item.path)
            target = source.with_name(f"{source.stem}.enhanced{source.suffix}")
            plans.append(OutputPlan(item.path, str(target), _output_problem(item.path, target, overwrite)))
        return plans
    if output is not None:
        if len(items) != 1:
            raise UsageError(f"-o names one output but there are {len(items)} inputs; use --out-dir DIR")
        item = items[0]
        target = Path(output)
        if target.is_dir():
            raise UsageError(f"-o {str(target)!r} is a directory; use --out-dir {str(target)!r} to write into it")
        problem = _output_problem(item.path, target, overwrite)
        if problem is not None and item.error is None:
            raise UsageError(problem)
        return [OutputPlan(item.path, str(target), item.error)]

    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out-dir {str(folder)!r} exists and is not a directory")
    plans, taken = [], set()
    for item in items:
        if item.error is not None:
            plans.append(OutputPlan(item.path, None, item.error))
            continue
        name = Path(item.path).name
        stem, suffix = Path(name).stem, Path(name).suffix
        candidate, n = folder / name, 1
        while str(candidate) in taken:
            n += 1
            candidate = folder / f"{stem}-{n}{suffix}"
        taken.add(str(candidate))
        plans.append(OutputPlan(item.path, str(candidate), _output_problem(item.path, candidate, overwrite)))
    return plans


# --------------------------------------------------------------------------- reading


@dataclass
class SourceImage:
    """An input as decoded for enhancement.

    ``composite`` is exactly what scoring sees (``imageio.load_image``: RGB over white, uint8
    for 8-bit sources);
    ``rgb`` is the colour without compositing and ``alpha`` the alpha channel (None when
    opaque), both (H, W[, 3]) float32 in [0, 1]; ``grey_range`` maps 16-bit or float grey back
    to its stored values; ``info`` holds what is carried to the output (ICC profile, EXIF).
    """

    path: str
    mode: str
    composite: np.ndarray
    rgb: np.ndarray
    alpha: np.ndarray | None
    grey_range: tuple[float, float] | None
    info: dict

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]


def read_source(path: str, *, max_pixels: int | None = None) -> SourceImage:
    """Decode ``path``; raises ``InputError(path, reason)`` exactly as scoring does."""
    from diqa_cli.imageio import as_float_rgb, load_image, pillow_pixel_limit

    composite = load_image(path, max_pixels=max_pixels)  # every check and error of `diqa score`
    if stat.S_ISFIFO(os.stat(path).st_mode):
        raise InputError(path, "enhance reads its input twice and cannot take a pipe; save the image to a file first")
    # Read again for what scoring drops (mode, alpha, profile), Pillow held to the same pixel limit.
    with pillow_pixel_limit(max_pixels), Image.open(path) as img:
        img.load()
        mode, info = img.mode, _carried_info(img)
        bits = img.tag_v2.get(258) if hasattr(img, "tag_v2") else None
        img = ImageOps.exif_transpose(img)
        alpha = None
        rgb = as_float_rgb(composite)
        if mode not in _GREY_HIGH_PRECISION and img.has_transparency_data:
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
            rgb, alpha = rgba[..., :3], rgba[..., 3]
        grey_range = _grey_range(img, bits) if mode in _GREY_HIGH_PRECISION else None
    return SourceImage(path=str(path), mode=mode, composite=composite, rgb=rgb, alpha=alpha,
                       grey_range=grey_range, info=info)


def _grey_range(img: Image.Image, bits) -> tuple[float, float]:
    """The stored values that map to 0 and 1, mirroring ``imageio``'s scaling rules."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        return 0.0, 65535.0
    if img.mode == "I":
        bits = bits[0] if isinstance(bits, tuple) and bits else bits
        top = float(2 ** (bits if isinstance(bits, int) else 16) - 1)
        if values.min() >= 0 and values.max() <= top:
            return 0.0, top
        return float(values.min()), float(values.max())
    if (values.min() >= 0 and values.max() <= 1) or values.max() == values.min():
        return 0.0, 1.0
    return float(values.min()), float(values.max())


def _carried_info(img: Image.Image) -> dict:
    info = {}
    if img.info.get("icc_profile"):
        info["icc_profile"] = img.info["icc_profile"]
    exif = img.getexif()
    if len(exif):
        if _EXIF_ORIENTATION in exif:
            exif[_EXIF_ORIENTATION] = 1  # the pixels are stored upright
        info["exif"] = exif.tobytes()
    return info


# --------------------------------------------------------------------------- composing


def _resize(planes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(C, h, w) float -> (C, height, width) float, bicubic, per channel, unclipped."""
    return np.stack([
        np.asarray(Image.fromarray(np.ascontiguousarray(p, dtype=np.float32))
                   .resize((width, height), Image.Resampling.BICUBIC))
        for p in planes
    ])


def compose(source: SourceImage, enhanced: np.ndarray, reconstruction: np.ndarray, *, mode: str = "residual") -> np.ndarray:
    """The result at the input's size: (H, W, 3) float32 in [0, 1].

    ``enhanced`` and ``reconstruction`` are (3, R, R) in [0, 1] (see the module docstring
    for the two modes)."""
    width, height = source.size
    if mode == "residual":
        delta = _resize(np.asarray(enhanced, np.float32) - np.asarray(reconstruction, np.float32), width, height)
        out = source.rgb + np.moveaxis(delta, 0, 2)
    elif mode == "decoded":
        out = np.moveaxis(_resize(np.asarray(enhanced, np.float32), width, height), 0, 2)
    else:
        raise UsageError(f"--output-mode {mode!r} is not one of {', '.join(OUTPUT_MODES)}")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def to_input_mode(source: SourceImage, rgb: np.ndarray) -> Image.Image:
    """(H, W, 3) float RGB in [0, 1] -> a PIL image in the input's colour mode (alpha kept)."""
    mode = source.mode
    if mode in _GREY_HIGH_PRECISION:
        low, high = source.grey_range
        grey = (rgb @ _LUMA).astype(np.float64) * (high - low) + low
        if mode == "F":
            return Image.fromarray(grey.astype(np.float32))
        if mode == "I":
            return Image.fromarray(np.round(grey).astype(np.int32))
        return Image.fromarray(np.clip(np.round(grey), 0, 65535).astype(np.uint16))
    rgb8 = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb8)
    if source.alpha is not None:
        image.putalpha(Image.fromarray(np.clip(np.round(source.alpha * 255.0), 0, 255).astype(np.uint8)))
    if image.mode == mode:
        return image
    if mode in ("P", "PA"):
        # An adaptive palette: Pillow's plain convert("P") would map to the fixed web palette.
        method = Image.Quantize.FASTOCTREE if image.mode == "RGBA" else Image.Quantize.MEDIANCUT
        return image.quantize(colors=256, method=method)
    try:
        return image.convert(mode)
    except ValueError as exc:
        raise InputError(source.path, f"cannot write colour mode {mode}: {exc}") from None


# --------------------------------------------------------------------------- writing


def save_atomic(image: Image.Image, path: str | os.PathLike, *, info: dict | None = None,
                keep: Callable[[str], bool] | None = None) -> Path | None:
    """Write ``image`` to ``path`` through a temporary file in the same folder and a rename.
    The format follows the extension; ``info`` (ICC profile, EXIF) is passed where the format
    takes it; ``keep(tmp)`` may decide, from the written file, not to write it (None returned).
    Raises ``OSError`` (or ``ValueError``) when the format cannot hold the image."""
    path = Path(path)
    fmt = _writable_format(path)
    if fmt is None:
        raise ValueError(f"cannot write images with the extension {path.suffix!r}")
    options = dict(info or {})
    if fmt in _LOSSY_QUALITY:
        options["quality"] = _LOSSY_QUALITY[fmt]
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **options), keep=keep)


def write_report(path: str | os.PathLike, record: dict) -> Path:
    """Write the run's JSON report atomically (replacing an older report)."""
    path = Path(path)
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


# --------------------------------------------------------------------------- one file


def enhance_file(plan: OutputPlan, enhancer, *, output_mode: str = "residual", max_pixels: int | None = None,
                 progress=None, keep_if_better: bool = False) -> dict:
    """Enhance ``plan.input`` into ``plan.output`` with ``enhancer``
    (:class:`~diqa_cli.enhance.map.MapEnhancer` whose prior is a
    :class:`~diqa_cli.metric.Metric`); returns the input's report entry.

    ``prior_before`` and ``prior_after`` are the prior's scores of the input file and of the
    written output file, decoded and resized exactly as ``diqa score`` does; ``fidelity`` is the
    distance between the two at the backbone's resolution; ``history`` holds the prior, fidelity
    and objective of each iterate (decoded latents, before composition). A bad input or an
    output that cannot be written gives ``status: "error"`` with a one-line ``error``; Ctrl-C
    during the optimisation writes the best image so far and gives ``status: "interrupted"``.
    With ``keep_if_better``, an output whose prior score is not above the input's is not written
    (``status: "not-improved"``, ``output`` None).
    """
    import torch

    from diqa_cli.imageio import load_image, resize_for_model

    started = time.perf_counter()
    entry = {"input": plan.input, "output": plan.output, "status": "error", "error": plan.error}
    if plan.error is not None:
        return entry
    prior = enhancer.prior
    size = enhancer.backbone.resolution

    def as_batch(image: np.ndarray, resolution: int):
        return torch.from_numpy(resize_for_model(image, resolution, resample=prior.resample))[None]

    def score(image: np.ndarray) -> float:
        with torch.no_grad():
            return float(prior(as_batch(image, prior.resolution))[0])

    try:
        source = read_source(plan.input, max_pixels=max_pixels)
        target = as_batch(source.composite, size)
        entry.update(width=source.size[0], height=source.size[1], mode=source.mode,
                     prior_before=score(source.composite))
        result = enhancer.run(target, progress=progress)
        rgb = compose(source, result.image.numpy(), result.reconstruction.numpy(), mode=output_mode)
        measured = {}

        def judge(tmp: str) -> bool:
            """Score the file as written (what a later `diqa score` will see) before it is kept."""
            measured["written"] = load_image(tmp, max_pixels=max_pixels)
            measured["prior_after"] = score(measured["written"])
            return not keep_if_better or measured["prior_after"] > entry["prior_before"]

        try:
            saved = save_atomic(to_input_mode(source, rgb), plan.output, info=source.info, keep=judge)
        except (OSError, ValueError) as exc:  # the format cannot hold the mode, disk full…
            raise InputError(plan.input, f"cannot write {plan.output}: {one_line(exc)}") from None
        with torch.no_grad():
            device = enhancer.backbone.device
            fidelity = float(enhancer.fidelity(as_batch(measured["written"], size).to(device), target.to(device))[0])
        status = "interrupted" if result.stop_reason == "interrupted" else "ok"
        entry.update(
            output=plan.output if saved is not None else None,
            status=status if saved is not None else "not-improved",
            error=None,
            prior_after=measured["prior_after"],
            fidelity=fidelity,
            iterations=result.iterations,
            best_iteration=result.best_iteration,
            stop_reason=result.stop_reason,
            inversion_error=result.inversion_error,
            seconds_inversion=round(result.seconds_inversion, 3),
            seconds_optimisation=round(result.seconds_optimisation, 3),
            history=result.history,
        )
    except InputError as exc:
        entry["error"] = exc.reason
    except Exception as exc:  # noqa: BLE001 - one input's failure (out of memory…) must not stop the others
        entry["error"] = f"enhancement failed: {type(exc).__name__}: {one_line(exc)}"
    entry["seconds"] = round(time.perf_counter() - started, 3)
    return entry
