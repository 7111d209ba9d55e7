"""Peak RSS of `ctrak featurize --folder` on a pixel model against N: streamed from disk (the
default: one batch of decoded images at a time) and, for comparison, the whole folder decoded
into memory first (what it did before), N = 256, 1024, 4096 tiny images.

    python benchmarks/bench_stream.py                      # N = 256, 1024, 4096 at 32 x 32
    python benchmarks/bench_stream.py --n 64 128 --size 16 # quick
    pytest benchmarks/bench_stream.py                      # smoke test

Each (N, mode) runs in a fresh process (`--child`), which featurizes through the CLI in-process
and reports its own peak RSS (getrusage ru_maxrss: the high-water mark, all pages). The images
are random PNGs at the model's size (a decoded image: 3 x S x S float32), the model a tiny
FactorUNet (d-trak, one timestep, k = 64, batch 32). Verified first: the two modes' stores are
byte-identical at the smallest N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, format_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BATCH = 32
VALUES = {"shape": ["circle", "square"], "colour": ["red", "green"]}


def write_folder(root: Path, n: int, size: int) -> Path:
    """n random size x size PNGs and their labels.json (every combination of VALUES in turn)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    labels = {}
    for i in range(n):
        name = f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name)
        labels[name] = {"shape": VALUES["shape"][i % 2], "colour": VALUES["colour"][i // 2 % 2]}
    (root / "labels.json").write_text(json.dumps(labels))
    return root


def write_model(path: Path, size: int) -> Path:
    import torch

    from ctrak_fast.models.factor_unet import FactorUNet, save_model

    torch.manual_seed(0)
    model = FactorUNet([2, 2], image_size=size, block_out_channels=(8, 16),
                       attention=(False, False), norm_num_groups=4, factors=list(VALUES),
                       values=VALUES)  # fmt: skip
    save_model(model, path)
    return path


def child(a: argparse.Namespace) -> None:
    """One featurization in this process; prints {"seconds", "peak_rss"} as JSON."""
    import ctrak_fast.data
    from ctrak_fast.cli import main

    if a.mode == "memory":  # the folder decoded whole first
        load = ctrak_fast.data.load_image_folder
        ctrak_fast.data.load_image_folder = lambda *p, **kw: load(*p, **{**kw, "decode": True})
    folder = Path(a.folder)
    argv = ["featurize", "--model", a.model, "--folder", folder, "--labels",
            folder / "labels.json", "--image-size", a.size, "--method", "d-trak", "--timesteps",
            "499", "--k", "64", "--batch-size", BATCH, "--param-filter", "@condition",
            "--out", a.out]  # fmt: skip
    t0 = time.perf_counter()
    rc = main([str(v) for v in argv])
    seconds = time.perf_counter() - t0
    if rc:
        raise SystemExit(rc)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    print(json.dumps({"seconds": seconds, "peak_rss": peak}))


def run_child(model: Path, folder: Path, size: int, mode: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--model", str(model),
           "--folder", str(folder), "--size", str(size), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode:
        raise RuntimeError(f"{mode} N={folder.name}: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def store_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != ".lock"}


def run(a: argparse.Namespace) -> dict:
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    model = write_model(work / "model.safetensors", a.size)
    rows = []
    for n in a.n:
        folder = write_folder(work / str(n), n, a.size)
        for mode in ("stream", "memory"):
            out = work / f"store-{n}-{mode}"
            got = run_child(model, folder, a.size, mode, out)
            decoded = n * 3 * a.size * a.size * 4
            rows.append({"N": n, "mode": mode, "peak_rss_MB": got["peak_rss"] / 2**20,
                         "decoded_set_MB": decoded / 2**20, "seconds": got["seconds"]})  # fmt: skip
            print(format_table(rows[-1:]), flush=True)
        same = store_bytes(work / f"store-{n}-stream") == store_bytes(work / f"store-{n}-memory")
        if not same:
            raise AssertionError(f"N={n}: the streamed store differs from the in-memory one")
        shutil.rmtree(folder)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {"environment": environment({"batch_size": BATCH, "image_size": a.size}), "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--size", type=int, default=32, help="image and model side (pixels)")
    p.add_argument("--work", default="/tmp/ctrak-bench-stream")
    p.add_argument("--out", help="the JSON result (default: printed only); --child: the store")
    p.add_argument("--keep", action="store_true", help="keep the images and stores")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["stream", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return {}
    result = run(a)
    print(format_table(result["rows"]))
    if a.out:
        write_json(a.out, result)
    return result


def test_stream_small(tmp_path):
    result = main(["--n", "32", "64", "--size", "16", "--work", str(tmp_path / "w")])
    assert [r["mode"] for r in result["rows"]] == ["stream", "memory"] * 2


if __name__ == "__main__":
    main()
