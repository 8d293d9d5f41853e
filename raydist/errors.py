"""Every exception raydist raises on purpose, in one place so any layer can raise or catch it: bad user
input found before a cluster starts (ConfigError: one line, exit code 2), input only a worker can see
(WorkerInputError and its kinds: the run's cause in one line), data, folder, model-argument and weights
problems, a failed study trial; and `keep_traceback`, which keeps a worker's traceback on its exception.
"""

from __future__ import annotations

import traceback


class ConfigError(ValueError):
    """Bad user input: printed as one line, exit code 2, before any cluster starts."""


class WorkerInputError(Exception):
    """A problem with the user's input that only a worker can see (data or a checkpoint missing on its node).
    Every rank raises the same message; `raydist.train` prints it as the run's cause, in one line."""


class DataUnavailable(WorkerInputError):
    pass


class CorruptCheckpoint(WorkerInputError):
    """A checkpoint file that cannot be read (cut short by a crash while it was written, or damaged)."""


class OutOfMemory(WorkerInputError):
    """A worker ran out of device memory: a setting to change, said in one line (raised from torch's error)."""


class DatasetNotFound(FileNotFoundError):
    """The data set is not on disk and was not asked to be downloaded."""


class DataFileCorrupt(OSError):
    """A data file is there but truncated or damaged (an OSError: the user's side, like a missing one)."""


class DownloadFailed(OSError):
    """--download could not fetch the data set (no network, a proxy, a mirror down)."""


class FolderError(ValueError):
    """The folder cannot be a data set (missing, empty, one class, ...): one line naming the path."""


class TooManyBadImages(OSError):
    """More undecodable image files than --max-bad-images allows."""


class ModelArgError(ValueError):
    """A --model-arg the model's builder does not take, or a value of the wrong type or out of range."""


class WeightsError(ValueError):
    """Pretrained weights that cannot be had or do not fit: one line saying what and what fixes it."""


class TrialError(Exception):
    """What a study's trial raises when its run failed: the cause in one line (Tune records it as the
    trial's error and the results' `error` column shows it); the tracebacks are in the trial's error.log."""


TRACEBACK_ATTRIBUTE = "raydist_traceback"  # set on a worker's exception; pickled with it to the driver


def keep_traceback(exc: BaseException, *, where: str) -> None:
    """On a worker: store the exception's whole traceback (with its causes) on it, as text, because Ray
    returns the exception to the driver without one."""
    try:
        setattr(exc, TRACEBACK_ATTRIBUTE, f"({where})\n" + "".join(traceback.format_exception(exc)))
    except AttributeError:  # an exception type that takes no attributes: Ray's truncated text stays
        pass


def first_line(exc: BaseException, limit: int = 0) -> str:
    """An exception's first non-empty line (its type's name when it says nothing), cut to `limit` characters
    when given: the cause a one-line error quotes."""
    line = next((part.strip() for part in str(exc).splitlines() if part.strip()), type(exc).__name__)
    return line[:limit] if limit else line
