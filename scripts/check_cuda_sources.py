#!/usr/bin/env python3
"""Compiles every CUDA source of the kernels crate with NVRTC, as the `cuda` build does at run
time, so a syntax or type error fails CI on a machine without a GPU or CUDA toolkit.

    check_cuda_sources.py LIBNVRTC [KERNELS_DIR]

Each kernels/cuda/*.cu is compiled after kernels/cuda/prelude.cuh (prepended, as the Rust side
does) for every architecture in ARCHS; the kernel names the Rust side launches (quoted in
kernels/src/cuda/sources.rs) must all be entry points of the PTX of their source.
"""
import ctypes
import pathlib
import re
import sys

ARCHS = ["compute_80", "compute_90"]


def main() -> int:
    lib = ctypes.CDLL(sys.argv[1])
    root = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else pathlib.Path(__file__).parent.parent / "kernels")
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    prelude = (root / "cuda" / "prelude.cuh").read_text()
    wanted = launched_names(root / "src" / "cuda" / "sources.rs")
    sources = sorted((root / "cuda").glob("*.cu"))
    if not sources:
        print(f"check_cuda_sources: no .cu files under {root / 'cuda'}", file=sys.stderr)
        return 1
    failed = 0
    for path in sources:
        src = prelude + "\n#line 1 \"" + path.name + "\"\n" + path.read_text()
        for arch in ARCHS:
            ok, log, ptx = compile(lib, src, path.name, arch)
            if not ok:
                print(f"check_cuda_sources: {path.name} ({arch}) does not compile:\n{log}", file=sys.stderr)
                failed += 1
                continue
            entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
            missing = sorted(set(wanted.get(path.stem, [])) - entries)
            if missing:
                print(f"check_cuda_sources: {path.name}: kernels launched from Rust but not defined: {missing}",
                      file=sys.stderr)
                failed += 1
            elif arch == ARCHS[0]:
                print(f"check_cuda_sources: {path.name}: {len(entries)} kernels, PTX {len(ptx)} bytes "
                      f"({', '.join(ARCHS)}; NVRTC {major.value}.{minor.value})")
    unknown = sorted(set(wanted) - {p.stem for p in sources})
    if unknown:
        print(f"check_cuda_sources: sources.rs names sources that do not exist: {unknown}", file=sys.stderr)
        failed += 1
    return 1 if failed else 0


def launched_names(sources_rs: pathlib.Path) -> dict:
    """{source stem: [kernel names]} from the `("stem", &["name", ...])` table in sources.rs."""
    table = {}
    for stem, names in re.findall(r'\(\s*"(\w+)",\s*&\[([^\]]*)\]', sources_rs.read_text()):
        table[stem] = re.findall(r'"(\w+)"', names)
    if not table:
        raise SystemExit(f"check_cuda_sources: no kernel table found in {sources_rs}")
    return table


def compile(lib, src: str, name: str, arch: str):
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None)
    if rc != 0:
        return False, f"nvrtcCreateProgram returned {rc}", ""
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = ""
    if rc == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, buf)
        ptx = buf.value.decode()
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, log.value.decode(errors="replace"), ptx


if __name__ == "__main__":
    sys.exit(main())
