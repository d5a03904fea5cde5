"""The GPU compile report: every shipped Triton config compiles for sm_80 and sm_90 with no
spills and shared memory within the limit (no GPU needed)."""
import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_gpu_report_is_clean():
    run = subprocess.run([sys.executable, "-m", "mmkernels", "gpu-report"], capture_output=True,
                         text=True)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if " sm_" in line]
    assert rows and all(" ok " in line for line in rows)
    assert {"sm_80", "sm_90"} <= {line.split()[1] for line in rows}
    # Tensor cores are used (mma.sync on sm_80, wgmma on sm_90) by every config except the
    # exact-fp32 ("ieee") ones, which are FMA by design.
    tensor_core = [line for line in rows if "ieee" not in line.split()[0]]
    assert all(line.split()[6] == "True" for line in tensor_core if " sm_80 " in line)
    assert all(line.split()[7] == "True" for line in tensor_core if " sm_90 " in line)
