"""Shared test settings: hypothesis profiles and the --run-slow switch.

Profiles (``--hypothesis-profile=NAME``):

* ``ci`` (the default): few examples so that ``make test`` stays fast on 2 cores, and NOT
  derandomized: every run draws new examples, from a seed chosen at random and printed in
  the pytest header (``hypothesis seed N: rerun with --hypothesis-seed=N``). A failure also
  prints its ``@reproduce_failure`` blob (``print_blob``), and the example database in
  .hypothesis/ replays it first on the next run.
* ``thorough`` (``make test-slow``): twenty times as many examples.

Tests marked ``slow`` are skipped unless ``--run-slow`` is given (``make test-slow`` does).

In parallel (``pytest -n 2``, pytest-xdist, as ``make test`` runs) every worker uses the
controller's hypothesis seed, so the one printed in the header reproduces the whole run, and
one thread per worker (torch and the notebooks' kernels alike), so that two workers on two
cores do not fight over them.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=12, **_COMMON)
settings.register_profile("thorough", max_examples=250, **_COMMON)
settings.load_profile("ci")

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))   # set in xdist workers
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
os.environ["OMP_NUM_THREADS"] = str(THREADS)   # inherited by subprocesses and notebook kernels
torch.set_num_threads(THREADS)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (make test-slow)")


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Choose the run's hypothesis seed (unless --hypothesis-seed gave one), so that the header
    can print it: one integer reproduces every example of the run."""
    from hypothesis import core

    if config.getoption("hypothesis_seed", None) is not None:
        return
    worker_input = getattr(config, "workerinput", None)    # an xdist worker: the controller's
    core.global_force_seed = (worker_input["hypothesis_seed"] if worker_input
                              else int.from_bytes(os.urandom(4), "little"))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist, in the controller: hand every worker the controller's hypothesis seed."""
    from hypothesis import core

    node.workerinput["hypothesis_seed"] = core.global_force_seed


def pytest_report_header(config):
    from hypothesis import core

    seed = core.global_force_seed
    slow = "run" if config.getoption("--run-slow") else "skipped (--run-slow runs them)"
    return [f"hypothesis seed {seed}: rerun with --hypothesis-seed={seed}",
            f"slow tests: {slow}"]


# Files that take a minute or more, started first so that no worker is left with one at the
# end while the other idles (xdist hands out whole files in collection order).
LONG_FILES = ("test_gpu_check.py", "test_student.py", "test_course.py", "10_inference.ipynb",
              "test_ddp.py", "08_full_model.ipynb", "06_kernel.ipynb")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in LONG_FILES)     # stable: order kept
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
