"""``diqa weights …``: list, pull, verify, path, convert, tiny. Data to stdout, people to stderr.

The library (:mod:`diqa_cli.weights`) does the work; this module parses and formats. Nothing here
imports torch at start-up: ``diqa weights list`` must stay fast.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from diqa_cli import weights as lib

weights_app = typer.Typer(
    name="weights",
    help="Model weights: list the manifest, download with SHA-256 checks, verify, convert.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(weights_app, name="weights")


def _err(message: str) -> None:
    typer.echo(message, err=True)


@weights_app.command("list")
def list_command(
    fmt: Optional[str] = typer.Option(
        None, "--format", "-f", help="table|csv|json (default: table on a terminal, csv in a pipe)"
    ),
) -> None:
    """List the manifest's entries: kind, licence, whether cached, size."""
    fmt = (fmt or ("table" if sys.stdout.isatty() else "csv")).lower()
    if fmt not in ("table", "csv", "json"):
        raise typer.BadParameter(f"{fmt!r} is not one of table, csv, json", param_hint="--format")
    rows = []
    for e in lib.list_entries():
        known, complete = e.known_size
        rows.append(
            {
                "name": e.name,
                "kind": e.kind,
                "licence": e.licence,
                "cached": lib.entry_status(e),
                "size": _size_text(known, complete),
                "size_bytes": known if complete else None,
                "non_commercial": e.non_commercial,
                "source": e.source,
                "revision": e.revision,
                "description": e.description,
            }
        )
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        columns = ["name", "kind", "licence", "cached", "size"]
        writer = csv.DictWriter(
            sys.stdout, fieldnames=columns, extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table()
        for column in ("name", "kind", "licence", "cached", "size"):  # folded, never cut: names are typed next
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(row["name"], row["kind"], row["licence"], row["cached"], row["size"])
        Console().print(table)
        _err(f"cache: {lib.cache_dir()}")


def _size_text(known: int, complete: bool) -> str:
    if complete:
        return lib.human_size(known)
    return f"{lib.human_size(known)}+" if known else "?"


@weights_app.command("pull")
def pull_command(
    names: Optional[List[str]] = typer.Argument(None, metavar="[NAME...]", help="manifest entries"),
    methods: Optional[List[str]] = typer.Option(
        None, "--for", metavar="METHOD",
        help="set up everything METHOD needs to score (head, backbone parts, CLIP, SlowFast, perceptual trunks): "
        "listed with sizes and licences, downloaded, converted, verified; repeat for several methods",
        show_default=False,
    ),
    accept_licence: bool = typer.Option(
        False, "--accept-licence", help="accept non-commercial licences without asking (never assumed in a pipe)"
    ),
    print_urls: bool = typer.Option(
        False, "--print-urls", help="print URL, target path and SHA-256 of every file (tab-separated); download nothing"
    ),
    offline: bool = typer.Option(False, "--offline", help="never touch the network"),
    force: bool = typer.Option(False, "--force", help="download again even if cached"),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="accept pickle files (convert them afterwards)"
    ),
) -> None:
    """Download entries into the cache, checking each file's SHA-256; `--for METHOD` sets a method up."""
    from diqa_cli.errors import UsageError
    from diqa_cli.home import offline_requested
    from diqa_cli.methods import get_method
    from diqa_cli.weights import setup

    if not names and not methods:
        raise UsageError("name manifest entries (`diqa weights list`) or a method with --for METHOD")
    specs = [get_method(name) for name in methods or []]
    plan = setup.plan_for(specs) if specs else []
    if print_urls:
        plan += [setup.PlannedPart(lib.entry(name), None, [], []) for name in names or []]
        for url, target, sha256 in setup.origins(plan):
            typer.echo(f"{url}\t{target}\t{sha256 or '-'}")
        return
    if specs:
        _set_up(specs, plan, accept_licence=accept_licence, offline=offline_requested(offline), force=force)
    for name in names or []:
        with _progress() as progress:
            path = lib.pull(
                name,
                offline=offline,
                force=force,
                allow_pickle=allow_pickle,
                progress=progress,
                notify=_err,
            )
        _err(f"{name}: ready at {path}")


