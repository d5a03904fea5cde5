"""Test configuration: seeding, markers, and the Triton interpreter on machines without CUDA.

TRITON_INTERPRET must be set before triton is first imported (a kernel decorated earlier runs
compiled, not interpreted), so it is set here, before any test module imports mmkernels'
Triton files.

Every uninitialised allocation (torch.empty in the Triton wrappers, at::empty in the C++
kernels) is filled with NaN: torch does that in deterministic mode
(torch.utils.deterministic.fill_uninitialized_memory), so an output element a kernel forgets to
write shows up as NaN instead of as leftover memory that happens to look right.
"""
import os
import random
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.use_deterministic_algorithms(True, warn_only=True)
assert torch.utils.deterministic.fill_uninitialized_memory

# Fresh random inputs every run; the seed is printed so a failure can be replayed with
# MMK_TEST_SEED=<seed>.
SEED = int(os.environ.get("MMK_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    import mmkernels
    return [f"mmkernels: seed {SEED} (MMK_TEST_SEED), backends {mmkernels.available_backends()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers",
                            "interpreter: Triton kernels on CPU under TRITON_INTERPRET=1")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    # Each test gets its own stream derived from the run seed and its name: independent of
    # test order and of which tests were selected.
    # crc32, not hash(): str hashes change per process, which would defeat MMK_TEST_SEED.
    torch.manual_seed(SEED ^ zlib.crc32(request.node.nodeid.encode()))
    yield
