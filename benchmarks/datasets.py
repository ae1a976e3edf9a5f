"""Time to load each packaged dataset, each load in a fresh process.

Usage (from the repository root, with the project installed):

    python benchmarks/datasets.py --repeats 3 --write docs/benchmarks.md

Every load runs in a new Python process (``--child NAME``), so nothing is cached in
memory between repeats. The child process reports the time of ``load_dataset(NAME)``
alone (its imports are timed apart) and its peak resident memory. Datasets that are
built once and cached on disk (``mnistm-synthetic``) are measured after the cache
exists, so run the benchmark twice after a fresh install to see the cached time.

Target: the packaged MNIST loads in under 10 s on a 2-core machine, so a loader
that parses pixels in a Python loop (minutes) shows up here.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from markdown_section import machine_description, publish_section  # noqa: E402

SECTION_TITLE = "## Dataset loading"
# The datasets that load without a data directory (the others read files the user supplies).
PACKAGED = (
    "mnist",
    "digits",
    "optdigits",
    "mnist-rgb",
    "mnistm-synthetic",
    "optdigits-28",
    "rotated-mnist",
    "rotated-mnist-small",
    "cps1988",
)
MNIST_TARGET_SECONDS = 10.0


def _child(name: str) -> None:
    started = time.perf_counter()
    from simulations.datasets import load_dataset

    import_seconds = time.perf_counter() - started
    started = time.perf_counter()
    dataset = load_dataset(name)
    load_seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = {
        "name": name,
        "import_seconds": import_seconds,
        "load_seconds": load_seconds,
        "peak_rss_mib": peak_kib / 1024,
        "train": len(dataset.train_y),
        "test": len(dataset.test_y),
    }
    print(json.dumps(result))


def measure(name: str, repeats: int) -> dict:
    """Load ``name`` in ``repeats`` fresh processes and return the times and the largest peak memory."""
    runs = []
    for _ in range(repeats):
        completed = subprocess.run(
            [sys.executable, __file__, "--child", name], capture_output=True, text=True, check=False, cwd=ROOT
        )
        if completed.returncode != 0:
            raise RuntimeError(f"Loading {name!r} failed (exit code {completed.returncode}):\n{completed.stderr[-2000:]}")
        runs.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    return {
        "name": name,
        "load_seconds": [run["load_seconds"] for run in runs],
        "import_seconds": statistics.median(run["import_seconds"] for run in runs),
        "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
        "train": runs[0]["train"],
        "test": runs[0]["test"],
    }


def format_section(results: list[dict], repeats: int, command: str) -> str:
    lines = [
        SECTION_TITLE,
        "",
        f"Command: `{command}`",
        "",
        "| dataset | train / test examples | load time, median (s) | range (s) | peak memory (MiB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for result in results:
        times = result["load_seconds"]
        lines.append(
            f"| {result['name']} | {result['train']:,} / {result['test']:,} | {statistics.median(times):.2f} "
            f"| {min(times):.2f} to {max(times):.2f} | {result['peak_rss_mib']:.0f} |"
        )
    mnist = next((result for result in results if result["name"] == "mnist"), None)
    if mnist is not None:
        seconds = statistics.median(mnist["load_seconds"])
        verdict = "met" if seconds < MNIST_TARGET_SECONDS else "MISSED"
        lines += ["", f"Target: packaged MNIST in under {MNIST_TARGET_SECONDS:.0f} s. Measured {seconds:.2f} s: {verdict}."]
    import_seconds = statistics.median(result["import_seconds"] for result in results)
    lines += [
        "",
        f"Each load ran in a fresh process, {repeats} {'time' if repeats == 1 else 'times'} per dataset. Load time excludes the imports "
        f"(median {import_seconds:.2f} s for `simulations.datasets`); peak memory is the process's maximum "
        "resident set, imports included.",
        "",
        "Machine (`lscpu | head`):",
        "",
        machine_description(f"numpy {_numpy_version()}"),
        "",
    ]
    return "\n".join(lines)


def _numpy_version() -> str:
    import numpy

    return numpy.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(PACKAGED), help="comma-separated dataset names (default: all packaged ones)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process loads per dataset (default: 3)")
    parser.add_argument("--write", help="Markdown file whose dataset-loading section is replaced (created if absent)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0
    if args.repeats < 1:
        parser.error(f"Invalid --repeats {args.repeats}: it must be at least 1.")
    names = [name.strip() for name in args.datasets.split(",") if name.strip()]
    unknown = [name for name in names if name not in PACKAGED]
    if unknown:
        parser.error(f"Invalid --datasets {', '.join(unknown)}: choose from {', '.join(PACKAGED)}.")

    results = []
    for name in names:
        result = measure(name, args.repeats)
        print(f"{name}: median {statistics.median(result['load_seconds']):.2f} s, peak {result['peak_rss_mib']:.0f} MiB", flush=True)
        results.append(result)
    command = f"python benchmarks/datasets.py --repeats {args.repeats}"
    if names != list(PACKAGED):
        command += f" --datasets {','.join(names)}"
    section = format_section(results, args.repeats, command)
    publish_section(section, SECTION_TITLE, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
