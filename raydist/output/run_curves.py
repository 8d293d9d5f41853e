"""A run folder's pictures, drawn by the driver from what the workers wrote: curves.png (loss, accuracy and
learning rate per epoch, from history.jsonl) and confusion.png (what the saved model gets wrong, from
per_class.csv).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from raydist.output.mistakes import CONFUSION_FILE, PER_CLASS_FILE
from raydist.storage import filesystem, is_uri, read_bytes

CURVES_FILE = "curves.png"


def write_run_curves(run_dir: str, title: str) -> Optional[str]:
    """<run>/curves.png from the run's whole history.jsonl (a resumed run continues the same picture)."""
    from raydist.output import report
    from raydist.runs.history import read_history

    return _draw(run_dir, CURVES_FILE, lambda path: report.plot_run_curves(read_history(run_dir), path,
                                                                           title=title))


def write_confusion_picture(run_dir: str, title: str) -> Optional[str]:
    """<run>/confusion.png from the per_class.csv the run's last epoch wrote (none: the run ended before
    one, or diverged)."""
    from raydist.output.mistakes import draw_confusion, read_per_class_csv

    try:
        data = read_bytes(f"{run_dir}/{PER_CLASS_FILE}")
    except Exception:  # noqa: BLE001 - an unreadable folder is the run's outcome to report, not the picture's
        data = None
    if data is None:
        return None

    def draw(path: str) -> None:  # inside _draw's guard: a file that cannot be read is a warning too
        confusion, names = read_per_class_csv(data.decode())
        draw_confusion(confusion, names, path, title=title)

    return _draw(run_dir, CONFUSION_FILE, draw)


def _draw(run_dir: str, name: str, draw: Callable[[str], object]) -> Optional[str]:
    """`draw(path)` into <run_dir>/<name>: written locally, then copied when the run folder is a URI. A picture
    that cannot be drawn is a line, never the run's failure."""
    import shutil
    import tempfile

    try:
        if is_uri(run_dir):
            import pyarrow.fs

            local = tempfile.mkdtemp(prefix="raydist-picture-")
            draw(os.path.join(local, name))
            fs, inner = filesystem(run_dir)
            pyarrow.fs.copy_files(os.path.join(local, name), f"{inner}/{name}", destination_filesystem=fs)
            shutil.rmtree(local, ignore_errors=True)
        else:
            if not os.path.isdir(run_dir):
                return None
            draw(os.path.join(run_dir, name))
        return f"{run_dir}/{name}"
    except Exception as exc:  # noqa: BLE001 - the run's own outcome matters more than its picture
        print(f"warning: could not draw {run_dir}/{name}: {type(exc).__name__}: {exc}", flush=True)
        return None
