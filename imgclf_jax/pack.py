"""A data pack: a config's prepared dataset as parts of bounded size, for a machine without the data.

Usage::

  python -m imgclf_jax.pack write --config configs/NAME.py [--config.data.dir=...] --out PARTS_DIR [--part_mib 60]
  python -m imgclf_jax.pack read PARTS_DIR --to DATA_DIR
  python -m imgclf_jax.train --config configs/NAME.py --config.data.dir=DATA_DIR     # on the other machine

``write`` prepares the config's data as train does (once, into ``data.cache_dir``), then writes
``PARTS_DIR/part-000.bin, part-001.bin, ...``: one uncompressed tar stream of the prepared
array_record folder (its records are already zlib-compressed), cut into parts of at most
``--part_mib`` MiB (default 60: a transfer of 64 MiB carries one part and the manifest), and
``PARTS_DIR/pack.json``, the manifest: the builder, the class names, every split's rows
(image id, label, where it was listed), the dataset's content digest, and each part's size and
sha256. The competition's 13,750 labelled images (train and validation, 334 MiB prepared) make 6
parts: 5 of 60 MiB and one of 34 MiB, plus a 0.9 MiB pack.json (measured 2026-12-04: write 4.7 s, read 2.1 s).

``read`` checks every part against the manifest (size and sha256; a missing, truncated or changed
part is named, and nothing is written), then unpacks the stream into ``DATA_DIR``: a *packed data
folder* holding ``imgclf_pack.json`` (the manifest without its parts) and the prepared folder. A
run with ``--config.data.dir=DATA_DIR`` and the same ``data.builder`` opens it without scanning any
image file or preparing anything: the rows, their order and the decoded pixels are the original
machine's bit for bit, and so is the content digest a run records, so a run started on one machine
resumes on the other. The prepared folder's own checksum manifest is checked when it is opened, as
for every prepared folder (:mod:`imgclf_jax.data.builders`; the packed folder's format is
:mod:`imgclf_jax.data.packed`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tarfile
import uuid

from imgclf_jax import cli, disk
from imgclf_jax.manifest import sha256_file
from imgclf_jax.data.packed import PACK_NAME, PACKED_NAME, VERSION, is_packed, read_manifest
from imgclf_jax.errors import ConfigError, DataError

_CHUNK = 1 << 20


class _PartWriter:
    """A write-only file object that cuts what it is given into ``part-NNN.bin`` files of at most `part_bytes`."""

    def __init__(self, folder: str, part_bytes: int):
        self.folder, self.part_bytes = folder, part_bytes
        self.parts: list[dict] = []
        self._file = None
        self._digest = None
        self._size = 0

    def _close_part(self) -> None:
        if self._file is not None:
            self._file.close()
            self.parts[-1].update(bytes=self._size, sha256=self._digest.hexdigest())
            self._file = None

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._file is None or self._size == self.part_bytes:
                self._close_part()
                name = f"part-{len(self.parts):03d}.bin"
                self.parts.append({"name": name})
                self._file = open(os.path.join(self.folder, name), "wb")
                self._digest, self._size = hashlib.sha256(), 0
            take = min(len(view), self.part_bytes - self._size)
            self._file.write(view[:take])
            self._digest.update(view[:take])
            self._size += take
            view = view[take:]
        return len(data)

    def close(self) -> None:
        self._close_part()


class _PartReader:
    """A read-only file object over the parts, in order, as one stream."""

    def __init__(self, paths: list[str]):
        self._paths, self._file = list(paths), None

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while size < 0 or len(out) < size:
            if self._file is None:
                if not self._paths:
                    break
                self._file = open(self._paths.pop(0), "rb")
            block = self._file.read(-1 if size < 0 else size - len(out))
            if not block:
                self._file.close()
                self._file = None
                continue
            out += block
        return bytes(out)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _scan_to_json(scan) -> dict:
    return {
        "class_names": list(scan.class_names),
        "splits": {split: [[ex.image_id, int(ex.label), ex.origin] for ex in examples]
                   for split, examples in scan.splits.items()},
        "sources": dict(scan.sources),
    }


def write_pack(data_config, out_dir: str, part_bytes: int) -> dict:
    """Prepares the ``data`` section's dataset (if needed) and writes its pack into `out_dir`.

    Args:
      data_config: a run config's ``data`` section (builder, dir, cache_dir, num_classes are read).
      out_dir: the parts folder (created; must be empty or absent).
      part_bytes: the largest part, in bytes (>= 1 MiB).

    Returns:
      the manifest written to ``out_dir/pack.json``.

    Raises:
      ConfigError: `out_dir` holds files already, `part_bytes` is below 1 MiB, the builder reads no
        data folder (digits), or ``data.dir`` is a packed folder already.
      DataError: as :func:`imgclf_jax.data.builders.prepare` (missing data, a corrupt image).
    """
    from imgclf_jax.data import builders

    if part_bytes < _CHUNK:
        raise ConfigError(f"--part_mib must be at least 1, got {part_bytes / _CHUNK:g}")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"--out '{out_dir}' is not empty: give a new or empty folder")
    entry = builders.BUILDERS[data_config.builder]
    if "dir" in entry.ignored_keys:
        raise ConfigError(f"data.builder='{data_config.builder}' reads no data folder "
                          f"({entry.ignored_keys['dir'][1]}): there is nothing to pack")
    root = data_config.dir
    if is_packed(root):
        raise ConfigError(f"config key 'data.dir' ({root}) is a packed data folder already: copy its parts instead")
    scan = entry.scan(root, data_config.num_classes)
    prepared = builders.prepare(data_config.builder, data_config.dir, data_config.cache_dir, data_config.num_classes)
    os.makedirs(out_dir, exist_ok=True)
    folder = os.path.basename(prepared.path)
    writer = _PartWriter(out_dir, part_bytes)
    try:
        try:
            with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                tar.add(prepared.path, arcname=folder)
        finally:
            writer.close()
    except BaseException as e:  # out_dir was empty: leave it so, for a rerun of the same command
        for name in os.listdir(out_dir):
            os.remove(os.path.join(out_dir, name))
        if isinstance(e, OSError) and disk.is_disk_full(e):
            raise disk.disk_full_error(f"the pack's parts in '{out_dir}'", out_dir, disk.folder_bytes(prepared.path),
                                       "free space and rerun the same command",
                                       elsewhere="give an --out on a larger disk") from None
        raise
    pack = {
        "version": VERSION,
        "builder": data_config.builder,
        "folder": folder,
        "content_digest": prepared.content_digest,
        "scan": _scan_to_json(scan),
        "parts": writer.parts,
    }
    tmp = os.path.join(out_dir, f"{PACK_NAME}.tmp")
    with open(tmp, "w") as f:
        json.dump(pack, f)
    os.replace(tmp, os.path.join(out_dir, PACK_NAME))
    return pack


def read_pack(parts_dir: str, data_dir: str) -> dict:
    """Checks the parts in `parts_dir` against its ``pack.json`` and unpacks them into `data_dir`.

    Returns the manifest. `data_dir` is written through a temporary sibling folder renamed into place,
    so an interrupted read leaves no half-written folder.

    Raises:
      DataError: no or an unreadable manifest; a part missing, of the wrong size or with the wrong
        sha256 (named); the stream holds a path outside the pack's folder.
      ConfigError: `data_dir` exists and is not empty.
    """
    pack = read_manifest(os.path.join(parts_dir, PACK_NAME))
    if os.path.exists(data_dir) and (not os.path.isdir(data_dir) or os.listdir(data_dir)):
        raise ConfigError(f"--to '{data_dir}' exists and is not empty: give a new folder")
    paths = []
    for part in pack.get("parts", []):
        path = os.path.join(parts_dir, part["name"])
        if not os.path.isfile(path):
            raise DataError(f"part '{path}' is missing ({len(pack['parts'])} parts in {PACK_NAME}); nothing written")
        size = os.path.getsize(path)
        if size != part["bytes"]:
            raise DataError(f"part '{path}' has {size:,} bytes, {part['bytes']:,} expected (cut short in transfer?); "
                            "nothing written")
        if sha256_file(path) != part["sha256"]:
            raise DataError(f"part '{path}' does not match its sha256 in {PACK_NAME} (changed in transfer?); "
                            "nothing written")
        paths.append(path)
    parent = os.path.dirname(os.path.abspath(data_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(data_dir))}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    reader = _PartReader(paths)
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                if member.name.split("/")[0] != pack["folder"]:
                    raise DataError(f"part stream holds '{member.name}', outside the pack's folder {pack['folder']!r}")
                tar.extract(member, tmp, filter="data")
        manifest = {key: value for key, value in pack.items() if key != "parts"}
        with open(os.path.join(tmp, PACKED_NAME), "w") as f:
            json.dump(manifest, f)
        if os.path.isdir(data_dir):
            os.rmdir(data_dir)
        os.rename(tmp, data_dir)
    except tarfile.TarError as e:
        raise DataError(f"the parts in '{parts_dir}' do not form a tar stream ({e})") from None
    except OSError as e:
        if disk.is_disk_full(e):
            raise disk.disk_full_error(f"the unpacked data for '{data_dir}'", parent, sum(p["bytes"] for p in pack["parts"]),
                                       "free space and rerun the same command (nothing was kept)",
                                       elsewhere="give a --to on a larger disk") from None
        raise
    finally:
        reader.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return pack


def main(argv: list[str]) -> int:
    """Runs the tool on command-line words `argv` (see the module docstring); returns the exit status."""
    if not argv or argv[0] not in ("write", "read"):
        raise ConfigError("usage: python -m imgclf_jax.pack write --config ... --out PARTS_DIR [--part_mib 60] | "
                          "read PARTS_DIR --to DATA_DIR")
    if argv[0] == "write":
        args = cli.parse_args(argv[1:], {"out": str, "part_mib": float}, workdir=False)
        out, part_mib = args.extras["out"], args.extras["part_mib"]
        part_mib = 60.0 if part_mib is None else part_mib  # an explicit 0 is refused below, not defaulted
        if not out:
            raise ConfigError("write needs --out PARTS_DIR")
        pack = write_pack(args.config.data, out, int(part_mib * _CHUNK))
        total = sum(p["bytes"] for p in pack["parts"])
        rows = sum(len(r) for r in pack["scan"]["splits"].values())
        print(f"wrote {len(pack['parts'])} parts ({total / _CHUNK:,.1f} MiB, at most {part_mib:g} MiB each; "
              f"{rows:,} images) and {PACK_NAME} to {out}")
        return 0
    paths, values = cli.paths_and_flags(argv[1:], {"to": str})
    if len(paths) != 1 or not values["to"]:
        raise ConfigError("usage: python -m imgclf_jax.pack read PARTS_DIR --to DATA_DIR")
    pack = read_pack(paths[0], values["to"])
    print(f"unpacked {len(pack.get('parts', []))} parts into {values['to']}: train with "
          f"--config.data.builder={pack['builder']} --config.data.dir={values['to']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main, "imgclf_jax.pack")
