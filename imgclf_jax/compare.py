"""Compare runs on one page: ``python -m imgclf_jax.compare runs/a runs/b ... --out report.html``.

Each argument is a run's workdir, or a folder holding runs (every workdir below it
with a history.json, sorted by path, as :mod:`imgclf_jax.results` finds them). A
run still training (history.json, no summary.json yet) is compared as far as it
has come (its rows say "running").

Writes one self-contained HTML page (no scripts, no network: the images are
embedded as PNG data URIs), which any browser opens from disk:

- the runs' validation accuracy and validation loss per epoch, overlaid (one color
  per run; an ensemble's members share its color, thin, and its majority and soft
  votes are thick lines on the accuracy plot);
- a table: run, then the config keys whose values differ between the runs (only
  those: ``-`` where a run lacks the key), best validation accuracy and its epoch
  (by the run's early-stopping monitor, ``train.early_stopping.monitor``, as
  summary.json records it), the result weights' validation accuracy, epochs run,
  wall time (the sum of the epochs' seconds) and training images/s (steady state;
  for an ensemble member-images/s). An ensemble gives one row per member (its seed)
  and one per vote rule (best: the best per-epoch vote, result: the result weights'
  vote); a population's members (``ensemble.sweep``) show their swept values in those
  keys' columns (its votes ``-`` there);
- every run's confusion matrix (the validation split, with its result weights; an
  ensemble's is its ``ensemble.vote`` rule's), side by side.

Reads config.json, history.json, summary.json and confusion_matrix.json; a missing
or damaged one stops with one line naming the file (a run without
confusion_matrix.json yet shows none).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os

import ml_collections

from imgclf_jax import cli, report
from imgclf_jax.ensemble import population
from imgclf_jax.errors import ConfigError


@dataclasses.dataclass
class Row:
    """One table row: a run, a member of an ensemble, or one of its votes."""

    label: str
    config: dict  # flat config keys -> values (members: their own seed)
    best_val_accuracy: float | None
    best_epoch: int | None
    result_val_accuracy: float | None
    epochs: int
    wall_seconds: float
    images_per_s: float | None
    kind: str = "run"  # "run", "member" or "vote"


@dataclasses.dataclass
class Run:
    """A workdir as compare reads it."""

    workdir: str
    label: str
    config: dict  # flat
    history: list[dict]
    summary: dict | None  # None while the run is still training
    confusion: dict | None

    @property
    def is_ensemble(self) -> bool:
        return bool(self.history) and isinstance(self.history[0].get("val_accuracy"), list)


def _read_json(path: str, required: bool = True):
    if not os.path.exists(path):
        if required:
            raise ConfigError(f"'{os.path.dirname(path)}' has no {os.path.basename(path)} (not a run's workdir)")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"'{path}' is damaged ({type(e).__name__}: {e}); the run cannot be compared") from None


def find_runs(path: str) -> list[str]:
    """The workdirs `path` names: itself if it holds history.json, else every workdir below it (sorted).

    Raises:
      ConfigError: `path` does not exist, is a file, or holds no history.json in it or below it.
    """
    if os.path.isfile(os.path.join(path, "history.json")):
        return [path]
    if os.path.isfile(path):
        raise ConfigError(f"'{path}' is a file; give the run's workdir (here '{os.path.dirname(path) or '.'}') "
                          "or a folder of runs")
    if not os.path.isdir(path):
        raise ConfigError(f"'{path}' not found (give a run's workdir or a folder of runs)")
    runs = []
    for folder, subfolders, files in os.walk(path):
        subfolders.sort()
        if "history.json" in files:
            runs.append(folder)
            subfolders.clear()
    if not runs:
        raise ConfigError(f"'{path}' holds no run: no history.json in it or in any folder below it")
    return sorted(runs)


def labels_for(workdirs: list[str]) -> list[str]:
    """Short unique names: each workdir's path relative to the workdirs' common folder (its name for one)."""
    real = [os.path.abspath(w) for w in workdirs]
    if len(real) == 1:
        return [os.path.basename(real[0].rstrip(os.sep)) or real[0]]
    common = os.path.commonpath(real)
    labels = [os.path.relpath(r, common) for r in real]
    return [os.path.basename(common) if label == "." else label for label in labels]


def load_run(workdir: str, label: str) -> Run:
    """Reads one workdir.

    Raises:
      ConfigError: config.json or history.json missing or damaged, or a damaged summary.json /
        confusion_matrix.json (naming the file).
    """
    config = _read_json(os.path.join(workdir, "config.json"))
    history = _read_json(os.path.join(workdir, "history.json"))
    if not isinstance(config, dict) or not isinstance(history, list):
        raise ConfigError(f"'{workdir}': config.json or history.json is not what a run writes; it is damaged")
    summary = _read_json(os.path.join(workdir, "summary.json"), required=False)
    confusion = _read_json(os.path.join(workdir, "confusion_matrix.json"), required=False)
    from imgclf_jax.workdir import flat_config

    return Run(workdir, label, flat_config(config), history, summary, confusion)


def _nan(value):
    return float("nan") if value is None else value


def _best(history: list[dict], key: str, index: int | None = None) -> tuple[float | None, int | None]:
    values = [(h[key] if index is None else h[key][index], h["epoch"]) for h in history]
    values = [(v, e) for v, e in values if v is not None]
    if not values:
        return None, None
    return max(values, key=lambda ve: (ve[0], -ve[1]))  # the earliest of equal bests


def rows_of(run: Run) -> list[Row]:
    """The table rows of one run: one row, or an ensemble's members then its votes.

    Raises:
      ConfigError: the history or summary lacks keys a run writes (damaged), naming the workdir.
    """
    try:
        return _rows(run)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise ConfigError(f"'{run.workdir}' has a damaged summary.json or history.json ({type(e).__name__}: "
                          f"{e}); the run cannot be compared") from None


def _rows(run: Run) -> list[Row]:
    history, summary = run.history, run.summary
    wall = sum(h["seconds"] for h in history)
    epochs = len(history)
    if not run.is_ensemble:
        if summary is not None:
            best_epoch = summary["best_epoch"]
            best = history[best_epoch - 1]["val_accuracy"] if best_epoch else None
            return [Row(run.label, run.config, best, best_epoch, summary["result_val_accuracy"], epochs, wall,
                        summary.get("train_images_per_s"))]
        best, best_epoch = _best(history, "val_accuracy")
        speed = history[-1].get("train_images_per_s") if history else None
        return [Row(f"{run.label} (running)", run.config, best, best_epoch, None, epochs, wall, speed)]
    k = len(history[0]["val_accuracy"])
    seed, per_seed = run.config.get("seed", 0), run.config.get("ensemble.num_members", k)
    sweep = population.parse_sweep(run.config.get("ensemble.sweep", "") or "")
    values = [m.values for m in population.members(ml_collections.ConfigDict(
        {"seed": seed, "ensemble": {"num_members": per_seed, "sweep": run.config.get("ensemble.sweep", "")}}))]
    rows = []
    for i in range(k):
        config = dict(run.config, **(values[i] if sweep and len(values) == k else {}))
        if summary is not None:
            member = summary["members"][i]
            config.update(member.get("values", {}))  # a population member's swept values
            config["seed"] = member["seed"]
            best_epoch = member["best_epoch"]
            best = history[best_epoch - 1]["val_accuracy"][i] if best_epoch else None
            result, trained = member["result_val_accuracy"], member["epochs_trained"]
            speed = summary.get("member_images_per_s")
        else:
            config["seed"] = seed + i % per_seed
            best, best_epoch = _best(history, "val_accuracy", i)
            result, trained = None, sum(1 for h in history if h.get("trained", [True] * k)[i])
            speed = history[-1].get("train_images_per_s")
            speed = None if speed is None else speed * k
        rows.append(Row(f"{run.label} member {i}" + ("" if summary else " (running)"), config, best, best_epoch,
                        result, trained, wall, speed, kind="member"))
    voters = dict(run.config, seed=[row.config["seed"] for row in rows])  # a vote has every member's seed
    voters.update({key: None for key, _ in sweep})  # and every member's values: shown '-'
    for rule in ("majority", "soft"):
        best, best_epoch = _best(history, f"{rule}_val_accuracy")
        result = summary["vote"][rule]["val_accuracy"] if summary is not None else None
        rows.append(Row(f"{run.label} {rule} vote" + ("" if summary else " (running)"), voters, best,
                        best_epoch, result, epochs, wall, rows[0].images_per_s, kind="vote"))
    return rows


def differing_keys(configs: list[dict]) -> list[str]:
    """The config keys (flat, sorted) whose values are not the same in every config (absent counts as a value)."""
    keys = sorted(set().union(*configs))
    absent = "\0absent"
    return [key for key in keys
            if len({json.dumps(c.get(key, absent), sort_keys=True) for c in configs}) > 1]


def _png(fig) -> str:
    plt = report._pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def curve_images(runs: list[Run]) -> dict[str, str]:
    """{"val_accuracy": data URI, "val_loss": data URI}: the runs' validation curves overlaid."""
    plt = report._pyplot()
    colors = plt.get_cmap("tab10")
    images = {}
    for metric in ("val_accuracy", "val_loss"):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r, run in enumerate(runs):
            color = colors(r % 10)
            epochs = [h["epoch"] for h in run.history]
            if not run.is_ensemble:
                ax.plot(epochs, [_nan(h[metric]) for h in run.history], "o-", ms=3, color=color, lw=1.6,
                        label=run.label)
                continue
            k = len(run.history[0][metric])
            for i in range(k):
                ax.plot(epochs, [_nan(h[metric][i]) for h in run.history], "-", color=color, lw=0.9, alpha=0.6,
                        label=f"{run.label} members" if i == 0 else None)
            if metric == "val_accuracy":
                for rule, style in (("majority", "-"), ("soft", "--")):
                    ax.plot(epochs, [_nan(h[f"{rule}_val_accuracy"]) for h in run.history], style, color=color,
                            lw=2.6, label=f"{run.label} {rule} vote")
        name = metric.replace("val_", "validation ")
        report._label_curve(plt, fig, ax, name, f"{name} per epoch", fontsize=8,
                            ncol=2 if len(ax.get_lines()) > 8 else 1)
        images[metric] = _png(fig)
    return images


