"""Merge submission files by majority vote (attempt 3 of the reference line).

Usage::

  python -m imgclf_jax.vote A.csv B.csv [C.csv ...] --out merged.csv

Each file is ``image_id,label`` with the same set of ids; labels are text (class
names: '0'..'4' for the competition, folder names for a ``folders`` run) and are
compared as text, so '3' and '03' are different labels.
The merged file has the first file's id order and, per id, the label most
files give. Ties are broken deterministically (the original broke them at
random): among the tied labels, the one given by the earliest file on the
command line wins, so list the files best first.
"""

from __future__ import annotations

import collections

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


def main(argv: list[str]) -> int:
    """Runs the tool on command-line words `argv` (see the module docstring); returns the exit status."""
    files, out, i = [], None, 0
    while i < len(argv):
        word = argv[i]
        if word == "--out":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError("flag --out needs a value")
            out, i = argv[i + 1], i + 2
            continue
        if word.startswith("--out="):
            out = word[len("--out="):]
        elif word.startswith("-"):
            raise ConfigError(f"unknown flag {word}; usage: A.csv B.csv [...] --out merged.csv")
        else:
            files.append(word)
        i += 1
    if out is None or len(files) < 2:
        raise ConfigError("usage: python -m imgclf_jax.vote A.csv B.csv [...] --out merged.csv "
                          "(at least two files)")
    votes = [read_submission(path) for path in files]
    first_ids = set(votes[0])
    for path, vote in zip(files[1:], votes[1:]):
        if set(vote) != first_ids:
            missing, extra = sorted(first_ids - set(vote)), sorted(set(vote) - first_ids)
            raise DataError(
                f"'{path}' has other ids than '{files[0]}': {len(missing)} missing"
                f"{' (e.g. ' + missing[0] + ')' if missing else ''}, {len(extra)} extra"
                f"{' (e.g. ' + extra[0] + ')' if extra else ''}"
            )
    merged = majority_vote(votes)
    report.write_labels(out, list(merged), list(merged.values()))
    print(f"wrote {out}: {len(merged)} ids, majority of {len(files)} files")
    return 0


if __name__ == "__main__":
    cli.run(main, "imgclf_jax.vote")
