"""Every `diqa` command the README shows parses with today's commands and options, so the README
cannot drift from the tool."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

def readme_commands() -> list[str]:
    """The `diqa …` part of every `$ …` line in the README's console blocks."""
    commands = []
    for line in README.read_text(encoding="utf-8").splitlines():
        if not line.startswith("$ "):
            continue
        for part in line[2:].split("|"):
            words = shlex.split(part, comments=True)
            if words and words[0] == "diqa":
                kept = []
                for word in words[1:]:
                    if word in (">", "2>", "<"):
                        break
                    kept.append(word)
                commands.append(shlex.join(kept))
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_commands():
    assert len(COMMANDS) > 30


def _parse(args: list[str]) -> None:
    """Parse ``args`` as `diqa` would (options, arguments, sub-commands) without running anything."""
    import typer.main

    from diqa_cli.cli import app

    command = typer.main.get_command(app)
    context = command.make_context("diqa", list(args), resilient_parsing=False)
    while hasattr(command, "resolve_command"):
        # click keeps the sub-command's name apart from its arguments (``_protected_args`` since 8.2).
        protected = getattr(context, "_protected_args", None) or getattr(context, "protected_args", None) or []
        remaining = [*protected, *context.args]
        if not remaining:
            return
        name, command, rest = command.resolve_command(context, remaining)
        context = command.make_context(name, rest, parent=context, resilient_parsing=False)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    _parse(shlex.split(command))
