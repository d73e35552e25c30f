"""Builds csrc/cuda/*.cu for the CPU emulation of emu.h, as the module ``bignlp_fast_cuda_emu``.

The sources are rewritten into build/cuda_emu/src (line for line, with ``#line`` pointing back at csrc, so
errors and the emulation's messages name the original lines) and compiled by the host compiler with
torch.utils.cpp_extension.load; headers named like CUDA's resolve to tests/cuda_emu/include. The rewrite:

- ``kernel<<<grid, block[, shared[, stream]]>>>(args)`` -> ``::emu::launch(kernel, grid, block, ...)(args)``
- ``extern __shared__ T name[];`` -> ``T* name = static_cast<T*>(::emu::dynamic_shared());``
- ``__shared__ T name[...];`` gets ``::emu::poison_static_shared(&name, sizeof(name));`` after it, and
  an ``alignas`` after ``__shared__`` moves in front of it (C++ puts attributes first)
- ``asm("op.with.dots ...;" : "=f"(out) : "f"(in))`` -> ``::emu::ptx::op_with_dots(out, in);``
- ``.is_cuda()`` -> ``.is_cpu()`` (the emulated kernels run on CPU tensors)
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "cuda_emu"
NAME = "bignlp_fast_cuda_emu"

_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:(?:__align__|alignas)\(\s*\d+\s*\)\s+)?(?P<type>[\w:]+(?:\s+[\w:]+)*?)\s+"
    r"(?P<name>\w+)\s*\[\s*\]\s*;")
_SHARED_ALIGN = re.compile(r"__shared__\s+(?P<align>(?:__align__|alignas)\(\s*\d+\s*\))")
_STATIC_SHARED = re.compile(r"(?P<decl>__shared__\s+[\w:\s<>,]*?\b(?P<name>\w+)\s*(?:\[[^\]]*\])+\s*;)")
_ASM = re.compile(
    r"asm\s*(?:volatile\s*)?\(\s*\"(?P<op>[\w.]+)[^\"]*\"\s*:\s*\"=\w\"\((?P<out>[^)]*)\)\s*:\s*(?P<ins>[^;]*?)\)\s*;")
_ASM_INPUT = re.compile(r"\"\w\"\((?P<arg>[^)]*)\)")


def _kernel_start(src: str, end: int) -> int:
    """Where the kernel expression ending at ``end`` (a name, maybe qualified, maybe with template
    arguments) begins."""
    j = end
    if src[j - 1] == ">":
        depth = 0
        while True:
            j -= 1
            depth += {">": 1, "<": -1}.get(src[j], 0)
            if depth == 0:
                break
    while j > 0 and (src[j - 1].isalnum() or src[j - 1] in "_:"):
        j -= 1
    if j == end:
        raise ValueError(f"cuda emulation: no kernel name before <<< at offset {end}")
    return j


def _rewrite_launches(src: str) -> str:
    out, pos = [], 0
    while (i := src.find("<<<", pos)) >= 0:
        end = i
        while src[end - 1].isspace():
            end -= 1
        start = _kernel_start(src, end)
        close = src.index(">>>", i)
        # the whitespace between the kernel and <<< is kept, so the line numbers stay
        out += [src[pos:start], "::emu::launch(", src[start:end], ",", src[end:i], src[i + 3:close], ")"]
        pos = close + 3
    out.append(src[pos:])
    return "".join(out)


def _rewrite_asm(m: re.Match) -> str:
    args = [m["out"].strip()] + [a.group("arg").strip() for a in _ASM_INPUT.finditer(m["ins"])]
    return f"::emu::ptx::{m['op'].replace('.', '_')}({', '.join(args)});"


def rewrite(src: str, path: Path) -> str:
    """The emulation's version of one CUDA source file (same lines)."""
    src = _rewrite_launches(src)
    src = _EXTERN_SHARED.sub(lambda m: f"{m['type']}* {m['name']} = static_cast<{m['type']}*>(::emu::dynamic_shared());",
                             src)
    src = _SHARED_ALIGN.sub(lambda m: f"{m['align']} __shared__", src)
    src = _STATIC_SHARED.sub(
        lambda m: f"{m['decl']} ::emu::poison_static_shared(&{m['name']}, sizeof({m['name']}));", src)
    src = _ASM.sub(_rewrite_asm, src)
    src = src.replace(".is_cuda()", ".is_cpu()")
    return f'#line 1 "{path}"\n{src}'


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def sources() -> list[Path]:
    """Rewrites csrc/cuda into build/cuda_emu/src; returns the files to compile."""
    out = [HERE / "emu.cpp", HERE / "bindings.cpp"]
    for path in sorted((CSRC / "cuda").iterdir()):
        if path.suffix not in (".cu", ".cuh"):
            continue
        target = BUILD / "src" / "cuda" / (path.stem + (".cpp" if path.suffix == ".cu" else ".cuh"))
        _write_if_changed(target, rewrite(path.read_text(), path))
        if path.suffix == ".cu":
            out.append(target)
    return out


ASAN_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer"]


def asan_runtime() -> str:
    """What a Python that loads an ``asan=True`` module must start with in LD_PRELOAD: the compiler's
    AddressSanitizer runtime, and libstdc++ after it (Python does not link it, and without it at
    start-up the runtime cannot intercept C++ exceptions, and ends the process at the first one). Run
    with ASAN_OPTIONS=detect_leaks=0: Python and torch keep memory until exit."""
    def library(name: str) -> str:
        path = subprocess.run([os.environ.get("CXX", "c++"), f"-print-file-name={name}"], capture_output=True,
                              text=True, check=True).stdout.strip()
        if not os.path.isabs(path):
            raise RuntimeError(f"cuda emulation: the compiler has no {name} (AddressSanitizer)")
        return os.path.realpath(path)

    return f"{library('libasan.so')} {library('libstdc++.so.6')}"


def _load(name: str, srcs: list[Path], verbose: bool, asan: bool):
    from torch.utils import cpp_extension

    if asan:
        if "libasan" not in os.environ.get("LD_PRELOAD", ""):  # loading it would end the process
            raise RuntimeError("cuda emulation: an AddressSanitizer build loads only in a Python started with "
                               f"LD_PRELOAD={asan_runtime()} (and ASAN_OPTIONS=detect_leaks=0)")
        name += "_asan"
    directory = BUILD / name
    directory.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    return cpp_extension.load(
        name=name,
        sources=[str(s) for s in srcs],
        extra_include_paths=[str(HERE / "include"), str(BUILD / "src"), str(CSRC)],
        extra_cflags=["-O1" if asan else "-O2", "-std=c++20", "-DBIGNLP_FAST_WITH_CUDA", "-fno-strict-aliasing",
                      "-w"] + (ASAN_FLAGS if asan else []),
        extra_ldflags=ASAN_FLAGS if asan else [],
        build_directory=str(directory),
        verbose=verbose,
    )


def load(verbose: bool = False, asan: bool = False):
    """The compiled emulation module (built on first use, then from build/cuda_emu while nothing changed).
    ``asan``: compiled with AddressSanitizer, so that a kernel's access outside a tensor's memory is
    reported (needs :func:`asan_runtime` preloaded)."""
    return _load(NAME, sources(), verbose, asan)


def load_selftest(verbose: bool = False, asan: bool = False):
    """The emulation's own test kernels (selftest.cu), compiled the same way."""
    target = BUILD / "src" / "selftest.cpp"
    path = HERE / "selftest.cu"
    _write_if_changed(target, rewrite(path.read_text(), path))
    return _load(NAME + "_selftest", [HERE / "emu.cpp", target], verbose, asan)
