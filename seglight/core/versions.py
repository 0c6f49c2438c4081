"""The versions a run or an export records: installed packages, and the git commit seglight runs from."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

# Packages whose versions decide what a run computes; recorded in run_info.json.
RECORDED_PACKAGES = ("seglight", "torch", "lightning", "monai", "hydra-core", "omegaconf", "numpy", "nibabel")


def package_versions(names: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None for a package that is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# The folder above the seglight package: a git checkout's top when seglight runs from one.
SOURCE_DIR = Path(__file__).resolve().parents[2]


def git_state(source_dir: Path = SOURCE_DIR) -> dict[str, Any] | None:
    """Commit and dirty flag of the git checkout seglight runs from; None when it is not one (a wheel install)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(source_dir), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top != source_dir.resolve():
            return None  # seglight is installed inside some other repository, whose commit says nothing
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return None