def _set_up(specs, plan, *, accept_licence: bool, offline: bool, force: bool) -> None:
    from diqa_cli.weights import setup

    names = ", ".join(spec.name for spec in specs)
    _err(f"diqa: {names} need{'s' if len(specs) == 1 else ''}:")
    for part in plan:
        known, complete = part.size
        size = lib.human_size(known) if complete else (f"{lib.human_size(known)}+" if known else "size unknown")
        what = part.entry.name + (f" ({', '.join(part.parts)})" if part.parts else "")
        state = {"yes": "cached", "partial": "partly cached", "no": "to download"}[lib.entry_status(part.entry)]
        _err(f"  {what}  {size}  {part.entry.licence}  [{state}]  {'; '.join(p for p in part.purposes if p)}")

    def accept(part) -> bool:
        if accept_licence:
            return True
        if not sys.stdin.isatty():  # never accepted silently in a pipe
            return False
        return _ask(f"{part.entry.name} is {part.entry.licence}. Accept this licence? [y/N]: ")

    with _progress() as progress:
        setup.setup(specs, accept=accept, offline=offline, force=force, progress=progress, notify=_err)
    for spec in specs:
        if any(need.role == "head" for need in spec.weights):
            _err(f"diqa: {spec.name} is ready: diqa score PHOTOS... -m {spec.name}")
        else:
            kind = "score-video" if spec.input_kind == "video" else "score"
            _err(
                f"diqa: {spec.name}'s backbone is ready, but no trained head is published: train one with "
                f"`diqa train -m {spec.name} --data labels.csv --out {spec.name}.safetensors`, then "
                f"`diqa {kind} … -m {spec.name} -c {spec.name}.safetensors`"
            )


def _ask(question: str) -> bool:
    """A yes/no question on stderr, the answer from stdin (click's confirm echoes a space to
    stdout, which is data)."""
    sys.stderr.write(question)
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if not answer.endswith("\n"):
        sys.stderr.write("\n")
    return answer.strip().lower() in ("y", "yes")


class _progress:
    """A Rich progress bar on stderr when stderr is a terminal; silent otherwise."""

    def __enter__(self):
        if not sys.stderr.isatty():
            return None
        from rich.console import Console
        from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

        self._bar = Progress(
            *Progress.get_default_columns(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._bar.start()
        self._tasks: dict[str, int] = {}

        def update(label: str, done: int, total: Optional[int]) -> None:
            if label not in self._tasks:
                self._tasks[label] = self._bar.add_task(label, total=total)
            self._bar.update(self._tasks[label], completed=done, total=total)

        return update

    def __exit__(self, *exc) -> None:
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.stop()


@weights_app.command("verify")
def verify_command(
    names: Optional[List[str]] = typer.Argument(
        None, metavar="[NAME...]", help="default: every cached entry"
    ),
) -> None:
    """Hash cached files again; exit 1 when any file is missing or differs."""
    results = lib.verify(names or None)
    if not results:
        _err("nothing is cached yet; nothing to verify")
        return
    for r in results:
        typer.echo(f"{r.status}\t{r.name}/{r.path}\t{r.actual or '-'}")
        if r.status != "ok":
            _err(f"{r.name}/{r.path}: {r.message}")
    failed = [r for r in results if not r.ok]
    _err(f"verified {len(results)} file(s): {len(results) - len(failed)} ok, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)


@weights_app.command("path")
def path_command(name: str = typer.Argument(..., metavar="NAME")) -> None:
    """Print an entry's local path (folder or file); exit 1 if it is not cached."""
    typer.echo(str(lib.resolve(name, allow_pickle=True, download=False)))


@weights_app.command("convert")
def convert_command(
    sources: list[str] = typer.Argument(
        ..., metavar="SRC... [DST]",
        help="a .pth/.pyth/.bin file, or a manifest entry name; several files for a method released as "
        "several (GenzIQA: LoRA file and prompt learner; GenzVQA: plus slowAttn, fastAttn, linearBlocks). "
        "A last argument ending in .safetensors is the output.",
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="output .safetensors (default: beside the first SRC)", show_default=False
    ),
    method: Optional[str] = typer.Option(
        None, "--method", "-m", help="map the released key names through this method's converter"
    ),
) -> None:
    """Convert released PyTorch state dicts to safetensors (read with weights_only=True); says on
    stderr what was kept and dropped (also in the note beside the output)."""
    sources = list(sources)
    if output is None and len(sources) > 1 and sources[-1].endswith(".safetensors"):
        output = Path(sources.pop())
    if len(sources) == 1 and not Path(sources[0]).exists() and sources[0] in lib.load_manifest():
        written = lib.convert_entry(sources[0], method=method, dst=output)
    else:
        target = output or Path(sources[0]).with_suffix(".safetensors")
        written = [lib.convert([Path(s) for s in sources], target, method=method)]
    for path in written:
        _err(f"diqa: {path.name}: {lib.conversion_summary(path)}")
        typer.echo(str(path))


@weights_app.command("tiny")
def tiny_command(directory: Path = typer.Argument(..., metavar="DIR")) -> None:
    """Write the tiny random backbone and one head per method to DIR (tests, smoke checks)."""
    from diqa_cli.tiny import write_tiny_bundle

    write_tiny_bundle(directory)
    typer.echo(str(directory))
