"""Build of bignlp_fast and its one compiled module, bignlp_fast._C.

CPU sources (csrc/cpu/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu) are built when the
installed torch has CUDA and nvcc is found, unless forced with BIGNLP_FAST_CUDA=0|1.

Environment variables read here:
  BIGNLP_FAST_CUDA       0: no CUDA sources; 1: CUDA sources or fail; unset: when possible
  BIGNLP_FAST_CPU_ARCH   -march for the CPU kernels: "native" (default), "none" (compiler
                         default, portable), or any gcc -march value such as "x86-64-v3"
  TORCH_CUDA_ARCH_LIST   CUDA targets; default "8.0;9.0" so a build takes minutes
  MAX_JOBS               parallel compile jobs (ninja)
  CUDA_HOME              CUDA toolkit; default /usr/local/cuda when it exists
"""

import glob
import os
import shlex
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# torch.utils.cpp_extension reads CUDA_HOME when it is imported; nvcc on PATH alone may point at a
# wrapper whose parent has no lib64/, and then the link step does not find cudart.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> bool:
    flag = os.environ.get("BIGNLP_FAST_CUDA", "").strip().lower()
    possible = torch.version.cuda is not None and CUDA_HOME is not None and os.path.exists(
        os.path.join(CUDA_HOME, "bin", "nvcc"))
    if flag not in ("", "0", "1", "false", "true", "no", "yes", "off", "on"):
        sys.exit(f"BIGNLP_FAST_CUDA={flag!r}: expected 0 / 1 (or false / true, no / yes, off / on), or unset")
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if not possible:
            sys.exit("BIGNLP_FAST_CUDA=1 but torch has no CUDA (torch.version.cuda=%r) or nvcc was not "
                     "found under CUDA_HOME=%r" % (torch.version.cuda, CUDA_HOME))
        return True
    return possible


def _cpu_arch_flags() -> list[str]:
    arch = os.environ.get("BIGNLP_FAST_CPU_ARCH", "native").strip()
    return [] if arch in ("", "none") else [f"-march={arch}"]


def _cpu_capability(arch_flags: list[str]) -> str:
    """The at::vec level the compiler targets with these flags: AVX512, AVX2 or DEFAULT.

    ATen's vector headers pick their implementation from CPU_CAPABILITY_* macros, not from the
    compiler's own __AVX512F__, so we ask the compiler what it targets and define the macro to match.
    """
    cxx = os.environ.get("CXX", "c++")
    try:
        macros = subprocess.run([*shlex.split(cxx), *arch_flags, "-dM", "-E", "-x", "c++", os.devnull],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "DEFAULT"
    has = lambda m: f"#define {m} " in macros  # noqa: E731
    if all(has(m) for m in ("__AVX512F__", "__AVX512BW__", "__AVX512VL__", "__AVX512DQ__", "__FMA__")):
        return "AVX512"
    if has("__AVX2__") and has("__FMA__"):
        return "AVX2"
    return "DEFAULT"


def _extension():
    with_cuda = _want_cuda()
    arch_flags = _cpu_arch_flags()
    capability = _cpu_capability(arch_flags)
    cpu_flags = ["-O3", "-fopenmp", *arch_flags]
    macros = [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}",
              f'-DBIGNLP_FAST_CPU_FLAGS="{" ".join(cpu_flags)}"',
              f'-DBIGNLP_FAST_CPU_CAPABILITY="{capability}"']
    if capability == "DEFAULT":
        macros = macros[2:]  # ATen's scalar fallback is selected by defining nothing
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    extra = {"cxx": cpu_flags + macros}
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        extra["cxx"].append("-DBIGNLP_FAST_WITH_CUDA")
        extra["cxx"].append(f'-DBIGNLP_FAST_CUDA_ARCHS="{arch_list}"')
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo", "-DBIGNLP_FAST_WITH_CUDA",
                         "--expt-relaxed-constexpr"]
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension
    print(f"bignlp_fast: CUDA sources {'on' if with_cuda else 'off'}; CPU kernels {' '.join(cpu_flags)} "
          f"(at::vec {capability})", file=sys.stderr)
    return ext_cls("bignlp_fast._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                   extra_compile_args=extra, extra_link_args=["-fopenmp"])


setup(
    # every package under bignlp_fast/ (a hand-kept list once left out bignlp_fast.models: the
    # non-editable install could not import), plus kernels/ installed as bignlp_fast.kernels
    packages=find_packages(include=["bignlp_fast", "bignlp_fast.*"]) + ["bignlp_fast.kernels"],
    package_dir={"bignlp_fast.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
