"""Time `mednets --help` at several git revisions, side by side, alternating runs (issue 23).

    .venv/bin/python benchmarks/cli_startup.py [REV ...]      # default: 0b1328b (the redesign) and the working tree

Each revision is checked out into a temporary git worktree and imported from its `src/` with this
environment's Python; the working tree is `.`. Prints the median and fastest of 10 runs per revision.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = 10
COMMAND = "import sys; from mednets.cli import main; sys.exit(main(['--help']))"


def _seconds(src: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(src))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", COMMAND], env=env, capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    revisions = sys.argv[1:] or ["0b1328b", "."]
    with tempfile.TemporaryDirectory() as scratch:
        sources = {}
        for revision in revisions:
            if revision == ".":
                sources["working tree"] = ROOT / "src"
                continue
            tree = Path(scratch) / revision
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), revision], check=True
            )
            sources[revision] = tree / "src"
        try:
            times: dict[str, list[float]] = {name: [] for name in sources}
            for _ in range(RUNS):
                for name, src in sources.items():  # alternate, so drift in machine load hits every revision alike
                    times[name].append(_seconds(src))
        finally:
            for name in sources:
                if name != "working tree":
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(Path(scratch) / name)])
    print(f"`mednets --help`, {RUNS} runs each\n\n| revision | median | fastest |\n|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.3f} s | {min(values):.3f} s |")


if __name__ == "__main__":
    main()
