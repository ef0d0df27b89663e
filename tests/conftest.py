"""Shared test settings: one torch thread (tiny models; the CI machine has 2 shared cores), in this
process (each pytest-xdist worker runs this file) and in every subprocess that does not set its own."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

#: the modules that take longest (real processes: fake Slurm jobs, the paper pipeline, torchrun, the
#: demo), run first: under pytest-xdist (`make test` runs `pytest -n 2 --dist loadfile --no-loadscope-reorder`)
#: a long module started last would leave the other worker idle at the end
SLOW_FIRST = ("test_paper_recipe.py", "test_slurm_jobs.py", "test_demo.py", "test_sigterm.py", "test_distributed.py",
              "test_faults.py", "test_examples_python.py", "test_locks.py", "test_gpu_check.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))     # stable: module order kept otherwise


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
