"""Projection of B per-sample gradients of p parameters to k dimensions, against peers, one run.

    python benchmarks/bench_projection.py                  # B=16, p=10**6, k=2048
    python benchmarks/bench_projection.py --p 200000 --threads 1 --json out/proj.json
    pytest benchmarks/bench_projection.py                  # small pytest-benchmark case

Cases (all float32 on the CPU, same input):

- ``ours/reference``: Projector with the torch reference hash, no cache (signs made per call).
- ``ours/cpu``: Projector with the fused C++ kernel (when ctrak_fast._C is built): signs hashed
  into an L1 panel and consumed there, never stored (csrc/project_impl.h); its best ISA variant.
- ``ours/cpu [isa]``: the kernel's other ISA variants (AVX2, portable) called directly.
- ``traker/BasicProjector``: TRAK's CPU projector (rademacher, its default block_size=100), which
  regenerates its matrix block by block on every call.
- ``torch/dense``: ``x @ M`` with a stored [p, k] matrix (the memory-hungry upper bound).

Method: every output is checked (signs equal to the hash on a slice, the fused kernel against the
reference on a slice, norms as the JL property predicts) and timed: slow cases (> 5 s per call)
once, others once to warm up and ``--reps`` times, reporting the median (min-max). The reference
backend is timed on its first ``--reference-p`` rows and scaled linearly to p (its cost is exactly
linear in p: one hash per entry), marked "extrapolated"; ``--full`` times it on all p. Cases
needing a [p, k] float32 matrix in memory (8.2 GB at the defaults) are skipped, with the reason
printed, when the machine has too little free memory. Ratios are against traker measured in the
same run; GFLOP/s (2 B p k per call) against a 2048^3 float32 torch matmul and the kernel's fma
peak, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctrak_fast.engine.native import native_available  # noqa: E402
from ctrak_fast.engine.projection import ProjectionSpec  # noqa: E402
from ctrak_fast.engine.projector import Projector  # noqa: E402
from ctrak_fast.kernels import hashing  # noqa: E402


def environment() -> dict:
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        sha = None
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_sha": sha,
        "mem_available_gb": round(_mem_available() / 1e9, 1),
    }


def _mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(fn, reps: int) -> tuple[list[float], torch.Tensor]:
    """(seconds per call, first output). A slow first call (> 5 s) is the only timing; otherwise
    it is the warm-up and ``reps`` timed calls follow."""
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    if first > 5 or reps <= 1:
        return [first], out
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times, out


def check_norms(out: torch.Tensor, x: torch.Tensor, entry_sq: float) -> None:
    """A projection with entries of square entry_sq keeps E|Px|^2 = k * entry_sq * |x|^2."""
    k = out.shape[1]
    ratio = out.double().square().sum(1) / (k * entry_sq * x.double().square().sum(1))
    assert (ratio - 1).abs().max() < 6 * math.sqrt(2 / k), ratio  # relative sd is sqrt(2/k)


def float32_error(x: torch.Tensor, out: torch.Tensor, seed: int, k: int, cols: int = 64):
    """(error of `out`, error of float32 BLAS x @ P): max |. - exact| / max |exact| over the first
    `cols` output columns, exact = float64 x @ P (P hashed in chunks of rows)."""
    cs = torch.arange(cols)
    P = torch.empty(x.shape[1], cols, dtype=torch.float64)
    for a in range(0, x.shape[1], 2**16):
        rows = torch.arange(a, min(a + 2**16, x.shape[1]))
        P[a : a + len(rows)] = 1 - 2 * hashing.sign_bits(seed, rows, cs).double()
    P /= math.sqrt(k)
    exact = x.double() @ P
    scale = exact.abs().max()
    blas = x @ P.float()
    return (
        float((out[:, :cols].double() - exact).abs().max() / scale),
        float((blas.double() - exact).abs().max() / scale),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--p", type=int, default=10**6)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--reference-p", type=int, default=2**15)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for every case")
    ap.add_argument("--full", action="store_true", help="time the reference backend on all p rows")
    ap.add_argument("--json", type=Path, default=REPO / "out" / "bench_projection.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, p, k = args.batch, args.p, args.k
    x = torch.randn(B, p, generator=torch.Generator().manual_seed(0))
    spec = ProjectionSpec(k=k, seed=0)
    env = environment()
    rows, notes = [], []
    matrix_bytes = p * k * 4
    fits = _mem_available() > 1.5 * matrix_bytes + 2e9
    no_room = f"needs {matrix_bytes / 1e9:.1f} GB free, {_mem_available() / 1e9:.1f} GB available"
    print(f"B={B} p={p} k={k}; {env['cpu']}, {env['torch_threads']} threads", flush=True)

    def record(name: str, times: list[float], scale: float = 1.0, note: str = "") -> None:
        secs = [t * scale for t in times]
        med = statistics.median(secs)
        rows.append(
            {"case": name, "seconds": med, "min": min(secs), "max": max(secs), "reps": len(secs)}
        )
        rows[-1]["note"] = note
        print(f"  {name}: {med:.3f} s {note}", flush=True)

    # The spec on a small slice: our tiles are the hash, and the projection is x @ P.
    x_small = x[:, :4096]
    p_small = hashing.rademacher_block(spec.seed, 0, 4096, k)
    ref = Projector(spec, p, backend="reference", cache_bytes=0)
    torch.testing.assert_close(
        ref.project_blocks([(0, x_small)]), x_small @ p_small, rtol=1e-4, atol=1e-4
    )

    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError as e:
        notes.append(f"traker skipped: not installed ({e}); `pip install --no-deps traker`")
    else:
        tp = BasicProjector(p, k, 0, ProjectionType.rademacher, torch.device("cpu"))
        times, out = measure(lambda: tp.project(x, model_id=0), args.reps)
        check_norms(out, x, 1.0)  # its entries are +-1
        record("traker/BasicProjector", times)
        del tp

    rp = p if args.full else min(p, args.reference_p)
    times, want = measure(lambda: ref.project_blocks([(0, x[:, :rp])]), 1)
    check_norms(want, x[:, :rp], 1 / k)
    note = "" if rp == p else f"(extrapolated from {rp:,} rows)"
    record("ours/reference", times, scale=p / rp, note=note)

    if not native_available():
        notes.append("ours/cpu skipped: ctrak_fast._C is not built (./dev setup)")
    else:
        from ctrak_fast.engine import native as _native

        C = _native.load()
        cpu = Projector(spec, p, backend="cpu")
        assert torch.equal(cpu.rows(0, 4096), p_small)
        torch.testing.assert_close(cpu.project_blocks([(0, x[:, :rp])]), want, rtol=1e-5, atol=1e-4)
        times, first = measure(lambda: cpu.project(x), args.reps)
        check_norms(first, x, 1 / k)
        record("ours/cpu", times, note=f"({C.cpu_isa()}, fused)")
        err, err_blas = float32_error(x, first, spec.seed, k)
        notes.append(
            f"float32 error vs float64 (first 64 columns, max |diff| / max |exact|): ours/cpu "
            f"{err:.1e}, float32 BLAS x @ P {err_blas:.1e}"
        )
        threads = torch.get_num_threads()
        for isa in C.cpu_isas()[1:]:

            def call(isa=isa):
                out = torch.zeros(B, k)
                C.rademacher_project(0, 0, x.numpy(), k, out.numpy(), threads, isa)
                return out

            times, out = measure(call, args.reps)
            torch.testing.assert_close(out, first, rtol=1e-4, atol=1e-4)
            record(f"ours/cpu [{isa}]", times)
        peak = C.cpu_fma_peak(0.5, threads) / 1e9
        notes.append(f"fma peak of the {C.cpu_isa()} kernels: {peak:.0f} GFLOP/s")

    if fits:
        m = torch.empty(p, k).bernoulli_(0.5).mul_(2).sub_(1).div_(math.sqrt(k))
        times, out = measure(lambda: x @ m, args.reps)
        check_norms(out, x, 1 / k)
        record("torch/dense", times, note="(stored [p, k] matrix)")
        del m
    else:
        notes.append(f"torch/dense skipped: {no_room}")

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm_times, _ = measure(lambda: a @ b, 3)
    matmul = 2 * 2048**3 / statistics.median(mm_times) / 1e9
    notes.append(f"2048^3 float32 torch matmul: {matmul:.0f} GFLOP/s")
    base = next((r["seconds"] for r in rows if r["case"].startswith("traker")), None)
    grad_bytes = B * p * 4
    print(
        f"\nprojection of B={B} x p={p:,} float32 gradients to k={k} "
        f"({env['cpu']}, {env['cores']} cores, torch {env['torch']})"
    )
    print("| case | seconds (min-max, n) | samples/s | speed-up vs traker | GFLOP/s | note |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["samples_per_s"] = B / r["seconds"]
        r["speedup_vs_traker"] = base / r["seconds"] if base else None
        r["gb_per_s"] = grad_bytes / r["seconds"] / 1e9
        r["gflop_per_s"] = 2 * B * p * k / r["seconds"] / 1e9
        sp = f"{r['speedup_vs_traker']:.2f}x" if base else "-"
        print(
            f"| {r['case']} | {r['seconds']:.3f} ({r['min']:.3f}-{r['max']:.3f}, {r['reps']}) "
            f"| {r['samples_per_s']:.2f} | {sp} | {r['gflop_per_s']:.1f} | {r['note']} |"
        )
    for n in notes:
        print(f"note: {n}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {"bench": "projection", "batch": B, "p": p, "k": k, "env": env, "rows": rows}
    result["matmul_gflops"] = matmul
    result["notes"] = notes
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


def test_projection_fused_cpu_small(benchmark):
    """pytest-benchmark entry: B = 16, p = 2**17, k = 1024 through Projector's cpu backend (or the
    reference where the extension is not built), checked against the stored matrix."""
    B, p, k = 16, 2**17, 1024
    x = torch.randn(B, p, generator=torch.Generator().manual_seed(0))
    proj = Projector(ProjectionSpec(k=k), p, backend="cpu" if native_available() else "reference")
    out = benchmark(proj.project, x)
    want = x[:, :4096] @ hashing.rademacher_block(0, 0, 4096, k)
    got = proj.project_blocks([(0, x[:, :4096])])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    check_norms(out, x, 1 / k)


if __name__ == "__main__":
    main()
