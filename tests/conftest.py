import os

# The Triton interpreter reads this flag when @triton.jit runs, i.e. when a kernel module is imported:
# it must be set before anything imports lsa_kernels.kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

LAYERS = ("backends", "api", "integrations", "training", "tooling")


def pytest_collection_modifyitems(config, items):
    """Mark every test with its layer (its folder: `pytest -m api`), and skip `slow` tests unless asked for
    (LSA_SLOW=1, or a -m expression that names slow)."""
    want_slow = os.environ.get("LSA_SLOW") == "1" or "slow" in (config.getoption("-m") or "")
    skip_slow = pytest.mark.skip(reason="slow: set LSA_SLOW=1 or select with -m slow")
    for item in items:
        layer = item.path.parent.name
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))
        if "slow" in item.keywords and not want_slow:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
