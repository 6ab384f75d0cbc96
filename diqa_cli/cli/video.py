"""``diqa score-video``: videos to rows on stdout, one row per video.

Same conventions as ``diqa score``: data on stdout (table on a terminal, CSV in a pipe, or
``--format``), messages and the progress bar on stderr, rows streamed as each video finishes, an
error row for every input that cannot be scored, exit status 0 / 3 / 2 / 1. torch is imported only
once scoring starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from diqa_cli.errors import EXIT_OK, EXIT_PARTIAL, UsageError
from diqa_cli.output import FORMATS, default_format

# CSV carries the per-video columns; JSON adds the run's context (as ``diqa score`` does); the
# table keeps what a person reads at a glance.
_CSV_COLUMNS = (
    "path", "score", "raw_score", "status", "error",
    "frames_sampled", "frames_decoded", "frames_lost", "decoder", "duration",
)
_JSON_COLUMNS = (*_CSV_COLUMNS, "clips", "method", "backbone", "checkpoint", "slowfast", "seconds")
_TABLE_COLUMNS = ("path", "score", "status", "frames_sampled", "frames_lost", "decoder", "duration", "error")
# CSV with --per-frame is long: one line per scored frame (its time and score), one per failed video.
_LONG_COLUMNS = ("path", "time", "score", "status", "error")


def register(app: typer.Typer) -> None:
    app.command("score-video")(score_video)


def _columns(fmt: str, per_frame: bool) -> tuple[str, ...]:
    if fmt in ("json", "jsonl"):
        return (*_JSON_COLUMNS, "per_frame") if per_frame else _JSON_COLUMNS
    if fmt == "csv":
        return _LONG_COLUMNS if per_frame else _CSV_COLUMNS
    return _TABLE_COLUMNS


def _frame_lines(row: dict) -> list[dict]:
    """A video row in the long CSV format: one line per frame scored, or the row itself (failed,
    no time) when there is none."""
    frames = row.get("per_frame") or []
    if row["status"] != "ok" or not frames:
        return [{**row, "time": None}]
    return [{"path": row["path"], "time": f["time"], "score": f["score"], "status": "ok", "error": None, **(
        {"map": f["map"]} if "map" in f else {})} for f in frames]


def score_video(
    paths: list[str] | None = typer.Argument(
        None,
        metavar="[PATHS]...",
        help="Videos, folders, quoted glob patterns ('clips/*.mp4'), or '-' to read paths from stdin.",
        show_default=False,
    ),
    fps_sub: float | None = typer.Option(
        None, "--fps-sub", help="Frames per second of video to score, picked by timestamp. Default: see --max-frames.",
        show_default=False,
    ),
    max_frames: int | None = typer.Option(
        None, "--max-frames", min=1,
        help="At most this many frames, spread evenly over the whole video. Default: 8 when --fps-sub is not "
        "given (the released test setting), no cap when it is.",
        show_default=False,
    ),
    method: str | None = typer.Option(
        None, "--method", "-m", help="Video method (see `diqa methods`). Default: the checkpoint's, else the registry's video default.",
        show_default=False,
    ),
    backbone: str | None = typer.Option(
        None, "--backbone", help="Backbone: manifest name, diffusers folder or single .safetensors file. Default: the checkpoint's.",
        show_default=False,
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", "-c", help="Head checkpoint (.safetensors with its .json sidecar).", show_default=False,
    ),
    slowfast: str | None = typer.Option(
        None, "--slowfast",
        help="SlowFast weights: manifest name (slowfast-r50-k400) or converted .safetensors. Default: the checkpoint's.",
        show_default=False,
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, fp16 or bf16 (half only where the device supports it)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Frames per U-Net batch."),
    max_clips: int = typer.Option(16, "--max-clips", min=1, help="At most this many SlowFast clips (one per second of video)."),
    decoder: str = typer.Option("auto", "--decoder", help="auto (decord, PyAV where decord cannot read), decord or pyav."),
    fmt: str | None = typer.Option(
        None, "--format", "-f", help=f"{' | '.join(FORMATS)}. Default: table on a terminal, csv in a pipe.", show_default=False,
    ),
    per_frame: bool = typer.Option(
        False, "--per-frame",
        help="Each frame's time and score: a list per row in json and jsonl; in csv one line per frame (path, time, score).",
    ),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into sub-folders of folder inputs."),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed of the noise bank. Default: the one recorded in the checkpoint.", show_default=False,
    ),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network (also HF_HUB_OFFLINE=1)."),
    maps: Path | None = typer.Option(
        None, "--maps",
        help="Write a quality map of every scored frame into this folder (overlay PNG and raw float TIFF, named "
        "by the frame's time); rows gain a `map` column naming the worst frame's overlay.",
        show_default=False,
    ),
    workers: int = typer.Option(2, "--workers", "-j", min=1, help="Files hashed ahead at once with --db."),
    db: Path | None = typer.Option(
        None, "--db",
        help="Score database (SQLite): record every result, and reuse those of videos scored before with the "
        "same settings and frame choice.",
        show_default=False,
    ),
    engine: str = typer.Option(
        "local", "--engine", help="local (this process) or ray (an actor pool; pip install 'diqa-cli[ray]')."
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address",
        help="Ray cluster for --engine ray ('auto', HOST:PORT, ray://HOST:10001). "
        "Default: $RAY_ADDRESS, else a new local instance.",
        show_default=False,
    ),
    ray_actors: int | None = typer.Option(
        None, "--ray-actors", min=1,
        help="Scoring actors with --engine ray. Default: one per GPU, else one per 4 CPUs.",
        show_default=False,
    ),
) -> None:
    """Score videos; one row per video on stdout.

    Exit status: 0 every video scored, 3 some failed (each has an error row and a line on stderr),
    2 usage error, 1 fatal (weights missing, bad checkpoint), 130 interrupted.
    """
    from diqa_cli.home import offline_requested
    from diqa_cli.methods import default_method, get_method
    from diqa_cli.videoio import DECODERS, VIDEO_EXTENSIONS

    fmt = (fmt or default_format(sys.stdout)).lower()
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if per_frame and fmt == "table":
        raise UsageError("--per-frame needs --format json, jsonl (a list per row) or csv (one line per frame)")
    if decoder not in DECODERS:
        raise UsageError(f"--decoder {decoder!r} is not one of {', '.join(DECODERS)}")
    if fps_sub is not None and not fps_sub > 0:
        raise UsageError(f"--fps-sub must be a positive number of frames per second, got {fps_sub}")
    if not paths:
        raise UsageError("no inputs: pass video paths, folders, quoted glob patterns, or '-' to read paths from stdin")
    if maps is not None and maps.exists() and not maps.is_dir():
        raise UsageError(f"--maps {str(maps)!r} is a file; name a folder (it is created if missing)")
    if checkpoint is not None:
        from diqa_cli.checkpoint import read_sidecar

        trained = read_sidecar(checkpoint)["method"]  # a missing or foreign checkpoint fails before torch loads
        method = method or trained
    spec = get_method(method, kind="video") if method else default_method("score-video")
    offline = offline_requested(offline)

    from diqa_cli.imageio import expand_inputs

    items = expand_inputs(paths, recursive=recursive, stdin=sys.stdin, extensions=VIDEO_EXTENSIONS, kind="video")

    from diqa_cli.cli.score import row_columns, score_and_write
    from diqa_cli.engines import ScorerOptions

    options = ScorerOptions(
        method=spec.name,
        backbone=backbone,
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        device=device,
        dtype=dtype,
        offline=offline,
        seed=seed,
        batch_size=batch_size,
        workers=workers,
        maps=str(maps) if maps is not None else None,
        fps_sub=fps_sub,
        max_frames=max_frames,
        max_clips=max_clips,
        decoder=decoder,
        # A score database keeps every video's frame scores, printed or not.
        per_frame=per_frame or db is not None,
        clip_encoder=slowfast,
    )
    columns = row_columns(fmt, store=db is not None, maps=maps is not None, base=_columns(fmt, per_frame))

    def note(row: dict) -> str | None:
        if row.get("frames_lost"):
            return (f"diqa: {row['path']}: {row['frames_lost']} of {row['frames_sampled']} chosen frames did not "
                    "decode; scored on the rest")
        return None

    failed = score_and_write(
        items, options, fmt, columns, db=db, engine=engine, ray_address=ray_address, ray_actors=ray_actors,
        context={"checkpoint": str(checkpoint) if checkpoint is not None else None}, note=note,
        lines=_frame_lines if per_frame and fmt == "csv" else None,
    )
    if failed:
        print(f"diqa: {failed} of {len(items)} videos failed", file=sys.stderr)
    raise typer.Exit(EXIT_PARTIAL if failed else EXIT_OK)
