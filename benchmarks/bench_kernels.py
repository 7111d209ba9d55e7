"""Benchmark the Triton projection kernels against their peers and the GPU's measured ceilings.

    python benchmarks/bench_kernels.py [--quick] [--json rows.json]
    python benchmarks/bench_kernels.py --smoke     # tiny shapes; on CPU via the Triton interpreter

Method: every case is verified against its peer before it is timed. On a GPU, timing is
``triton.testing.do_bench`` (warm-up, then repetitions for ~``--rep-ms`` with the L2 cache flushed
between them); rows report the median and the 20th/80th percentiles in milliseconds. The ceilings
are measured in the same run: a large bfloat16 matmul (TFLOP/s) and a device-to-device copy (GB/s,
bytes read + written). Rows record the machine, versions and git sha. Without CUDA the script says
so and exits 0, unless ``--smoke`` asks for a check of the script itself (numbers meaningless).

Cases (full sizes; ``--quick`` shrinks p and out)
- ``rademacher``: ``rademacher_project`` x [16, 10^6] -> [16, 2048], float32 and bfloat16 x.
  Peers: ``x @ P`` with P stored in memory (the floor if 10^6 x 2048 signs fit: 4-8 GB here) and
  generating P with the torch hash then multiplying (what a kernel-less pipeline does).
- ``linear_grad``: ``linear_grad_project`` A [16, 64, 1280], G [16, 64, 1280] -> [16, 2048]
  (bfloat16, a 1.6 M-parameter layer). Peer: materialise W_b with bmm (float32), then
  ``rademacher_project``.
Useful FLOPs: 2 * B * p * k for a projection (+ 2 * B * T * in * out for forming W_b). Bytes: the
inputs read and the output written once, i.e. the traffic the fused kernels cannot avoid.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import environment, format_table, time_fn, write_json  # noqa: E402

SIZES = {
    "full": {"p": 1_000_000, "T": 64, "d_in": 1280, "d_out": 1280, "k": 2048, "mm": 8192},
    "quick": {"p": 100_000, "T": 64, "d_in": 1280, "d_out": 320, "k": 2048, "mm": 4096},
    "smoke": {"p": 300, "T": 5, "d_in": 24, "d_out": 17, "k": 40, "mm": 64},
}

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _import_kernels():
    """ctrak_fast.kernels (imported here, before triton: on CPU it selects the interpreter)."""
    return importlib.import_module("ctrak_fast.kernels")


def _bench(fn, rep_ms: float) -> dict:
    if not torch.cuda.is_available():  # --smoke on CPU: a few wall-clock runs
        t = time_fn(fn, warmup=1, repeat=3)
        return {"ms": 1e3 * t.median, "ms_p20": 1e3 * t.min, "ms_p80": 1e3 * t.max}
    from triton.testing import do_bench

    p20, p50, p80 = do_bench(fn, warmup=max(5, rep_ms / 4), rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    return {"ms": p50, "ms_p20": p20, "ms_p80": p80}


def dense_P(seed: int, p: int, k: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[p, k] projection matrix from the torch hash, generated on ``device`` in row chunks."""
    from ctrak_fast.kernels import hashing

    out = torch.empty(p, k, dtype=dtype, device=device)
    cols = torch.arange(k, device=device)
    step = max(1, (1 << 25) // k)
    for s in range(0, p, step):
        rows = torch.arange(s, min(p, s + step), device=device)
        neg = hashing.sign_bits(seed, rows, cols)
        out[s : s + rows.numel()] = (1.0 - 2.0 * neg.to(dtype)) / k**0.5
    return out


def _check(name: str, y: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    err = (y.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    if not err <= rtol * scale:
        raise AssertionError(f"{name}: max error {err:.3g} > {rtol} * {scale:.3g}")


def ceilings(size: dict, dev: str, rep_ms: float) -> dict:
    n = size["mm"]
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = _bench(lambda: a @ b, rep_ms)
    matmul = 2 * n**3 / (t["ms"] * 1e-3) / 1e12
    x = torch.empty(64 * n * n, device=dev, dtype=torch.float32)  # 2 GiB at n = 8192
    y = torch.empty_like(x)
    t = _bench(lambda: y.copy_(x), rep_ms)
    copy = 2 * x.numel() * 4 / (t["ms"] * 1e-3) / 1e9
    return {"bf16_matmul_tflops": matmul, "copy_gbps": copy, "matmul_n": n}


def case_rademacher(K, dtype: torch.dtype, size: dict, dev: str, rep_ms: float) -> list[dict]:
    from ctrak_fast.kernels import hashing

    B, p, k, seed = 16, size["p"], size["k"], 0
    x = torch.randn(B, p, device=dev).to(dtype)
    P = dense_P(seed, p, k, dtype, dev)
    peer = lambda: x @ P  # noqa: E731
    fused = lambda: K.rademacher_project_triton(x, seed, k)  # noqa: E731
    _check("rademacher vs stored P", fused(), peer(), 1e-2 if dtype != torch.float32 else 1e-4)

    step = max(1, (1 << 25) // k)
    cols = torch.arange(k, device=dev)

    def generate_then_matmul():
        out = torch.zeros(B, k, device=dev)
        for s in range(0, p, step):
            rows = torch.arange(s, min(p, s + step), device=dev)
            blk = 1.0 - 2.0 * hashing.sign_bits(seed, rows, cols).float()
            out.addmm_(x[:, s : s + rows.numel()].float(), blk)
        return out / k**0.5

    flops = 2 * B * p * k
    nbytes = x.numel() * x.element_size() + B * k * 4
    tag = f"B={B} p={p} k={k} {str(dtype).removeprefix('torch.')}"
    rows = []
    for impl, fn, reps in (
        ("triton fused", fused, rep_ms),
        ("stored P matmul", peer, rep_ms),
        ("torch hash + matmul", generate_then_matmul, rep_ms / 4),
    ):
        rows.append({"case": "rademacher", "shape": tag, "impl": impl, **_bench(fn, reps)})
    for r in rows:
        r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
        r["gbps"] = nbytes / (r["ms"] * 1e-3) / 1e9
        r["gsigns_per_s"] = p * k / (r["ms"] * 1e-3) / 1e9
    return rows


def case_linear_grad(K, size: dict, dev: str, rep_ms: float) -> list[dict]:
    B, T, d_in, d_out, k, seed = 16, size["T"], size["d_in"], size["d_out"], size["k"], 0
    A = torch.randn(B, T, d_in, device=dev, dtype=torch.bfloat16)
    G = torch.randn(B, T, d_out, device=dev, dtype=torch.bfloat16)
    fused = lambda: K.linear_grad_project(A, G, seed, k, force="triton")  # noqa: E731

    def materialise_then_project():
        W = torch.bmm(G.transpose(1, 2).float(), A.float())  # [B, out, in] float32
        return K.rademacher_project_triton(W.view(B, -1), seed, k)

    _check("linear_grad vs materialise", fused(), materialise_then_project(), 1e-4)
    flops = 2 * B * d_in * d_out * k + 2 * B * T * d_in * d_out
    nbytes = (A.numel() + G.numel()) * 2 + B * k * 4
    tag = f"B={B} T={T} in={d_in} out={d_out} k={k} bfloat16"
    rows = []
    for impl, fn in (("triton fused", fused), ("materialise + project", materialise_then_project)):
        r = {"case": "linear_grad", "shape": tag, "impl": impl, **_bench(fn, rep_ms)}
        r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
        r["gbps"] = nbytes / (r["ms"] * 1e-3) / 1e9
        rows.append(r)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs without CUDA too")
    ap.add_argument("--rep-ms", type=float, default=200.0, help="timing budget per measurement")
    ap.add_argument("--json", type=pathlib.Path, help="also write the rows here")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench_kernels: needs a CUDA device; nothing to do on this machine.")
        return 0
    size = SIZES["smoke" if args.smoke else "quick" if args.quick else "full"]
    dev = "cuda" if cuda else "cpu"

    K = _import_kernels()  # before triton: on CPU it selects the interpreter
    import triton

    env = environment({"triton": triton.__version__, "sizes": size})
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    ceil = ceilings(size, dev, args.rep_ms)
    print(
        f"ceilings: bf16 matmul {ceil['bf16_matmul_tflops']:.3g} TFLOP/s "
        f"(n={ceil['matmul_n']}), copy {ceil['copy_gbps']:.3g} GB/s"
    )

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        rows += case_rademacher(K, dtype, size, dev, args.rep_ms)
        if cuda:
            torch.cuda.empty_cache()  # the stored P of the case (4-8 GB)
    rows += case_linear_grad(K, size, dev, args.rep_ms)

    fused_ms = {(r["case"], r["shape"]): r["ms"] for r in rows if r["impl"] == "triton fused"}
    for r in rows:
        r["pct_matmul"] = 100 * r["tflops"] / ceil["bf16_matmul_tflops"]
        r["pct_copy"] = 100 * r["gbps"] / ceil["copy_gbps"]
        r["fused_speedup"] = r["ms"] / fused_ms[(r["case"], r["shape"])]
    cols = ["case", "shape", "impl", "ms", "ms_p20", "ms_p80", "tflops", "pct_matmul", "gbps"]
    print(format_table(rows, [*cols, "pct_copy", "fused_speedup"]))
    if args.json:
        write_json(args.json, {"environment": env, "ceilings": ceil, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
