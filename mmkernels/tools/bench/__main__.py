"""``python -m mmkernels.tools.bench``: how the harness starts its worker processes."""
import sys

from . import main

sys.exit(main(sys.argv[1:]))
