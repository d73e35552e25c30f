"""Where ops.linear beats F.linear on this machine: the sweep behind ops.linear's rule.

    .venv/bin/python -P benchmarks/linear_rule_sweep.py [--dtype float32] [--backward] [--transposed]
        [--rows 17,32,64,128,256,1024] [--weights 512x2048,768x768,768x3072,256x256]

For each product [rows, K] x [K, N] it times F.linear and ops.linear(backend="cpu") (the project's
GEMM, whatever the rule says) in this process, in turns (bench's time_interleaved), and prints the median ratio of three
rounds (> 1: ops.linear is faster) beside what ``linear_is_faster`` chooses for it. A row where the
ratio and the choice disagree is a place to recalibrate the rule (bignlp_fast/ops/linear.py) for this
class of CPU. Timings on a shared machine are noisy: repeat, and trust only clear margins.
"""

from __future__ import annotations

import argparse
import importlib
import torch
import torch.nn.functional as F

from bignlp_fast import _backend
from bignlp_fast.bench.runner import time_interleaved

lin = importlib.import_module("bignlp_fast.ops.linear")  # the module (ops.linear is also the function)


def _pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--transposed", action="store_true", help="weights stored [K, N] (GPT-2's Conv1D)")
    parser.add_argument("--rows", default="17,32,64,128,256,1024")
    parser.add_argument("--weights", default="512x2048,768x768,768x3072,256x256", help="K x N, comma-separated")
    parser.add_argument("--calls", type=int, default=40, help="timed calls per side and round")
    args = parser.parse_args()
    if _backend.unavailable("cpu", torch.device("cpu")) is not None:
        raise SystemExit("the CPU kernels are not built: ops.linear cannot run")
    dtype = getattr(torch, args.dtype)
    _backend.steady_allocator()
    build = _backend.build_info().get("cpu_capability")
    print(f"{_backend.cpu_vendor() or 'CPU'}, {torch.get_num_threads()} threads, build {build}, "
          f"{args.dtype}, {'forward + backward' if args.backward else 'forward'}"
          f"{', weights stored [K, N]' if args.transposed else ''}")
    print(f"{'rows':>5} {'K':>5} {'N':>5} {'F.linear us':>12} {'ops.linear us':>14} {'ratio':>6}  rule")
    for k, n in _pairs(args.weights):
        for rows in (int(r) for r in args.rows.split(",")):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(rows, k, generator=g).to(dtype).requires_grad_(args.backward)
            w = (torch.randn(k, n, generator=g).to(dtype).t() if args.transposed
                 else torch.randn(n, k, generator=g).to(dtype)).requires_grad_(args.backward)
            b = torch.randn(n, generator=g).to(dtype).requires_grad_(args.backward)
            dy = torch.randn(rows, n, generator=g).to(dtype)

            def step(f):
                if args.backward:
                    return lambda: torch.autograd.grad(f(x, w, b), (x, w, b), dy)
                return lambda: f(x, w, b)

            with torch.set_grad_enabled(args.backward):
                rounds = []
                for _ in range(3):
                    ref, ours = time_interleaved([step(F.linear), step(lambda *a: lin.linear(*a, backend="cpu"))],
                                                 torch.device("cpu"), args.calls)
                    rounds.append((ref / ours, ref * 1e6, ours * 1e6))
                ratio, ref, ours = sorted(rounds)[1]
                choice = "ops.linear" if lin.linear_is_faster(x, w) else "F.linear"
            print(f"{rows:>5} {k:>5} {n:>5} {ref:>12.0f} {ours:>14.0f} {ratio:>5.2f}x  {choice}", flush=True)


if __name__ == "__main__":
    main()
