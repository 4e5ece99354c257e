"""Faults around checkpoints, the disk and the prepared cache: one line naming the folder, nothing stale left."""

import errno
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from imgclf_jax import checkpoint as ckpt_lib
from imgclf_jax import config as config_lib
from imgclf_jax import disk, loop, manifest, report
from imgclf_jax import workdir as workdir_lib
from imgclf_jax.data import builders
from imgclf_jax.errors import CheckpointError, ConfigError, DataError, DiskFullError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_digits(cache, epochs=1, **train):
    c = config_lib.load_config_file(str(ROOT / "configs/digits.py"))
    c.data.cache_dir = str(cache)
    c.data.max_train_examples, c.data.max_val_examples = 256, 64  # 8 steps of 32 per epoch
    c.train.num_epochs = epochs
    for key, value in train.items():
        c.train[key] = value
    return c


def without_seconds(entries):
    """History entries without their wall-clock figures (seconds, train_images_per_s)."""
    return [{k: v for k, v in e.items() if k not in ("seconds", "train_images_per_s")} for e in entries]


def history(workdir):
    return json.loads((pathlib.Path(workdir) / "history.json").read_text())


def largest_file(folder: pathlib.Path) -> pathlib.Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def garble(path: pathlib.Path) -> None:
    """Overwrites 64 bytes in the middle of `path` (same size, other bytes)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A finished 2-epoch run (checkpoints/latest/8 and /16, checkpoints/result) and its cache."""
    tmp = tmp_path_factory.mktemp("two_epochs")
    loop.train_and_evaluate(tiny_digits(tmp / "cache", epochs=2), str(tmp / "run"))
    return tmp / "run", tmp / "cache"


# ----------------------------------------------------------------------------- point 5: corrupt checkpoints


def test_every_checkpoint_folder_gets_a_manifest_that_catches_a_changed_byte(two_epochs, tmp_path):
    run, _ = two_epochs
    latest = run / "checkpoints" / "latest"
    assert sorted(os.listdir(latest), key=int) == ["8", "16"]  # the two latest are kept
    for folder in (latest / "8", latest / "16", run / "checkpoints" / "result"):
        assert manifest.has_manifest(str(folder)) and manifest.verify(str(folder)) is None
    copy = shutil.copytree(run / "checkpoints" / "result", tmp_path / "result")
    target = largest_file(copy)
    garble(target)
    rel = target.relative_to(copy).as_posix()
    assert manifest.verify(str(copy)) == f"file '{rel}' differs from its checksum"
    truncate(target)
    assert manifest.verify(str(copy)).startswith(f"file '{rel}' has ")


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one_exactly(two_epochs, tmp_path, capfd):
    run, cache = two_epochs
    expected = history(run)
    work = shutil.copytree(run, tmp_path / "run")
    garble(largest_file(work / "checkpoints" / "latest" / "16" / "state"))
    capfd.readouterr()
    summary = loop.train_and_evaluate(tiny_digits(cache, epochs=2), str(work))
    err = capfd.readouterr().err
    assert f"checkpoint '{work}/checkpoints/latest/16' is corrupt (file 'state/" in err
    assert f"resuming from the previous checkpoint '{work}/checkpoints/latest/8'" in err
    # epoch 2 was trained again from the end of epoch 1: the same numbers as the first time
    assert without_seconds(history(work)) == without_seconds(expected)
    assert summary["epochs_run"] == 2
    assert manifest.verify(str(work / "checkpoints" / "latest" / "16")) is None  # written again, intact


@pytest.mark.parametrize("damage", ["garbage", "truncated", "metadata cut", "state deleted"])
def test_a_corrupt_only_checkpoint_stops_with_one_line_naming_it(two_epochs, tmp_path, damage, capfd):
    run, cache = two_epochs
    work = shutil.copytree(run, tmp_path / "run")
    shutil.rmtree(work / "checkpoints" / "latest" / "8")  # no earlier checkpoint to fall back to
    step = work / "checkpoints" / "latest" / "16"
    if damage == "garbage":
        garble(largest_file(step / "state"))
    elif damage == "truncated":
        truncate(largest_file(step / "state"))
    elif damage == "metadata cut":
        truncate(step / "_CHECKPOINT_METADATA")
    else:
        shutil.rmtree(step / "state")
    with pytest.raises(CheckpointError) as info:
        loop.train_and_evaluate(tiny_digits(cache, epochs=3), str(work))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint '{step}' is corrupt: file '")
    assert f"delete '{work}/checkpoints/latest' to train this run again from the start" in message
    assert message.endswith("or rerun with --overwrite")
    assert os.path.isdir(step)  # nothing deleted when nothing restores
    assert "ERROR:absl" not in capfd.readouterr().err  # orbax's own log lines about it are dropped


