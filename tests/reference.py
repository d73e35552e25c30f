"""The numerical rule of the project (DESIGN.md, Numerics): compared with a float64 computation on
the same inputs, a fused backend's error may be at most twice PyTorch's own error in that dtype,
plus a small absolute floor."""

import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def max_err(t: torch.Tensor, ref64: torch.Tensor) -> float:
    return (t.double() - ref64).abs().max().item() if t.numel() else 0.0


def assert_within_torch_error(name: str, ours: torch.Tensor, theirs: torch.Tensor, ref64: torch.Tensor,
                              dtype: torch.dtype) -> None:
    """``ours`` (fused) and ``theirs`` (PyTorch in the same dtype) against the float64 ``ref64``."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != PyTorch's {theirs.dtype}"
    e_ours, e_torch = max_err(ours, ref64), max_err(theirs, ref64)
    bound = 2 * e_torch + FLOOR[dtype] * max(1.0, ref64.abs().max().item() if ref64.numel() else 1.0)
    assert e_ours <= bound, f"{name}: error {e_ours:.3g} vs float64 exceeds {bound:.3g} (PyTorch's own: {e_torch:.3g})"