def confusion_image(run: Run) -> str | None:
    """The run's confusion matrix (from confusion_matrix.json) as a data URI, titled with the run's name."""
    if run.confusion is None:
        return None
    import numpy as np

    try:
        matrix = np.asarray(run.confusion["counts"], np.int64)
        names = list(run.confusion["class_names"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"'{os.path.join(run.workdir, 'confusion_matrix.json')}' is damaged "
                          f"({type(e).__name__}: {e})") from None
    accuracy = np.trace(matrix) / max(1, matrix.sum())
    what = f"{run.config.get('ensemble.vote', 'majority')} vote" if run.is_ensemble else "result weights"
    return _png(report.confusion_matrix_figure(matrix, names, f"{run.label} ({what}): validation accuracy "
                                               f"{accuracy:.4f}"))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _fmt_acc(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_wall(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def table_html(rows: list[Row], keys: list[str]) -> str:
    """The comparison table (an HTML <table>): run, the differing keys, then the figures."""
    head = ["run", *keys, "best val acc", "best epoch", "result val acc", "epochs", "wall time", "train img/s"]
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    best = max((r.best_val_accuracy for r in rows if r.best_val_accuracy is not None), default=None)
    for r in rows:
        cells = [r.label, *(_cell(r.config.get(k)) if k in r.config else "-" for k in keys),
                 _fmt_acc(r.best_val_accuracy), _cell(r.best_epoch), _fmt_acc(r.result_val_accuracy),
                 str(r.epochs), _fmt_wall(r.wall_seconds),
                 "-" if r.images_per_s is None else f"{r.images_per_s:.1f}"]
        marks = {1 + len(keys)} if best is not None and r.best_val_accuracy == best else set()
        out.append(f'<tr class="{r.kind}">' + "".join(
            f"<td><b>{html.escape(c)}</b></td>" if j in marks else f"<td>{html.escape(c)}</td>"
            for j, c in enumerate(cells)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 13px; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 3px 7px; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
tr.member td { color: #555; } tr.vote td { font-style: italic; }
.row { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; flex: 0 1 400px; } figure img { width: 100%; }
figcaption { font-size: 12px; color: #555; } img { max-width: 100%; }
"""


def page(runs: list[Run], rows: list[Row]) -> str:
    """The whole HTML page of :func:`main` (a str); `rows`: the runs' :func:`rows_of`, in order."""
    keys = differing_keys([row.config for row in rows])
    curves = curve_images(runs)
    figures = []
    for run in runs:
        uri = confusion_image(run)
        caption = html.escape(f"{run.label}: {run.workdir}")
        body = (f'<img src="{uri}" alt="confusion matrix of {html.escape(run.label)}">' if uri
                else "<p>(no confusion_matrix.json yet)</p>")
        figures.append(f'<figure data-run="{html.escape(run.label)}">{body}<figcaption>{caption}</figcaption>'
                       "</figure>")
    names = ", ".join(run.label for run in runs)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape('compare: ' + names)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(f'{len(runs)} run' + ('s' if len(runs) != 1 else ''))}: {html.escape(names)}</h1>",
        "<h2>Runs</h2>",
        "<p>Config keys shown: those whose values differ between the rows"
        + (" (none: the runs share their config)" if not keys else "") + ". Best: by each run's early-stopping "
        "monitor; result: the result weights' validation accuracy.</p>",
        table_html(rows, keys),
        "<h2>Validation curves</h2>", '<div class="row">',
        f'<img src="{curves["val_accuracy"]}" alt="validation accuracy per epoch">',
        f'<img src="{curves["val_loss"]}" alt="validation loss per epoch">', "</div>",
        "<h2>Confusion matrices (validation)</h2>", '<div class="row">', *figures, "</div>",
        "</body></html>", ""])


def main(argv: list[str]) -> int:
    """Runs the tool on command-line words `argv` (see the module docstring); returns the exit status."""
    from imgclf_jax import workdir as workdir_lib

    paths, values = cli.paths_and_flags(argv, {"out": str})
    out = values["out"]
    if out is None or not paths:
        raise ConfigError("usage: python -m imgclf_jax.compare WORKDIR_OR_FOLDER_OF_RUNS [...] --out report.html")
    if os.path.isdir(out):
        raise ConfigError(f"--out '{out}' is a folder; give a file name such as {os.path.join(out, 'report.html')}")
    workdirs = list(dict.fromkeys(run for path in paths for run in find_runs(path)))
    out_real = os.path.realpath(out)
    for workdir in workdirs:
        parent, name = os.path.split(out_real)
        if parent == os.path.realpath(workdir) and (name in workdir_lib.RUN_FILES
                                                     or workdir_lib.RUN_FILE_PATTERN.fullmatch(name)):
            raise ConfigError(f"--out '{out}' would overwrite the run's own file {name} in '{workdir}'; give "
                              "another name (e.g. report.html)")
    runs = [load_run(w, label) for w, label in zip(workdirs, labels_for(workdirs))]
    rows = [row for run in runs for row in rows_of(run)]
    text = page(runs, rows).encode("ascii", "xmlcharrefreplace").decode("ascii")  # any locale writes it alike
    os.makedirs(os.path.dirname(out_real), exist_ok=True)
    report.write_atomically(out, lambda f: f.write(text))
    print(f"wrote {out}: {len(runs)} run(s), {len(rows)} rows, {len(text) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    cli.run(main, "imgclf_jax.compare")
