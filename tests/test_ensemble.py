"""Ensembles: member i of a K-member job is the plain run with seed + i; votes; NaN freeze; memory check."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgclf_jax import config as config_lib, loop
from imgclf_jax.ensemble import steps as ens_steps
from imgclf_jax.ensemble.mapping import default_mapping, map_members, resolve_mapping
from imgclf_jax.ensemble.voting import majority_vote, soft_vote
from imgclf_jax import workdir as workdir_lib
from imgclf_jax.errors import ConfigError, TrainingError
from imgclf_jax.models import create_model
from imgclf_jax.optim import create_optimizer

EPOCHS = 4


def small_config(data_dir, cache_dir, **ensemble):
    """A tiny model on the 40-image real subset, with dropout, augmentation, resampling and early stopping."""
    c = config_lib.base_config()
    c.seed = 3
    c.data.dir, c.data.cache_dir, c.data.image_size = str(data_dir), cache_dir, 24
    c.data.class_repeats = (1, 1, 1, 1, 2)
    c.augment.rotation_deg, c.augment.shift_fraction, c.augment.horizontal_flip = 10.0, 0.1, True
    c.model.conv_filters, c.model.conv_kernel_sizes = (4, 6), (3, 3)
    c.model.conv_paddings, c.model.conv_pools, c.model.conv_dropouts = ("same", "valid"), (True, True), (0.2, 0.0)
    c.model.side_filters, c.model.side_pool_size = 2, 4
    c.model.dense_units, c.model.dense_dropouts = (8,), (0.3,)
    c.model.l2 = 1e-3
    c.optimizer.learning_rate = 3e-3
    c.train.num_epochs, c.train.batch_size = EPOCHS, 16
    c.train.early_stopping.monitor, c.train.early_stopping.patience = "val_loss", 1
    for key, value in ensemble.items():
        c.ensemble[key] = value
    config_lib.validate(c)
    return c


def read(workdir, name):
    return json.loads((pathlib.Path(workdir) / name).read_text())


@pytest.fixture(scope="module")
def single_runs(small_competition, tmp_path_factory):
    """Plain runs with seeds 3 and 4: (summary, history) each."""
    tmp = tmp_path_factory.mktemp("single")
    runs = []
    for seed in (3, 4):
        c = small_config(small_competition, str(tmp / "cache"))
        c.seed = seed
        loop.train_and_evaluate(c, str(tmp / f"seed{seed}"))
        runs.append((read(tmp / f"seed{seed}", "summary.json"), read(tmp / f"seed{seed}", "history.json")))
    return runs


@pytest.mark.parametrize("mapping", ["unroll", "vmap"])
def test_member_i_follows_the_single_run_with_seed_plus_i(mapping, single_runs, small_competition, tmp_path):
    c = small_config(small_competition, str(tmp_path / "cache"), num_members=2, mapping=mapping)
    summary = loop.train_and_evaluate(c, str(tmp_path / "ens"))
    history = read(tmp_path / "ens", "history.json")
    assert summary["num_members"] == 2 and summary["mapping"] == mapping
    assert len(summary["devices"]) == 2  # members mapped, batch sharded over the 2 forced devices
    num_val = summary["num_val_examples"]
    assert sorted(s["epochs_run"] for s, _ in single_runs) == [3, EPOCHS]  # seed 3 stops early, seed 4 does not
    for i, (single, single_history) in enumerate(single_runs):
        member = summary["members"][i]
        assert member["seed"] == 3 + i
        # Same early stopping: the member trained exactly the single run's epochs and kept the same best.
        assert member["epochs_trained"] == single["epochs_run"]
        assert member["best_epoch"] == single["best_epoch"]
        for epoch, expected in enumerate(single_history):
            got = history[epoch]
            assert got["trained"][i]
            np.testing.assert_allclose(got["train_loss"][i], expected["train_loss"], rtol=1e-4)
            np.testing.assert_allclose(got["val_loss"][i], expected["val_loss"], rtol=1e-4)
            assert abs(got["val_accuracy"][i] - expected["val_accuracy"]) * num_val <= 1 + 1e-9
            assert got["learning_rate"][i] == expected["learning_rate"]
        assert abs(member["result_val_accuracy"] - single["result_val_accuracy"]) * num_val <= 1 + 1e-9
        # After its early stop a member is frozen: untrained epochs, constant validation metrics.
        for later in history[single["epochs_run"]:]:
            assert not later["trained"][i] and later["train_loss"][i] is None
            np.testing.assert_allclose(later["val_loss"][i], history[single["epochs_run"] - 1]["val_loss"][i])
    assert summary["epochs_run"] == max(s["epochs_run"] for s, _ in single_runs)
    # The votes in the summary are the votes of the members' result weights.
    for rule in ("majority", "soft"):
        assert 0.0 <= summary["vote"][rule]["val_accuracy"] <= 1.0
    assert summary["result_val_accuracy"] == summary["vote"]["majority"]["val_accuracy"]
    from imgclf_jax.results import ensemble_rows

    rows = ensemble_rows(str(tmp_path / "ens"))
    assert len(rows) == 4 and rows[2].startswith("| ens majority vote | 2 x ")
    assert f"| {summary['members'][1]['best_val_accuracy']:.4f} | {summary['members'][1]['best_epoch']} |" in rows[1]
    for name in ("accuracy.png", "loss.png", "confusion_matrix.png"):
        assert (tmp_path / "ens" / name).stat().st_size > 0
    matrix = np.array(read(tmp_path / "ens", "confusion_matrix.json")["counts"])
    assert matrix.sum() == num_val
    assert np.trace(matrix) / num_val == pytest.approx(summary["result_val_accuracy"])


def test_shared_data_feeds_every_member_the_first_seeds_batches(single_runs, small_competition, tmp_path):
    c = small_config(small_competition, str(tmp_path / "cache"), num_members=2, shared_data=True,
                     mapping="unroll")
    c.train.early_stopping.monitor = ""
    loop.train_and_evaluate(c, str(tmp_path / "ens"))
    history = read(tmp_path / "ens", "history.json")
    c.ensemble.num_members, c.ensemble.shared_data = 1, False
    loop.train_and_evaluate(c, str(tmp_path / "single"))  # seed 3, no early stopping
    single = read(tmp_path / "single", "history.json")
    for got, expected in zip(history, single):
        np.testing.assert_allclose(got["train_loss"][0], expected["train_loss"], rtol=1e-4)
    # Member 1 has seed 4's init and dropout but seed 3's batches: not the seed-4 run.
    assert history[0]["train_loss"][1] != pytest.approx(single_runs[1][1][0]["train_loss"], rel=1e-4)


def poison(monkeypatch, members):
    """Makes the given members start with a huge output kernel: their first loss overflows."""
    real_create = ens_steps.create_ensemble_state

    def poisoned(model, tx, keys, image_size, *args):
        state = real_create(model, tx, keys, image_size, *args)
        params = jax.tree.map(lambda x: x, state.members.params)
        for i in members:
            params["logits"]["kernel"] = params["logits"]["kernel"].at[i].set(3e38)
        return state.replace(members=state.members.replace(params=params))

    monkeypatch.setattr(ens_steps, "create_ensemble_state", poisoned)


def test_a_nan_freezes_one_member_and_the_others_go_on(small_competition, tmp_path, monkeypatch):
    poison(monkeypatch, [1])
    c = small_config(small_competition, str(tmp_path / "cache"), num_members=2, mapping="unroll")
    c.train.early_stopping.monitor, c.train.num_epochs = "", 2
    summary = loop.train_and_evaluate(c, str(tmp_path / "ens"))
    history = read(tmp_path / "ens", "history.json")
    assert summary["members"][1]["nan_step"] == 1 and summary["members"][0]["nan_step"] is None
    assert history[0]["trained"] == [True, True] and history[1]["trained"] == [True, False]
    assert history[0]["train_loss"][1] is None  # its only step was not counted
    assert history[1]["train_loss"][0] < history[0]["train_loss"][0] * 1.5  # member 0 trained normally
    assert summary["epochs_run"] == 2


def test_when_every_member_hits_a_nan_the_job_writes_its_reports_and_fails(small_competition, tmp_path,
                                                                             monkeypatch):
    poison(monkeypatch, [0, 1])
    c = small_config(small_competition, str(tmp_path / "cache"), num_members=2, mapping="unroll")
    c.train.early_stopping.monitor, c.train.num_epochs = "", 3
    with pytest.raises(TrainingError, match=r"every member.*\[1, 1\]"):
        loop.train_and_evaluate(c, str(tmp_path / "ens"))
    summary = read(tmp_path / "ens", "summary.json")
    assert summary["epochs_run"] == 1 and [m["nan_step"] for m in summary["members"]] == [1, 1]


def test_ensemble_step_freezes_a_non_finite_member_keeping_its_previous_state():
    c = config_lib.base_config()
    c.model.conv_filters, c.model.conv_kernel_sizes = (3,), (3,)
    c.model.conv_paddings, c.model.conv_pools, c.model.conv_dropouts = ("valid",), (True,), (0.0,)
    c.model.dense_units, c.model.dense_dropouts = (4,), (0.0,)
    model = create_model(c.model, 3)
    tx, _ = create_optimizer(c.optimizer, steps_per_epoch=1, num_epochs=c.train.num_epochs)
    init_keys, dropout_keys = ens_steps.member_keys(0, 3)
    state = ens_steps.create_ensemble_state(model, tx, init_keys, 8)
    params = state.members.params
    params["logits"]["bias"] = params["logits"]["bias"].at[2, 0].set(jnp.nan)
    state = state.replace(members=state.members.replace(params=params),
                          active=jnp.array([True, False, True]))  # member 1 already stopped
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((3, 4, 8, 8, 3), dtype=np.float32),
             "label": rng.integers(0, 3, (3, 4)).astype(np.int32), "mask": np.ones((3, 4), bool)}
    new, metrics = ens_steps.ensemble_train_step(state, batch, dropout_keys, model=model, tx=tx, l2=0.0,
                                                 mode="unroll", shared_data=False)
    assert np.asarray(metrics["updated"]).tolist() == [True, False, False]
    assert np.asarray(metrics["nan"]).tolist() == [False, False, True]
    assert np.asarray(new.active).tolist() == [True, False, False]
    assert np.asarray(new.members.step).tolist() == [1, 0, 0]
    old_k, new_k = np.asarray(state.members.params["logits"]["kernel"]), np.asarray(new.members.params["logits"]["kernel"])
    assert not np.array_equal(old_k[0], new_k[0])
    np.testing.assert_array_equal(old_k[1:], new_k[1:])


def test_majority_vote_breaks_ties_by_summed_probabilities_never_at_random():
    p = np.array([  # 4 members, 3 examples, 3 classes
        [[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]],
        [[0.1, 0.8, 0.1], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8]],
        [[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.2, 0.7, 0.1]],
        [[0.1, 0.9, 0.0], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]],
    ])
    # Example 0: 2 votes each for 0 and 1; summed probabilities 1.5 vs 2.2 -> 1.
    # Example 1: votes 0, 1, 2, 1 -> 1 outright. Example 2: 3 votes for 2.
    assert majority_vote(p).tolist() == [1, 1, 2]
    # Soft: mean probabilities; example 1: class 0 1.2, class 1 1.8, class 2 1.0 -> 1.
    assert soft_vote(p).tolist() == [1, 1, 2]
    q = p.copy()
    q[1, 0], q[3, 0] = [0.45, 0.55, 0.0], [0.45, 0.55, 0.0]  # now class 0 sums 1.9 > class 1's 1.6
    assert majority_vote(q)[0] == 0


def test_mapping_modes_agree_and_auto_is_unroll_on_cpu():
    assert default_mapping("cpu") == "unroll" and default_mapping("gpu") == "vmap"
    assert resolve_mapping("auto", "cpu") == "unroll" and resolve_mapping("map") == "map"
    fn = lambda w, x: jnp.tanh(x @ w).sum()  # noqa: E731
    w = jnp.arange(12.0).reshape(3, 2, 2) / 10
    x = jnp.ones((4, 2))
    outs = [map_members(fn, mode, 3, (0, None))(w, x) for mode in ("vmap", "unroll", "map")]
    expected = [float(fn(w[i], x)) for i in range(3)]
    for out in outs:
        np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_too_many_members_stop_before_training_with_the_per_member_figures(small_competition, tmp_path):
    c = small_config(small_competition, str(tmp_path / "cache"), num_members=10**7)
    with pytest.raises(ConfigError, match=r"ensemble.num_members=10000000 needs about .* GiB per member"):
        loop.train_and_evaluate(c, str(tmp_path / "ens"))
    assert not (tmp_path / "ens" / "checkpoints").exists()


def test_config_rejects_bad_ensemble_settings():
    c = config_lib.base_config()
    c.ensemble.mapping = "pmap"
    with pytest.raises(ConfigError, match="ensemble.mapping"):
        config_lib.validate(c)
    c = config_lib.base_config()
    c.ensemble.num_members = 0
    with pytest.raises(ConfigError, match="ensemble.num_members"):
        config_lib.validate(c)



def test_test_split_gives_voted_and_per_member_submissions_and_predict_reproduces_them(small_competition,
                                                                                       tmp_path):
    import collections
    import subprocess
    import sys

    from conftest import copy_with_test_split

    data = tmp_path / "data"
    test_ids = [f"t{i}" for i in range(9)]
    copy_with_test_split(small_competition, data, test_ids)
    (data / "test.csv").write_text("image_id\n" + "\n".join(test_ids) + "\n")
    c = small_config(data, str(tmp_path / "cache"), num_members=3)
    c.train.num_epochs = 2
    workdir = tmp_path / "ens"
    loop.train_and_evaluate(c, str(workdir))

    def labels(path):
        rows = (workdir / path).read_text().splitlines()
        assert rows[0] == "image_id,label" and [r.split(",")[0] for r in rows[1:]] == test_ids
        return [int(r.split(",")[1]) for r in rows[1:]]

    voted = labels("submission.csv")
    members = [labels(f"submission_member_{i}.csv") for i in range(3)]
    for n, label in enumerate(voted):
        top, count = collections.Counter(m[n] for m in members).most_common(1)[0]
        if count >= 2:
            assert label == top  # a majority decides; only 1-1-1 ties go to the summed probabilities
    out = tmp_path / "predicted.csv"
    done = subprocess.run([sys.executable, "-m", "imgclf_jax.predict", "--workdir", str(workdir), "--images",
                           str(data / "test.csv"), "--out", str(out)],
                          cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_text() == (workdir / "submission.csv").read_text()
    # --overwrite removes the ensemble's own files, per-member submissions included.
    (workdir / "notes.txt").write_text("mine")
    workdir_lib.check_workdir(str(workdir), c, overwrite=True)
    assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]
