"""Open a report in headless Chromium: check that its images load, and take screenshots.

Uses the system's Chromium (Debian's `chromium` package; `.ci/run` installs it) through its
command line, so no browser driver is needed: `--dump-dom` prints the page after a small script
has written the image checks into it, `--screenshot` writes a PNG.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mednets.atomic import atomic_path
from mednets.errors import InvalidInputError

__all__ = ["PageCheck", "find_chromium", "check_page", "screenshot"]

_FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]
_CHECK = """<script>window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const result = {images: images.length,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 40)),
    text_length: document.body.innerText.trim().length, height: document.documentElement.scrollHeight};
  const out = document.createElement("pre"); out.id = "mednets-page-check";
  out.textContent = JSON.stringify(result); document.body.appendChild(out);
});</script>"""


@dataclass(frozen=True)
class PageCheck:
    """What Chromium saw: image count, images that did not load (alt text), visible text length, page height (px)."""

    images: int
    broken: list[str]
    text_length: int
    height: int


def find_chromium() -> str | None:
    """Path of a Chromium or Chrome executable on PATH (or `$CHROMIUM`), or None."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def _run(arguments: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    executable = find_chromium()
    if executable is None:
        raise InvalidInputError("Chromium not found", source="chromium", expected="`apt-get install chromium`")
    with tempfile.TemporaryDirectory(prefix="mednets-chromium-") as profile:
        return subprocess.run(
            [executable, *_FLAGS, f"--user-data-dir={profile}", *arguments],
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
            check=False,
        )


def check_page(page: str | os.PathLike[str], *, width: int = 1280, timeout: float = 60.0) -> PageCheck:
    """Load `page` in headless Chromium (`width` px wide) and report whether every `<img>` decoded (natural width > 0).

    The page is copied with a checking script added; the original is not changed.

    Raises:
        InvalidInputError: Chromium is missing, or it printed no result.
    """
    page = Path(page)
    with tempfile.TemporaryDirectory(prefix="mednets-page-") as folder:
        checked = Path(folder) / page.name
        checked.write_text(page.read_text(encoding="utf-8").replace("</body>", _CHECK + "</body>"), encoding="utf-8")
        arguments = [f"--window-size={width},900", "--virtual-time-budget=10000", "--dump-dom", checked.as_uri()]
        result = _run(arguments, timeout)
    found = re.search(r'<pre id="mednets-page-check">(.*?)</pre>', result.stdout, re.S)
    if found is None:
        raise InvalidInputError(
            "Chromium returned no page check", source=str(page), got=(result.stderr or result.stdout)[-500:]
        )
    values = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    return PageCheck(values["images"], values["broken"], values["text_length"], values["height"])


def screenshot(
    page: str | os.PathLike[str], out: str | os.PathLike[str], *, width: int = 1280, height: int | None = None
) -> Path:
    """Write a PNG of `page` at `width` px; `height` None takes the whole page (measured first).

    Raises:
        InvalidInputError: Chromium is missing or wrote no screenshot.
    """
    page = Path(page)
    height = height or check_page(page, width=width).height
    with atomic_path(out) as temporary:
        result = _run([f"--window-size={width},{height}", f"--screenshot={temporary}", page.resolve().as_uri()], 120)
        if not temporary.is_file() or temporary.stat().st_size == 0:
            raise InvalidInputError("Chromium wrote no screenshot", source=str(page), got=result.stderr[-500:])
    return Path(out)
