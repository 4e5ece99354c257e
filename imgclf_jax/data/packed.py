"""A packed data folder: what ``python -m imgclf_jax.pack read`` writes, and how a run opens it.

A packed data folder holds ``imgclf_pack.json`` (the pack's manifest: version, builder, the
prepared folder's name, its content digest, and the scan: class names and every split's rows as
[image id, label, where it was listed]) beside the prepared array_record folder itself.
:func:`imgclf_jax.data.builders.prepare` opens one as it is, with the rows read here, so nothing is
scanned or prepared. Writing and unpacking parts is the tool's job (:mod:`imgclf_jax.pack`).
"""

from __future__ import annotations

import json
import os

from imgclf_jax.data import scan as scan_lib
from imgclf_jax.errors import ConfigError, DataError

PACK_NAME = "pack.json"  # the manifest in a parts folder
PACKED_NAME = "imgclf_pack.json"  # the manifest in a packed data folder
VERSION = 1


def read_manifest(path: str) -> dict:
    """The pack manifest at `path` (a parts folder's ``pack.json`` or a packed folder's ``imgclf_pack.json``).

    Raises:
      DataError: `path` is missing, not JSON, of another version, or lacks builder, folder or scan.
    """
    try:
        with open(path) as f:
            pack = json.load(f)
        if pack.get("version") != VERSION:
            raise ValueError(f"version {pack.get('version')!r}, {VERSION} expected")
        for key in ("builder", "folder", "scan"):
            if key not in pack:
                raise ValueError(f"no {key!r}")
        return pack
    except FileNotFoundError:
        raise DataError(f"'{path}' not found: not a data pack (python -m imgclf_jax.pack write makes one)") from None
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"'{path}' is not a readable pack manifest ({e})") from None


def is_packed(root: str) -> bool:
    """Whether `root` (a ``data.dir``) is a packed data folder (it holds ``imgclf_pack.json``)."""
    return bool(root) and os.path.isfile(os.path.join(root, PACKED_NAME))


def open_packed(builder: str, root: str, num_classes: int) -> tuple[str, scan_lib.Scan]:
    """(the prepared folder's path, its :class:`imgclf_jax.data.scan.Scan`) of packed data folder `root`.

    Raises:
      ConfigError: ``data.builder`` or ``data.num_classes`` (when not 0) differ from the pack's.
      DataError: an unreadable manifest.
    """
    pack = read_manifest(os.path.join(root, PACKED_NAME))
    if builder != pack["builder"]:
        raise ConfigError(f"config key 'data.builder' is {builder!r} but data.dir '{root}' is a pack of "
                          f"{pack['builder']!r} data: set --config.data.builder={pack['builder']}")
    saved = pack["scan"]
    if num_classes and num_classes != len(saved["class_names"]):
        raise ConfigError(f"config key 'data.num_classes' is {num_classes} but the pack in '{root}' has "
                          f"{len(saved['class_names'])} classes")
    scan = scan_lib.Scan(
        class_names=list(saved["class_names"]),
        splits={split: [scan_lib.Example(str(i), int(y), "", str(o)) for i, y, o in rows]
                for split, rows in saved["splits"].items()},
        sources=dict(saved.get("sources", {})))
    return os.path.join(root, pack["folder"]), scan
