"""Merge submission files by majority vote (attempt 3 of the reference line), or by soft vote.

Usage::

  python -m imgclf_jax.vote A.csv B.csv [C.csv ...] --out merged.csv
  python -m imgclf_jax.vote A.csv B.csv [...] --soft [--probabilities] --out merged.csv

Each file is ``image_id,label`` with the same set of ids; labels are text (class
names: '0'..'4' for the competition, folder names for a ``folders`` run) and are
compared as text, so '3' and '03' are different labels.
The merged file has the first file's id order and, per id, the label most
files give. Ties are broken deterministically (the original broke them at
random): among the tied labels, the one given by the earliest file on the
command line wins, so list the files best first.

``--soft`` averages class probabilities instead: every file must carry one
probability column per class after ``image_id,label`` (headed by the class names,
as ``python -m imgclf_jax.predict --probabilities`` writes them; the columns may come
in any order, matched by name; every file the same classes); the merged label is
the class of the highest mean probability (ties: the class whose column comes first
in the first file). ``--probabilities`` also writes the mean probabilities into the
merged file, so it can take part in a further soft vote. The vote is unweighted.
"""

from __future__ import annotations

import collections
import csv
import math

import numpy as np

from imgclf_jax import cli, report
from imgclf_jax.data.scan import read_csv
from imgclf_jax.errors import ConfigError, DataError


def read_submission(path: str) -> dict[str, str]:
    """``image_id -> label`` (text, whitespace stripped) of one submission file, in file order.

    Raises:
      DataError: a missing file, missing columns, duplicate ids or an empty label (naming file and line).
    """
    labels = {}
    for line, image_id, text in read_csv(path, need_label=True):
        if not text:
            raise DataError(f"CSV file '{path}' line {line}: empty label for id '{image_id}'")
        labels[image_id] = text
    return labels


def majority_vote(votes: list[dict]) -> dict:
    """Per id (in the first mapping's order) the most frequent label; ties to the earliest voter.

    Args:
      votes: one ``image_id -> label`` mapping per voter, all with the same ids; labels are
        any hashable values (text as read from files), compared with ``==``.
    """
    merged = {}
    for image_id in votes[0]:
        labels = [v[image_id] for v in votes]
        counts = collections.Counter(labels)
        top = max(counts.values())
        merged[image_id] = next(label for label in labels if counts[label] == top)
    return merged


SUM_TOLERANCE = 1e-3
"""How far a row's probabilities may sum from 1 (files with 7 significant digits are off by ~1e-6)."""


def read_probabilities(path: str) -> tuple[list[str], list[str], np.ndarray]:
    """The class probabilities of a file written by ``predict --probabilities``.

    Returns:
      (image ids in file order, class names in column order, ``float64[N, K]``).

    Raises:
      DataError: naming the file (and line and column): ids as in :func:`read_submission`; no
        probability columns (a plain ``image_id,label`` file), an empty or duplicate column name,
        a cell that is missing, not a number, NaN/infinite or outside [0, 1], or a row that does
        not sum to 1 within :data:`SUM_TOLERANCE`.
    """
    rows = read_csv(path, need_label=False)  # ids checked: present, unique, not empty
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        columns = [(i, name) for i, name in enumerate(header) if name not in ("image_id", "label")]
        if not columns:
            raise DataError(f"CSV file '{path}' has no probability columns (header {','.join(header)!r}): "
                            "--soft needs one column per class, as predict --probabilities writes them")
        names = [name for _, name in columns]
        for i, name in columns:
            if not name:
                raise DataError(f"CSV file '{path}' line 1: column {i + 1} has no name (probability columns "
                                "are headed by the class names)")
            if names.count(name) > 1:
                raise DataError(f"CSV file '{path}' line 1: column '{name}' appears twice")
        by_line = {line: image_id for line, image_id, _ in rows}
        values = []
        for line, row in enumerate(reader, start=2):
            if line not in by_line:  # a blank row, skipped as read_csv skips it
                continue
            cells = []
            for i, name in columns:
                text = row[i].strip() if i < len(row) else ""
                try:
                    p = float(text)
                except ValueError:
                    p = math.nan if text.lower() in ("nan", "-nan") else None
                if p is None or not math.isfinite(p) or not 0.0 <= p <= 1.0:
                    shown = repr(text) if text else "an empty cell"
                    raise DataError(f"CSV file '{path}' line {line}, column '{name}': {shown} is not a "
                                    "probability (a number in [0, 1])")
                cells.append(p)
            total = sum(cells)
            if abs(total - 1.0) > SUM_TOLERANCE:
                raise DataError(f"CSV file '{path}' line {line}: the probabilities sum to {total:.6g}, not 1 "
                                f"(within {SUM_TOLERANCE:g}): give softmax probabilities, not scores or logits")
            values.append(cells)
    return [image_id for _, image_id, _ in rows], names, np.asarray(values, np.float64)


