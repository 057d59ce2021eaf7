"""What a chunk with its halo costs to read from Zarr: zarr-python against daskrecon's raw-chunk reads.

A 1x3x8192x8192 float32 array in 512² chunks (the out-of-core benchmarks' chunk), written
uncompressed and zstd-compressed (zarr's default). Every chunk is read alone and with a
20-pixel halo (a map_overlap's extended block), through zarr-python, and through
``daskrecon.tasks.regions.read_region`` (memory maps of the raw chunk files). Per-chunk
milliseconds, medians of ``--repeats`` passes over all 256 chunks; sizes on disk.

Writes benchmarks/results/region_reads.json.

    python benchmarks/bench_region_reads.py [--repeats 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, write  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--halo", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed after)")
    args = p.parse_args()

    import numpy as np
    import zarr

    from daskrecon.tasks.regions import read_region

    n, c, h = args.size, args.chunk, args.halo
    root = args.dir or tempfile.mkdtemp(prefix="region-reads-")
    x = np.random.default_rng(0).standard_normal((1, 3, n, n)).astype(np.float32)
    starts = [(i, j) for i in range(0, n, c) for j in range(0, n, c)]

    def per_chunk_ms(read) -> float:
        passes = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for i, j in starts:
                read(i, j)
            passes.append((time.perf_counter() - t0) / len(starts) * 1e3)
        return statistics.median(passes)

    res = {"machine": machine(), "array": f"1x3x{n}x{n} float32", "chunk": c, "halo": h, "repeats": args.repeats}
    try:
        for label, kw in (("raw", {"compressors": None}), ("zstd", {})):
            path = os.path.join(root, f"{label}.zarr")
            z = zarr.create_array(path, shape=x.shape, dtype=x.dtype, chunks=(1, 3, c, c), overwrite=True, **kw)
            t0 = time.perf_counter()
            for i, j in starts:
                z[:, :, i:i + c, j:j + c] = x[:, :, i:i + c, j:j + c]
            write_ms = (time.perf_counter() - t0) / len(starts) * 1e3
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)

            def window(i, j, halo):
                return ((0, 3, False), (max(i - halo, 0), min(i + c + halo, n), False),
                        (max(j - halo, 0), min(j + c + halo, n), False))

            row = {"write_ms": write_ms, "bytes_on_disk": size,
                   "zarr_alone_ms": per_chunk_ms(lambda i, j: z[0, :, i:i + c, j:j + c]),
                   "zarr_halo_ms": per_chunk_ms(lambda i, j: z[(0, *(slice(a, b) for a, b, _ in window(i, j, h)))]),
                   "daskrecon_alone_ms": per_chunk_ms(lambda i, j: read_region(z, (0,), window(i, j, 0))),
                   "daskrecon_halo_ms": per_chunk_ms(lambda i, j: read_region(z, (0,), window(i, j, h)))}
            res[label] = row
            print(f"{label:5s} {size / 2**20:6.0f} MiB, write {write_ms:5.2f} ms/chunk; read alone: zarr "
                  f"{row['zarr_alone_ms']:5.2f} ms, daskrecon {row['daskrecon_alone_ms']:5.2f} ms; with a {h}-pixel "
                  f"halo: zarr {row['zarr_halo_ms']:5.2f} ms, daskrecon {row['daskrecon_halo_ms']:5.2f} ms")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print("wrote", write("region_reads", res))


if __name__ == "__main__":
    main()
