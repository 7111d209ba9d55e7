"""Scoring at the paper's dimension: time and peak memory of the Gram, its factorisation and a
lambda sweep, for the scoring path before issue #18 and for the new ones, in one run.

    python benchmarks/bench_scoring.py                       # k 4096..32768 x N 420, 1e4, 1e5
    python benchmarks/bench_scoring.py --k 4096 --n 420,10000 --json out/scoring.json
    python benchmarks/bench_scoring.py --max-cell-s 600      # skip cells predicted over 10 min

Paths (each cell runs in its own process, so peak RSS (VmHWM) is that path's alone):
  * before: the code before #18: a float64 Gram from 8192-row float64 chunks with full
    products and (G + G^T) / 2, a clone for G + lam I, a fresh Cholesky factor, cholesky_solve;
    the sweep is one Cholesky per lambda (Preconditioner.with_lambda).
  * primal: gram.gram (lower block triangle, chunks bounded in bytes) factored in place
    (Preconditioner(inplace=True)); the sweep is one eigh (LambdaSweep(gram=G)).
  * mixed: primal with the mixed-precision Gram (float32 products per chunk, float64 sums).
  * dual (N < k only): DualPreconditioner through K = Phi Phi^T [N, N]; the sweep is one eigh
    of K (LambdaSweep(phi, path="dual")).
Features are random float32 blocks made on the fly (seeded; generation is not timed), as a
store's shards would stream: at N = 1e5, k = 32768 they are 13 GB, more than memory beside G.
Cells predicted (from this machine's measured GEMM rate) to take over --max-cell-s, or to need
more memory than the machine has, are skipped and say why. A small accuracy table compares the
mixed Gram with the float64 one on features with a decaying spectrum.
JSON rows: k, n, path, gram_s, factor_s, sweep_s, peak_rss_gb (+ skipped / reason). A primal
sweep (eigh of G, or 9 Choleskys) does not depend on N: it is timed in the first cell of each
family (primal and mixed share it) and reused (sweep_from); that cell's peak RSS includes it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, format_table, write_json  # noqa: E402

from ctrak_fast.engine.gram import gram  # noqa: E402
from ctrak_fast.engine.scoring import (  # noqa: E402
    DualPreconditioner,
    Preconditioner,
    damping,
)
from ctrak_fast.engine.sweep import LambdaSweep  # noqa: E402

LAMBDAS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4]
GEN_BYTES = 256 << 20  # one generated block of float32 features
M_QUERIES = 16


def vm_hwm_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def mem_total_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            return int(line.split()[1]) / 1e6
    return float("nan")


class Blocks:
    """Seeded random [rows, k] float32 blocks; counts the seconds spent generating them."""

    def __init__(self, n: int, k: int, seed: int = 0) -> None:
        self.n, self.k, self.seed, self.gen_s = n, k, seed, 0.0
        self.rows = max(1, GEN_BYTES // (4 * k))

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for start in range(0, self.n, self.rows):
            t0 = time.perf_counter()
            block = torch.randn(min(self.rows, self.n - start), self.k, generator=g)
            self.gen_s += time.perf_counter() - t0
            yield block


def before_gram(blocks: Blocks) -> torch.Tensor:
    """scoring.gram as it was before #18 (full products, float64 chunks of 8192 rows)."""
    g = torch.zeros(blocks.k, blocks.k, dtype=torch.float64)
    for feats in blocks:
        for start in range(0, feats.shape[0], 8192):
            chunk = feats[start : start + 8192].double()
            g.addmm_(chunk.T, chunk)
    return (g + g.T) / 2


def before_factor(g: torch.Tensor, lambda_r: float) -> torch.Tensor:
    """Preconditioner.__init__ as it was: clone, damp, a fresh Cholesky factor."""
    a = g.clone()
    a.diagonal().add_(damping(g, lambda_r))
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info):
        raise ValueError("not positive definite")
    return chol


