"""Pack onnxruntime-gpu for a GPU machine that has no package registry (the GPU check's carry).

The wheel is 255 MB; a device call carries at most 64 MiB. This keeps what serving on one GPU
architecture needs and makes the rest compressible:

* drops the TensorRT provider and the C API library (``libonnxruntime.so.*``: the Python module
  links its own copy of the runtime);
* in the CUDA provider, zeroes the device code (cubins) built for other architectures than
  ``--arch`` (90: H100/H200), leaving every fatbin header in place, so the CUDA runtime still finds
  the sm_90 image of each kernel; xz then squeezes the zeroed bytes to nothing;
* tars the installed package (``onnxruntime/`` + its dist-info) as xz and cuts it into parts
  (``<out>/p1/part1``, ``<out>/p2/part2``, ...) with ``<out>/SHA256`` of the whole tarball.

``loadtests/gpu_check.sh run`` joins the parts, checks the digest and unpacks them into its site
folder. A fatbin is a 16-byte header (magic 0xBA55ED50, version 1, header size, payload size) and
entries, each a header (kind, header size, payload size, ..., SM architecture at byte 28) and its
payload; kind 1 is PTX, kind 2 a cubin.

    python loadtests/pack_ortgpu.py onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import shutil
import struct
import tarfile
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
DROP = ("libonnxruntime_providers_tensorrt.so", "libonnxruntime.so.")


def zero_other_archs(data: bytearray, keep: int) -> Counter[str]:
    """Zero, in place, the payload of every fatbin entry whose SM architecture is not ``keep``."""
    stats: Counter[str] = Counter()
    pos = 0
    while (pos := data.find(FATBIN_MAGIC, pos)) >= 0:
        version, header, size = struct.unpack_from("<HHQ", data, pos + 4)
        if version != 1 or header != 16 or size > len(data) - pos - header:
            pos += 4  # the magic bytes by chance, not a fatbin
            continue
        entry, end = pos + header, pos + header + size
        while entry < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            start = entry + entry_header
            if kind not in (1, 2) or entry_header < 32 or start + payload > end:
                raise ValueError(
                    f"unexpected fatbin entry at byte {entry}: kind {kind}, header {entry_header}"
                )
            if arch == keep:
                stats[f"kept sm_{arch}"] += payload
            else:
                data[start : start + payload] = bytes(payload)
                stats["zeroed"] += payload
            entry = start + payload
        pos = end
    return stats


def pack(wheel: Path, out: Path, arch: int, part_bytes: int) -> list[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(root)
        capi = root / "onnxruntime" / "capi"
        for lib in list(capi.iterdir()):
            if lib.name.startswith(DROP):
                lib.unlink()
        cuda = capi / "libonnxruntime_providers_cuda.so"
        data = bytearray(cuda.read_bytes())
        stats = zero_other_archs(data, arch)
        if not stats[f"kept sm_{arch}"]:
            raise ValueError(f"{cuda.name} has no device code for sm_{arch}")
        cuda.write_bytes(bytes(data))
        print({k: f"{v / 1e6:.1f} MB" for k, v in stats.items()})
        tarball = root / "ortgpu.tar.xz"
        with lzma.open(tarball, "wb", preset=6) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
            for item in sorted(root.iterdir()):
                if item.name.startswith("onnxruntime"):
                    tar.add(item, arcname=item.name)
        blob = tarball.read_bytes()
    if out.exists():
        shutil.rmtree(out)
    parts = []
    for index, offset in enumerate(range(0, len(blob), part_bytes), start=1):
        part = out / f"p{index}" / f"part{index}"
        part.parent.mkdir(parents=True)
        part.write_bytes(blob[offset : offset + part_bytes])
        parts.append(part)
    (out / "SHA256").write_text(f"{hashlib.sha256(blob).hexdigest()}  ortgpu.tar.xz\n")
    print(
        f"{wheel.name}: {wheel.stat().st_size / 1e6:.0f} MB -> {len(blob) / 1e6:.1f} MB in {len(parts)} parts"
    )
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="an onnxruntime-gpu wheel (from pip download)")
    parser.add_argument("--out", type=Path, default=Path(".ortgpu"))
    parser.add_argument("--arch", type=int, default=90, help="SM architecture to keep (90: H100/H200)")
    parser.add_argument("--part-mb", type=float, default=60.0, help="part size; one part per device call")
    args = parser.parse_args()
    pack(args.wheel, args.out, args.arch, int(args.part_mb * 1e6))


if __name__ == "__main__":
    main()
