"""A large synthetic image set for scale tests: N rows, C classes, 3 x 32 x 32 uint8 images, sharded parquet.

    python jobs/bench/make_synthetic.py OUT --rows 600000 --classes 1000 [--test-rows 10000]
        [--shard-rows 20000] [--seed 0]

OUT is a folder or an ``s3://`` URI (pyarrow.fs; the endpoint from the AWS variables). It gets
``train/part-00000.parquet ...`` and ``test/part-00000.parquet ...`` with columns ``id`` (int64,
unique over both splits), ``label`` (int64) and ``image`` (3072 uint8, channels first), which
kd_ray reads with ``data: {name: parquet, root: OUT, image_shape: [3, 32, 32]}``.

Each class has a fixed smooth prototype (a random 4 x 4 x 3 pattern, upsampled); an image is its
class's prototype, shifted by up to 4 pixels, scaled in contrast and covered in noise, so small
CNN teachers learn the classes but do not ace them. Shards are generated one at a time (memory
stays at one shard) and each is a pure function of (seed, split, shard).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kd_ray.core import storage  # noqa: E402

SIZE = 32


def prototypes(classes: int, seed: int) -> np.ndarray:
    """[C, 3, 32, 32] float32 in [-1, 1]: one smooth pattern per class."""
    rng = np.random.default_rng([seed, 0])
    coarse = rng.uniform(-1, 1, size=(classes, 3, 4, 4)).astype(np.float32)
    return np.repeat(np.repeat(coarse, SIZE // 4, axis=2), SIZE // 4, axis=3)


def shard(protos: np.ndarray, rows: int, first_id: int, seed: int, split: int, index: int) -> pa.Table:
    """``rows`` images of random classes, ids ``first_id ...``."""
    rng = np.random.default_rng([seed, split + 1, index])
    labels = rng.integers(0, len(protos), size=rows)
    images = protos[labels]
    dy, dx = rng.integers(-4, 5, size=2)  # one shift per shard keeps this vectorised
    images = np.roll(images, (int(dy), int(dx)), axis=(2, 3))
    images = images * rng.uniform(0.5, 1.0, size=(rows, 1, 1, 1)) + rng.normal(0, 0.6, size=images.shape)
    pixels = np.clip((images + 1.5) * 85, 0, 255).astype(np.uint8).reshape(rows, -1)
    return pa.table({
        "id": pa.array(np.arange(first_id, first_id + rows, dtype=np.int64)),
        "label": pa.array(labels.astype(np.int64)),
        "image": pa.FixedSizeListArray.from_arrays(pa.array(pixels.ravel()), pixels.shape[1]),
    })


def write(out: str, rows: int, test_rows: int, classes: int, shard_rows: int, seed: int) -> dict:
    protos = prototypes(classes, seed)
    started, written, first_id = time.time(), 0, 0
    for split_index, (split, n) in enumerate((("train", rows), ("test", test_rows))):
        for i, start in enumerate(range(0, n, shard_rows)):
            table = shard(protos, min(shard_rows, n - start), first_id, seed, split_index, i)
            first_id += table.num_rows
            fs, path = storage.resolve(storage.join(out, split, f"part-{i:05d}.parquet"))
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(path) as f:
                pq.write_table(table, f)
            written += table.num_rows
            print(f"[make_synthetic] {split} shard {i}: {written:,} rows, {time.time() - started:.1f} s",
                  file=sys.stderr, flush=True)
    return {"out": out, "rows": rows, "test_rows": test_rows, "classes": classes, "seconds": round(time.time() - started, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--test-rows", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--shard-rows", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rows < 1 or args.test_rows < 1 or args.classes < 2 or args.shard_rows < 1:
        parser.error("--rows, --test-rows and --shard-rows must be >= 1 and --classes >= 2")
    print(write(args.out, args.rows, args.test_rows, args.classes, args.shard_rows, args.seed))


if __name__ == "__main__":
    main()
