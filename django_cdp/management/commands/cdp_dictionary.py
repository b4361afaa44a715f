"""``manage.py cdp_dictionary``: the event dictionary as Markdown or JSON Schema, and a CI gate.

``--check PATH`` compares the dictionary of the current code and settings with
a committed one and exits 1 on drift, printing what changed: a change of the
tracking plan (a new property, a field that became nullable, a renamed event)
then shows up in review like any other change of code.
"""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path
from typing import Any

from django.core.management.base import CommandError, CommandParser

from django_cdp.dictionary import Dictionary, get_dictionary
from django_cdp.management.base import CdpCommand

MARKDOWN, JSON_SCHEMA = "markdown", "json-schema"


class Command(CdpCommand):
    database_help = None
    help = (
        "Print the event dictionary (events, triggers, properties, traits with types) as "
        "Markdown or JSON Schema; --check PATH exits 1 when a committed copy has drifted."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--format",
            choices=[MARKDOWN, JSON_SCHEMA],
            default=None,
            help="Markdown (default) or one JSON Schema draft-07 document "
            '{"identify": ..., "events": {...}}. With --check, the default is the format of '
            "the committed file.",
        )
        parser.add_argument("--output", metavar="PATH", help="Write to PATH instead of stdout.")
        parser.add_argument(
            "--check",
            metavar="PATH",
            help="Compare with the dictionary committed at PATH; exit 1 and print the "
            "differences when they differ.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        dictionary = get_dictionary()
        if options["check"]:
            self._check(dictionary, Path(options["check"]), options["format"])
            return
        text = render(dictionary, options["format"] or MARKDOWN)
        if options["output"]:
            try:
                Path(options["output"]).write_text(text, encoding="utf-8")
            except OSError as exc:
                raise CommandError(
                    f"--output {options['output']!r}: cannot write it: {exc.strerror or exc}"
                ) from exc
            if options["verbosity"] >= 1:
                self.stderr.write(f"Wrote the event dictionary to {options['output']}.")
        else:
            self.stdout.write(text, ending="")

    def _check(self, dictionary: Dictionary, path: Path, fmt: str | None) -> None:
        try:
            committed = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"Cannot read {path}: {exc}") from exc
        if fmt is None:
            fmt = JSON_SCHEMA if _is_json(committed) else MARKDOWN
        if fmt == JSON_SCHEMA:
            if not _is_json(committed):
                raise CommandError(f"{path} is not JSON: cannot compare it as json-schema.")
            old, new = json.loads(committed), dictionary.to_json_schema()
            if old == new:
                self._ok(path)
                return
            self.stdout.write(f"The event dictionary has drifted from {path}:")
            for line in summarise(old, new):
                self.stdout.write(f"  {line}")
            self.stdout.write("")
            self._diff(_canonical(old), _canonical(new), path)
        else:
            current = render(dictionary, MARKDOWN)
            if committed == current:
                self._ok(path)
                return
            self.stdout.write(f"The event dictionary has drifted from {path}:")
            self._diff(committed, current, path)
        self.stdout.write(
            f"Review the change, then update it with: manage.py cdp_dictionary "
            f"--format {fmt} --output {path}"
        )
        sys.exit(1)

    def _ok(self, path: Path) -> None:
        self.stdout.write(f"The event dictionary matches {path}.")

    def _diff(self, old: str, new: str, path: Path) -> None:
        lines = difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            fromfile=f"{path} (committed)",
            tofile="current code and settings",
        )
        for line in lines:
            self.stdout.write(line, ending="" if line.endswith("\n") else "\n")


def render(dictionary: Dictionary, fmt: str) -> str:
    return dictionary.to_json() if fmt == JSON_SCHEMA else dictionary.to_markdown()


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _canonical(document: Any) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _members(schema: Any) -> dict[str, Any]:
    """The property (or trait) schemas of one event schema, tolerating hand edits."""
    if not isinstance(schema, dict):
        return {}
    for member in ("properties", "traits"):
        inner = schema.get("properties", {}).get(member)
        if isinstance(inner, dict):
            return inner.get("properties", {}) or {}
    return {}


def summarise(old: Any, new: dict[str, Any]) -> list[str]:
    """One readable line per event or trait that was added, removed or changed."""
    lines = []
    old_events = old.get("events", {}) if isinstance(old, dict) else {}
    for name in sorted(set(old_events) | set(new["events"])):
        if name not in new["events"]:
            lines.append(f"event removed: {name}")
        elif name not in old_events:
            lines.append(f"event added: {name}")
        elif old_events[name] != new["events"][name]:
            lines.append(
                f"event changed: {name}" + _member_changes(old_events[name], new["events"][name])
            )
    old_identify = old.get("identify") if isinstance(old, dict) else None
    if old_identify != new["identify"]:
        lines.append("identify changed" + _member_changes(old_identify, new["identify"]))
    return lines


def _member_changes(old: Any, new: Any) -> str:
    before, after = _members(old), _members(new)
    parts = [f"+{n}" for n in after if n not in before]
    parts += [f"-{n}" for n in before if n not in after]
    parts += [f"~{n}" for n in after if n in before and before[n] != after[n]]
    return f" ({', '.join(parts)})" if parts else ""
