import os

# The Triton interpreter reads this flag when @triton.jit runs, i.e. when a kernel module is imported:
# it must be set before anything imports lsa_kernels.kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (run with -m slow or LSA_SLOW=1)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
