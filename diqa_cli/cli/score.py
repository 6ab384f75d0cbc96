"""``diqa score`` (images to rows on stdout) and ``diqa methods`` (the registry).

Only data goes to stdout; messages, per-input errors and the progress bar go to stderr, the
bar only when stderr is a terminal. torch is imported once scoring starts, never for
``diqa methods``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer

from diqa_cli.cli._terminal import write_rows
from diqa_cli.errors import EXIT_OK, EXIT_PARTIAL, UsageError
from diqa_cli.output import FORMATS, columns_for, default_format, rich_console


def register(app: typer.Typer) -> None:
    app.command("score")(score)
    app.command("methods")(methods)


def score(
    paths: list[str] | None = typer.Argument(
        None,
        metavar="[PATHS]...",
        help="Images, folders, quoted glob patterns ('photos/**/*.jpg'), or '-' to read paths from stdin.",
        show_default=False,
    ),
    method: str | None = typer.Option(
        None, "--method", "-m",
        help="Method (see `diqa methods`). Default: the checkpoint's method, else the registry's image default.",
        show_default=False,
    ),
    backbone: str | None = typer.Option(
        None, "--backbone",
        help="Backbone: manifest name, diffusers folder or single .safetensors file. Default: the checkpoint's.",
        show_default=False,
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", "-c",
        help="Head checkpoint (.safetensors with its .json sidecar). Default: the method's released weights.",
        show_default=False,
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, fp16 or bf16 (half only where the device supports it)."),
    batch_size: str = typer.Option(
        "8", "--batch-size", "-b",
        help="Images per forward pass, or auto: the most that fit the device's free memory (measured once per model).",
    ),
    workers: int = typer.Option(2, "--workers", "-j", min=1, help="Image-decoding threads."),
    fmt: str | None = typer.Option(
        None, "--format", "-f",
        help=f"{' | '.join(FORMATS)}. Default: table on a terminal, csv in a pipe.",
        show_default=False,
    ),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into sub-folders of folder inputs."),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed for methods that draw noise. Default: the one recorded in the checkpoint.",
        show_default=False,
    ),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network (also HF_HUB_OFFLINE=1)."),
    max_pixels: int | None = typer.Option(
        None, "--max-pixels", min=1,
        help="Refuse images with more pixels than this (decompression bombs). Default: $DIQA_MAX_PIXELS, else 100 M.",
        show_default=False,
    ),
    db: Path | None = typer.Option(
        None, "--db",
        help="Score database (SQLite): record every result, and reuse those of files scored before with the same settings.",
        show_default=False,
    ),
    maps: Path | None = typer.Option(
        None, "--maps",
        help="Write a quality map of every scored image into this folder (overlay PNG and raw float TIFF); "
        "rows gain a `map` column. See `diqa methods` for how each method makes its map.",
        show_default=False,
    ),
    compile_model: bool = typer.Option(
        False, "--compile",
        help="torch.compile the model first (minutes once, cached in DIQA_HOME; needs a C++ compiler on CPU, Triton on CUDA).",
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
    """Score images; one row per input on stdout.

    Exit status: 0 every input scored, 3 some inputs failed (each has an error row and a line on
    stderr), 2 usage error, 1 fatal (weights missing, bad checkpoint), 130 interrupted.
    """
    from diqa_cli.home import offline_requested
    from diqa_cli.methods import default_method, get_method

    fmt = (fmt or default_format(sys.stdout)).lower()
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not paths:
        raise UsageError("no inputs: pass image paths, folders, quoted glob patterns, or '-' to read paths from stdin")
    if method is not None:
        get_method(method, kind="image")  # an unknown name fails here, with a did-you-mean, before any loading
    if checkpoint is not None:
        from diqa_cli.checkpoint import read_sidecar, sidecar_path

        # A missing or foreign checkpoint fails here, before torch is imported (a bare state dict
        # with --method is read with that method's released configuration instead).
        if method is None or sidecar_path(checkpoint).is_file():
            trained = read_sidecar(checkpoint)["method"]
            method = method or trained  # a --method naming another method is refused on loading
    spec = get_method(method, kind="image") if method else default_method("score")
    offline = offline_requested(offline)

    from diqa_cli.imageio import expand_inputs

    items = expand_inputs(paths, recursive=recursive, stdin=sys.stdin)

    from diqa_cli.batching import parse_batch_size
    from diqa_cli.engines import ScorerOptions

    options = ScorerOptions(
        method=spec.name,
        backbone=backbone,
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        device=device,
        dtype=dtype,
        offline=offline,
        seed=seed,
        batch_size=parse_batch_size(batch_size),
        workers=workers,
        max_pixels=max_pixels,
        maps=str(maps) if maps is not None else None,
        compile=compile_model,
    )
    if maps is not None and maps.exists() and not maps.is_dir():
        raise UsageError(f"--maps {str(maps)!r} is a file; name a folder (it is created if missing)")
    from diqa_cli.scoring import checkpoint_label  # the released weights' name when no checkpoint is given

    failed = score_and_write(
        items, options, fmt, row_columns(fmt, store=db is not None, maps=maps is not None),
        db=db, engine=engine, ray_address=ray_address, ray_actors=ray_actors,
        context={"checkpoint": checkpoint_label(checkpoint, spec)},
    )
    if failed:
        print(f"diqa: {failed} of {len(items)} inputs failed", file=sys.stderr)
    raise typer.Exit(EXIT_PARTIAL if failed else EXIT_OK)


def score_and_write(items, options, fmt: str, columns, *, db, engine: str, ray_address, ray_actors,
                    context: dict, note=None, lines=None) -> int:
    """Score ``items`` with ``options`` on ``engine`` (through the score store ``db`` when given)
    and write their rows (``write_rows``); returns how many failed. Shared by ``score`` and
    ``score-video``."""
    from diqa_cli.engines import open_engine
    from diqa_cli.store import ReuseRun, open_store

    with contextlib.ExitStack() as stack:
        # A bad --db fails here, before the model loads; with a store the model loads only once an
        # input turns out not to be in it.
        store = stack.enter_context(open_store(db)) if db is not None else None
        scorer = stack.enter_context(
            open_engine(engine, options, ray_address=ray_address, ray_actors=ray_actors, lazy=store is not None)
        )
        if store is not None:
            # With --maps, results reused from the database get their maps written too.
            complete = scorer.complete if options.maps is not None else None
            rows = ReuseRun(items, scorer, store, hash_workers=options.workers, complete=complete)
        else:
            rows = scorer.score(items)
        failed = write_rows(items, rows, fmt, columns, context=context, note=note, lines=lines)
        if store is not None:
            print(f"diqa: reused {rows.reused} of {rows.reused + rows.scored} results from {db}", file=sys.stderr)
    return failed


def row_columns(fmt: str, *, store: bool, maps: bool, base: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The columns ``score`` (or ``base``'s command) prints: with --db, JSON rows say whether
    they were reused from it; with --maps, rows name their map."""
    from diqa_cli.maps import MAP_COLUMN

    columns = columns_for(fmt) if base is None else base
    if store and fmt in ("json", "jsonl"):
        columns = (*columns, "cached")
    return (*columns, MAP_COLUMN) if maps else columns


