"""Top-k at scale: N = 10^7 float16 features of k = 256 on disk, 100 queries (10^9 pairs),
top-1000 of both tails, against the machine's ceilings measured in the same run.

    python benchmarks/bench_scale.py                    # the full run (5 GB store, minutes)
    python benchmarks/bench_scale.py --n 2000000 --small-n 200000 --faiss-n 200000  # quick
    pytest benchmarks/bench_scale.py                    # smoke test of the whole pipeline

Steps, all in one process:
 1. write the stores with FeatureStore (N rows and a 10x smaller one, same shard size);
 2. ceilings: a plain sequential read() of the same shard files, cold (the files evicted from
    the page cache: posix_fadvise(DONTNEED) per file, or --drop-caches for the whole cache) and
    warm; a large float32 matmul (torch.mm, 4096^2); and, for reference, the peak of
    independent fma chains of the ISA the kernels use (``_C.cpu_fma_peak``). The compute
    ceilings are measured before and after the searches and the higher value kept (the
    machine is shared: this is the conservative choice for the ratios);
 3. our search (``ctrak_fast.engine.search.topk`` on the FeatureStore): cold with and without
    read-ahead at the benchmark's q (compute-bound here) and at a small q (--io-queries,
    read-bound), warm (repeated), warm with full sha256 verification; the small store warm.
    Each run records wall time, rows/s, file bytes/s, GFLOP/s and peak RSS (total and anon,
    sampled from /proc/self/status);
 4. efficiency: the time the ceilings allow (max of bytes / read ceiling and FLOPs / matmul
    ceiling) over the wall time, naming the ceiling that bounds the run; also FLOP/s as a
    fraction of the fma peak;
 5. verification: 4 queries checked against a streamed torch float32 pass over the whole store
    (ids equal except where exact scores tie within the fp32 bound);
 6. faiss ``IndexFlatIP`` (exact, largest tail only) on an in-memory subset at q = 16 and 256,
    against ours (both tails) on the same rows; both verified against ``topk_reference`` first.
The stores are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, format_table, time_fn, write_json  # noqa: E402

from ctrak_fast.engine import native as _native  # noqa: E402
from ctrak_fast.engine.search import fp32_error_bound, topk, topk_reference
from ctrak_fast.engine.store import (
    FeatureStore,  # noqa: E402
    iter_store_shards,
)

# --- data --------------------------------------------------------------------------------------


def write_store(path: Path, n: int, dim: int, shard_rows: int, seed: int = 0) -> FeatureStore:
    """N rows of standard normal float16 features, ids = row index, shard by shard."""
    if path.exists():
        shutil.rmtree(path)
    store = FeatureStore.create(path, k=dim, dtype="float16", shard_rows=shard_rows)
    g = torch.Generator().manual_seed(seed)
    with store.writer() as w:
        for lo in range(0, n, shard_rows):
            hi = min(n, lo + shard_rows)
            w.append(torch.randn(hi - lo, dim, generator=g).half(), torch.arange(lo, hi))
    return FeatureStore.open(path)


def shard_files(store: FeatureStore) -> list[Path]:
    return [store.path / rec["file"] for rec in store.manifest["shards"]]


def evict(files: list[Path], drop_all: bool) -> str:
    """Make the next read of `files` come from the disk; returns how."""
    os.sync()
    if drop_all:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "drop_caches"
        except OSError:
            pass
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise(DONTNEED)"


def cached_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' bytes in the page cache (util-linux fincore), None if unknown."""
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *map(str, files)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    res, size = sum(map(int, out[0::2])), sum(map(int, out[1::2]))
    return res / max(size, 1)


# --- measurement -------------------------------------------------------------------------------


