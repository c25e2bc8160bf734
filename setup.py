"""Builds the native extension rlhf_fast._C from csrc/.

The C++ part is always built; the CUDA part only where torch has CUDA and nvcc is found. The build never
fails the install for lack of CUDA: it prints what it skipped.
"""

import glob
import os

from setuptools import setup


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("rlhf_fast: torch not importable at build time; skipping rlhf_fast._C")
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    if not cpp:
        return [], {}
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    with_cuda = bool(cu) and torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("RLHF_FAST_NO_CUDA") == "1":
        with_cuda = False
    if with_cuda:
        nvcc = ["-O3", "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80",
                "--use_fast_math"]
        ext = CUDAExtension("rlhf_fast._C", cpp + cu, define_macros=[("RLHF_FAST_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])
    else:
        if cu:
            print(f"rlhf_fast: building rlhf_fast._C without CUDA (torch.version.cuda={torch.version.cuda}, "
                  f"CUDA_HOME={CUDA_HOME}); skipped {', '.join(cu)}")
        ext = CppExtension("rlhf_fast._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
