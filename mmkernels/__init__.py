"""mmkernels: fused kernels for multimodal (vision + text) training, as drop-in PyTorch ops.

Every op runs on three backends behind one dispatcher (``backend="auto"`` by default):
Triton on CUDA, C++ on CPU (the optional extension ``mmkernels._C``), and an eager PyTorch
reference that is both the test oracle and the fallback. Importing the package touches
neither CUDA nor triton.
"""
import torch

from . import _cpp, lora, nn
from ._dispatch import (BackendUnavailableError, available_backends, unavailable_reasons,
                        use_backend)
from .attention.cross_attention import cross_attention, cross_attention_varlen
from .contrastive.infonce import infonce_loss
from .contrastive.siglip import siglip_loss
from .lora.adapters import apply_lora
from .lora.lora_linear import lora_linear

__version__ = "0.1.0"

# Load the C++ kernels now (a millisecond; quiet: a missing build warns at the first op that
# would have used it), so that nothing is imported while torch.compile traces a first call,
# and register their fake implementations.
if _cpp.load() is not None:
    from .attention import cpu as _attention_cpu  # noqa: F401
    from .contrastive import cpu as _contrastive_cpu  # noqa: F401
    from .lora import cpu as _lora_cpu  # noqa: F401


def empty_cache() -> None:
    """Free the memory the C++ kernels hold between calls.

    One large buffer is held (today: the logits InfoNCE keeps, 64 MiB at B = 4096 in fp32),
    so that the next training step reuses it instead of faulting in fresh pages. This returns
    it to the system, as ``torch.cuda.empty_cache()`` does for CUDA's cache; a buffer still in
    use by a live autograd graph is freed when that graph is.
    """
    # Eager only: in a torch.compile graph an op with no outputs would be dropped silently.
    # Refusing to be traced makes dynamo run the calling frame eagerly instead (fullgraph=True
    # fails). (torch.compiler.disable would do the same but imports torch._dynamo, and with it
    # triton, when mmkernels is imported.)
    if torch.compiler.is_compiling():
        raise RuntimeError("mmkernels.empty_cache() frees memory between steps: call it outside "
                           "torch.compile'd code")
    ops = _cpp.load()
    if ops is not None:
        ops.empty_cache()


__all__ = [
    "BackendUnavailableError",
    "empty_cache",
    "apply_lora",
    "available_backends",
    "cross_attention",
    "cross_attention_varlen",
    "infonce_loss",
    "lora",
    "lora_linear",
    "nn",
    "siglip_loss",
    "unavailable_reasons",
    "use_backend",
]