class RssPeak:
    """Peak VmRSS and RssAnon (bytes) of this process while the block runs (sampled)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.rss, self.anon = interval, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def sample() -> tuple[int, int]:
        vals = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                vals[key] = int(rest.split()[0]) * 1024
        return vals.get("VmRSS", 0), vals.get("RssAnon", 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._update()
            time.sleep(self.interval)

    def _update(self) -> None:
        rss, anon = self.sample()
        self.rss, self.anon = max(self.rss, rss), max(self.anon, anon)

    def __enter__(self) -> RssPeak:
        self._update()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._update()


def sequential_read(files: list[Path], chunk: int = 16 << 20) -> tuple[float, int]:
    """(seconds, bytes) of a plain read() of every file in order into one buffer."""
    buf = memoryview(bytearray(chunk))
    total = 0
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return time.perf_counter() - t0, total


def matmul_flops(size: int = 4096, repeat: int = 3) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    t = time_fn(lambda: a @ b, warmup=1, repeat=repeat)
    return 2 * size**3 / t.min


def torch_topk_store(store: FeatureStore, u: torch.Tensor, k: int, chunk: int = 1 << 16):
    """Streamed torch peer for verification: float32 scores per chunk, running top-k merge.
    Returns (top_ids, bottom_ids) [m, k]; ids are row indices in this benchmark's stores."""
    best: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
    for feats, ids in iter_store_shards(store):
        for lo in range(0, feats.shape[0], chunk):
            s = u @ feats[lo : lo + chunk].float().T
            i = ids[lo : lo + chunk].expand(u.shape[0], -1)
            for largest in (True, False):
                v, j = s.topk(min(k, s.shape[1]), dim=1, largest=largest)
                j = i.gather(1, j)
                if largest in best:
                    pv, pj = best[largest]
                    v, o = torch.cat([pv, v], 1).topk(k, dim=1, largest=largest)
                    j = torch.cat([pj, j], 1).gather(1, o)
                best[largest] = (v, j)
    return best[True][1], best[False][1]


def exact_rows(store: FeatureStore, rows: torch.Tensor) -> torch.Tensor:
    """features[rows] (any shape of row indices) gathered shard by shard, float64."""
    flat = rows.reshape(-1)
    out = torch.empty(flat.shape[0], store.k, dtype=torch.float64)
    start = 0
    for feats, _ in iter_store_shards(store):
        sel = (flat >= start) & (flat < start + feats.shape[0])
        out[sel] = feats[flat[sel] - start].double()
        start += feats.shape[0]
    return out.reshape(*rows.shape, store.k)


def verify_ids(name, store, u, got, want, bound) -> dict:
    """Ids equal except where the exact scores tie within twice the fp32 bound."""
    fg, fw = exact_rows(store, got), exact_rows(store, want)
    sg = (fg * u.double()[:, None, :]).sum(-1)
    sw = (fw * u.double()[:, None, :]).sum(-1)
    ok = bool(((sg - sw).abs() <= 2 * bound[:, None]).all())
    if not ok:
        raise SystemExit(f"verification failed: {name}")
    return {"check": name, "ids_equal": float((got == want).float().mean()), "ok": ok}


# --- the run -----------------------------------------------------------------------------------


def search_row(label, store, u, k, n_flops, file_bytes, **kw) -> tuple[dict, object]:
    load = os.getloadavg()[0]
    with RssPeak() as mem:
        t0 = time.perf_counter()
        res = topk(store, u, k, tails="both", **kw)
        wall = time.perf_counter() - t0
    return {
        "run": label,
        "N": store.n_rows,
        "wall_s": wall,
        "Mrows/s": store.n_rows / wall / 1e6,
        "GB/s": file_bytes / wall / 1e9,
        "GFLOP/s": n_flops / wall / 1e9,
        "peak_rss_MB": mem.rss / 2**20,
        "peak_anon_MB": mem.anon / 2**20,
        "load": load,
    }, res


def efficiency(row: dict, read_bps: float, ceilings: dict, file_bytes: int, n_flops: int) -> None:
    t_read = file_bytes / read_bps
    t_flop = n_flops / (ceilings["matmul_GFLOPs"] * 1e9)
    row["bound_by"] = "read" if t_read >= t_flop else "compute"
    row["%ceiling"] = 100 * max(t_read, t_flop) / row["wall_s"]
    row["%read_bw"] = 100 * t_read / row["wall_s"]
    row["%matmul"] = 100 * t_flop / row["wall_s"]
    row["%fma_peak"] = 100 * n_flops / (ceilings["fma_peak_GFLOPs"] * 1e9) / row["wall_s"]


def compute_ceilings(C) -> tuple[float, float]:
    """(float32 matmul FLOP/s, fma-chain peak FLOP/s)."""
    return matmul_flops(), C.cpu_fma_peak(0.5)