def run_cell(k: int, n: int, path: str, lambdas: list[float], sweep: bool) -> dict:
    """One (k, N, path) measurement, in this process (call it in a fresh one)."""
    blocks = Blocks(n, k)
    q = torch.randn(M_QUERIES, k, generator=torch.Generator().manual_seed(1))
    row = {"k": k, "n": n, "path": path}
    t0 = time.perf_counter()
    if path == "dual":
        phi = torch.cat(list(blocks))
        t0 = time.perf_counter()
        from ctrak_fast.engine.gram import kernel

        kmat = kernel(phi)
        row["gram_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        pre = DualPreconditioner(phi, 1.0, kernel_matrix=kmat)
        pre.solve(q)
        row["factor_s"] = time.perf_counter() - t1
        del pre
        if sweep:
            t2 = time.perf_counter()
            LambdaSweep(phi, kernel=kmat, path="dual").solve(q, lambdas)
            row["sweep_s"] = time.perf_counter() - t2
    elif path == "before":
        g = before_gram(blocks)
        row["gram_s"] = time.perf_counter() - t0 - blocks.gen_s
        t1 = time.perf_counter()
        chol = before_factor(g, 1.0)
        torch.cholesky_solve(q.double().T, chol)
        row["factor_s"] = time.perf_counter() - t1
        del chol
        if sweep:
            t2 = time.perf_counter()
            for r in lambdas:
                c = before_factor(g, r)
                torch.cholesky_solve(q.double().T, c)
                del c
            row["sweep_s"] = time.perf_counter() - t2
    else:
        g = gram(blocks, precision="mixed" if path == "mixed" else "float64")
        row["gram_s"] = time.perf_counter() - t0 - blocks.gen_s
        if sweep:  # before the in-place factorisation consumes G
            t2 = time.perf_counter()
            LambdaSweep(gram=g).solve(q, lambdas)
            row["sweep_s"] = time.perf_counter() - t2
        t1 = time.perf_counter()
        Preconditioner(g, 1.0, inplace=True).solve(q)
        row["factor_s"] = time.perf_counter() - t1
    row["peak_rss_gb"] = vm_hwm_gb()
    return row


def gemm_rates(size: int = 2048) -> dict[str, float]:
    """GFLOP/s of a float64 and a float32 square GEMM here (to predict cell times)."""
    out = {}
    for name, dtype in (("f64", torch.float64), ("f32", torch.float32)):
        a = torch.randn(size, size, dtype=dtype)
        a @ a
        t0 = time.perf_counter()
        for _ in range(3):
            a @ a
        out[name] = 3 * 2 * size**3 / (time.perf_counter() - t0) / 1e9
    return out


def predict(k: int, n: int, path: str, rates: dict[str, float], sweep: bool) -> tuple[float, float]:
    """(seconds, GB) this cell should take; eigh ~ 9 k^3 flops at the f64 GEMM rate / 3."""
    f64, f32 = rates["f64"] * 1e9, rates["f32"] * 1e9
    d = min(n, k) if path == "dual" else k
    chol = d**3 / 3 / f64
    eigh = 6.6 * d**3 / f64  # fitted: 42 s at k = 8192 on 86 GFLOP/s
    if path == "dual":
        gram_s, gb = 2 * n * n * k / f64, (n * k * 4 + 3 * n * n * 8) / 1e9
    elif path == "before":
        gram_s, gb = 2 * n * k * k / f64, 3 * k * k * 8 / 1e9
    else:
        rate = f32 if path == "mixed" else f64
        gram_s, gb = n * k * k / rate, k * k * 8 / 1e9
    sweep_s = (9 * chol if path == "before" else eigh) if sweep else 0.0
    if sweep and path in ("primal", "mixed"):
        gb = max(gb, 4 * k * k * 8 / 1e9)  # eigh: G's copy, the eigenvectors, the workspace
    if sweep and path == "dual":
        gb = max(gb, (n * k * 8 + 4 * n * n * 8) / 1e9)  # phi in float64 beside U and K
    return gram_s + chol + sweep_s, gb + 0.6  # + torch and one generated block


def accuracy_rows(n: int = 20000, k: int = 2048) -> list[dict]:
    """Mixed vs float64 Gram on features with a decaying spectrum: relative Frobenius error of
    G, and of the preconditioned queries at several lambda_r."""
    gen = torch.Generator().manual_seed(5)
    phi = torch.randn(n, k, generator=gen) * torch.logspace(0, -3, k)
    q = torch.randn(M_QUERIES, k, generator=gen)
    g64, g32 = gram(phi), gram(phi, precision="mixed")
    rows = []
    for r in (1e-4, 1e-2, 1.0):
        u64 = Preconditioner(g64, r).solve(q, torch.float64)
        u32 = Preconditioner(g32, r).solve(q, torch.float64)
        rows.append(
            {
                "n": n,
                "k": k,
                "lambda_r": r,
                "gram_rel_err": float((g32 - g64).norm() / g64.norm()),
                "u_rel_err": float((u32 - u64).norm() / u64.norm()),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--k", default="4096,8192,16384,32768")
    ap.add_argument("--n", default="420,10000,100000")
    ap.add_argument("--lambdas", default=",".join(f"{x:g}" for x in LAMBDAS))
    ap.add_argument("--paths", default="before,primal,mixed,dual")
    ap.add_argument("--max-cell-s", type=float, default=3600.0, help="skip longer cells")
    ap.add_argument("--no-sweep", action="store_true", help="time the single-lambda path only")
    ap.add_argument("--plan", action="store_true", help="print the predictions, run nothing")
    ap.add_argument("--json", default="out/bench_scoring.json")
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # k,n,path: run one cell, print its JSON
    a = ap.parse_args()
    lambdas = [float(x) for x in a.lambdas.split(",")]
    if a.cell:
        k, n, path = a.cell.split(",")
        print(json.dumps(run_cell(int(k), int(n), path, lambdas, not a.no_sweep)))
        return
    rates = gemm_rates()
    budget_gb = mem_total_gb() * 0.9
    print(
        f"GEMM here: {rates['f64']:.0f} GFLOP/s float64, {rates['f32']:.0f} float32; "
        f"memory {mem_total_gb():.1f} GB",
        flush=True,
    )
    cols = ["k", "n", "path", "gram_s", "factor_s", "sweep_s", "peak_rss_gb", "predicted_s"]
    rows, sweeps, planned = [], {}, set()
    for k in [int(x) for x in a.k.split(",")]:
        for n in [int(x) for x in a.n.split(",")]:
            for path in a.paths.split(","):
                if path == "dual" and n >= k:
                    continue
                # A primal sweep depends on k only (the same eigh for primal and mixed): timed
                # once per k and path family, then reused (sweep_from).
                family = path if path in ("dual", "before") else "primal"
                key = (k, n, family) if family == "dual" else (k, family)
                sweep = not a.no_sweep and key not in planned
                planned.add(key)
                reason = sweep_reason = None
                for with_sweep in [True, False] if sweep else [False]:
                    seconds, gb = predict(k, n, path, rates, with_sweep)
                    reason = None
                    if seconds > a.max_cell_s:
                        reason = f"predicted {seconds / 60:.0f} min > {a.max_cell_s / 60:.0f} min"
                    elif gb > budget_gb:
                        reason = f"needs ~{gb:.0f} GB > {budget_gb:.0f} GB of memory"
                    if reason is None or not with_sweep:
                        break
                    sweep_reason, sweep = reason, False
                base = {"k": k, "n": n, "path": path, "predicted_s": round(seconds)}
                if a.plan:
                    note = f" (sweep skipped: {sweep_reason})" if sweep_reason else ""
                    print(
                        f"k={k} n={n} {path}: ~{seconds:.0f} s, ~{gb:.1f} GB {reason or ''}{note}"
                    )
                    continue
                if reason:
                    rows.append({**base, "skipped": True, "reason": reason})
                    print(f"skip k={k} n={n} {path}: {reason}", flush=True)
                    continue
                cmd = [sys.executable, __file__, "--cell", f"{k},{n},{path}"]
                cmd += ["--lambdas", a.lambdas] + ([] if sweep else ["--no-sweep"])
                proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                if proc.returncode != 0:
                    tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
                    rows.append({**base, "skipped": True, "reason": f"failed: {tail}"})
                    print(f"FAILED k={k} n={n} {path}: {tail}", flush=True)
                    continue
                row = {**base, **json.loads(proc.stdout.strip().splitlines()[-1])}
                if "sweep_s" in row:
                    sweeps[key] = row["sweep_s"], f"{path} n={n}"
                elif key in sweeps:
                    row["sweep_s"], row["sweep_from"] = sweeps[key]
                elif sweep_reason:
                    row["sweep_skipped"] = sweep_reason
                rows.append(row)
                print(format_table([row], cols).splitlines()[-1], flush=True)
                write_json(a.json, {"environment": environment(), "rates": rates, "rows": rows})
    if a.plan:
        return
    print(format_table([r for r in rows if not r.get("skipped")], cols))
    for r in rows:
        if r.get("skipped"):
            print(f"skipped: k={r['k']} n={r['n']} {r['path']}: {r['reason']}")
    acc = accuracy_rows()
    print(format_table(acc))
    payload = {"environment": environment(), "rates": rates, "rows": rows, "accuracy": acc}
    print(f"-> {write_json(a.json, payload)}")


if __name__ == "__main__":
    main()
