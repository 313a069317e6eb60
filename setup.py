"""Build: the native library of csrc/ (CUDA or its CPU twin), then the Cython modules of kvbm/_fast.

Order: `build_ext` first compiles csrc/ into one static library, `libkvbm_native.a` under the build
temp folder (nvcc for csrc/cuda/*.cu when nvcc is found and KVBM_NO_CUDA is unset; otherwise
csrc/cpu/cuda_absent.cpp stands in), then links it into every extension of kvbm/_fast/*.pyx, the
way uvloop links libuv.a. The build log says which library was built; _build_info.py beside the
built extensions (build/lib*/kvbm/_fast, and so the wheel) records it and KVBM_DEBUG, and a change
of either rebuilds them.

Environment:
  KVBM_NO_CUDA=1        build the CPU library even where nvcc exists
  KVBM_CUDA_ARCHS="90"  semicolon/comma separated SM targets for nvcc (default: 90): SASS for each,
                        plus PTX of the highest, which the driver JIT-compiles on newer GPUs
  KVBM_DEBUG=1          compile the registry invariant checks in (-DKVBM_DEBUG, Cython asserts)
  CUDA_HOME             where to look for nvcc (default: PATH, then /usr/local/cuda)
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
INCLUDES = [os.path.join(CSRC, d) for d in ("include", "common", "third_party/xxhash")]
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-pthread"]
DEBUG = os.environ.get("KVBM_DEBUG", "") not in ("", "0")


def find_nvcc() -> str | None:
    if os.environ.get("KVBM_NO_CUDA", "") not in ("", "0"):
        return None
    candidates = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    return next((c for c in candidates if c and os.path.exists(c)), None)


def find_cudart_dirs(nvcc: str) -> list[str]:
    """Folders holding libcudart_static.a. nvcc may be a wrapper script outside the toolkit (as in
    /usr/local/bin here), so CUDA_HOME and /usr/local/cuda are asked before nvcc's own folder."""
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda",
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    for home in filter(None, homes):
        dirs = [d for d in (os.path.join(home, "lib64"), os.path.join(home, "targets/x86_64-linux/lib"))
                if os.path.exists(os.path.join(d, "libcudart_static.a"))]
        if dirs:
            return dirs
    raise RuntimeError(f"nvcc found at {nvcc} but no libcudart_static.a under {homes}; "
                       "set CUDA_HOME, or KVBM_NO_CUDA=1 for the CPU build")


def cuda_arch_flags() -> list[str]:
    """SASS for each arch of KVBM_CUDA_ARCHS, plus PTX of the highest one: a newer GPU than any
    listed then JIT-compiles that PTX at first load instead of failing with "no kernel image".
    An arch-specific target (90a, 100f) has PTX that only its own arch runs, so the PTX is of its
    plain number (compute_90)."""
    raw = (os.environ.get("KVBM_CUDA_ARCHS") or "90").replace(",", ";").split(";")
    archs = [a.strip() for a in raw if a.strip()]
    bad = [a for a in archs if not re.fullmatch(r"\d+[af]?", a)]
    if not archs or bad:
        raise SystemExit(f"KVBM_CUDA_ARCHS={os.environ.get('KVBM_CUDA_ARCHS')!r}: expected SM numbers "
                         f"such as '80;90' (optionally with an a/f suffix), got {bad or 'none'}")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    top = max(int(a.rstrip("af")) for a in archs)
    flags.append(f"-gencode=arch=compute_{top},code=compute_{top}")
    return flags


def run(cmd: list[str]) -> None:
    print("kvbm build:", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


class BuildNative(build_ext):
    """Compiles csrc/ to a static library before the Cython extensions link it."""

    def build_extensions(self) -> None:
        nvcc = find_nvcc()
        out = os.path.join(os.path.abspath(self.build_temp), "kvbm_native")
        os.makedirs(out, exist_ok=True)
        cxx = os.environ.get("CXX", "g++")
        sources = sorted(glob.glob(os.path.join(CSRC, "common", "*.cpp")))
        sources += sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
        cu_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))) if nvcc else []
        if nvcc and not cu_sources:
            print("kvbm build: nvcc found but csrc/cuda has no sources; building the CPU library")
            nvcc = None
        if nvcc:
            sources = [s for s in sources if not s.endswith("cuda_absent.cpp")]
        defines = ["-DKVBM_DEBUG"] if DEBUG else []
        objects = []
        for src in sources:
            obj = os.path.join(out, os.path.basename(src) + ".o")
            run([cxx, *CXXFLAGS, *defines, *[f"-I{i}" for i in INCLUDES], "-c", src, "-o", obj])
            objects.append(obj)
        cuda_lib_dirs: list[str] = []
        for src in cu_sources:
            obj = os.path.join(out, os.path.basename(src) + ".o")
            run([nvcc, "-O3", "--std=c++17", "-Xcompiler", "-fPIC", *cuda_arch_flags(), *defines,
                 *[f"-I{i}" for i in INCLUDES], "-c", src, "-o", obj])
            objects.append(obj)
        if nvcc:
            cuda_lib_dirs = find_cudart_dirs(nvcc)
        lib = os.path.join(out, "libkvbm_native.a")
        if os.path.exists(lib):
            os.remove(lib)
        run(["ar", "rcs", lib, *objects])
        kind = "CUDA (" + ", ".join(cuda_arch_flags()) + ")" if nvcc else "CPU (no nvcc or KVBM_NO_CUDA=1)"
        print(f"kvbm build: native library = {kind}", flush=True)
        # build_ext rebuilds an extension only when its .pyx/.cpp is newer than the .so, so after a
        # switch of KVBM_DEBUG or of the library an in-place .so would silently keep the old build.
        # _build_info.py beside the .so files records the configuration they were built with; a
        # change forces the rebuild; it is written once they are built.
        info = (f'"""Written by setup.py: the configuration the extensions here were built with."""\n'
                f'BUILD_KIND = {"cuda" if nvcc else "cpu"!r}\nDEBUG = {DEBUG!r}\nNATIVE = {kind!r}\n')
        info_path = os.path.join(os.path.dirname(self.get_ext_fullpath(self.extensions[0].name)),
                                 "_build_info.py")
        if not os.path.exists(info_path) or open(info_path).read() != info:
            self.force = True
        for ext in self.extensions:
            ext.extra_objects = [lib]
            # Static cudart: no run-time search for libcudart; it shares the driver's primary
            # context with torch's own cudart, so CUDA IPC handles and pointers mix freely.
            ext.library_dirs = cuda_lib_dirs
            ext.libraries = (["cudart_static", "rt", "dl"] if nvcc else []) + ["pthread"]
        super().build_extensions()
        with open(info_path, "w") as fh:
            fh.write(info)


def extensions() -> list[Extension]:
    exts = []
    for pyx in sorted(glob.glob(os.path.join("kvbm", "_fast", "*.pyx"))):
        name = pyx[:-4].replace(os.sep, ".")
        exts.append(Extension(name, [pyx], include_dirs=[*INCLUDES, numpy.get_include()],
                              language="c++", extra_compile_args=["-O3", "-std=c++17"],
                              define_macros=[("KVBM_DEBUG", "1")] if DEBUG else []))
    return cythonize(exts, language_level=3,
                     compile_time_env={"KVBM_DEBUG": DEBUG},
                     compiler_directives={"boundscheck": True, "wraparound": True})


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildNative})