def run(a: argparse.Namespace) -> dict:
    C = _native.load()
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    env = environment({"cpu_isa": C.cpu_isa()})
    result: dict = {"env": env, "config": vars(a), "rows": [], "ceilings": {}, "checks": []}

    print(f"writing {a.n} x {a.dim} float16 rows in shards of {a.shard_rows} ...", flush=True)
    t0 = time.perf_counter()
    big = write_store(root / "big", a.n, a.dim, a.shard_rows)
    t_write = time.perf_counter() - t0
    small = write_store(root / "small", a.small_n, a.dim, a.shard_rows, seed=1)
    files = shard_files(big)
    file_bytes = sum(f.stat().st_size for f in files)
    small_bytes = sum(f.stat().st_size for f in shard_files(small))
    result["store"] = {
        "rows": big.n_rows,
        "shards": len(files),
        "GB": file_bytes / 1e9,
        "write_s": t_write,
    }

    u = torch.randn(a.queries, a.dim, generator=torch.Generator().manual_seed(7))

    how = evict(files, a.drop_caches)
    resident = cached_fraction(files)
    t, nb = sequential_read(files)
    cold_bw = nb / t
    t, nb = sequential_read(files)
    warm_bw = nb / t
    mm0, fma0 = compute_ceilings(C)
    ceilings = result["ceilings"]
    ceilings.update(
        {
            "evicted_with": how,
            "cached_before_cold_read": resident,
            "read_cold_GBps": cold_bw / 1e9,
            "read_warm_GBps": warm_bw / 1e9,
            "matmul_GFLOPs": mm0 / 1e9,
            "fma_peak_GFLOPs": fma0 / 1e9,
            "torch_threads": torch.get_num_threads(),
        }
    )
    print(f"ceilings (before): {ceilings}", flush=True)

    rows, pending = result["rows"], []  # efficiency once the ceilings are final

    def search(label, store, uq, read_bw, nbytes, cold=False, **kw):
        flops = 2 * store.n_rows * a.dim * uq.shape[0]
        if cold:
            evict(shard_files(store), a.drop_caches)
        cached = cached_fraction(shard_files(store)) if cold else None
        print(f"search {label} ...", flush=True)
        row, res = search_row(label, store, uq, a.k, flops, nbytes, **kw)
        if cold:
            row["cached_before"] = cached
        row["q"] = uq.shape[0]
        pending.append((row, read_bw, nbytes, flops))
        return row, res

    io_u = u[: a.io_queries]
    for q_u in (u, io_u):
        for readahead in (True, False):
            label = f"cold, q={q_u.shape[0]}, readahead={'on' if readahead else 'off'}"
            rows.append(search(label, big, q_u, cold_bw, file_bytes, True, readahead=readahead)[0])
    for i in range(a.repeat):
        row, res = search(f"warm #{i + 1}", big, u, warm_bw, file_bytes)
        rows.append(row)
    rows.append(search("warm, verify=full", big, u, warm_bw, file_bytes, verify="full")[0])
    search("small store (warming)", small, u, warm_bw, small_bytes)
    pending.pop()
    rows.append(search("small store, warm", small, u, warm_bw, small_bytes)[0])

    mm1, fma1 = compute_ceilings(C)
    ceilings["matmul_GFLOPs_after"], ceilings["fma_peak_GFLOPs_after"] = mm1 / 1e9, fma1 / 1e9
    ceilings["matmul_GFLOPs"] = max(mm0, mm1) / 1e9
    ceilings["fma_peak_GFLOPs"] = max(fma0, fma1) / 1e9
    for row, read_bw, nbytes, flops in pending:
        efficiency(row, read_bw, ceilings, nbytes, flops)

    # Verification of the big run on a few queries against a streamed torch pass.
    nv = min(4, a.queries)
    print(f"verifying {nv} queries against torch over all {a.n} rows ...", flush=True)
    top, bottom = torch_topk_store(big, u[:nv], a.k)
    sub = torch.arange(0, a.n, max(1, a.n // 200_000))  # the bound, from a row sample
    bound = fp32_error_bound(exact_rows(big, sub), u[:nv]) * a.n / len(sub)
    checks = result["checks"]
    checks.append(verify_ids("scale top vs torch", big, u[:nv], res.top_ids[:nv], top, bound))
    checks.append(
        verify_ids("scale bottom vs torch", big, u[:nv], res.bottom_ids[:nv], bottom, bound)
    )

    # faiss on an in-memory subset.
    result["faiss"] = faiss_rows(a, big, checks)
    return result


def faiss_rows(a, store: FeatureStore, checks: list) -> list[dict]:
    try:
        import faiss
    except ImportError:
        print("faiss is not installed (pip install faiss-cpu): skipping that peer", flush=True)
        return []
    n = min(a.faiss_n, store.n_rows)
    parts, have = [], 0
    for feats, _ in iter_store_shards(store):
        parts.append(feats[: n - have].clone())
        have += parts[-1].shape[0]
        if have >= n:
            break
    feats = torch.cat(parts)
    ids = torch.arange(n)
    index = faiss.IndexFlatIP(a.dim)
    for lo in range(0, n, 1 << 16):
        index.add(feats[lo : lo + (1 << 16)].float().numpy())
    out = []
    for q in a.faiss_queries:
        u = torch.randn(q, a.dim, generator=torch.Generator().manual_seed(q))
        vn = min(n, 20_000)  # verify both on a slice first
        ref = topk_reference(feats[:vn], ids[:vn], u, min(a.k, vn))
        sub_index = faiss.IndexFlatIP(a.dim)
        sub_index.add(feats[:vn].float().numpy())
        _, labels = sub_index.search(u.numpy(), min(a.k, vn))
        mine = topk((feats[:vn], ids[:vn]), u, min(a.k, vn))
        exact = (feats[:vn].double() @ u.double().T).T
        bound = fp32_error_bound(feats[:vn], u)[:, None]
        for name, got in (("faiss", torch.from_numpy(labels)), ("ours", mine.top_ids)):
            gap = (exact.gather(1, got) - exact.gather(1, ref.top_ids)).abs()
            if not (gap <= 2 * bound).all():
                raise SystemExit(f"verification failed: {name} at q={q}")
            checks.append({"check": f"{name} q={q} vs reference", "ok": True})
        uq = u.numpy()
        t_ours = time_fn(lambda u=u: topk((feats, ids), u, a.k), warmup=1, repeat=a.repeat)
        t_faiss = time_fn(lambda uq=uq: index.search(uq, a.k), warmup=1, repeat=a.repeat)
        for name, t in (("ours (both tails)", t_ours), ("faiss IndexFlatIP (top only)", t_faiss)):
            out.append(
                {
                    "method": name,
                    "N": n,
                    "q": q,
                    "k": a.k,
                    "median_s": t.median,
                    "Mrows/s": n / t.median / 1e6,
                    "GFLOP/s": 2 * n * a.dim * q / t.median / 1e9,
                    "ours_speedup": t.median / t_ours.median,
                }
            )
        print(format_table(out[-2:]), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--small-n", type=int, default=1_000_000, help="the 10x smaller store")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--io-queries", type=int, default=8, help="q of the read-bound cold runs")
    p.add_argument("--shard-rows", type=int, default=1 << 18, help="128 MiB float16 shards")
    p.add_argument("--repeat", type=int, default=2, help="warm runs")
    p.add_argument("--faiss-n", type=int, default=1_000_000)
    p.add_argument("--faiss-queries", type=int, nargs="+", default=[16, 256])
    p.add_argument("--drop-caches", action="store_true", help="echo 3 > drop_caches (root)")
    p.add_argument("--dir", default="out/scale_stores", help="where the stores are written")
    p.add_argument("--keep", action="store_true", help="keep the stores")
    p.add_argument("--out", default="out/bench_scale.json")
    a = p.parse_args(argv)
    try:
        result = run(a)
    finally:
        if not a.keep:
            shutil.rmtree(a.dir, ignore_errors=True)
    env, c = result["env"], result["ceilings"]
    print(
        f"\n{env['cpu']} ({env['cores_usable']} usable cores, load {env['load_avg_1m']:.1f}), "
        f"torch {env['torch']}, ISA {env['cpu_isa']}, git {env['git_sha']}"
    )
    s = result["store"]
    print(
        f"store: {s['rows']} rows x {a.dim} float16, {s['shards']} shards, {s['GB']:.2f} GB "
        f"(written in {s['write_s']:.0f} s); {a.queries} queries, top-{a.k} both tails"
    )
    print(
        f"ceilings: read cold {c['read_cold_GBps']:.2f} GB/s ({c['evicted_with']}, "
        f"cached before: {c['cached_before_cold_read']}), warm {c['read_warm_GBps']:.2f} GB/s; "
        f"float32 matmul {c['matmul_GFLOPs']:.0f} GFLOP/s; fma peak "
        f"{c['fma_peak_GFLOPs']:.0f} GFLOP/s (best of before / after the searches)\n"
    )
    print(format_table(result["rows"]))
    print()
    print(format_table(result["faiss"]))
    print()
    print(format_table(result["checks"]))
    print(f"\nwritten {write_json(a.out, result)}")
    return result


def test_scale_small(tmp_path):
    """The whole pipeline at a small size (verification included)."""
    r = main(
        [
            *("--n", "300000", "--small-n", "30000", "--dim", "64", "--queries", "8"),
            *("--k", "100", "--shard-rows", "65536", "--repeat", "1", "--faiss-n", "50000"),
            *("--faiss-queries", "4", "--io-queries", "2", "--dir", str(tmp_path / "s")),
            *("--out", str(tmp_path / "r.json")),
        ]
    )
    assert all(c["ok"] for c in r["checks"]) and len(r["rows"]) == 8
    assert not (tmp_path / "s").exists()


if __name__ == "__main__":
    main()
