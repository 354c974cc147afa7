"""Pack onnxruntime-gpu and onnxruntime-genai-cuda into one bundle small enough to carry to a lent GPU.

The lent GPU machines reach no package registry and one call carries at most 64 MiB; the
onnxruntime-gpu wheel alone is 255 MB, almost all of it the CUDA kernels of
``libonnxruntime_providers_cuda.so`` compiled for seven GPU architectures. This script keeps the
kernels one architecture can run and drops kernel families a GroupQueryAttention decoder with one
head size never launches, so that both packages fit in one call (about 52 MiB):

    python -m perf.device_bundle --out .whl            # then carry .whl (see perf/device_run.sh)

How the library is thinned, without changing its layout (every offset stays valid):

* ``.nv_fatbin`` holds one fatbin container per compiled source file, each with one entry per
  architecture (header: kind, header size, payload size, ..., arch). An entry the target GPU
  cannot run is zero-filled: the driver never picks it (a cubin runs only on GPUs of its major
  version and at least its minor one) and zeros compress to nothing.
* Of the target architecture's entries (zstd-compressed cubins), those whose every kernel is a MoE
  GEMM or a flash-attention kernel for another head size are zero-filled too, and relabelled to
  another architecture so the driver never reads them. A model that needs one of those kernels
  fails with "no kernel image is available" (or JIT-compiles it, slowly, where the library carries
  PTX for it; onnxruntime-gpu 1.31.1 carries none): build a bundle with ``--head-size`` for it.
* The TensorRT provider library is left out.

Needs ``zstd`` on PATH (to read kernel names) and pip. Reads no machine-specific path.
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

FATBIN_MAGIC = b"\x50\xed\x55\xba"
WHEELS = ("onnxruntime-gpu==1.31.1", "onnxruntime-genai-cuda==0.18.0")
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64"]


def _section(data: bytes | bytearray, name: str) -> tuple[int, int]:
    """(offset, size) of an ELF64 section."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple:
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)

    strings = header(shstrndx)[4]
    for i in range(shnum):
        h = header(i)
        end = data.index(b"\0", strings + h[0])
        if data[strings + h[0] : end].decode() == name:
            return h[4], h[5]
    raise ValueError(f"no {name} section")


def _entries(data: bytearray):
    """Yield (header offset, payload offset, payload size, kind, arch) of every fatbin entry."""
    pos, end = _section(data, ".nv_fatbin")
    end += pos
    while pos < end:
        if data[pos : pos + 4] != FATBIN_MAGIC:  # containers are 8-byte aligned, zero padding between
            if any(data[pos : pos + 8]):
                raise ValueError(f"unexpected bytes at {pos:#x} in .nv_fatbin")
            pos += 8
            continue
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        entry, stop = pos + header_size, pos + header_size + fat_size
        while entry < stop:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            if kind not in (1, 2):  # 1: PTX, 2: cubin
                raise ValueError(f"unknown fatbin entry kind {kind} at {entry:#x}")
            yield entry, entry + entry_header, payload, kind, arch
            entry += entry_header + payload
        if entry != stop:
            raise ValueError(f"fatbin container at {pos:#x} does not add up")
        pos = stop


def _kernel_names(payload: bytes) -> list[str]:
    out = subprocess.run(["zstd", "-d", "-c"], input=payload, capture_output=True, check=False).stdout
    return [m.decode() for m in re.findall(rb"_Z\w{8,}", out)]


def _unused(names: list[str], head_size: int) -> bool:
    """Whether a cubin holds only MoE GEMMs, or only flash-attention kernels for other head sizes."""
    if not names:
        return False
    if all("flash" in n for n in names):
        return not any(f"Flash_fwd_kernel_traitsILi{head_size}E" in n for n in names)
    if any("moe" in n.lower() for n in names):
        return all("moe" in n.lower() or "GroupProblemShape" in n for n in names)
    return False


def thin(library: Path, arch: int, head_size: int) -> tuple[int, int]:
    """Zero-fill in place what an ``arch`` GPU running one head size never loads; (bytes zeroed, total)."""
    data = bytearray(library.read_bytes())
    zeroed = 0
    for header, payload_at, size, kind, entry_arch in list(_entries(data)):
        runs_here = entry_arch // 10 == arch // 10 and entry_arch <= arch  # a cubin: same major, minor <= ours
        keep = (kind == 2 and runs_here) or (kind == 1 and entry_arch <= arch)
        if keep and kind == 2 and _unused(_kernel_names(bytes(data[payload_at : payload_at + size])), head_size):
            keep = False
            struct.pack_into("<I", data, header + 28, (arch // 10 - 1) * 10)  # relabel: an older major, never read
        if not keep:
            data[payload_at : payload_at + size] = bytes(size)
            zeroed += size
    library.write_bytes(data)
    return zeroed, _section(data, ".nv_fatbin")[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".whl", help="folder for the bundle (ignore it in .git/info/exclude)")
    p.add_argument("--arch", type=int, default=90, help="SM architecture to keep (90: H100/H200)")
    p.add_argument("--head-size", type=int, default=128, help="attention head size whose kernels stay")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d"]
        subprocess.run([*cmd, str(tmp), *WHEELS], check=True)
        ort_wheel = next(tmp.glob("onnxruntime_gpu-*.whl"))
        genai_wheel = next(tmp.glob("onnxruntime_genai_cuda-*.whl"))
        site = tmp / "site"
        with zipfile.ZipFile(ort_wheel) as z:
            z.extractall(site)
        (site / "onnxruntime/capi/libonnxruntime_providers_tensorrt.so").unlink(missing_ok=True)
        zeroed, total = thin(site / "onnxruntime/capi/libonnxruntime_providers_cuda.so", args.arch, args.head_size)
        print(f"zero-filled {zeroed / 1e6:.0f} of {total / 1e6:.0f} MB of CUDA kernels", flush=True)
        bundle = out / f"ort_gpu_sm{args.arch}.tar.xz"
        with tarfile.open(bundle, "w:xz", preset=9) as tar:
            for path in sorted(site.iterdir()):
                tar.add(path, arcname=path.name)
        shutil.copy2(genai_wheel, out / genai_wheel.name)
    sizes = {f.name: f.stat().st_size for f in out.iterdir() if f.is_file()}
    for name, size in sorted(sizes.items()):
        print(f"{name}: {size / 2**20:.1f} MiB")
    print(f"total {sum(sizes.values()) / 2**20:.1f} MiB (one device call carries 64 MiB with the working tree)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
