"""The repository stands alone: no tracked file points to notes outside it."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTSIDE = ("../" + "shared", "SPEC" + ".md", "SPEC" + " §")  # split, so this file does not match itself


def test_no_tracked_file_points_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    offending = [
        f"{name}: {marker}"
        for name in files
        if (REPO / name).is_file()
        for marker in OUTSIDE
        if marker in (REPO / name).read_text(errors="ignore")
    ]
    assert not offending, offending
    assert (REPO / "docs/algorithm.md").is_file()
