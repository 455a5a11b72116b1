"""Build script: the pure-Python package, ``kernels/`` as ``nest_fast.kernels``, and the mel-frontend extensions.

* ``nest_fast._C``: C++ (CPU) sources in ``csrc/*.cpp``, always built when there are any.
* ``nest_fast._C_cuda``: CUDA sources in ``csrc/cuda/*.cu`` (+ ``csrc/cuda/*.cpp``), built only when the
  installed torch has CUDA and nvcc is found (``CUDAExtension`` cannot even be constructed otherwise).

Install with ``pip install --no-build-isolation .`` so the build uses the torch already installed.
Set ``NEST_FAST_NO_EXT=1`` to skip every extension (pure-Python install).
"""

import glob
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, here) for p in paths)


def extensions():
    if os.environ.get("NEST_FAST_NO_EXT"):
        return [], {}
    cpp = _rel(glob.glob(os.path.join(here, "csrc", "*.cpp")))
    cu = _rel(glob.glob(os.path.join(here, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(here, "csrc", "cuda", "*.cpp")))
    if not cpp and not cu:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # torch is needed to build the extensions; install it first
        print("nest_fast: torch not importable, building without the C++ extension")
        return [], {}
    exts = []
    cxx = ["-O3", "-std=c++20"]
    if cpp:
        exts.append(cpp_extension.CppExtension("nest_fast._C", cpp, extra_compile_args={"cxx": cxx + ["-fopenmp"]},
                                               extra_link_args=["-fopenmp"]))
    if cu and torch.version.cuda and cpp_extension.CUDA_HOME:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        exts.append(cpp_extension.CUDAExtension(
            "nest_fast._C_cuda", cu,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-std=c++20"]}))
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["nest_fast", "nest_fast.*"]) + ["nest_fast.kernels"],
    package_dir={"nest_fast": "nest_fast", "nest_fast.kernels": "kernels"},
    package_data={"nest_fast": ["configs/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
