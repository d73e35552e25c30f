"""bignlp_fast: fused CPU, CUDA and Triton kernels for NLP models in PyTorch.

    import bignlp_fast
    out, h = bignlp_fast.ops.add_layer_norm(x, residual, weight, bias)
    bignlp_fast.report()        # fallbacks to the torch reference so far
    bignlp_fast.info()          # versions, build flags, backends per op
    bignlp_fast.optimize(model) # swap torch.nn layers (and HF attention) for the fused ones, in place
    bignlp_fast.steady_allocator()  # a long-running CPU process: reuse freed memory, no page faults

With transformers installed, ``attn_implementation="bignlp_fast"`` is registered (lazily: see bignlp_fast.hf).
"""

from bignlp_fast import hf, models, nn, ops
from bignlp_fast._backend import BACKENDS, BackendError, build_info, report, reset_report, steady_allocator
from bignlp_fast._info import info
from bignlp_fast._optimize import OptimizeReport, optimize

hf.install()

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendError", "OptimizeReport", "build_info", "hf", "info", "models", "nn", "ops", "optimize",
           "report", "reset_report", "steady_allocator"]
