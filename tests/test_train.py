"""The train step, early stopping, data parallelism and the train CLI end to end."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imgclf_jax import config as config_lib, loop, parallel, plain, steps
from imgclf_jax.early_stopping import EarlyStopping
from imgclf_jax.models import create_model
from imgclf_jax.optim import create_optimizer

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- early stopping


def run_script(monitor, patience, values):
    """Feeds a scripted metric sequence; returns (epochs run, best epoch, improvements)."""
    stopper = EarlyStopping(monitor, patience)
    improved = []
    for epoch, value in enumerate(values):
        if stopper.update(epoch, {"val_loss": value, "val_accuracy": value}):
            improved.append(epoch)
        if stopper.stopped:
            return epoch + 1, stopper.best_epoch, improved
    return len(values), stopper.best_epoch, improved


def test_early_stopping_on_loss_stops_after_patience_epochs_without_improvement():
    # best at epoch 2 (0.5); epochs 3, 4, 5 do not improve (0.5 is a tie: no improvement) -> stop after 5.
    assert run_script("val_loss", 3, [0.9, 0.7, 0.5, 0.6, 0.5, 0.55, 0.1]) == (6, 2, [0, 1, 2])


def test_early_stopping_on_accuracy_and_patience_reset():
    values = [0.5, 0.6, 0.55, 0.65, 0.6, 0.6, 0.64]  # improvement at 3 resets the wait
    assert run_script("val_accuracy", 2, values) == (6, 3, [0, 1, 3])


def test_early_stopping_patience_zero_never_stops_after_first_epoch_only():
    assert run_script("val_loss", 0, [0.5, 0.6, 0.4]) == (2, 0, [0])


def test_without_monitor_never_stops_but_tracks_best_accuracy():
    stopper = EarlyStopping("", 0)
    for epoch, acc in enumerate([0.3, 0.9, 0.4, 0.5]):
        stopper.update(epoch, {"val_loss": 1.0, "val_accuracy": acc})
    assert not stopper.stopped and stopper.best_epoch == 1 and not stopper.restores_best


# ----------------------------------------------------------------- train step


def tiny_setup(l2=1e-3):
    c = config_lib.base_config()
    c.model.conv_filters, c.model.conv_kernel_sizes = (4, 6), (3, 3)
    c.model.conv_paddings, c.model.conv_pools, c.model.conv_dropouts = ("same", "valid"), (True, True), (0.2, 0.0)
    c.model.side_filters, c.model.side_pool_size = 2, 4
    c.model.dense_units, c.model.dense_dropouts = (8,), (0.3,)
    c.model.l2 = l2
    model = create_model(c.model, 3)
    tx, _ = create_optimizer(c.optimizer, steps_per_epoch=1, num_epochs=c.train.num_epochs)
    return model, tx


def tiny_batch(seed=0, batch=8, real=6):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.random((batch, 12, 12, 3), dtype=np.float32),
        "label": rng.integers(0, 3, batch).astype(np.int32),
        "mask": np.arange(batch) < real,
        "row": np.arange(batch, dtype=np.int32),
    }


def run_steps(devices, num_steps=3):
    model, tx = tiny_setup()
    mesh = parallel.make_mesh(8, devices)
    state = jax.device_put(steps.create_train_state(model, tx, jax.random.key(0), 12),
                           parallel.replicated(mesh))
    step = steps.jit_train_step(model, tx, 1e-3, mesh)
    history = []
    for i in range(num_steps):
        state, metrics = step(state, parallel.shard_batch(tiny_batch(i), mesh), jax.random.key(7))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def test_two_devices_match_one_device():
    devices = jax.local_devices()
    assert len(devices) == 2, "conftest forces 2 host devices"
    state1, hist1 = run_steps(devices[:1])
    state2, hist2 = run_steps(devices)
    assert int(state1.step) == int(state2.step) == 3
    for m1, m2 in zip(hist1, hist2):
        for key in ("loss_sum", "correct", "count"):
            np.testing.assert_allclose(m1[key], m2[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_train_step_loss_counts_real_rows_and_includes_l2():
    model, tx = tiny_setup(l2=1e-2)
    state = steps.create_train_state(model, tx, jax.random.key(0), 12)
    batch = tiny_batch(batch=8, real=5)
    _, metrics = steps.train_step(state, batch, jax.random.key(1), model=model, tx=tx, l2=1e-2)
    assert float(metrics["count"]) == 5.0
    # Padded rows do not change the loss: the same 5 rows alone give the same sums.
    small = {k: v[:5] for k, v in batch.items()}
    metrics_small, _ = steps.eval_step(state.params, small, model=model, l2=1e-2)
    metrics_full, _ = steps.eval_step(state.params, batch, model=model, l2=1e-2)
    np.testing.assert_allclose(metrics_full["loss_sum"], metrics_small["loss_sum"], rtol=1e-6)
    # loss = mean CE over real rows + l2 * sum of squared kernels (logits layer excluded).
    logits = model.apply({"params": state.params}, jnp.asarray(small["image"]), train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, small["label"]).mean()
    kernels = [v["kernel"] for k, v in state.params.items() if k != "logits"]
    penalty = 1e-2 * sum(float(jnp.sum(w ** 2)) for w in kernels)
    np.testing.assert_allclose(float(metrics_small["loss_sum"]) / 5, float(ce) + penalty, rtol=1e-5)


def test_dropout_key_is_folded_with_the_step():
    model, tx = tiny_setup()
    state = steps.create_train_state(model, tx, jax.random.key(0), 12)
    batch = tiny_batch()
    a, _ = steps.train_step(state, batch, jax.random.key(3), model=model, tx=tx, l2=0.0)
    b, _ = steps.train_step(state, batch, jax.random.key(3), model=model, tx=tx, l2=0.0)
    later = state.replace(step=state.step + 5)
    c, _ = steps.train_step(later, batch, jax.random.key(3), model=model, tx=tx, l2=0.0)
    leaf = lambda s: np.asarray(s.params["dense_0"]["kernel"])
    np.testing.assert_array_equal(leaf(a), leaf(b))  # same step, same key: same dropout
    assert not np.array_equal(leaf(a), leaf(c))  # another step: another dropout mask


# ----------------------------------------------------------------- the loop


def digits_config(tmp_path, **overrides):
    c = config_lib.load_config_file(str(ROOT / "configs/digits.py"))
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.max_train_examples, c.data.max_val_examples = 200, 100
    c.train.num_epochs = 3
    for key, value in overrides.items():
        config_lib.apply_override(c, key, str(value))
    return c


def test_loop_restores_the_best_epoch_of_a_scripted_validation_loss(tmp_path, monkeypatch):
    config = digits_config(tmp_path, **{"train.early_stopping.monitor": "val_loss",
                                        "train.early_stopping.patience": "2", "train.num_epochs": "6"})
    scripted = iter([0.9, 0.4, 0.6, 0.7, 0.1])  # best at epoch index 1; stops after index 3
    seen = []
    real_evaluate = plain.evaluate

    def fake_evaluate(eval_step, params, split, cfg, mesh, **kwargs):
        result = real_evaluate(eval_step, params, split, cfg, mesh, **kwargs)
        seen.append(jax.tree.map(np.asarray, params))
        value = next(scripted, None)
        if value is not None:
            result.loss = value
        return result

    monkeypatch.setattr(plain, "evaluate", fake_evaluate)
    summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["epochs_run"] == 4 and summary["stopped_early"]
    assert summary["best_epoch"] == 2 and summary["result_weights"] == "best epoch"
    assert summary["best_val_loss"] == 0.4 and summary["min_val_loss"] == 0.4
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["val_loss"] for h in history] == [0.9, 0.4, 0.6, 0.7]
    result_params = seen[4]  # the first evaluation after training: the result weights
    for a, b in zip(jax.tree.leaves(result_params), jax.tree.leaves(seen[1])):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(seen[3]), jax.tree.leaves(seen[1])))


def test_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    straight = loop.train_and_evaluate(digits_config(tmp_path), str(tmp_path / "straight"))
    loop.train_and_evaluate(digits_config(tmp_path, **{"train.num_epochs": "2"}), str(tmp_path / "split"))
    resumed = loop.train_and_evaluate(digits_config(tmp_path), str(tmp_path / "split"))
    a = json.loads((tmp_path / "straight" / "history.json").read_text())
    b = json.loads((tmp_path / "split" / "history.json").read_text())
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for timing in ("seconds", "train_images_per_s"):
            x.pop(timing), y.pop(timing)
        assert x == y
    assert straight["result_val_accuracy"] == resumed["result_val_accuracy"]


def test_another_config_in_the_same_workdir_is_refused(tmp_path):
    loop.train_and_evaluate(digits_config(tmp_path, **{"train.num_epochs": "1"}), str(tmp_path / "run"))
    from imgclf_jax.errors import ConfigError
    with pytest.raises(ConfigError, match=r"another config: optimizer.learning_rate \(0.001 -> 0.01\)"):
        loop.train_and_evaluate(digits_config(tmp_path, **{"optimizer.learning_rate": "0.01"}),
                                str(tmp_path / "run"))
    loop.train_and_evaluate(digits_config(tmp_path, **{"optimizer.learning_rate": "0.01",
                                                       "train.num_epochs": "1"}),
                            str(tmp_path / "run"), overwrite=True)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optimizer"]["learning_rate"] == 0.01


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    from imgclf_jax.errors import ConfigError
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        loop.train_and_evaluate(digits_config(tmp_path), str(tmp_path / "afile"))


def test_train_cli_end_to_end_writes_every_output(tmp_path):
    workdir = tmp_path / "digits"
    done = subprocess.run(
        [sys.executable, "-m", "imgclf_jax.train", "--config", "configs/digits.py",
         "--config.train.num_epochs=2", f"--config.data.cache_dir={tmp_path / 'cache'}",
         "--workdir", str(workdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("config.json", "history.json", "summary.json", "accuracy.png", "loss.png",
                 "confusion_matrix.png", "confusion_matrix.json"):
        assert (workdir / name).stat().st_size > 0, name
    assert (workdir / "checkpoints" / "result").is_dir()
    assert (workdir / "checkpoints" / "latest").is_dir()
    history = json.loads((workdir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        assert set(h) == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                          "learning_rate", "train_images_per_s", "seconds"}
        assert 0 <= h["val_accuracy"] <= 1 and h["learning_rate"] == pytest.approx(1e-3)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["num_params"] == 545_098 and summary["epochs_run"] == 2
    assert summary["best_val_accuracy"] == max(h["val_accuracy"] for h in history)  # no monitor: by accuracy
    best = history[summary["best_epoch"] - 1]
    assert (summary["best_val_accuracy"], summary["best_val_loss"]) == (best["val_accuracy"], best["val_loss"])
    assert summary["min_val_loss"] == min(h["val_loss"] for h in history)
    assert summary["best_val_accuracy"] > 0.5 and summary["train_images_per_s"] > 0
    matrix = json.loads((workdir / "confusion_matrix.json").read_text())
    counts = np.array(matrix["counts"])
    assert counts.shape == (10, 10) and counts.sum() == 360
    assert np.trace(counts) / 360 == pytest.approx(summary["result_val_accuracy"])
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["num_epochs"] == 2
    # The last lines are for people (the JSON is in summary.json): the best epoch, the result, what was written.
    last, wrote = done.stdout.strip().splitlines()[-2:]
    assert last.startswith(f"best val_accuracy {summary['best_val_accuracy']:.4f} at epoch "
                           f"{summary['best_epoch']} of 2; result (last epoch weights) val_accuracy "
                           f"{summary['result_val_accuracy']:.4f}; "), last
    assert wrote.startswith(f"wrote {workdir}/{{config.json,history.json,summary.json,")
    assert "\r" not in done.stdout + done.stderr  # stderr is not a terminal: plain lines, no bars
    assert "validation: 360 img done" in done.stderr