def old_style(work: pathlib.Path) -> None:
    """Makes the copied run look written before manifests existed: no marker, no manifest anywhere."""
    os.remove(work / "checkpoints" / ckpt_lib.MARKER_NAME)
    for folder in (work / "checkpoints").rglob(manifest.MANIFEST_NAME):
        os.remove(folder)


def test_checkpoints_without_a_manifest_restore_unverified_and_orbax_errors_are_one_line(two_epochs, tmp_path):
    run, cache = two_epochs
    expected = history(run)
    work = shutil.copytree(run, tmp_path / "run")
    old_style(work)  # a workdir of checkpoints written before manifests existed
    summary = loop.train_and_evaluate(tiny_digits(cache, epochs=2), str(work))  # a finished run: restores 16
    assert summary["epochs_run"] == 2 and without_seconds(history(work)) == without_seconds(expected)
    # rewriting the result marked the workdir; the old steps, just trusted unverified, got manifests
    assert "checksum manifest" in (work / "checkpoints" / ckpt_lib.MARKER_NAME).read_text()
    for folder in ("latest/8", "latest/16", "result"):
        assert manifest.verify(str(work / "checkpoints" / folder)) is None
    old_style(work)
    shutil.rmtree(work / "checkpoints" / "latest" / "8")
    shutil.rmtree(work / "checkpoints" / "latest" / "16" / "state")
    with pytest.raises(CheckpointError, match=r"latest/16' is corrupt: orbax cannot restore it \(") as info:
        loop.train_and_evaluate(tiny_digits(cache, epochs=3), str(work))
    assert "\n" not in str(info.value)


NO_MANIFEST = f"its checksum manifest {manifest.MANIFEST_NAME} is missing, so it cannot be verified"


def garble_4000(path: pathlib.Path) -> None:
    """Overwrites 4000 bytes in the middle of `path` (same size), as the tester did."""
    data = bytearray(path.read_bytes())
    middle = max(len(data) // 2 - 2000, 0)
    data[middle:middle + 4000] = bytes(255 - b for b in data[middle:middle + 4000])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("marker", ["marker kept", "marker deleted"])
def test_a_deleted_manifest_and_garbage_in_the_newest_checkpoint_falls_back_exactly(two_epochs, tmp_path, capfd,
                                                                                    marker):
    run, cache = two_epochs
    expected = history(run)
    work = shutil.copytree(run, tmp_path / "run")
    step = work / "checkpoints" / "latest" / "16"
    os.remove(step / manifest.MANIFEST_NAME)
    garble_4000(largest_file(step / "state"))
    if marker == "marker deleted":  # latest/8 still has its manifest: 16 without one is corrupt all the same
        os.remove(work / "checkpoints" / ckpt_lib.MARKER_NAME)
    capfd.readouterr()
    summary = loop.train_and_evaluate(tiny_digits(cache, epochs=2), str(work))
    err = capfd.readouterr().err
    assert (f"warning: checkpoint '{step}' is corrupt ({NO_MANIFEST}); deleted it and resuming from the previous "
            f"checkpoint '{work}/checkpoints/latest/8'") in err
    assert without_seconds(history(work)) == without_seconds(expected)  # not the garbage's numbers
    assert summary["epochs_run"] == 2
    assert manifest.verify(str(step)) is None  # written again, with its manifest
    assert os.path.isfile(work / "checkpoints" / ckpt_lib.MARKER_NAME)  # and the marker again


def test_a_deleted_manifest_in_the_only_checkpoint_stops_with_one_line(two_epochs, tmp_path):
    run, cache = two_epochs
    work = shutil.copytree(run, tmp_path / "run")
    shutil.rmtree(work / "checkpoints" / "latest" / "8")  # no earlier checkpoint, no sibling with a manifest
    step = work / "checkpoints" / "latest" / "16"
    os.remove(step / manifest.MANIFEST_NAME)  # also what a kill -9 right after orbax's save leaves
    garble_4000(largest_file(step / "state"))
    with pytest.raises(CheckpointError) as info:
        loop.train_and_evaluate(tiny_digits(cache, epochs=3), str(work))
    assert str(info.value) == (
        f"checkpoint '{step}' is corrupt: {NO_MANIFEST} (there is no earlier one); delete "
        f"'{work}/checkpoints/latest' to train this run again from the start, or rerun with --overwrite")
    assert os.path.isdir(step)


def test_overwrite_removes_the_marker_with_the_checkpoints(two_epochs, tmp_path):
    run, cache = two_epochs
    work = shutil.copytree(run, tmp_path / "run")
    assert os.path.isfile(work / "checkpoints" / ckpt_lib.MARKER_NAME)
    workdir_lib.check_workdir(str(work), tiny_digits(cache, epochs=2), overwrite=True)
    assert not (work / "checkpoints").exists()


def test_a_deleted_checkpoint_metadata_file_gives_no_orbax_log_line(two_epochs, tmp_path, caplog):
    run, cache = two_epochs
    work = shutil.copytree(run, tmp_path / "run")
    shutil.rmtree(work / "checkpoints" / "latest" / "8")
    step = work / "checkpoints" / "latest" / "16"
    os.remove(step / "_CHECKPOINT_METADATA")
    with caplog.at_level(logging.DEBUG), pytest.raises(CheckpointError) as info:
        loop.train_and_evaluate(tiny_digits(cache, epochs=3), str(work))
    assert str(info.value).startswith(f"checkpoint '{step}' is corrupt: file '_CHECKPOINT_METADATA' is missing")
    assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]


