"""`bignlp-fast info | bench | triton-compile`: what is built and usable here, how fast it is against
PyTorch, and whether the Triton kernels compile and fit a given GPU (without one)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from typing import Optional

import torch


def _cpu_name() -> str:
    from bignlp_fast._backend import cpuinfo
    return cpuinfo("model name") or platform.processor() or platform.machine()


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{_cpu_name()}, {torch.get_num_threads()} threads ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}"


def _info(args) -> int:
    from bignlp_fast import info
    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"bignlp_fast {data['bignlp_fast']}  python {data['python']}  torch {data['torch']} "
          f"(CUDA {data['torch_cuda']})  triton {data['triton']}"
          + ("  [TRITON_INTERPRET=1]" if data["triton_interpret"] else ""))
    print(f"machine: {machine()}; GPU: {data['gpu'] or 'none'}")
    print(f"fp32 GEMMs on the CPU (nn.Linear, the models, RNN input projections): {data['fp32_projection_gemm']}")
    print(f"rows ops.linear multiplies without packing the weight: up to {data['linear_streaming_rows']} "
          f"({data['linear_streaming_rows_prepacked']} for a weight packed once by ops.prepack)")
    print(f"bf16 GEMMs on the CPU (nn.Linear, the models, RNN input projections): {data['bf16_gemm']}")
    print(f"bf16 attention tiles on the CPU: {data['bf16_tiles']}")
    print(f"fp32 convolutions on the CPU: {data['conv_main_loops']}")
    cache = data["cpu_buffer_cache"]
    if cache is not None:
        mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
        print(f"CPU buffer cache (BIGNLP_FAST_CPU_CACHE_MB): {mib(cache['cached_bytes'])} held in "
              f"{cache['cached_buffers']} buffers, limit {mib(cache['limit_bytes'])}; {cache['hits']} hits, "
              f"{cache['misses']} misses")
    print("extension build:")
    for k, v in data["build"].items():
        print(f"  {k}: {v}")
    print("backends per op: [dtypes it runs] usable on this machine?")
    for op, backends in data["ops"].items():
        print(f"  {op}")
        for name, row in backends.items():
            print(f"    {name:<7} [{row['dtypes']}] {row['usable']}")
    print("fallbacks to the torch reference in this process:", "none" if not data["fallbacks"] else "")
    for f in data["fallbacks"]:
        print(f"  {f['op']}: {f['backend']} -> torch x{f['count']}: {f['reason']}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _writable(path: Optional[str], option: str, command: str) -> bool:
    """Whether ``path`` (if given) can be written, said before a long run rather than after it."""
    if path is None:
        return True
    folder = os.path.dirname(os.path.abspath(path)) if path else ""
    if os.path.isdir(path):
        problem = "is a folder"
    elif not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        problem = f"is not in a writable folder ({folder or 'no path given'})"
    else:  # tried for real: the folder's permission bits do not bind root, and /proc takes no new files
        existed = os.path.exists(path)
        try:
            with open(path, "a"):
                pass
        except OSError as e:
            problem = f"cannot be written ({e.strerror})"
        else:
            if not existed:
                os.remove(path)
            return True
    print(f"bignlp-fast {command}: {option} {path!r} {problem}", file=sys.stderr)
    return False


def select(suite: str, filters: Optional[list[str]]) -> list:
    """The suite's cases whose id contains any of ``filters`` (every case without filters)."""
    from bignlp_fast.bench import cases
    return [c for c in cases(suite) if not filters or any(f in c.id for f in filters)]