def methods(
    fmt: str = typer.Option("table", "--format", "-f", help="table or json."),
) -> None:
    """List the registered methods: names, inputs, backbones, timesteps, scores, licences, papers."""
    from diqa_cli.methods import list_methods

    specs = list_methods()
    if fmt == "json":
        import json

        sys.stdout.write(json.dumps([spec.to_dict() for spec in specs], indent=2) + "\n")
        return
    if fmt != "table":
        raise UsageError(f"--format {fmt!r} is not one of table, json")
    from rich.table import Table
    from rich.text import Text

    # One block per method (name and summary, then its facts): the facts are sentences, which
    # a column-per-fact table would squeeze into unreadable slivers on an 80-column terminal.
    console = rich_console(sys.stdout)
    for i, spec in enumerate(specs):
        if i:
            console.print()
        console.print(Text.assemble((spec.name, "bold"), "  ", spec.summary))
        facts = Table.grid(padding=(0, 2))
        facts.add_column(style="dim", no_wrap=True)
        facts.add_column(overflow="fold")
        for key, value in (
            ("aliases", ", ".join(spec.aliases) or "-"),
            ("input", f"{spec.input_kind}, {spec.resolution} px, {spec.input_convention}"),
            ("backbone", spec.default_backbone),
            ("timesteps", ", ".join(str(t) for t in spec.timesteps) or "-"),
            ("score", f"{spec.score_direction}; {spec.score_range}"),
            ("weights", ", ".join(spec.released_weights) or "none released"),
            ("licence", spec.licence),
            ("paper", spec.paper + (" (reconstruction: no released code)" if spec.reconstruction else "")),
            ("map", spec.map_description),
        ):
            facts.add_row(key, Text(value))
        console.print(facts)