def test_the_orbax_noise_filter_drops_only_what_is_reported_in_one_line():
    def record(text):
        return logging.LogRecord("absl", logging.WARNING, __file__, 1, text, None, None)

    noise = ckpt_lib._OrbaxNoise()
    assert not noise.filter(record("Metadata file does not exist: /w/checkpoints/latest/14/_CHECKPOINT_METADATA"))
    assert not noise.filter(record("Failed to json parse Metadata file: /w/x"))
    assert noise.filter(record("Failed to read Metadata file: /w/x, error: boom"))
    assert noise.filter(record("Saving checkpoint at step 8"))


def predict_one_image(work, tmp_path) -> subprocess.CompletedProcess:
    """Runs the predict command of `work` on one black 8x8 image, writing tmp_path/out.csv."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    return subprocess.run([sys.executable, "-m", "imgclf_jax.predict", "--workdir", str(work), "--images",
                           str(images), "--out", str(tmp_path / "out.csv")], cwd=ROOT, capture_output=True,
                          text=True)


def test_predict_on_a_corrupt_result_is_one_line_naming_the_folder(two_epochs, tmp_path):
    run, _ = two_epochs
    work = shutil.copytree(run, tmp_path / "run")
    result = work / "checkpoints" / "result"
    garble(largest_file(result / "params"))
    done = predict_one_image(work, tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0, done.stderr[-2000:]
    assert f"result checkpoint '{result}' is corrupt: file 'params/" in done.stderr
    assert "restore that folder from a copy, or train the run again" in done.stderr
    shutil.rmtree(result / "params")
    old_style(work)  # unverified: orbax's own failure becomes one line
    checkpoints = ckpt_lib.RunCheckpoints(str(work))
    with pytest.raises(CheckpointError, match="is corrupt: orbax cannot restore it"):
        checkpoints.restore_result({"x": None})


def test_predict_on_a_result_without_its_manifest_is_one_line(two_epochs, tmp_path):
    run, _ = two_epochs
    work = shutil.copytree(run, tmp_path / "run")
    result = work / "checkpoints" / "result"
    os.remove(result / manifest.MANIFEST_NAME)
    garble_4000(largest_file(result / "params"))
    done = predict_one_image(work, tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0, done.stderr[-2000:]
    assert f"result checkpoint '{result}' is corrupt: {NO_MANIFEST}; restore that folder from a copy" in done.stderr
    assert not (tmp_path / "out.csv").exists()
    # with the marker deleted too, latest/ steps with manifests still say the result should have one
    os.remove(work / "checkpoints" / ckpt_lib.MARKER_NAME)
    with pytest.raises(CheckpointError, match=f"is corrupt: {NO_MANIFEST}"):
        ckpt_lib.RunCheckpoints(str(work)).result_metadata()


# ----------------------------------------------------------------------------- point 6: a full disk

def _enospc(path=""):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_disk_full_is_recognised_in_orbax_and_os_errors():
    assert disk.is_disk_full(_enospc())
    assert disk.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    # what orbax/tensorstore raised on a real 30 MB tmpfs
    assert disk.is_disk_full(ValueError('RESOURCE_EXHAUSTED: Error writing "a/0" ...: Failed to write 4345856 '
                                        "bytes to file 14: No space left on device [os_error_code='28']"))
    assert not disk.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk.is_disk_full(ValueError("shapes differ"))
    assert disk.format_bytes(1536) == "1.5 KB" and disk.format_bytes(3 * 1024 ** 3) == "3.0 GB"


def test_a_failed_json_write_leaves_no_tmp_file_and_says_so(tmp_path, monkeypatch):
    real_open = open

    class FullFile:
        def __init__(self, path, *args, **kwargs):
            self._f = real_open(path, *args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()
            return False

        def write(self, text):
            raise _enospc()

    monkeypatch.setattr(report, "open", FullFile, raising=False)
    monkeypatch.setattr(disk, "free_bytes", lambda path: 0)
    with pytest.raises(DiskFullError) as info:
        report.write_json(str(tmp_path / "config.json"), {"a": 1})
    assert str(info.value) == (
        f"no space left on the disk of '{tmp_path}' while writing '{tmp_path}/config.json': 0 B is free; "
        "free some space (or write to a folder on a larger disk), then rerun the same command")
    with pytest.raises(DiskFullError):
        report.write_submission(str(tmp_path / "submission.csv"), ["a"], [1], ["cat", "dog"])
    assert os.listdir(tmp_path) == []  # neither the file nor its .tmp


def test_a_checkpoint_save_on_a_full_disk_removes_its_tmp_folder(two_epochs, tmp_path, monkeypatch):
    run, cache = two_epochs
    work = shutil.copytree(run, tmp_path / "run")
    latest = work / "checkpoints" / "latest"
    shutil.rmtree(work / "checkpoints" / "result")
    real_save = ckpt_lib.ocp.CheckpointManager.save

    def save_until_full(self, step, *args, **kwargs):
        """Writes part of the step into orbax's temporary folder, then fails as tensorstore does."""
        partial = latest / f"{step}.orbax-checkpoint-tmp" / "state" / "d"
        partial.mkdir(parents=True)
        (partial / "chunk").write_bytes(b"\0" * 100_000)
        raise ValueError(f"RESOURCE_EXHAUSTED: Error writing in OCDBT database at local file \"{partial}\": "
                         "No space left on device [os_error_code='28']")

    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "save", save_until_full)
    monkeypatch.setattr(disk, "free_bytes", lambda path: 123 * 1024)
    need = disk.folder_bytes(str(latest / "16"))
    with pytest.raises(DiskFullError) as info:
        loop.train_and_evaluate(tiny_digits(cache, epochs=3), str(work))
    assert str(info.value) == (
        f"no space left on the disk of '{latest}' while writing checkpoint '{latest}/24': it needs about "
        f"{disk.format_bytes(need)}, 123.0 KB is free; free some space (or use a --workdir on a larger "
        "disk), then rerun the same command to resume from the last checkpoint")
    assert sorted(os.listdir(latest), key=int) == ["8", "16"]  # no temporary folder; the others intact
    assert manifest.verify(str(latest / "16")) is None
    assert not list(work.glob("*.tmp"))
    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "save", real_save)
    assert loop.train_and_evaluate(tiny_digits(cache, epochs=3), str(work))["epochs_run"] == 3  # resumes