def _bench(args) -> int:
    from bignlp_fast.bench import copy_gbps, format_table, run_case
    from bignlp_fast import _backend
    from bignlp_fast._backend import steady_allocator
    from bignlp_fast.bench.runner import gemm_gflops, plot, pyplot
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bignlp-fast bench: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    if args.suite == "gpu" and device.type != "cuda":
        print("bignlp-fast bench: the --gpu suite is sized for a GPU; it needs --device cuda", file=sys.stderr)
        return 2
    selected = select(args.suite, args.filter)
    if not selected:
        print(f"bignlp-fast bench: no case in suite {args.suite!r} matches {' or '.join(args.filter)!r}",
              file=sys.stderr)
        return 2
    skipped = []  # (case, why): what the named backend cannot run, said instead of a traceback mid-run
    if args.backend:
        runnable = []
        for case in selected:
            name, _, reasons = _backend.plan(_backend.OPS[case.op], device, case.dtype, args.backend)
            (runnable.append(case) if name is not None else skipped.append((case.id, reasons[0][1])))
        selected = runnable
        if not selected:
            print(f"bignlp-fast bench: backend {args.backend!r} can run none of the selected cases on {device}: "
                  f"{skipped[0][1]}", file=sys.stderr)
            return 2
    if args.plot:
        pyplot()  # before the run, not after it: a missing matplotlib is said at once
    if not (_writable(args.json, "--json", "bench") and _writable(args.plot, "--plot", "bench")):
        return 2
    steady = steady_allocator()
    print(f"machine: {machine()}" + ("" if steady else " (allocator not pinned: expect noisier timings)"), flush=True)
    rate = copy_gbps(device)
    gemm_rate = gemm_gflops(device) if any(c.flops for c in selected) else None
    rows = []
    for case in selected:
        try:
            rows.append(run_case(case, device, args.backend, repeats=args.repeats))  # copy measured around it
        except _backend.BackendError as e:  # a limit of the call (a head_dim), not of the dtype or device
            skipped.append((case.id, str(e)))
            print(f"  {case.id}: skipped: {e}", file=sys.stderr, flush=True)
            continue
        print(f"  {case.id}: {rows[-1].speedup:.2f}x", file=sys.stderr, flush=True)
    if not rows:
        print(f"bignlp-fast bench: every selected case was skipped: {skipped[0][1]}", file=sys.stderr)
        return 2
    print(format_table(rows, rate, gemm_rate))
    for case_id, why in skipped:
        print(f"skipped {case_id}: {why}")
    slower = [r.case for r in rows if r.speedup < 1]
    if slower:
        print(f"slower than PyTorch in this run: {', '.join(slower)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "device": str(device), "copy_gbps": rate, "sgemm_gflops": gemm_rate,
                       "rows": [dataclasses.asdict(r) for r in rows],
                       "skipped": [{"case": c, "reason": why} for c, why in skipped]}, fh, indent=2)
    if args.plot:
        plot(rows, args.plot)
    return 0


def _triton_compile(args) -> int:
    if not _writable(args.json, "--json", "triton-compile"):
        return 2
    # The kernels are compiled here, not interpreted: Triton reads this when they are first imported.
    if os.environ.pop("TRITON_INTERPRET", "0") == "1":
        print("bignlp-fast triton-compile: ignoring TRITON_INTERPRET=1 (this command compiles)", file=sys.stderr)
    from bignlp_fast import triton_compile
    dtypes = tuple(getattr(torch, d) for d in args.dtype)
    rows = []
    for arch in args.arch:
        rows += triton_compile.check(arch, dtypes, args.filter, args.workers)
    if not rows:
        print(f"bignlp-fast triton-compile: no case matches {args.filter!r}", file=sys.stderr)
        return 2
    print(triton_compile.format_table(rows))
    problems = [r for r in rows if r.problems]
    spills = [r for r in rows if r.spill_bytes]
    print(f"{len(rows)} kernels compiled for {', '.join(f'sm_{a}' for a in args.arch)}: "
          f"{len(problems)} would not launch, {len(spills)} spill registers")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([dict(dataclasses.asdict(r), problems=r.problems) for r in rows], fh, indent=2)
    return 1 if problems else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bignlp-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, build flags, backends per op, fallbacks")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_info.set_defaults(func=_info)
    p_bench = sub.add_parser("bench", help="time every case against the PyTorch reference")
    suite = p_bench.add_mutually_exclusive_group()
    suite.add_argument("--quick", dest="suite", action="store_const", const="quick", help="the quick suite (default)")
    suite.add_argument("--full", dest="suite", action="store_const", const="full", help="every case")
    suite.add_argument("--gpu", dest="suite", action="store_const", const="gpu",
                       help="GPU-sized cases (attention at D 128 and 512 to 16k tokens, the RNNs, convolutions, "
                            "TextCNN, BERT and GPT-2, in bf16 and fp32); needs a CUDA device")
    p_bench.set_defaults(suite="quick", func=_bench)
    p_bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p_bench.add_argument("--backend", choices=["cpu", "cuda", "triton", "torch"], help="default: automatic")
    p_bench.add_argument("--filter", action="append",
                         help="only cases whose id contains this text (repeat it for cases that match any)")
    p_bench.add_argument("--repeats", type=_positive_int, default=15, help="timed calls per side (median reported)")
    p_bench.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    p_bench.add_argument("--plot", metavar="FILE.png", help="bar chart of speedups (needs matplotlib)")
    p_tc = sub.add_parser("triton-compile", help="compile every Triton kernel for a GPU architecture (no GPU "
                          "needed) and check its registers, spills and shared memory against that GPU")
    p_tc.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 86, 89, 90],
                      help="compute capabilities to compile for (default: 80 90)")
    p_tc.add_argument("--dtype", nargs="+", default=["float32", "float16", "bfloat16"],
                      choices=["float32", "float16", "bfloat16"], help="input dtypes (default: all three)")
    p_tc.add_argument("--filter", help="only cases whose name (e.g. 'attention D128 causal bfloat16') contains this")
    p_tc.add_argument("--workers", type=_positive_int, help="compiler processes (default: one per CPU)")
    p_tc.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    p_tc.set_defaults(func=_triton_compile)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`bignlp-fast info | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE, a shell's status for it