def soft_vote(files: list[str]) -> tuple[list[str], list[str], np.ndarray]:
    """The mean class probabilities of `files` (each as :func:`read_probabilities` reads it).

    Returns:
      (the first file's ids, its class names in column order, ``float64[N, K]`` the mean over
      files, rows aligned by id and columns by class name).

    Raises:
      DataError: a file's classes or ids are not the first file's (naming the file and one difference),
        or any error of :func:`read_probabilities`.
    """
    ids, names, total = read_probabilities(files[0])
    total = total.copy()
    for path in files[1:]:
        other_ids, other_names, values = read_probabilities(path)
        if set(other_names) != set(names):
            missing, extra = sorted(set(names) - set(other_names)), sorted(set(other_names) - set(names))
            raise DataError(f"'{path}' has other class columns than '{files[0]}': missing "
                            f"{', '.join(missing) or 'none'}; extra {', '.join(extra) or 'none'}")
        _check_same_ids(files[0], set(ids), path, set(other_ids))
        row = {image_id: r for r, image_id in enumerate(other_ids)}
        column = [other_names.index(name) for name in names]
        total += values[np.ix_([row[image_id] for image_id in ids], column)]
    return ids, names, total / len(files)


def _check_same_ids(first_path: str, first_ids: set, path: str, ids: set) -> None:
    if ids != first_ids:
        missing, extra = sorted(first_ids - ids), sorted(ids - first_ids)
        raise DataError(
            f"'{path}' has other ids than '{first_path}': {len(missing)} missing"
            f"{' (e.g. ' + missing[0] + ')' if missing else ''}, {len(extra)} extra"
            f"{' (e.g. ' + extra[0] + ')' if extra else ''}"
        )


def main(argv: list[str]) -> int:
    """Runs the tool on command-line words `argv` (see the module docstring); returns the exit status."""
    usage = "usage: A.csv B.csv [...] [--soft [--probabilities]] --out merged.csv"
    files, values = cli.paths_and_flags(argv, {"out": str, "soft": bool, "probabilities": bool})
    out = values["out"]
    if out is None or len(files) < 2:
        raise ConfigError(f"{usage} (at least two files)")
    if values["probabilities"] and not values["soft"]:
        raise ConfigError("--probabilities writes the soft vote's mean probabilities: give --soft too")
    if values["soft"]:
        ids, names, mean = soft_vote(files)
        labels = [names[k] for k in mean.argmax(-1)]
        report.write_labels(out, ids, labels, probabilities=mean if values["probabilities"] else None,
                            class_names=names)
        print(f"wrote {out}: {len(ids)} ids, soft vote of {len(files)} files ({len(names)} classes)")
        return 0
    votes = [read_submission(path) for path in files]
    first_ids = set(votes[0])
    for path, vote in zip(files[1:], votes[1:]):
        _check_same_ids(files[0], first_ids, path, set(vote))
    merged = majority_vote(votes)
    report.write_labels(out, list(merged), list(merged.values()))
    print(f"wrote {out}: {len(merged)} ids, majority of {len(files)} files")
    return 0

if __name__ == "__main__":
    cli.run(main, "imgclf_jax.vote")
