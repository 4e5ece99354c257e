"""The run's feedback and guards (issue 13): start banner, workdir lock, memory check, progress, plots."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from imgclf_jax import config as config_lib, loop, memory, workdir_lock
from imgclf_jax import workdir as workdir_lib
from imgclf_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_digits(tmp_path, **overrides):
    """configs/digits.py with a tiny model, 100 train / 50 validation rows, 1 epoch."""
    c = config_lib.load_config_file(str(ROOT / "configs/digits.py"))
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.image_size = 16
    c.data.max_train_examples, c.data.max_val_examples = 100, 50
    c.model.conv_filters, c.model.dense_units = (4, 8), (16,)
    c.train.num_epochs, c.train.batch_size = 1, 32
    for key, value in overrides.items():
        config_lib.apply_override(c, key, str(value))
    config_lib.validate(c)
    return c


# ----------------------------------------------------------------- workdir lock


def test_a_second_lock_on_a_workdir_is_refused_naming_it_and_the_holder(tmp_path):
    workdir = tmp_path / "run"
    with workdir_lock.WorkdirLock(str(workdir)):
        assert (workdir / workdir_lock.LOCK_NAME).read_text().strip() == str(os.getpid())
        # flock locks belong to the open file description: a second open in this process conflicts.
        with pytest.raises(workdir_lock.WorkdirBusy,
                           match=f"workdir '{workdir}' is in use by another train process \\(pid {os.getpid()}\\)"):
            workdir_lock.WorkdirLock(str(workdir)).acquire()
        with pytest.raises(workdir_lock.WorkdirBusy):
            loop.train_and_evaluate(tiny_digits(tmp_path), str(workdir))
        assert not (workdir / "config.json").exists()  # refused before anything was written
    assert not (workdir / workdir_lock.LOCK_NAME).exists()  # released and removed
    with workdir_lock.WorkdirLock(str(workdir)):  # free again
        pass


def test_a_lock_held_by_a_killed_process_is_free_again(tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from imgclf_jax.workdir_lock import WorkdirLock; "
         f"WorkdirLock({str(workdir)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {holder.pid}"):
            workdir_lock.WorkdirLock(str(workdir)).acquire()
    finally:
        holder.kill()  # SIGKILL: no cleanup runs; the kernel drops the flock
        holder.wait()
    assert (workdir / workdir_lock.LOCK_NAME).exists()  # left behind by the killed holder
    with workdir_lock.WorkdirLock(str(workdir)):
        assert (workdir / workdir_lock.LOCK_NAME).read_text().strip() == str(os.getpid())


def test_train_cli_refuses_a_locked_workdir_with_one_line(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()  # there before the lock: it stays
    with workdir_lock.WorkdirLock(str(workdir)):
        done = subprocess.run(
            [sys.executable, "-m", "imgclf_jax.train", "--config", "configs/digits.py",
             f"--config.data.cache_dir={tmp_path / 'cache'}", "--workdir", str(workdir), "--overwrite"],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0] == (f"imgclf_jax.train: error: workdir '{workdir}' is in use by another train process "
                        f"(pid {os.getpid()}); wait for it to finish or stop it, or use another --workdir")
    assert sorted(p.name for p in workdir.iterdir()) == []  # --overwrite removed nothing; lock file gone


def test_a_run_that_fails_before_writing_anything_leaves_no_workdir(tmp_path):
    workdir = tmp_path / "runs" / "ml1"
    missing = tmp_path / "no_such_data"
    done = subprocess.run(
        [sys.executable, "-m", "imgclf_jax.train", "--config", "configs/ml1.py", f"--config.data.dir={missing}",
         f"--config.data.cache_dir={tmp_path / 'cache'}", "--workdir", str(workdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and f"data folder '{missing}' not found" in done.stderr, done.stderr[-2000:]
    assert not workdir.exists() and (tmp_path / "runs").is_dir()  # only the folder the lock made is gone


# ----------------------------------------------------------------- memory check


def fake_free(monkeypatch, free_bytes):
    monkeypatch.setattr(memory, "available_bytes", lambda devices: (free_bytes, "mocked"))


def test_a_plain_run_that_does_not_fit_stops_before_training_saying_what_to_reduce(tmp_path, monkeypatch):
    c = tiny_digits(tmp_path)
    model_bytes = None

    real_check = memory.check_fits

    def spy(member, *args, **kwargs):
        nonlocal model_bytes
        model_bytes = member
        return real_check(member, *args, **kwargs)

    monkeypatch.setattr(memory, "check_fits", spy)
    fake_free(monkeypatch, 10**15)
    loop.train_and_evaluate(c, str(tmp_path / "fits"))  # fits: trains
    assert (tmp_path / "fits" / "summary.json").exists()
    m = model_bytes
    assert m.batch == 16 and m.params > 0 and m.opt_state >= 2 * m.params and m.temp > 0  # 32 over 2 devices
    # Room for the weights, optimizer state and half the temporaries: about half the batch fits.
    free = m.params + m.opt_state + m.temp // 2
    fake_free(monkeypatch, free)
    with pytest.raises(ConfigError) as e:
        loop.train_and_evaluate(c, str(tmp_path / "small"))
    message = str(e.value)
    assert message.startswith(f"training needs about {m.total / memory.GIB:.2f} GiB per device (params ")
    assert f"only {free / memory.GIB:.2f} GiB is free (mocked)" in message
    fits = int((free - m.params - m.opt_state) / (m.temp / m.batch))
    assert fits in (7, 8)
    assert f"reduce train.batch_size (the step's temporaries grow with it: about {fits} images per device " \
           "would fit, 16 asked), or data.image_size (now 16), or the model" in message
    assert "num_members" not in message and "\n" not in message
    # Refused before config.json (nothing left, not even the workdir): the corrected command is not
    # refused as "another config".
    assert not (tmp_path / "small").exists()
    # Not even the weights fit: the model (or the image size) must shrink.
    fake_free(monkeypatch, m.params)
    with pytest.raises(ConfigError, match=r"the weights and optimizer state alone need .* use a smaller model"):
        loop.train_and_evaluate(c, str(tmp_path / "small"))


def test_an_ensemble_where_no_member_fits_says_what_to_reduce_not_num_members_0(monkeypatch):
    m = memory.MemberMemory(params=100 * 2**20, opt_state=200 * 2**20, temp=2 * 2**30, batch=64)
    per = m.total + m.params  # keeps best
    # Room for 2 members' weights, optimizer state and best copy, and half the temporaries of one.
    free = 2 * (m.params + m.opt_state + m.params) + m.temp // 2
    assert free < per
    fake_free(monkeypatch, free)
    with pytest.raises(ConfigError) as e:
        memory.check_fits(m, 2, True, [object()], image_size=100)
    message = str(e.value)
    assert "num_members <=" not in message
    assert message.startswith(f"ensemble.num_members=2 needs about {2 * per / memory.GIB:.2f} GiB per device "
                              f"({per / memory.GIB:.2f} GiB per member: params 0.10, optimizer state 0.20, "
                              "step temporaries at batch 64 per device 2.00, best weights copy 0.10)")
    # (free - fixed) / (2 members x 32 MiB per image) = 1 GiB / 64 MiB = 16 images per device
    assert "about 16 images per device would fit, 64 asked), or data.image_size (now 100)" in message
    assert message.endswith("or ensemble.num_members")
    fake_free(monkeypatch, 3 * per + 1)
    with pytest.raises(ConfigError, match=r"use ensemble.num_members <= 3 or a smaller train.batch_size"):
        memory.check_fits(m, 5, True, [object()])


# ----------------------------------------------------------------- start banner


def test_every_run_starts_with_the_banner_fresh_then_resumed(tmp_path, capsys):
    c = tiny_digits(tmp_path)
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(c, workdir)
    out = capsys.readouterr().out.splitlines()
    first = next(i for i, line in enumerate(out) if line.startswith("train: "))
    assert out[first:first + 7] == [
        f"train: builder 'digits', data.dir none (bundled data), prepared in {tmp_path / 'cache'}/"
        + out[first].rsplit("/", 1)[1],
        "  train: 100 images from scikit-learn's bundled 8x8 digits (the rest held out for validation; "
        "a class-balanced subset, data.max_train_examples=100)",
        "  validation: 50 images from scikit-learn's bundled 8x8 digits (20% held out by data.val_fraction=0.2, "
        "stratified by class, data.split_seed=0; a class-balanced subset, data.max_val_examples=50)",
        "  test: none",
        # data.max_train_examples=100 is class-balanced: 10 of each digit
        "  classes (10; train rows each): " + ", ".join(f"{i} 10" for i in range(10)),
        "  images 16x16 RGB; model conv (4, 8) + dense (16,), "
        f"{json.loads((tmp_path / 'run' / 'summary.json').read_text())['num_params']:,} params; "
        "batch 32 on 2 device(s) (cpu:0, cpu:1; 16 each); augmentation on the host",  # auto on a CPU
        f"  workdir {workdir}: fresh run",
    ]
    assert out[first].rsplit("/", 1)[1].startswith("digits-")
    loop.train_and_evaluate(tiny_digits(tmp_path, **{"train.num_epochs": 2}), workdir)
    out = capsys.readouterr().out
    assert f"  workdir {workdir}: resuming at epoch 2, batch 0 (from checkpoints/latest)\n" in out
    loop.train_and_evaluate(tiny_digits(tmp_path, **{"train.num_epochs": 2}), workdir)
    assert f"  workdir {workdir}: finished run (2 epochs); writing its reports again\n" in capsys.readouterr().out


def test_the_banner_says_where_each_split_came_from_and_caps_the_class_list():
    from imgclf_jax import banner
    from imgclf_jax.data.splits import RunData, Split

    def split(labels):
        return Split(source=None, records=np.arange(len(labels)), labels=np.asarray(labels),
                     image_ids=[str(i) for i in range(len(labels))])

    names = [f"class_{i:02d}" for i in range(25)]
    data = RunData(class_names=names, train=split(list(range(25)) * 2 + [3]), validation=split([0, 1]),
                   test=split([-1] * 4), fingerprint="folders-abc",
                   sources={"train": "51 images from train/", "validation": "2 images from val/",
                            "test": "4 images from test/"})
    c = config_lib.base_config()
    c.data.builder, c.data.dir, c.data.cache_dir = "folders", "/data/mine", "/cache"
    c.ensemble.num_members = 3
    text = banner.start_banner(c, "runs/mine", data, 1234, ["cpu:0"], "fresh run")
    lines = text.splitlines()
    assert lines[0] == "train: builder 'folders', data.dir /data/mine, prepared in /cache/folders-abc"
    assert lines[1:4] == ["  train: 51 images from train/", "  validation: 2 images from val/",
                          "  test: 4 images from test/"]
    assert lines[4].startswith("  classes (25; train rows each): class_00 2, class_01 2, class_02 2, class_03 3, ")
    assert lines[4].endswith("class_19 2, ... (5 more)")
    assert "1,234 params per member, 3 members; batch 32 on 1 device(s) (cpu:0; 32 each)" in lines[5]
    assert lines[5].endswith("(cpu:0; 32 each); no augmentation")  # the base config's augment.* are off
    assert lines[6] == "  workdir runs/mine: fresh run" and len(lines) == 7
    c.augment.horizontal_flip = True
    assert banner.start_banner(c, "runs/mine", data, 1234, ["cpu:0"], "fresh run").splitlines()[5].endswith(
        "; augmentation on the host")  # 'auto' on a CPU
    c.data.augment_on, c.data.on_device = "device", True
    assert banner.start_banner(c, "runs/mine", data, 1234, ["cpu:0"], "fresh run").splitlines()[5].endswith(
        "; augmentation on the device, training split in device memory")
    c.augment.horizontal_flip, c.data.augment_on, c.data.on_device = False, "auto", False
    data.sources = {}  # a RunData made without them: the counts on one line
    lines = banner.start_banner(c, "runs/mine", data, 1234, ["cpu:0"], "fresh run").splitlines()
    assert lines[1] == "  rows: train 51, validation 2, test 4" and len(lines) == 5


# ----------------------------------------------------------------- figures


def _boxes(fig, texts):
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in texts if t.get_text()]


@pytest.mark.parametrize("names", [
    ["real", "fake"], ["0", "1", "2"], [str(i) for i in range(5)], [str(i) for i in range(12)],
    ["a_very_long_class_name_number_one", "golden retriever", "Border collie (smooth coat)", "x", "b"],
    [f"category number {i} long" for i in range(12)], [f"c{i}" for i in range(40)],
], ids=["2", "3", "5", "12", "5-long", "12-long", "40"])
def test_confusion_matrix_title_and_names_lie_inside_the_figure_without_overlapping(names):
    from imgclf_jax import report

    k = len(names)
    matrix = np.arange(k * k).reshape(k, k) % 7
    title = "validation, 3-member soft vote: accuracy 0.8123"
    fig = report.confusion_matrix_figure(matrix, names, title)
    fig.canvas.draw()
    ax = fig.axes[0]
    inside = fig.bbox
    title_box = _boxes(fig, [ax.title])[0]
    assert ax.title.get_text().replace("\n", " ") == title  # whole, perhaps wrapped
    xs, ys = _boxes(fig, ax.get_xticklabels()), _boxes(fig, ax.get_yticklabels())
    assert len(xs) == len(ys) == k
    for box in [title_box] + xs + ys:
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
    for a, b in zip(ys, ys[1:]):
        assert not a.overlaps(b)
    labels = ax.get_xticklabels()
    angle = labels[0].get_rotation()
    if angle == 0:
        for a, b in zip(xs, xs[1:]):
            assert a.x1 < b.x0  # left to right, apart
    else:  # parallel slanted strips: apart when the spacing across them exceeds the text's thickness
        assert angle == 45
        renderer = fig.canvas.get_renderer()
        thickness = []
        for t in labels:
            t.set_rotation(0)
            thickness.append(t.get_window_extent(renderer).height)
            t.set_rotation(angle)
        spacing = (xs[1].x1 - xs[0].x1) * np.sin(np.radians(angle))
        assert spacing > max(thickness), (spacing, max(thickness))
    import matplotlib.pyplot as plt
    plt.close(fig)


def _line(ax, label):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_curves_mark_the_best_epoch():
    from imgclf_jax import report

    history = [{"epoch": e + 1, "train_accuracy": a, "val_accuracy": v, "train_loss": 1 - a, "val_loss": 1 - v}
               for e, (a, v) in enumerate([(0.5, 0.6), (0.7, 0.8), (0.9, 0.75)])]
    figures = report.curve_figures(history, best_epoch=2)
    acc = _line(figures["accuracy.png"].axes[0], "best epoch 2 (val_accuracy 0.8000)")
    assert list(acc.get_xdata()) == [2, 2]  # a vertical line at epoch 2
    loss = _line(figures["loss.png"].axes[0], "best epoch 2 (val_loss 0.2000)")
    assert list(loss.get_xdata()) == [2, 2]
    assert "best epoch" in [t.get_text() for t in figures["accuracy.png"].axes[0].get_legend().get_texts()][2]
    import matplotlib.pyplot as plt
    for fig in figures.values():
        plt.close(fig)
    # With early stopping on val_loss, the label names the monitor that chose the epoch.
    figures = report.curve_figures(history, best_epoch=2, monitor="val_loss")
    _line(figures["accuracy.png"].axes[0], "best epoch 2 by val_loss (val_accuracy 0.8000)")
    for fig in figures.values():
        plt.close(fig)


def test_an_ensemble_shows_its_result_vote_beside_the_per_epoch_votes(tmp_path, capsys):
    from imgclf_jax import report, results, train

    c = tiny_digits(tmp_path, **{"ensemble.num_members": 2, "train.num_epochs": 3,
                                 "train.early_stopping.monitor": "val_loss", "train.early_stopping.patience": 1})
    workdir = tmp_path / "ens"
    summary = loop.train_and_evaluate(c, str(workdir))
    history = json.loads((workdir / "history.json").read_text())
    assert json.loads((workdir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    vote = summary["vote"]
    assert vote["rule"] == "majority"
    assert vote["result"] == {"rule": "majority", "val_accuracy": summary["result_val_accuracy"],
                              "members_at": "their own best epochs"}
    assert vote["result"]["val_accuracy"] == vote["majority"]["val_accuracy"]
    for rule in ("majority", "soft"):
        per_epoch = [h[f"{rule}_val_accuracy"] for h in history]
        best = vote[rule]["per_epoch_best"]
        assert best["val_accuracy"] == max(per_epoch) and per_epoch.index(max(per_epoch)) == best["epoch"] - 1
    assert len(results.ensemble_rows(str(workdir))) == 4  # results still reads the summary
    out = capsys.readouterr().out
    assert "params per member, 2 members; batch 32" in out
    line = train.summary_lines(summary, str(workdir), workdir_lib.run_files(str(workdir)))[0]
    assert (f"result: majority vote of the members at their own best epochs {summary['result_val_accuracy']:.4f} "
            f"(majority {vote['majority']['val_accuracy']:.4f}, soft {vote['soft']['val_accuracy']:.4f}); the "
            f"per-epoch majority vote peaked at {vote['majority']['per_epoch_best']['val_accuracy']:.4f} "
            f"(epoch {vote['majority']['per_epoch_best']['epoch']})") in line
    best_epochs = [m["best_epoch"] for m in summary["members"]]
    figures = report.member_curve_figures(history, best_epochs, ("majority vote, members at their own best epochs",
                                                                 summary["result_val_accuracy"]))
    ax = figures["accuracy.png"].axes[0]
    result = _line(ax, f"result: majority vote, members at their own best epochs {summary['result_val_accuracy']:.4f}")
    assert list(result.get_ydata()) == [summary["result_val_accuracy"]] * 2  # a horizontal line
    stars = [line for line in ax.get_lines() if line.get_marker() == "*" and len(line.get_xdata())]
    assert [(list(s.get_xdata()), list(s.get_ydata())) for s in stars] == [
        ([e], [history[e - 1]["val_accuracy"][i]]) for i, e in enumerate(best_epochs)]
    import matplotlib.pyplot as plt
    for fig in figures.values():
        plt.close(fig)


# ----------------------------------------------------------------- progress


class FakeTerminal:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return True


def test_progress_is_plain_lines_without_carriage_returns_when_not_a_terminal():
    import io

    from imgclf_jax import progress

    log = io.StringIO()
    with progress.Bar(1000, "epoch 1/3", stream=log, interval=0.0) as bar:
        bar.set_postfix(loss="0.5000")
        bar.update(250)
        bar.update(750)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 3  # one per update (interval 0), one at the end
    assert lines[0].startswith("epoch 1/3: 250/1,000 img (25%), ") and " img/s, " in lines[0]
    assert lines[0].endswith(", loss 0.5000") and lines[1].startswith("epoch 1/3: 1,000/1,000 img (100%), ")
    assert lines[2].startswith("epoch 1/3: 1,000 img done, ")
    quiet = io.StringIO()
    with progress.Bar(10, "validation", stream=quiet) as bar:  # 30 s between lines: only the final one
        bar.update(10)
    assert quiet.getvalue().count("\n") == 1
    terminal = FakeTerminal()
    with progress.Bar(10, "validation", stream=terminal) as bar:
        bar.update(10)
    assert "\r" in terminal.text and "validation" in terminal.text  # a tqdm bar on a terminal


def test_the_run_eta_comes_from_the_mean_epoch_time():
    from imgclf_jax.progress import eta_text

    assert eta_text([30.0, 50.0], 10, early_stopping=False) == "run ETA 7 min (10 epochs left)"  # 40 s x 10
    assert eta_text([20.0], 2, early_stopping=True) == "run ETA at most 40 s (2 epochs left)"
    assert eta_text([3600.0], 3, early_stopping=False) == "run ETA 3.0 h (3 epochs left)"
    assert eta_text([5.0], 1, early_stopping=False) == "run ETA 5 s (1 epoch left)"
    assert eta_text([5.0], 0, early_stopping=False) == "last epoch"