def test_preparing_the_cache_on_a_full_disk_removes_the_tmp_folder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def prepare_until_full(self, *args, **kwargs):
        folder = pathlib.Path(self.data_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "part.array_record").write_bytes(b"\0" * 10_000)
        raise _enospc(str(folder / "part.array_record"))

    monkeypatch.setattr(builders.Digits, "download_and_prepare", prepare_until_full)
    monkeypatch.setattr(disk, "free_bytes", lambda path: 5 * 1024 * 1024)
    with pytest.raises(DiskFullError) as info:
        builders.prepare("digits", "", str(cache))
    message = str(info.value)
    assert message.startswith(f"no space left on the disk of '{cache}' while writing the prepared copy of "
                              f"1797 images ('{cache}/digits-")
    # 1797 digits of 32x32x3 bytes, before zlib; the free space as measured before preparing
    assert f": it needs up to {disk.format_bytes(1797 * 32 * 32 * 3)}, 5.0 MB was free when it started; " in message
    assert "(or set data.cache_dir to a folder on a larger disk), then rerun the same command" in message
    assert "\n" not in message
    assert os.listdir(cache) == []  # the temporary folder is gone


# ----------------------------------------------------------------------------- point 9: a corrupt cache


@pytest.mark.parametrize("damage", ["garbage", "truncated", "truncated, prepared before manifests"])
def test_a_corrupt_prepared_cache_stops_before_training_naming_the_folder(two_epochs, tmp_path, damage):
    _, cache = two_epochs
    copy = shutil.copytree(cache, tmp_path / "cache")
    (prepared,) = [p for p in copy.iterdir() if p.is_dir()]
    record = next(prepared.rglob("*.array_record*"))
    garble(record) if damage == "garbage" else truncate(record)
    if damage.endswith("manifests"):
        os.remove(prepared / manifest.MANIFEST_NAME)  # checked by reading its first and last records
    c = tiny_digits(copy)
    with pytest.raises(DataError) as info:
        loop.train_and_evaluate(c, str(tmp_path / "run"))
    message = str(info.value)
    problem = "RuntimeError: Invalid Riegeli/records file" if damage.endswith("manifests") else "file '"
    assert message.startswith(f"prepared dataset '{prepared}' is corrupt: {problem}")
    assert "\n" not in message
    assert message.endswith("delete that folder to prepare it again (the data folder is untouched)")
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training


