"""Carry CIFAR-10 to a machine that cannot download it, in parts small enough for a size-limited transfer.

    python benchmarks/device_data.py pack CIFAR_DIR OUT_DIR --parts 2      # here: OUT_DIR/part1, part2, ...
    python benchmarks/device_data.py unpack PART_DIR DEST_DIR               # there: once per part

The official batch files (about 30 MB each) barely compress as bytes. Their pixels compress to about
55% as lossless WebP, so each batch is stored as one WebP mosaic of its images plus the file's own
bytes before and after the pixel block (the pickle's header, labels and file names). Unpacking rebuilds
each file byte for byte and checks it against the MD5 of the original, refusing a file that differs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

BATCH_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


def mosaic_shape(count: int) -> tuple[int, int]:
    """(rows, columns) of images: as square as `count` allows, exactly `count` tiles."""
    rows = int(math.isqrt(count))
    while count % rows:
        rows -= 1
    return rows, count // rows


def pack_file(path: Path, out: Path) -> None:
    raw = path.read_bytes()
    pixels = pickle.loads(raw, encoding="bytes")[b"data"]  # (N, 3072) uint8, channel-major per image
    block = np.ascontiguousarray(pixels).tobytes()
    start = raw.find(block)
    if start < 0:
        raise SystemExit(f"{path}: the pixel block is not stored contiguously; cannot pack this file")
    count = len(pixels)
    rows, columns = mosaic_shape(count)
    images = pixels.reshape(count, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    mosaic = images.reshape(rows, columns, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(rows * 32, columns * 32, 3)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(mosaic).save(buffer, format="WEBP", lossless=True, quality=100, method=6)
    (out / f"{path.name}.webp").write_bytes(buffer.getvalue())
    (out / f"{path.name}.pre").write_bytes(raw[:start])
    (out / f"{path.name}.post").write_bytes(raw[start + len(block):])
    (out / f"{path.name}.md5").write_text(hashlib.md5(raw).hexdigest() + "\n")
    (out / f"{path.name}.count").write_text(f"{count} {rows} {columns}\n")


def unpack_file(part: Path, name: str, dest: Path) -> bool:
    count, rows, columns = (int(value) for value in (part / f"{name}.count").read_text().split())
    mosaic = np.array(Image.open(part / f"{name}.webp").convert("RGB"))  # (rows·32, columns·32, 3)
    images = mosaic.reshape(rows, 32, columns, 32, 3).transpose(0, 2, 1, 3, 4).reshape(count, 32, 32, 3)
    block = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(count, 3072).tobytes()
    raw = (part / f"{name}.pre").read_bytes() + block + (part / f"{name}.post").read_bytes()
    if hashlib.md5(raw).hexdigest() != (part / f"{name}.md5").read_text().strip():
        print(f"{name}: MD5 MISMATCH, not written", flush=True)
        return False
    dest.mkdir(parents=True, exist_ok=True)
    (dest / name).write_bytes(raw)
    print(f"{name}: md5 ok", flush=True)
    return True


def pack(cifar_dir: Path, out: Path, parts: int) -> None:
    names = [name for name in BATCH_FILES if (cifar_dir / name).is_file()]
    if not names:
        raise SystemExit(f"{cifar_dir} holds none of {', '.join(BATCH_FILES)}; pass the cifar-10-batches-py folder")
    for index, name in enumerate(names):
        part = out / f"part{index * parts // len(names) + 1}"
        pack_file(cifar_dir / name, part)
        print(f"{name} -> {part}", flush=True)
    if (cifar_dir / "batches.meta").is_file():
        (out / "part1" / "batches.meta").write_bytes((cifar_dir / "batches.meta").read_bytes())


def unpack(part: Path, dest: Path) -> int:
    """Rebuild every file of one part into `dest`; the number that failed their MD5."""
    failed = sum(not unpack_file(part, webp.stem, dest) for webp in sorted(part.glob("*.webp")))
    if (part / "batches.meta").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "batches.meta").write_bytes((part / "batches.meta").read_bytes())
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="CIFAR_DIR (cifar-10-batches-py) -> OUT_DIR/part1..partN")
    packing.add_argument("cifar_dir", type=Path)
    packing.add_argument("out", type=Path)
    packing.add_argument("--parts", type=int, default=2, help="split the batch files into this many parts")
    unpacking = commands.add_parser("unpack", help="PART_DIR -> DEST_DIR (the cifar-10-batches-py folder)")
    unpacking.add_argument("part", type=Path)
    unpacking.add_argument("dest", type=Path)
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.cifar_dir, args.out, args.parts)
    elif unpack(args.part, args.dest):
        raise SystemExit("some files failed their MD5 check; pack them again")


if __name__ == "__main__":
    main()
