"""Several processes as one run, on one CPU machine: 2 processes x 1 CPU device each (gloo on localhost,
``python -m imgclf_jax.launch``) against 1 process with 2 devices and with 1 device; resumption across
process counts; a killed process; differing configs.

Every run is a subprocess with ``JAX_NUM_CPU_DEVICES`` and no ``--xla_force_host_platform_device_count``
(the JAX docs: CPU collectives and the forced device count do not mix).
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import copy_with_test_split

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORCED = re.compile(r"--xla_force_host_platform_device_count=\d+")


def environment(devices: int) -> dict:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = FORCED.sub("", env.get("XLA_FLAGS", "")).strip()
    return env


def single(args, devices):
    """`python -m imgclf_jax.train args` as one process with `devices` CPU devices."""
    return [sys.executable, "-m", "imgclf_jax.train", *args], environment(devices)


def launched(args, processes=2):
    """`args` as `processes` processes of 1 CPU device each, through the local launcher."""
    return ([sys.executable, "-m", "imgclf_jax.launch", "--num_processes", str(processes), "--grace_s", "60", "--",
             *args], environment(1))


def in_this_process(args):
    """`python -m imgclf_jax.train args` run here: 1 process with the 2 CPU devices tests/conftest.py forces
    (no start-up: what 1 process x 2 devices computes, as ``JAX_NUM_CPU_DEVICES=2`` would)."""
    import jax

    from imgclf_jax import cli, loop

    assert jax.device_count() == 2 and jax.process_count() == 1
    parsed = cli.parse_args(list(map(str, args)))
    return loop.train_and_evaluate(parsed.config, parsed.workdir)


def run(command, check=True):
    cmd, env = command
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def history(workdir):
    path = pathlib.Path(workdir) / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def without_seconds(entries):
    return [{k: v for k, v in e.items() if k not in ("seconds", "train_images_per_s")} for e in entries]


def assert_close_to(entries, reference, num_train, num_val):
    """Per epoch: losses within float tolerance (XLA sums the batch in another order on 1 device),
    accuracies within one example."""
    assert len(entries) == len(reference)
    for got, want in zip(entries, reference):
        for key in ("train_loss", "val_loss"):
            assert got[key] == pytest.approx(want[key], rel=5e-3), (key, got["epoch"])
        assert abs(got["train_accuracy"] - want["train_accuracy"]) <= 1 / num_train + 1e-9, got["epoch"]
        assert abs(got["val_accuracy"] - want["val_accuracy"]) <= 1 / num_val + 1e-9, got["epoch"]


def digits_args(workdir, cache, epochs=4):
    return ["--config", "configs/digits.py", f"--config.train.num_epochs={epochs}",
            "--config.data.max_train_examples=320", f"--config.data.cache_dir={cache}",
            "--config.distributed.heartbeat_timeout_s=5", "--workdir", str(workdir)]


def test_a_multi_process_run_is_asked_for_by_keys_or_a_cluster_and_bad_keys_are_named(monkeypatch):
    from imgclf_jax import config as config_lib, distributed
    from imgclf_jax.errors import ConfigError

    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_STEP_ID", "OMPI_COMM_WORLD_SIZE",
                 "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    dist = config_lib.base_config().distributed
    assert not distributed.wanted(dist)  # a single process needs none of it
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert not distributed.wanted(dist)  # sbatch's own shell, outside a job step (srun)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert distributed.wanted(dist)
    dist.num_processes = 1
    assert not distributed.wanted(dist)  # forced single
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    dist.num_processes = 0
    assert distributed.wanted(dist)
    for changes, key in (({"num_processes": 2}, "coordinator_address"), ({"num_processes": -1}, "num_processes"),
                         ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, "process_id"),
                         ({"coordinator_address": "localhost"}, "coordinator_address"),
                         ({"heartbeat_timeout_s": 0}, "heartbeat_timeout_s")):
        bad = config_lib.base_config().distributed
        for k, v in changes.items():
            bad[k] = v
        with pytest.raises(ConfigError, match=key):
            distributed.check_section(bad)


def test_the_launcher_refuses_bad_flags_in_one_line(tmp_path):
    for argv, words in ((["--num_processes", "2"], "usage"), (["--", "--config", "configs/digits.py"], "--num_processes"),
                        (["--num_processes", "2", "--", "--config.distributed.process_id=1"], "leave them out")):
        done = subprocess.run([sys.executable, "-m", "imgclf_jax.launch", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and words in done.stderr, done.stderr


def test_an_unreachable_coordinator_is_one_line(tmp_path):
    from imgclf_jax.launch import free_port

    cmd, env = single(["--config", "configs/digits.py", "--workdir", str(tmp_path / "run"),
                       f"--config.distributed.coordinator_address=127.0.0.1:{free_port()}",
                       "--config.distributed.num_processes=2", "--config.distributed.process_id=1",
                       "--config.distributed.initialization_timeout_s=2"], devices=1)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "could not join the distributed run at coordinator 127.0.0.1:" in lines[0]
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


def test_a_refusal_at_start_up_is_one_line_from_process_0_and_every_process_exits_2(tmp_path):
    """The batch of 32 does not divide over 3 processes' devices: every process refuses alike; process 0
    says it once and leaves last (it hosts the coordination service: leaving first would abort the others)."""
    done = run(launched(["--config", "configs/digits.py", "--workdir", str(tmp_path / "run")], processes=3),
               check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Terminating process" not in done.stderr and "Check failure" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "error:" in line or line.startswith("launch:")]
    assert lines == ["imgclf_jax.train: error: train.batch_size 32 must be a multiple of the run's 3 devices "
                     "(3 processes x 1) in a multi-process run"], done.stderr[-3000:]


@pytest.fixture(scope="module")
def digits_two_processes(tmp_path_factory):
    """The uninterrupted 2-process digits run: (workdir, cache, its stdout)."""
    tmp = tmp_path_factory.mktemp("digits_2p")
    done = run(launched(digits_args(tmp / "run", tmp / "cache")))
    return tmp / "run", tmp / "cache", done.stdout


def test_two_processes_train_as_one_process_with_two_devices_and_as_one_device(digits_two_processes, tmp_path):
    reference, cache, stdout = digits_two_processes
    expected = history(reference)
    assert [e["epoch"] for e in expected] == [1, 2, 3, 4] and expected[-1]["val_accuracy"] > 0.8
    assert "2 device(s) of 2 processes" in stdout and stdout.count("best val_accuracy") == 1  # process 0 speaks
    in_this_process(digits_args(tmp_path / "two_devices", cache))
    assert without_seconds(history(tmp_path / "two_devices")) == without_seconds(expected)  # same global batches
    # 1 device sums each batch in another order; over 20 updates with dropout the drift stays within one example
    # (by epoch 3 it reached 3 of 360 validation images once), so this run stops after epoch 2
    run(single(digits_args(tmp_path / "one_device", cache, epochs=2), devices=1))
    assert_close_to(history(tmp_path / "one_device"), expected[:2], num_train=320, num_val=360)
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["result_val_accuracy"] == expected[-1]["val_accuracy"]


def process_pid(workdir, process_id):
    """The pid of the training process `process_id` running on `workdir` (from /proc)."""
    for entry in pathlib.Path("/proc").iterdir():
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if (str(workdir).encode() in words and b"imgclf_jax.train" in words
                and f"--config.distributed.process_id={process_id}".encode() in words):
            return int(entry.name)
    return None


def start_and_wait(command, until, timeout=300):
    cmd, env = command
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not until() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return process


def test_a_killed_process_stops_the_other_in_one_line_and_the_same_launch_resumes(
        digits_two_processes, tmp_path):
    reference, cache, _ = digits_two_processes
    workdir = tmp_path / "run"
    launch = start_and_wait(launched(digits_args(workdir, cache)), lambda: len(history(workdir)) >= 1)
    pid = process_pid(workdir, 1)
    assert pid is not None and launch.poll() is None, "the run ended before the kill"
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    out, err = launch.communicate(timeout=120)
    assert time.monotonic() - killed_at < 5 + 30  # within the heartbeat timeout (5 s) and then some
    assert launch.returncode == 128 + signal.SIGKILL  # the worst status: process 1's death
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "process 0: process 1 of 2 is gone" in lines[0] and "resume" in lines[0], err[-2000:]
    assert "launch: process 1 exited (killed by SIGKILL)" in err
    done = run(launched(digits_args(workdir, cache)))  # the same launch again
    assert "resuming" in done.stdout
    assert without_seconds(history(workdir)) == without_seconds(history(reference))


def test_ctrl_c_stops_both_processes_and_the_ensemble_resumes_with_one_process_then_again_with_two(
        ensemble_two_processes, tmp_path):
    """2 processes -> Ctrl-C -> 1 process (2 devices) -> SIGTERM -> 2 processes: the uninterrupted history."""
    reference, cache = ensemble_two_processes
    workdir = tmp_path / "run"
    launch = start_and_wait(launched(digits_args(workdir, cache) + MEMBERS), lambda: len(history(workdir)) >= 1)
    time.sleep(0.2)
    launch.send_signal(signal.SIGINT)  # as Ctrl-C in the launcher's terminal
    out, err = launch.communicate(timeout=120)
    assert launch.returncode == 130 and "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "checkpoint saved" in lines[0]  # process 0 speaks for both
    process = start_and_wait(single(digits_args(workdir, cache) + MEMBERS, devices=2),
                             lambda: len(history(workdir)) >= 3)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "resuming" in out and "checkpoint saved" in err, err[-2000:]
    done = run(launched(digits_args(workdir, cache) + MEMBERS))
    assert "resuming" in done.stdout
    assert without_seconds(history(workdir)) == without_seconds(history(reference))


def test_processes_given_different_configs_are_refused_before_training(tmp_path):
    from imgclf_jax.launch import free_port

    address = f"127.0.0.1:{free_port()}"
    base = ["--config", "configs/digits.py", "--workdir", str(tmp_path / "run"),
            f"--config.distributed.coordinator_address={address}", "--config.distributed.num_processes=2"]
    cmd0, env = single(base + ["--config.distributed.process_id=0", "--config.train.num_epochs=2"], devices=1)
    cmd1, _ = single(base + ["--config.distributed.process_id=1", "--config.train.num_epochs=3"], devices=1)
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in (cmd0, cmd1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert "'train.num_epochs' differs on process(es) [1] from process 0's (here 2)" in outputs[0][1]
    assert outputs[1][1].strip().startswith("imgclf_jax.train: error: process 1: ")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_real_images_with_a_padded_validation_batch_and_a_test_split(small_competition, tmp_path):
    """40 real training images in batches of 16 (the last one 8) and 15 validation images (one batch, a
    padded row); a 4-image test split: the submission is written once, by process 0, in test order."""
    root = tmp_path / "data"
    copy_with_test_split(small_competition, root, ["t0", "t1", "t2", "t3"])
    (root / "test.csv").write_text("image_id\nt0\nt1\nt2\nt3\n")

    def args(workdir):
        return ["--config", "configs/ml1.py", f"--config.data.dir={root}", f"--config.data.cache_dir={tmp_path}/cache",
                "--config.data.image_size=32", "--config.train.batch_size=16", "--config.train.num_epochs=2",
                "--workdir", str(workdir)]

    run(launched(args(tmp_path / "two_processes")))
    in_this_process(args(tmp_path / "two_devices"))
    run(single(args(tmp_path / "one_device"), devices=1))
    expected = history(tmp_path / "two_processes")
    assert without_seconds(history(tmp_path / "two_devices")) == without_seconds(expected)
    assert_close_to(history(tmp_path / "one_device"), expected, num_train=40, num_val=15)
    matrix = json.loads((tmp_path / "two_processes" / "confusion_matrix.json").read_text())
    assert sum(map(sum, matrix["counts"])) == 15  # every validation row once, the padded one not at all
    submission = (tmp_path / "two_processes" / "submission.csv").read_text().splitlines()
    assert submission[0] == "image_id,label" and [r.split(",")[0] for r in submission[1:]] == ["t0", "t1", "t2", "t3"]
    assert submission == (tmp_path / "two_devices" / "submission.csv").read_text().splitlines()


MEMBERS = ["--config.ensemble.num_members=2"]


@pytest.fixture(scope="module")
def ensemble_two_processes(digits_two_processes, tmp_path_factory):
    """The uninterrupted 2-process run of a 2-member ensemble on digits: (workdir, cache)."""
    _, cache, _ = digits_two_processes
    workdir = tmp_path_factory.mktemp("ensemble_2p") / "run"
    run(launched(digits_args(workdir, cache) + MEMBERS))
    return workdir, cache


def test_an_ensemble_across_processes_equals_it_on_one_process(ensemble_two_processes, tmp_path):
    reference, cache = ensemble_two_processes
    in_this_process(digits_args(tmp_path / "one_process", cache) + MEMBERS)
    expected = history(reference)
    assert len(expected) == 4 and len(expected[0]["val_accuracy"]) == 2 and "majority_val_accuracy" in expected[0]
    assert without_seconds(history(tmp_path / "one_process")) == without_seconds(expected)
