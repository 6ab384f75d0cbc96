"""Setting a method up in one step: every weights file it needs (``MethodSpec.weights``), listed
with sizes and licences, fetched, converted and verified (``diqa weights pull --for METHOD``);
and, when scoring finds pieces missing, one message naming them all and that one command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from diqa_cli.errors import WeightsError
from diqa_cli.weights.manifest import Entry, WeightFile, _file_origin, _selected, entry

__all__ = ["PlannedPart", "missing_for", "origins", "plan_for", "require_for", "setup", "setup_command"]


@dataclass
class PlannedPart:
    """One entry (and the parts of it) that some methods need."""

    entry: Entry
    parts: tuple[str, ...] | None
    purposes: list[str]
    methods: list[str]

    @property
    def files(self) -> list[WeightFile]:
        return _selected(self.entry, self.parts)

    @property
    def size(self) -> tuple[int, bool]:
        """(known bytes, whether every file's size is known)."""
        sizes = [f.size for f in self.files]
        return sum(s or 0 for s in sizes), all(s is not None for s in sizes)

    @property
    def needs_conversion(self) -> bool:
        return any(f.is_pickle for f in self.files)


def setup_command(specs: Iterable) -> str:
    return "diqa weights pull " + " ".join(f"--for {spec.name}" for spec in specs)


def plan_for(specs: Iterable, *, with_head: bool = True, with_backbone: bool = True) -> list[PlannedPart]:
    """The entries ``specs`` need, each once, with the union of the parts the methods read
    (an entry wanted whole by one method is pulled whole)."""
    planned: dict[str, PlannedPart] = {}
    for spec in specs:
        for need in spec.weights:
            if (need.role == "head" and not with_head) or (need.role == "backbone" and not with_backbone):
                continue
            part = planned.get(need.entry)
            if part is None:
                planned[need.entry] = PlannedPart(entry(need.entry), need.parts, [need.purpose], [spec.name])
                continue
            if part.parts is None or need.parts is None:
                part.parts = None
            else:
                part.parts = tuple(dict.fromkeys((*part.parts, *need.parts)))
            part.purposes.append(need.purpose)
            part.methods.append(spec.name)
    return list(planned.values())


def missing_for(spec, *, with_head: bool = True, with_backbone: bool = True) -> list[str]:
    """The pieces of ``spec``'s setup that are not in the cache, one line each (nothing is fetched)."""
    from diqa_cli.weights.fetch import resolve

    missing = []
    for part in plan_for([spec], with_head=with_head, with_backbone=with_backbone):
        try:
            resolve(part.entry.name, parts=part.parts, download=False)
        except WeightsError:
            what = f"{part.entry.name}" + (f" ({', '.join(part.parts)})" if part.parts else "")
            missing.append(f"{what}: {', '.join(p for p in part.purposes if p)}")
    return missing


def require_for(spec, *, with_head: bool = True, with_backbone: bool = True) -> None:
    """Raise one ``WeightsError`` that lists every missing piece of ``spec``'s setup and the one
    command that fetches them all (``diqa score`` and friends call this before loading)."""
    missing = missing_for(spec, with_head=with_head, with_backbone=with_backbone)
    if missing:
        raise WeightsError(
            f"{spec.name} needs weights that are not in the cache: " + "; ".join(missing)
            + f". Fetch them all with `{setup_command([spec])}`"
        )


def setup(
    specs: list,
    *,
    accept: Callable[[PlannedPart], bool],
    offline: bool = False,
    force: bool = False,
    progress=None,
    notify: Callable[[str], None] | None = None,
) -> list[Path]:
    """Pull (hash-checked) and convert every entry ``specs`` need. ``accept(part)`` is asked for
    each non-commercial entry before anything is downloaded; refusing any stops the whole setup."""
    from diqa_cli.weights.convert import conversion_summary, convert_entry
    from diqa_cli.weights.fetch import pull

    plan = plan_for(specs)
    refused = [part.entry.name for part in plan if part.entry.non_commercial and not accept(part)]
    if refused:
        raise WeightsError(
            f"{', '.join(refused)} {'is' if len(refused) == 1 else 'are'} licensed for non-commercial use only and "
            "the licence was not accepted; nothing was downloaded (pass --accept-licence to accept it)"
        )
    ready = []
    for part in plan:
        e = part.entry
        pull(e.name, offline=offline, force=force, allow_pickle=part.needs_conversion, progress=progress,
             parts=part.parts, notify=notify)
        converted = all((e.local_dir / f.converted_path).is_file() for f in part.files if f.is_pickle)
        if part.needs_conversion and (force or not converted):
            for out in convert_entry(e.name, method=e.method):  # read with weights_only=True, never unpickled
                if notify is not None:
                    notify(f"diqa: {e.name}: converted to {out.name}: {conversion_summary(out)}")
        ready.append(e.local_dir)
    return ready


def origins(plan: list[PlannedPart]) -> list[tuple[str, Path, str | None]]:
    """(URL, target path, SHA-256 or None) of every file of ``plan``, for machines without network."""
    return [(_file_origin(part.entry, f), part.entry.local_dir / f.path, f.sha256) for part in plan for f in part.files]