def test_a_record_count_mismatch_is_a_data_error(two_epochs):
    _, cache = two_epochs
    (prepared,) = [p for p in cache.iterdir() if p.is_dir()]
    scan = builders.scan_digits()
    scan.splits["train"] = scan.splits["train"][:-1]
    with pytest.raises(DataError, match=r"is corrupt: it has 1797 train records, 1796 expected; delete that"):
        builders.open_prepared(builders.Digits, str(prepared), scan)


# ----------------------------------------------------------------------------- point 14: keep_checkpoints


def test_keep_checkpoints_is_validated_and_may_change_on_resume(two_epochs):
    run, cache = two_epochs
    c = tiny_digits(cache, keep_checkpoints="latest")
    with pytest.raises(ConfigError, match=r"'train.keep_checkpoints' must be one of \('resume', 'result'\)"):
        config_lib.validate(c)
    workdir_lib.check_workdir(str(run), tiny_digits(cache, epochs=2, keep_checkpoints="result"), overwrite=False)


def test_keep_checkpoints_result_keeps_only_the_result_once_finished(two_epochs, tmp_path, capsys):
    run, cache = two_epochs
    work = shutil.copytree(run, tmp_path / "run")
    # switching a finished run to 'result' rewrites its reports and drops checkpoints/latest
    summary = loop.train_and_evaluate(tiny_digits(cache, epochs=2, keep_checkpoints="result"), str(work))
    assert sorted(os.listdir(work / "checkpoints")) == [ckpt_lib.MARKER_NAME, "result"]  # the marker stays
    assert manifest.verify(str(work / "checkpoints" / "result")) is None  # the result, written again, intact
    capsys.readouterr()
    again = loop.train_and_evaluate(tiny_digits(cache, epochs=2, keep_checkpoints="result"), str(work))
    assert again == summary and "resume checkpoints were removed" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match=r"finished after 2 epochs .* cannot train to 3 epochs; rerun with "
                                              r"--overwrite"):
        loop.train_and_evaluate(tiny_digits(cache, epochs=3, keep_checkpoints="result"), str(work))
    assert sorted(os.listdir(work / "checkpoints")) == [ckpt_lib.MARKER_NAME, "result"]  # neither call recreated checkpoints/latest


def test_an_ensemble_with_keep_checkpoints_result_keeps_only_the_result(two_epochs, tmp_path, capsys):
    _, cache = two_epochs
    c = tiny_digits(cache, epochs=1, keep_checkpoints="result")
    c.ensemble.num_members = 2
    summary = loop.train_and_evaluate(c, str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [ckpt_lib.MARKER_NAME, "result"]
    assert manifest.verify(str(tmp_path / "run" / "checkpoints" / "result")) is None
    capsys.readouterr()
    assert loop.train_and_evaluate(c, str(tmp_path / "run")) == summary
    assert "holds a finished run (1 epochs) whose resume checkpoints were removed" in capsys.readouterr().out
