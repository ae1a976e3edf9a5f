"""Shared helpers for benchmarks that record their results as a section of ``docs/benchmarks.md``."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def machine_description(versions: str) -> str:
    """Return the first lines of ``lscpu``, the given library versions and the load average, as Markdown."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()[:10]
    except (OSError, subprocess.CalledProcessError):
        lscpu = [f"{platform.processor() or platform.machine()}"]
    # Other jobs may share the machine, and the load average shows how much they inflated the times.
    load = "Load average (1, 5, 15 min) when the measurement finished: " + ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return "\n".join(["```", *lscpu, "```", "", f"Python {platform.python_version()}, {versions}", "", load])


def write_section(path: Path, title: str, section: str) -> None:
    """Replace the section that starts with the heading ``title`` in ``path`` (up to the next ``## ``), or append it."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if title in text:
        start = text.index(title)
        following = text.find("\n## ", start + len(title))
        end = len(text) if following == -1 else following + 1
        text = text[:start] + section + ("\n" if following != -1 else "") + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def publish_section(section: str, title: str, path: str | None) -> None:
    """Print ``section`` and, when ``path`` is given, write it into that Markdown file with ``write_section``."""
    print(section)
    if path:
        write_section(Path(path), title, section)
        print(f"Section written to {path}")
