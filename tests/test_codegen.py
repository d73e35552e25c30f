"""The compiled GEMM micro-kernels keep their operands in registers.

A register tile is only as fast as the code GCC makes of it. Inlined into a large loop, the fp32 GEMM's
8-row tile once had a B vector spilled to the stack and reloaded by every FMA (ten 64-byte loads for
sixteen FMAs a k): nothing failed, and on a Zen 4 ops.linear ran at 71% of the FMA peak, behind MKL,
until a profile showed it (docs/performance-notes.md, session 45). This test reads the built
extension's machine code and fails where a GEMM kernel's multiply-adds take an operand from the stack.
"""

import platform
import re
import shutil
import subprocess

import pytest

import bignlp_fast._C as C

# demangled names of the functions that hold the GEMM tiles' inner loops (gemm.h), and the depthwise
# convolution's per-plane loops (conv.cpp), whose weight-gradient sums once lived on the stack too
KERNELS = ("gemm_detail::tile<", "gemm_detail::tile_bf16<", "gemm_detail::micro_panel_tiles",
           "gemm_detail::packed_gemm_tasks<", "cpu::small_gemm", "depthwise_fwd_planes<", "depthwise_bwd_planes<")
MULTIPLY_ADD = re.compile(r"\s(vfn?madd\d{3}ps|vdpbf16ps)\s")
STACK_OPERAND = re.compile(r"\(%rsp\)")


def _functions(so_path):
    """{demangled name: [instruction lines]} of the extension's code (objdump -d)."""
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", so_path], capture_output=True, text=True,
                         check=True).stdout
    functions, name = {}, None
    for line in out.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            name = head.group(1)
            functions[name] = []
        elif name is not None and line.strip():
            functions[name].append(line)
    return functions


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_gemm_tiles_multiply_adds_read_no_spilled_vector():
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("reads x86-64 machine code")
    if "fma" not in C.build_info().get("cpu_isa", []):
        pytest.skip("the CPU kernels were built without FMA (BIGNLP_FAST_CPU_FLAGS): no multiply-adds to read")
    functions = _functions(C.__file__)
    kernels = {name: lines for name, lines in functions.items() if any(k in name for k in KERNELS)}
    fmas = {name: [l for l in lines if MULTIPLY_ADD.search(l)] for name, lines in kernels.items()}
    # the check must see the kernels it guards: the fp32 GEMM's tiles, called out of line, are in every build
    assert any("gemm_detail::micro_panel_tiles" in n for n in kernels), sorted(kernels)[:20]
    assert sum(map(len, fmas.values())) > 100
    spilled = {name: [l.strip() for l in lines if STACK_OPERAND.search(l)] for name, lines in fmas.items()}
    spilled = {name: lines for name, lines in spilled.items() if lines}
    assert not spilled, "\n".join(f"{name[:160]}: {len(lines)} multiply-adds read the stack, e.g. {lines[0]}"
                                  for name, lines in spilled.items())
