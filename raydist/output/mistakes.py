"""What the model gets wrong: per-class accuracy and the confusion matrix of an evaluation.

    text = per_class_csv(confusion, names)        # a run folder's per_class.csv (rank 0 writes it)
    confusion, names = read_per_class_csv(text)   # the matrix back, to draw
    draw_confusion(confusion, names, "confusion.png", title="...")

`confusion[i][j]` counts the validation images of class i the model predicted as j, summed exactly over every
rank (raydist.loop.evaluate). per_class.csv has one row per class: its index and name, its images, how many
were right, its accuracy (recall), the class it was most often mistaken for and how often, then the whole row
of the matrix (`predicted_0` ... `predicted_{C-1}`), so the file alone draws the picture.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Optional, Sequence

# Above this many classes no matrix is kept (it grows with the square: 8 MB a copy at 1000 classes, 3.2 GB at
# 20,000, in the all-reduce and every checkpoint); such runs keep top-5 and no per-class files.
MATRIX_CLASSES = 1000
PER_CLASS_FILE = "per_class.csv"
CONFUSION_FILE = "confusion.png"
NUMBERS_UP_TO = 20  # classes whose counts are written in their cells
NAMES_UP_TO = 60  # classes whose names label the axes


def _label_names(names: Sequence[str], classes: int) -> list[str]:
    """The names, or the label numbers where there are none for every class (fake data has none)."""
    return [str(n) for n in names] if len(names) == classes else [str(i) for i in range(classes)]


def per_class_rows(confusion: Sequence[Sequence[int]], names: Sequence[str]) -> list[dict]:
    names = _label_names(names, len(confusion))
    rows = []
    for i, counts in enumerate(confusion):
        counts = [int(c) for c in counts]
        images, correct = sum(counts), counts[i]
        wrong = [(c, j) for j, c in enumerate(counts) if j != i and c]
        count, j = max(wrong, key=lambda w: (w[0], -w[1])) if wrong else (0, None)
        rows.append({"class": i, "name": names[i], "images": images, "correct": correct,
                     "accuracy": round(correct / images, 6) if images else "",
                     "most_mistaken_for": names[j] if j is not None else "", "times": count,
                     **{f"predicted_{k}": c for k, c in enumerate(counts)}})
    return rows


def per_class_csv(confusion: Sequence[Sequence[int]], names: Sequence[str]) -> str:
    rows = per_class_rows(confusion, names)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def read_per_class_csv(text: str) -> tuple[list[list[int]], list[str]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    confusion = [[int(row[f"predicted_{k}"]) for k in range(len(rows))] for row in rows]
    return confusion, [row["name"] for row in rows]


def draw_confusion(confusion: Sequence[Sequence[int]], names: Sequence[str], path: str, *, title: str) -> None:
    """The matrix as a picture: true class down, predicted class across, each row coloured by the share of
    its class's images (so a rare class's mistakes show as plainly as a common one's), counts in the cells
    up to 20 classes, names on the axes up to 60."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(confusion, dtype=np.int64)
    n = len(counts)
    names = _label_names(names, n)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=100)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's images")
    if n <= NAMES_UP_TO:
        ax.set_xticks(range(n), names, rotation=90 if n > 10 else 0, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
    if n <= NUMBERS_UP_TO:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_mistake_files(folder: str, confusion: Optional[Sequence[Sequence[int]]], names: Sequence[str], *,
                        title: str) -> Optional[list[str]]:
    """per_class.csv and confusion.png into a local `folder` (a study's, raydist.predict's), an earlier
    call's removed first so none is left beside another model; none with no matrix. Returns their paths."""
    paths = [os.path.join(folder, PER_CLASS_FILE), os.path.join(folder, CONFUSION_FILE)]
    for path in paths:
        if os.path.exists(path):
            os.remove(path)
    if confusion is None:
        return None
    with open(paths[0], "w") as fh:
        fh.write(per_class_csv(confusion, names))
    draw_confusion(confusion, names, paths[1], title=title)
    return paths
