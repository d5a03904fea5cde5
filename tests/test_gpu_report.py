"""The GPU compile report: every shipped Triton config compiles for sm_80 and sm_90 with no
spills and shared memory within the limit (no GPU needed), and the executed-FLOP table shows
the work each design does against the nominal minimum."""
import importlib.util
import re
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
    # exact-fp32 ("ieee") ones, which are FMA by design, attention's Δ = rowsum(dO∘O)
    # preprocess and LoRA's reduction of partial sums, which have no product.
    tensor_core = [line for line in rows if "ieee" not in line.split()[0]
                   and not line.startswith(("attention_bwd_delta", "lora_reduce"))]
    assert all(line.split()[6] == "True" for line in tensor_core if " sm_80 " in line)
    assert all(line.split()[7] == "True" for line in tensor_core if " sm_90 " in line)
    # No kernel sits at the 255-register ceiling (one block per SM and spills one change away).
    assert all(int(line.split()[2]) < 255 for line in rows)

    # Forward + backward work over the nominal 8·B²·D (InfoNCE) / 6·B²·D (SigLIP): the atomic
    # paths do the nominal work, the deterministic ones compute every tile once more (no
    # atomics), and no path recomputes logits per D-slice (the same ratio at every D).
    # Attention (14·B²·D per head): the deterministic dQ pass recomputes S and dP (18/14); the
    # fp32/TF32 head-dim-256 dK/dV runs as two launches (one more product: 20/14).
    # LoRA (4·T·D² + 12·T·D·r, T = B tokens through a D → D layer, r = 16): every product is
    # done once (adding the partial sums of dA/dB is < 0.1% more), nothing is recomputed; only a
    # layer narrower than the 128-wide tensor-core tiles (D = 64) pays for padding.
    expected = {("infonce", "deterministic"): 10 / 8, ("infonce", "atomic"): 1.0,
                ("siglip", "deterministic"): 8 / 6, ("siglip", "atomic"): 1.0,
                ("siglip", "loss-only"): 1.0}
    summary = {}
    for line in run.stdout.splitlines():
        match = re.match(r"(infonce|siglip|attention|lora)\s+(\S+)\s+(\S+)"
                         r"((?:\s+(?:[\d.]+×|-))+)$", line)
        if match:
            op, precision, path, ratios = match.groups()
            summary[op, precision, path] = [None if r == "-" else float(r.rstrip("×"))
                                            for r in ratios.split()]
    for precision in ("bf16/fp16", "fp32/tf32", "fp32/ieee"):
        for (op, path), ratio in expected.items():
            assert summary[op, precision, path] == pytest.approx([ratio] * 5, abs=0.01), \
                (op, precision, path)
        attention = [v for (op, p, _), v in summary.items() if op == "attention" and p == precision]
        assert attention, precision
        last = 20 / 14 if precision == "fp32/tf32" else 18 / 14
        for ratios in attention:
            assert ratios[3:] == [None, None]  # head dims stop at 256
            assert ratios[:3] == pytest.approx([18 / 14, 18 / 14, last], abs=0.01), precision
        lora = summary["lora", precision, "deterministic"]
        assert lora[1:] == pytest.approx([1.0] * 4, abs=0.01), precision
        if precision == "fp32/ieee":  # 64×64 tiles: no padding at D = 64
            assert lora[0] == pytest.approx(1.0, abs=0.01)
        else:
            assert 1.0 < lora[0] < 2.0, precision
