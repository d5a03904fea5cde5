"""What an op family supplies to the harness, the report and the CLI.

A family is a module of this package defining ``OPS``: op name → an object of this shape (the
contrastive losses' ``contrastive.Loss`` is one). Registering it is one entry in
``FAMILIES`` (``__init__.py``). The harness, the report and the CLI reach ops only through
this interface, which is what lets them stay generic.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Case(Protocol):
    """One benchmark case: a frozen dataclass whose fields are the table's leading columns, in
    order (int fields right-aligned); rows carry them as keys. Among them ``dtype``, a key of
    ``harness.DTYPES``."""

    dtype: str

    def __str__(self) -> str:
        """Compact id (pytest ids, file-free logs)."""

    def aligned(self) -> str:
        """The fields padded to fixed widths, for the progress lines."""


class BenchOp(Protocol):
    name: str                 # the --op name and the results' file stem
    title: str                # headings and plot titles
    case_type: type           # the Case dataclass: workers rebuild cases from its fields
    impls: tuple              # implementations in run order; "eager" is the baseline of
                              # the speedup and memory ratios, "mmkernels" the fused op,
                              # peers.COMPILE the torch.compile peer
    quick_help: str           # --help text: what --quick runs
    sizes_help: str           # --help text: what --sizes sets
    warmup: str               # what the small warm-up case is, e.g. "a B=64 warm-up"
    step: str                 # what one timed fwd+bwd covers (markdown, after "fwd+bwd (")
    flops_formula: str        # nominal FLOPs as text, e.g. "8·B²·D"
    flops_note: str           # where that count comes from
    flops_basis: str          # why every implementation is scored on it (markdown)
    x_field: str | None       # the case field on the plots' x axis (None: bars per case)
    x_label: str | None       # and its axis label
    smoke_cases: tuple        # small cases benchmarks/test_bench.py runs every implementation on
    # Optional: ``floors``, implementations that do less than the op by design (LoRA's frozen
    # Linear alone), timed as a lower bound and exempt from the smoke tests' value check.

    def plan(self, device: str, quick: bool, sizes, dtypes, impls) -> list[tuple]:
        """(case, implementations) in run order; ``sizes`` replaces the default list."""

    def build(self, impl: str) -> Callable:
        """``fn(*make_inputs(...))`` returning a scalar (backward runs through it when the inputs
        require grad; "eager" gives the value every implementation must match); raises
        ``peers.PeerUnavailable`` when ``impl`` cannot run here."""

    def make_inputs(self, case, device: str, seed: int = 0) -> tuple:
        """The arguments of one call; the tensors that get gradients require grad."""

    def small_case(self, case):
        """The warm-up case: the same shapes as far as the kernels go, small."""

    def resolved_backend(self, dtype: str, device: str) -> str:
        """The backend ``backend="auto"`` picks for this op's inputs."""

    def estimate_bytes(self, impl: str, backend: str | None, case) -> int:
        """Rough peak memory of one fwd+bwd: cases that cannot fit are skipped, not run."""

    def flops(self, case) -> int:
        """Nominal FLOPs of one fwd+bwd (``flops_formula``)."""
