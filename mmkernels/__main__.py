"""Command line: ``python -m mmkernels {info,bench,gpu-report,demo} [options]``."""
import sys

USAGE = """usage: python -m mmkernels COMMAND [options]

commands:
  info         versions, device, available backends and why the others are not usable
  bench        benchmark the ops against eager PyTorch and peers (--help for options)
  gpu-report   compile every Triton kernel config for sm_80/sm_90 without a GPU; fails on
               register spills or shared memory over the limit
  demo         train the reference fusion model (mmkernels.models) on the offline shapes
               data set, fused and against the same model on eager ops (--help for options)
"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        from .tools.info import main as run
    elif command == "bench":
        from .tools.bench import main as run
    elif command == "gpu-report":
        from .tools.gpu_report import main as run
    elif command == "demo":
        from .models.demo import main as run
    else:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
