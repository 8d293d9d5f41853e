"""A run folder's curves.png: loss, accuracy and learning rate per epoch, drawn from history.jsonl.
"""

from __future__ import annotations

import os
from typing import Optional

from raydist.storage import filesystem, is_uri

CURVES_FILE = "curves.png"


def write_run_curves(run_dir: str, title: str) -> Optional[str]:
    """<run>/curves.png from the run's whole history.jsonl (a resumed run continues the same picture);
    written locally, then copied when the run folder is a URI. A picture that cannot be drawn is a line,
    never the run's failure."""
    import shutil
    import tempfile

    from raydist.output import report
    from raydist.runs.history import read_history

    try:
        history = read_history(run_dir)
        if is_uri(run_dir):
            import pyarrow.fs

            local = tempfile.mkdtemp(prefix="raydist-curves-")
            report.plot_run_curves(history, os.path.join(local, CURVES_FILE), title=title)
            fs, inner = filesystem(run_dir)
            pyarrow.fs.copy_files(os.path.join(local, CURVES_FILE), f"{inner}/{CURVES_FILE}",
                                  destination_filesystem=fs)
            shutil.rmtree(local, ignore_errors=True)
        else:
            if not os.path.isdir(run_dir):
                return None
            report.plot_run_curves(history, os.path.join(run_dir, CURVES_FILE), title=title)
        return f"{run_dir}/{CURVES_FILE}"
    except Exception as exc:  # noqa: BLE001 - the run's own outcome matters more than its picture
        print(f"warning: could not draw {run_dir}/{CURVES_FILE}: {type(exc).__name__}: {exc}", flush=True)
        return None
