"""The data pack: parts of bounded size that unpack into a data folder whose rows and pixels are the original's."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from imgclf_jax import pack
from imgclf_jax.data import builders, packed, splits
from imgclf_jax.errors import ConfigError, DataError
from tests.conftest import data_config
from tests.test_builders import make_class_folders


def _rows(prepared):
    return {split: [(s.image_ids[i], int(s.labels[i]), s.source[i]["image"]) for i in range(len(s.image_ids))]
            for split, s in prepared.splits.items()}


def _assert_same(a, b):
    assert a.class_names == b.class_names and a.content_digest == b.content_digest and a.content_digest
    ra, rb = _rows(a), _rows(b)
    assert ra.keys() == rb.keys()
    for split in ra:
        assert len(ra[split]) == len(rb[split]) > 0
        for (ia, ya, xa), (ib, yb, xb) in zip(ra[split], rb[split]):
            assert (ia, ya) == (ib, yb) and xa.dtype == xb.dtype == np.uint8
            np.testing.assert_array_equal(xa, xb)


def test_folders_round_trip_bit_for_bit_in_small_parts(tmp_path, cache_dir):
    root = tmp_path / "pets"
    make_class_folders(root, {"dog": 6, "cat": 9})
    data = data_config("folders", root, cache_dir)
    original = builders.prepare("folders", str(root), cache_dir)
    written = pack.write_pack(data, str(tmp_path / "parts"), part_bytes=1 << 20)
    prepared_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(original.path) for f in fs)
    sizes = [p["bytes"] for p in written["parts"]]
    assert sum(sizes) > prepared_bytes and all(s <= 1 << 20 for s in sizes)  # the tar stream holds every byte
    assert sorted(os.listdir(tmp_path / "parts")) == sorted([packed.PACK_NAME] + [p["name"] for p in written["parts"]])

    pack.read_pack(str(tmp_path / "parts"), str(tmp_path / "unpacked"))
    reopened = builders.prepare("folders", str(tmp_path / "unpacked"), str(tmp_path / "other-cache"))
    assert not os.path.exists(tmp_path / "other-cache")  # nothing scanned or prepared
    _assert_same(original, reopened)
    # a run config on the packed folder sees the same splits (a held-out validation split drawn alike)
    run_a = splits.load_run_data(data)
    run_b = splits.load_run_data(data_config("folders", tmp_path / "unpacked", tmp_path / "other-cache"))
    assert run_a.content_digest == run_b.content_digest
    np.testing.assert_array_equal(run_a.validation.records, run_b.validation.records)
    np.testing.assert_array_equal(run_a.train.labels, run_b.train.labels)
    # the start banner names where the packed data is, not the unused cache folder
    from imgclf_jax import banner, config as config_lib

    c = config_lib.base_config()
    c.data = data_config("folders", tmp_path / "unpacked", tmp_path / "other-cache")
    first = banner.start_banner(c, "run", run_b, 10, ["cpu:0"], "fresh run").splitlines()[0]
    assert first.endswith(f"prepared in {tmp_path / 'unpacked' / run_b.fingerprint}"), first
    assert os.path.isdir(tmp_path / "unpacked" / run_b.fingerprint)


def test_many_parts_are_cut_at_the_size_and_each_is_checked(small_competition, tmp_path, cache_dir):
    data = data_config("competition", small_competition, cache_dir)
    written = pack.write_pack(data, str(tmp_path / "parts"), part_bytes=1 << 20)
    sizes = [p["bytes"] for p in written["parts"]]
    assert len(sizes) >= 2 and all(s == 1 << 20 for s in sizes[:-1]) and 0 < sizes[-1] <= 1 << 20
    parts = tmp_path / "parts"
    original = builders.prepare("competition", str(small_competition), cache_dir)

    last = parts / written["parts"][-1]["name"]
    good = last.read_bytes()
    last.write_bytes(good[:-1])  # cut short
    with pytest.raises(DataError, match=f"part '{last}' has .* bytes, .* expected"):
        pack.read_pack(str(parts), str(tmp_path / "out"))
    last.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size, one bit changed
    with pytest.raises(DataError, match="does not match its sha256"):
        pack.read_pack(str(parts), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")  # nothing written
    last.write_bytes(good)
    pack.read_pack(str(parts), str(tmp_path / "out"))
    _assert_same(original, builders.prepare("competition", str(tmp_path / "out"), cache_dir))
    with pytest.raises(ConfigError, match="data.builder' is 'folders' but .* pack of 'competition'"):
        builders.prepare("folders", str(tmp_path / "out"), cache_dir)
    with pytest.raises(ConfigError, match="data.num_classes' is 7 but the pack .* has 5 classes"):
        builders.prepare("competition", str(tmp_path / "out"), cache_dir, num_classes=7)


def test_command_line_write_and_read(tmp_path):
    root, parts, out = tmp_path / "pets", tmp_path / "parts", tmp_path / "data"
    make_class_folders(root, {"dog": 4, "cat": 5})
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def tool(*words):
        return subprocess.run([sys.executable, "-m", "imgclf_jax.pack", *words], capture_output=True, text=True, env=env)

    write = tool("write", "--config", "configs/folders.py", f"--config.data.dir={root}",
                 f"--config.data.cache_dir={tmp_path / 'cache'}", "--out", str(parts), "--part_mib", "1")
    assert write.returncode == 0, write.stderr
    assert "wrote 1 parts" in write.stdout and "9 images" in write.stdout
    read = tool("read", str(parts), "--to", str(out))
    assert read.returncode == 0, read.stderr
    assert json.loads((out / packed.PACKED_NAME).read_text())["builder"] == "folders"
    for words, message in ((("read", str(parts), "--to", str(out)), "is not empty"),
                           (("read", str(tmp_path), "--to", str(tmp_path / "x")), "not a data pack"),
                           (("write", "--config", "configs/digits.py", "--out", str(tmp_path / "d")), "nothing to pack"),
                           (("write", "--config", "configs/folders.py", f"--config.data.dir={root}", "--out",
                             str(tmp_path / "z"), "--part_mib", "0"), "--part_mib must be at least 1, got 0")):
        refused = tool(*words)
        assert refused.returncode in (1, 2) and refused.stderr.count("\n") == 1 and message in refused.stderr, words


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, cache_dir, monkeypatch):
    import errno
    import tarfile

    from imgclf_jax.errors import DiskFullError

    root, parts = tmp_path / "pets", tmp_path / "parts"
    make_class_folders(root, {"dog": 4, "cat": 5})
    data = data_config("folders", root, cache_dir)
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real_write = pack._PartWriter.write
    calls = []

    def write_then_fail(self, chunk):
        calls.append(len(chunk))
        if len(calls) > 2:  # a part file exists by then
            raise enospc
        return real_write(self, chunk)

    monkeypatch.setattr(pack._PartWriter, "write", write_then_fail)
    with pytest.raises(DiskFullError, match="pack's parts in.*rerun the same command"):
        pack.write_pack(data, str(parts), part_bytes=1 << 20)
    assert os.listdir(parts) == []  # empty again: the same command can rerun
    monkeypatch.undo()
    pack.write_pack(data, str(parts), part_bytes=1 << 20)

    def extract_fails(self, member, path, **kwargs):
        raise enospc

    monkeypatch.setattr(tarfile.TarFile, "extract", extract_fails)
    with pytest.raises(DiskFullError, match="unpacked data for.*nothing was kept"):
        pack.read_pack(str(parts), str(tmp_path / "data"))
    assert not os.path.exists(tmp_path / "data") and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
