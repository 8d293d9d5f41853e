"""One pytest-xdist process runs every test that starts or uses Ray; the other runs the in-process tests beside it.

Why: a Ray run leaves a core idle about a quarter of its time (Ray Train starts its processes one after
another), and the in-process tests (torch on the CPU, parsers, files) fill it. Why not two processes of Ray
tests: the machine must never hold two Ray instances at once (a second head's dashboard finds port 8265
taken, and Ray's State API, which Train and Tune use to clean up, assumes one cluster per machine).

How: xdist's own `--dist loadgroup` cannot be used: it tags a grouped test by rewriting `item._nodeid`, which
pytest 9 no longer reads (a Node's id is `item._id`), so its groups silently split across processes. Here
the workers, which collect, write the Ray tests' ids to a file named by an environment variable that the
controller sets before it starts them; the controller's scheduler, which sees only ids, reads it and keeps
those tests in one work unit, in collection order (own_cluster tests first, see conftest).
"""

import os

from xdist.scheduler import LoadScopeScheduling

GROUP_FILE_ENV = "RAYDIST_TESTS_RAY_GROUP_FILE"
GROUP = "ray"


def is_ray_test(item) -> bool:
    return bool(item.get_closest_marker("cluster") or item.get_closest_marker("own_cluster"))


def name_the_group_file(folder: str) -> None:
    """In the controller (and in a run without xdist): where its workers will write the group."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        os.environ[GROUP_FILE_ENV] = os.path.join(folder, "ray-tests.txt")


def write_group(items) -> None:
    """In each worker, after collection (every worker collects the same tests, in the same order)."""
    path = os.environ.get(GROUP_FILE_ENV)
    if not path or "PYTEST_XDIST_WORKER" not in os.environ:
        return
    partial = f"{path}.{os.environ['PYTEST_XDIST_WORKER']}"
    with open(partial, "w") as fh:
        fh.writelines(item.nodeid + "\n" for item in items if is_ray_test(item))
    os.replace(partial, path)  # whole or not at all: the other worker may be writing the same list


class RayGroupScheduling(LoadScopeScheduling):
    """xdist's load-scope scheduler with one scope for all Ray tests and one per other test. It hands out
    the largest scope first, so the Ray group starts at once on one process."""

    def __init__(self, config, log=None):
        super().__init__(config, log)
        self._ray_tests = None

    def _split_scope(self, nodeid: str) -> str:
        if self._ray_tests is None:  # first called once every worker has reported its collection
            with open(os.environ[GROUP_FILE_ENV]) as fh:
                self._ray_tests = set(fh.read().splitlines())
        return GROUP if nodeid in self._ray_tests else nodeid
