"""The benchmarks: row shapes, the matmul probe, the profile's shapes; Keras twins when Keras is installed."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import machine, profile_step, train_step
from imgclf_jax.config import load_config_file
from imgclf_jax.models import create_model
from imgclf_jax.summary import count_flops, param_counts

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = ["ml1", "ml2", "ml4", "ml5", "ml6"]


def test_matmul_probe_measures_a_positive_rate():
    probe = machine.matmul_gflops(size=128, repeats=2)
    assert probe["matmul_gflops_per_s"] > 0 and probe["matmul_size"] == 128


def test_train_step_row_of_imgclf_jax_in_process():
    settings = {"steps": 2, "repeats": 1, "warmup": 1, "batch": 8, "image_size": 32, "repeat_seconds": 1.0}
    row = train_step.derive(train_step.measure_row("ml1", "imgclf_jax", settings), machine_gflops=100.0)
    config = load_config_file(str(ROOT / "configs" / "ml1.py"))
    assert row["params"] == sum(param_counts(create_model(config.model, 5), 32).values())
    assert row["images_per_s"] > 0 and row["host_peak_rss_bytes"] > 0
    assert row["train_flops_per_image"] == 3 * count_flops(config.model, 32, 5)
    assert row["gflops_per_s"] == pytest.approx(row["images_per_s"] * row["train_flops_per_image"] / 1e9)
    assert row["fraction_of_machine"] == pytest.approx(row["gflops_per_s"] / 100.0)
    assert (row["steps"], row["repeats"], row["batch"]) == (2, 1, 8)


def test_cli_prints_one_json_line_per_row_and_skips_missing_keras():
    missing = [f for f, module in (("keras-tensorflow", "tensorflow"), ("keras-jax", "keras"))
               if importlib.util.find_spec(module) is None]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_step", "--models=ml1",
         "--frameworks=" + ",".join(["imgclf_jax", *missing]), "--steps=2", "--repeats=1", "--warmup=0",
         "--batch=4", "--image_size=32", "--no_probe"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["framework"] for r in rows] == ["imgclf_jax", *missing]
    assert rows[0]["images_per_s"] > 0 and rows[0]["model"] == "ml1" and rows[0]["gflops_per_s"] > 0
    for row in rows[1:]:
        assert row["images_per_s"] is None and "pip install '.[bench]'" in row["skipped"]


def test_unknown_model_or_framework_is_one_line():
    for flag in ("--models=ml9", "--frameworks=pytorch"):
        done = subprocess.run([sys.executable, "-m", "benchmarks.train_step", flag, "--no_probe"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_profile_shapes_follow_the_model():
    config = load_config_file(str(ROOT / "configs" / "ml1.py"))
    convs = profile_step.conv_shapes(config.model, 128, 5)
    assert [(c.name, c.input_hwc, c.output_hw, c.needs_input_gradient) for c in convs] == [
        ("conv_0", (128, 128, 3), (126, 126), False),
        ("conv_1", (63, 63, 32), (61, 61), True),
        ("conv_2", (30, 30, 64), (28, 28), True)]
    pools = profile_step.pool_shapes(config.model, 128, 5)
    assert [(p.name, p.input_hwc) for p in pools] == [
        ("pool_0", (126, 126, 32)), ("pool_1", (61, 61, 64)), ("pool_2", (28, 28, 128))]
    assert profile_step.dense_shapes(config.model, 128, 5) == [("dense_0", 14 * 14 * 128, 256),
                                                               ("logits", 256, 5)]
    six = load_config_file(str(ROOT / "configs" / "ml6.py"))
    side = profile_step.conv_shapes(six.model, 128, 5)[-1]
    assert (side.name, side.input_hwc, side.kernel, side.needs_input_gradient) == (
        "side_conv", (128, 128, 3), 5, False)


def test_trace_finds_the_max_pool_gradient_of_a_small_step():
    config = load_config_file(str(ROOT / "configs" / "ml1.py"))
    rows = profile_step.profile_trace(config, batch=4, image_size=32)
    shares = rows[-1]["share"]
    assert rows[-1]["part"] == "trace_share" and sum(shares.values()) == pytest.approx(1.0)
    assert "max_pool_gradient" in shares and "conv_dot_forward" in shares


def test_input_pipeline_on_synthetic_images():
    from benchmarks import input_pipeline

    config = load_config_file(str(ROOT / "configs" / "ml6.py"))
    config.data.image_size = 32
    row = input_pipeline.pipeline_rate(input_pipeline.synthetic_split(200), config, workers=0, batches=2,
                                       warmup=1)
    assert row["images_per_s"] > 0 and row["batches"] == 2


def test_device_augment_times_three_ways_and_reports_their_ratio_to_the_host(capsys):
    from benchmarks import device_augment

    code = device_augment.main(["--source=synthetic", "--image_size=32", "--train_examples=200",
                                "--batches=2", "--warmup_batches=1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and [r.get("way") for r in rows[:3]] == ["host", "device", "on_device"]
    assert [(r["augment_on"], r["on_device"]) for r in rows[:3]] == [("host", False), ("device", False),
                                                                       ("device", True)]
    summary = rows[3]
    assert summary["part"] == "summary" and summary["over_host"]["host"] == 1.0
    rates = summary["images_per_s"]
    assert summary["over_host"]["device"] == pytest.approx(rates["device"] / rates["host"])
    assert summary["fastest"] == max(rates, key=rates.get)


@pytest.mark.parametrize("name", REFERENCE)
def test_keras_twin_has_our_parameter_count(name):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    pytest.importorskip("keras")
    from benchmarks import keras_models

    config = load_config_file(str(ROOT / "configs" / f"{name}.py"))
    ours = sum(param_counts(create_model(config.model, 5), 128).values())
    assert keras_models.build(config.model, 5, 128).count_params() == ours


def test_tables_render_rows_and_skips():
    from benchmarks import tables

    rows = [{"model": "ml1", "framework": "imgclf_jax", "images_per_s": 37.06, "gflops_per_s": 32.6,
             "fraction_of_machine": 0.145, "params": 6517317, "host_peak_rss_bytes": 2**30,
             "device_peak_bytes": None},
            {"model": "ml1", "framework": "keras-jax", "images_per_s": None, "skipped": "no keras"}]
    text = tables.train_step_table(rows).splitlines()
    assert text[2] == "| ml1 | imgclf_jax | 37.1 | 32.6 | 14.5% | 6,517,317 | 1.00 | - |"
    assert text[3].startswith("| ml1 | keras-jax | skipped |")


@pytest.mark.parametrize("padding,k", [("SAME", 5), ("VALID", 3), ("SAME", 3)])
def test_conv_kernel_gradient_methods_equal_jax_grad_of_lax_conv(padding, k):
    import jax

    import numpy as np

    from benchmarks.conv_kernel_gradient import METHODS, kernel_gradient

    x = jax.random.normal(jax.random.key(0), (2, 11, 10, 3))
    kernel = jax.random.normal(jax.random.key(1), (k, k, 3, 4))
    conv = lambda kern: jax.lax.conv_general_dilated(x, kern, (1, 1), padding,  # noqa: E731
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y, vjp = jax.vjp(conv, kernel)
    g = jax.random.normal(jax.random.key(2), y.shape)
    expected = np.asarray(vjp(g)[0])
    for method in METHODS:
        np.testing.assert_allclose(np.asarray(kernel_gradient(method, x, g, k, padding)), expected,
                                   rtol=1e-4, atol=1e-4)


def test_processes_layouts_and_ratio():
    from benchmarks import processes
    from imgclf_jax.errors import ConfigError

    assert processes.parse_layout("2x1") == (2, 1) and processes.parse_layout(" 1x2") == (1, 2)
    for bad in ("2", "0x1", "2x0", "axb"):
        with pytest.raises(ConfigError, match="PxD"):
            processes.parse_layout(bad)
    cmd, env = processes.layout_command(2, 1, ["--config", "configs/digits.py"], "/tmp/w")
    assert cmd[1:5] == ["-m", "imgclf_jax.launch", "--num_processes", "2"] and env["JAX_NUM_CPU_DEVICES"] == "1"
    assert "xla_force_host_platform_device_count" not in env["XLA_FLAGS"]
    rows = [{"processes": 1, "devices_per_process": 1, "train_images_per_s": 100.0},
            {"processes": 2, "devices_per_process": 1, "train_images_per_s": 80.0}]
    assert processes.summary_row(rows)["ratio_to_baseline"] == {"1x1": 1.0, "2x1": 0.8}
