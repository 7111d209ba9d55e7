"""Cost of checking shard bytes while the search streams them (FeatureStore verify modes).

    python benchmarks/bench_verify.py                        # 512 MB float16 store, k = 2048
    python benchmarks/bench_verify.py --rows 65536 --k 4096 --dtype float32 --json out/v.json

For each verify mode of search.topk (none: no check; ids: sha256 of the ids; crc: block CRC-32C of
every byte, in the read-ahead thread; full: sha256 of every byte), the median seconds of a top-k
search of --queries queries over the store (page cache warm: every mode reads the same mapped
pages), the overhead against none, and the raw checksum rates on one core. A check that costs
under ~5% of the search can be the default (issue #16).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, format_table, write_json  # noqa: E402

from ctrak_fast.engine.checksum import shard_checksum  # noqa: E402
from ctrak_fast.engine.search import topk  # noqa: E402
from ctrak_fast.engine.store import FeatureStore  # noqa: E402


def checksum_rates(nbytes: int = 256 << 20) -> dict[str, float]:
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).numpy().tobytes()
    out = {}
    for name, fn in (
        ("block_crc32c", shard_checksum),
        ("zlib_crc32", zlib.crc32),
        ("sha256", lambda b: hashlib.sha256(b).digest()),
    ):
        t0 = time.perf_counter()
        fn(data)
        out[f"{name}_gb_s"] = nbytes / (time.perf_counter() - t0) / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--shard-rows", type=int, default=8192)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default="out/bench_verify.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="out" if Path("out").is_dir() else None) as tmp:
        store = FeatureStore.create(
            Path(tmp) / "s", k=a.k, dtype=a.dtype, shard_rows=a.shard_rows, meta={}
        )
        gen = torch.Generator().manual_seed(0)
        with store.writer() as w:
            for start in range(0, a.rows, a.shard_rows):
                n = min(a.shard_rows, a.rows - start)
                w.append(torch.randn(n, a.k, generator=gen), torch.arange(start, start + n))
        store = FeatureStore.open(Path(tmp) / "s")
        u = torch.randn(a.queries, a.k, generator=gen)
        gb = sum(r["bytes"] for r in store.shards) / 1e9
        topk(store, u, a.topk, verify="none")  # warm the page cache
        times = {mode: [] for mode in ("none", "ids", "crc", "full")}
        for _ in range(a.repeat):  # interleaved, so drift in machine load hits every mode alike
            for mode in times:
                t0 = time.perf_counter()
                topk(store, u, a.topk, tails="both", verify=mode)
                times[mode].append(time.perf_counter() - t0)
    base = statistics.median(times["none"])
    rows = [
        {
            "verify": mode,
            "search_s": statistics.median(ts),
            "gb_per_s": gb / statistics.median(ts),
            "overhead_pct": 100 * (statistics.median(ts) / base - 1),
        }
        for mode, ts in times.items()
    ]
    rates = checksum_rates()
    print(f"store: {a.rows} rows x k={a.k} {a.dtype} = {gb:.2f} GB; {a.queries} queries")
    print(format_table(rows))
    print(", ".join(f"{k} {v:.2f}" for k, v in rates.items()) + " (one core)")
    payload = {"environment": environment(), "args": vars(a), "rows": rows, "rates": rates}
    print(f"-> {write_json(a.json, payload)}")


if __name__ == "__main__":
    main()
