"""Checksum manifests: the size and sha256 of every file of a folder, written once it is complete.

A checkpoint step folder, the result checkpoint and a prepared dataset each get
one (``MANIFEST_NAME`` inside the folder, written to a temporary name and
renamed). :func:`verify` re-hashes the files before they are trusted, so a
truncated file, garbage bytes in one, a deleted sub-folder or a cut metadata
file is caught before anything is restored from it. Hashing reads every byte
(about 1 s per GB on one core).
"""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST_NAME = "imgclf_manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: str) -> str:
    """The hex sha256 of the file at `path`, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: str) -> list[str]:
    """Paths relative to `folder` of every regular file under it (the manifest aside), sorted."""
    out = []
    for parent, dirs, names in os.walk(folder):
        dirs.sort()
        for name in names:
            rel = os.path.relpath(os.path.join(parent, name), folder)
            if rel != MANIFEST_NAME and not rel.endswith(f"{MANIFEST_NAME}.tmp"):
                out.append(rel)
    return sorted(out)


def write(folder: str) -> None:
    """Writes ``<folder>/imgclf_manifest.json``: ``{"files": {relative path: [size in bytes, sha256 hex]}}``.

    Atomic (temporary name, then rename); the temporary file is removed if the write fails.

    Raises:
      OSError: the folder cannot be read or the manifest written (e.g. ENOSPC).
    """
    files = {rel: [os.path.getsize(os.path.join(folder, rel)), sha256_file(os.path.join(folder, rel))]
             for rel in _files(folder)}
    path = os.path.join(folder, MANIFEST_NAME)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump({"version": 1, "files": files}, f, indent=0)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def has_manifest(folder: str) -> bool:
    """Whether `folder` holds a manifest (folders written before manifests existed do not)."""
    return os.path.isfile(os.path.join(folder, MANIFEST_NAME))


def verify(folder: str) -> str | None:
    """Checks every file listed in `folder`'s manifest; returns None if all match, else the first problem.

    The problem is a short phrase such as ``"file 'state/x' is missing"``,
    ``"file 'a' has 812 bytes, 1024 expected"`` or ``"file 'a' differs from its checksum"``.
    A folder without a manifest returns ``"no checksum manifest"`` (see :func:`has_manifest`).
    """
    if not os.path.isdir(folder):
        return "the folder is missing"
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        return "no checksum manifest"
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        items = sorted(files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its manifest {MANIFEST_NAME} is unreadable"
    for rel, expected in items:
        full = os.path.join(folder, rel)
        if not os.path.isfile(full):
            return f"file '{rel}' is missing"
        size = os.path.getsize(full)
        if size != expected[0]:
            return f"file '{rel}' has {size} bytes, {expected[0]} expected"
        if sha256_file(full) != expected[1]:
            return f"file '{rel}' differs from its checksum"
    return None
