"""``diqa enhance``: parse, call :mod:`diqa_cli.enhance`, report.

The images are the data, written to files; stdout stays empty. One line per image and the
progress bar (only when stderr is a terminal) go to stderr; ``--report`` writes the JSON record.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional

import typer

from diqa_cli.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, UsageError

REPORT_FORMAT = "diqa-enhance/1"
# One row per input on stdout; the report (--report) holds everything else.
ROW_COLUMNS = ("input", "output", "prior_before", "prior_after", "iterations", "status", "error")


def register(app: typer.Typer) -> None:
    app.command("enhance")(enhance)


def enhance(
    paths: list[str] = typer.Argument(
        ..., metavar="INPUTS", show_default=False,
        help="Images, folders, quoted glob patterns, or '-' to read paths from stdin.",
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", show_default=False,
        help="Output image of a single input (format from its extension). Default: <stem>.enhanced<ext> beside each input.",
    ),
    out_dir: Optional[Path] = typer.Option(
        None, "--out-dir", show_default=False,
        help="Folder for several inputs: DIR/<input name>; later inputs with the same name get <stem>-2<ext>, -3…",
    ),
    prior: Optional[str] = typer.Option(
        None, "--prior", "-p", show_default=False,
        help="Quality prior: a registered image method or alias (pmg/lgdm, dpiqa, genziqa…). "
        "Default: the checkpoint's method, else the registry's enhance default (lgdm).",
    ),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c", show_default=False,
        help="Head checkpoint of the prior (.safetensors + sidecar). Default: the method's released weights.",
    ),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", show_default=False,
        help="Backbone of the prior and of the diffusion process. Default: the checkpoint's.",
    ),
    fidelity: str = typer.Option("nlpd", "--fidelity", help="Distance to the input: nlpd | lpips | mse."),
    fidelity_weight: float = typer.Option(20.0, "--fidelity-weight", help="λ in prior(x) − λ·fidelity(x, input)."),
    iterations: int = typer.Option(50, "--iterations", help="Gradient-ascent steps at most."),
    inversion_steps: int = typer.Option(
        50, "--inversion-steps", help="EDICT (DDIM) steps of the inversion and of every generation."
    ),
    mix: float = typer.Option(0.93, "--mix", help="EDICT mixing weight p."),
    lr: float = typer.Option(
        2.0, "--lr",
        help="Step size: the latents move by lr × (momentum-accumulated clipped gradient), so by at most "
        "lr × clip per element in a step without momentum.",
    ),
    momentum: float = typer.Option(0.9, "--momentum", help="Momentum of the gradient ascent."),
    clip: float = typer.Option(1e-3, "--clip", help="Per-element gradient clip."),
    patience: int = typer.Option(
        10, "--patience", help="Stop after this many iterations without a better prior score; 0 never stops early."
    ),
    no_checkpointing: bool = typer.Option(
        False, "--no-checkpointing",
        help="Keep every step's activations for the backward pass instead of recomputing them "
        "(faster; memory grows with the steps).",
    ),
    output_mode: str = typer.Option(
        "residual", "--output-mode",
        help="residual: add the enhancement to the original pixels at full size; "
        "decoded: the regenerated image resized back.",
    ),
    report: Optional[Path] = typer.Option(
        None, "--report", show_default=False,
        help="Write a JSON report (scores before/after, fidelity, iterations, times, seed, settings) and, "
        "with matplotlib (pip install 'diqa-cli[plots]'), a PNG strip beside it: before, after, amplified "
        "difference and the prior by iteration.",
    ),
    seed: Optional[int] = typer.Option(
        None, "--seed", show_default=False,
        help="Seed (of the prior's noise, if it draws any). Default: the checkpoint's recorded seed.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs, the input itself included."),
    keep_if_better: bool = typer.Option(
        False, "--keep-if-better", help="Write an output only where the prior scores it above the input (else status not-improved)."
    ),
    fmt: Optional[str] = typer.Option(
        None, "--format", "-f", show_default=False,
        help="Rows on stdout (input, output, prior before/after, iterations, status): table | csv | json | jsonl. "
        "Default: table on a terminal, csv in a pipe.",
    ),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into sub-folders of folder inputs."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, fp16 or bf16."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network (also HF_HUB_OFFLINE=1)."),
    max_pixels: Optional[int] = typer.Option(
        None, "--max-pixels", min=1, show_default=False,
        help="Refuse images with more pixels than this (default 100 M).",
    ),
) -> None:
    """Enhance images by gradient ascent on a quality prior in EDICT-inverted diffusion latents.

    Maximises prior(x) − λ·fidelity(x, input) over the latents of an exact (EDICT) inversion of
    the input, x being the image generated from them; the best iterate is written at the input's
    size and colour mode. Exit status: 0 all written, 3 some inputs failed (a line on stderr each),
    2 usage error, 1 fatal (weights missing), 130 interrupted (the image in progress is written
    with the best iterate so far).
    """
    from diqa_cli.enhance import OUTPUT_MODES, enhance_file, plan_outputs
    from diqa_cli.enhance.map import MapSettings
    from diqa_cli.home import offline_requested
    from diqa_cli.imageio import expand_inputs
    from diqa_cli.methods import default_method, get_method

    from diqa_cli.output import FORMATS, default_format, open_writer

    fmt = (fmt or default_format(sys.stdout)).lower()
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if output_mode not in OUTPUT_MODES:
        raise UsageError(f"--output-mode {output_mode!r} is not one of {', '.join(OUTPUT_MODES)}")
    settings = MapSettings(
        iterations=iterations, inversion_steps=inversion_steps, mix=mix, fidelity=fidelity,
        fidelity_weight=fidelity_weight, lr=lr, momentum=momentum, clip=clip, patience=patience,
        checkpointing=not no_checkpointing, seed=seed if seed is not None else 0,
    )
    sidecar = None
    if checkpoint is not None:
        from diqa_cli.checkpoint import read_sidecar

        sidecar = read_sidecar(checkpoint)  # a missing or foreign checkpoint fails before torch loads
    chosen = prior or (sidecar["method"] if sidecar else None)
    method = get_method(chosen) if chosen else default_method("enhance")
    if method.input_kind != "image":
        raise UsageError(f"--prior {method.name!r} scores {method.input_kind}s; enhancement needs an image method (see `diqa methods`)")
    if report is not None and report.is_dir():
        raise UsageError(f"--report {str(report)!r} is a directory; name a .json file")
    offline = offline_requested(offline)

    items = expand_inputs(paths, recursive=recursive, stdin=sys.stdin)
    plans = plan_outputs(items, output=output, out_dir=out_dir, overwrite=overwrite)
    record = {"format": REPORT_FORMAT, "prior": {"method": method.name}, "settings": None, "images": []}
    entries = record["images"]
    runnable = [plan for plan in plans if plan.error is None]

    if runnable:
        enhancer, record["prior"], settings = _build(method.name, checkpoint, backbone, device, dtype, offline, seed, settings)
    record["settings"] = {**settings.to_dict(), "output_mode": output_mode}
    record["seed"] = settings.seed

    interrupted = False
    width = max((len(p.input) for p in plans), default=5)
    try:
        with _Progress(settings) as progress, open_writer(fmt, sys.stdout, columns=ROW_COLUMNS, path_width=width) as rows:
            for plan in plans:
                if plan.error is not None:
                    entry = {"input": plan.input, "output": plan.output, "status": "error", "error": plan.error}
                else:
                    progress.start(plan.input)
                    entry = enhance_file(plan, enhancer, output_mode=output_mode, max_pixels=max_pixels,
                                         progress=progress.update, keep_if_better=keep_if_better)
                entries.append(entry)
                progress.tell(_summary(entry, settings.fidelity))
                rows.write(entry)
                if entry["status"] == "interrupted":
                    interrupted = True
                    break
    finally:
        if report is not None:
            _write_report(report, record)
    if report is not None:
        _write_strip(report, entries, max_pixels)
    failed = sum(entry["status"] == "error" for entry in entries)
    if failed:
        print(f"diqa: {failed} of {len(plans)} inputs failed", file=sys.stderr)
    if interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    raise typer.Exit(EXIT_PARTIAL if failed else EXIT_OK)


def _build(method, checkpoint, backbone, device, dtype, offline, seed, settings):
    """Load the prior and its backbone; returns (enhancer, the report's prior record, settings
    with the seed actually used)."""
    from dataclasses import replace

    from diqa_cli.enhance.map import MapEnhancer
    from diqa_cli.metric import Metric
    from diqa_cli.scoring import load_scorer

    # The diffusion process runs the backbone's U-Net even where the prior carries its own.
    model, sidecar = load_scorer(method, backbone=backbone, checkpoint=str(checkpoint) if checkpoint else None,
                                 device=device, dtype=dtype, offline=offline, seed=seed, keep_backbone_unet=True)
    metric = Metric(model, sidecar)
    diffusion = model.backbone
    if diffusion is None:  # a prior without a diffusion backbone (the DP-IQA student)
        from diqa_cli.backbone import load_backbone

        ref = backbone or sidecar["backbone"]["ref"] or model.spec.default_backbone
        diffusion = load_backbone(ref, device=device, dtype=dtype, offline=offline)
        model.to(diffusion.device)
    settings = replace(settings, seed=int(model.config.get("seed", sidecar.get("seed", 0)) if seed is None else seed))
    enhancer = MapEnhancer(diffusion, metric, settings, offline=offline)
    prior = {
        "method": model.method_name,
        "checkpoint": str(checkpoint) if checkpoint else sidecar.get("released_weights"),
        "backbone": {"ref": str(diffusion.ref), "identity": diffusion.identity},
        "score_normalisation": sidecar["score_normalisation"],
        "resolution": model.resolution,
        "device": str(diffusion.device),
        "dtype": str(diffusion.dtype).replace("torch.", ""),
    }
    return enhancer, prior, settings


def _summary(entry: dict, fidelity: str) -> str:
    if entry["status"] == "error":
        return f"diqa: {entry['input']}: {entry['error']}"
    if entry["status"] == "not-improved":
        return (f"diqa: {entry['input']}: not written: the prior did not improve "
                f"({entry['prior_before']:.4g} -> {entry['prior_after']:.4g}; --keep-if-better)")
    note = " (interrupted: best so far)" if entry["status"] == "interrupted" else f" ({entry['stop_reason']})"
    return (
        f"diqa: {entry['input']} -> {entry['output']}: prior {entry['prior_before']:.4g} -> {entry['prior_after']:.4g}, "
        f"{fidelity} {entry['fidelity']:.4g}, {entry['iterations']} iterations{note}, {entry['seconds']:.1f} s"
    )


def _write_report(path: Path, record: dict) -> None:
    import diqa_cli
    from diqa_cli.enhance import write_report

    write_report(path, {"diqa_version": diqa_cli.__version__, **record})


def _write_strip(report: Path, entries: list[dict], max_pixels) -> None:
    """The report's PNG strip, ``<report stem>.png`` beside it; without matplotlib a one-line
    warning instead (the JSON report is written either way)."""
    from diqa_cli.plots import enhance_strip

    path = report.with_name(report.name + ".png") if report.suffix.lower() == ".png" else report.with_suffix(".png")
    try:
        written = enhance_strip(path, entries, max_pixels=max_pixels)
    except UsageError as exc:
        print(f"diqa: warning: no PNG strip beside the report: {exc}", file=sys.stderr)
        return
    if written is not None:
        print(f"diqa: wrote {written}", file=sys.stderr)


class _Progress(contextlib.AbstractContextManager):
    """A rich progress bar on stderr while it is a terminal (inversion steps, then iterations
    with the current prior score); otherwise silent. ``tell`` prints a line above it."""

    def __init__(self, settings):
        self.settings = settings
        self.bar = None
        self.task = None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(stderr=True), transient=True, redirect_stdout=False, redirect_stderr=False,
            )
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False

    def start(self, name: str) -> None:
        self.name = Path(name).name
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(f"{self.name}: inverting", total=self.settings.inversion_steps)

    def update(self, phase: str, done: int, total: int, record: dict | None) -> None:
        if self.bar is None:
            return
        if phase == "invert":
            self.bar.update(self.task, completed=done, total=total)
        else:
            description = f"{self.name}: prior {record['prior']:.4g}, {self.settings.fidelity} {record['fidelity']:.4g}"
            self.bar.update(self.task, description=description, completed=done, total=max(total, 1))

    def tell(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            print(message, file=sys.stderr, flush=True)
