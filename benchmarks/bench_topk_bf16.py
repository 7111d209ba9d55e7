"""The exact bfloat16 search beside the float32 engine: top-k of both tails on the CPU.

    python benchmarks/bench_topk_bf16.py                      # N = 10^6, dim 512, q = 16 and 256
    python benchmarks/bench_topk_bf16.py --n 200000 --repeat 1 --out out/topk_bf16_small.json
    python benchmarks/bench_topk_bf16.py --device cuda    # GPU: N = 4 * 10^6, dim 256 (below)

Rows (same random rows as bench_topk.py, stored as float16 and as bfloat16; same queries):
  * the float32 engine on the float16 store and on the bfloat16 store (``bf16_search=False``);
  * the exact bfloat16 search on the bfloat16 store (``Bf16TopKState``: vdpbf16ps scores, a bound
    on their error, float32 re-scoring of every row that can reach the k-th).
Before timing, the bfloat16 search's ids and values are checked equal to the float32 engine's on
the full bfloat16 data (they must be bit-identical). Reported: GFLOP/s (2 N dim q), its fraction
of the float32 FMA peak measured in the same run (``_C.cpu_fma_peak``) and of the bfloat16 peak
(twice that: vdpbf16ps does two multiply-adds per float32 lane at the fma's rate), the rows
re-scored per query, and the speedup over the float32 engine on the same bfloat16 store.

--device cuda (benchmarks/gpu_check.sh): bfloat16 and float16 rows on the device, the CUDA
engine's tensor-core kernel (mma: exact products, float32 accumulation in the MMA units, within
``fp32_error_bound(..., "mma")``) and its float32 kernel (simt: the CPU engine's fma chain), each
verified on a subset against the float64 reference; the simt ids and values on the bfloat16
subset are checked equal to the CPU's exact bfloat16 search. Feature bytes read per second
against the device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_topk import device_bandwidth, make_features, verify  # noqa: E402
from common import environment, format_table, time_fn, write_json  # noqa: E402

from ctrak_fast.engine import native as _native  # noqa: E402
from ctrak_fast.engine.search import fp32_error_bound, topk, topk_reference  # noqa: E402


def bf16_topk(C, feats: torch.Tensor, u: torch.Tensor, k: int):
    """The bfloat16 search through _C directly, to read its re-scoring count."""
    state = C.Bf16TopKState(u.numpy(), k, "both")
    state.add(feats.view(torch.int16).numpy())
    return state.result(), state


def run(args: argparse.Namespace) -> dict:
    C = _native.load()
    f16 = make_features(args.n, args.dim)
    bf16 = f16.bfloat16()
    ids = torch.arange(args.n, dtype=torch.int64)
    peak = C.cpu_fma_peak(0.5)
    env = environment(
        {"cpu_isa": C.cpu_isa(), "avx512bf16": C.has_avx512bf16(), "fma_peak_GFLOPs": peak / 1e9}
    )
    rows = []
    for q in args.queries:
        u = torch.randn(q, args.dim, generator=torch.Generator().manual_seed(q))
        ref = topk((bf16, ids), u, args.k, backend="cpu", bf16_search=False)
        (tv, ti, bv, bi), state = bf16_topk(C, bf16, u, args.k)
        got = [torch.from_numpy(a) for a in (tv, ti, bv, bi)]
        want = [ref.top_values, ref.top_ids, ref.bottom_values, ref.bottom_ids]
        if not all(torch.equal(a, b) for a, b in zip(got, want, strict=True)):
            raise SystemExit(f"q={q}: the bfloat16 search differs from the float32 engine")
        methods = {
            "float32 engine, float16 store": lambda u=u: topk((f16, ids), u, args.k, backend="cpu"),
            "float32 engine, bfloat16 store": lambda u=u: topk(
                (bf16, ids), u, args.k, backend="cpu", bf16_search=False
            ),
            f"bfloat16 exact ({state.path})": lambda u=u: bf16_topk(C, bf16, u, args.k),
        }
        times = {}
        for name, fn in methods.items():
            print(f"q={q}: timing {name} ...", flush=True)
            t = times[name] = time_fn(fn, warmup=args.warmup, repeat=args.repeat)
            gflops = 2 * args.n * args.dim * q / t.median / 1e9
            rows.append(
                {
                    "method": name,
                    "q": q,
                    "k": args.k,
                    "median_s": t.median,
                    "min-max_s": t.spread(),
                    "GFLOP/s": gflops,
                    "%fp32_peak": 100 * gflops * 1e9 / peak,
                    "%bf16_peak": 100 * gflops * 1e9 / (2 * peak),
                    "rescored/query": state.rescored / q if name.startswith("bfloat16") else None,
                }
            )
        base = times["float32 engine, bfloat16 store"].median
        for r in rows[-len(methods) :]:
            r["speedup_vs_fp32_bf16store"] = base / r["median_s"]
    return {"env": env, "config": vars(args), "rows": rows}


def run_cuda(args: argparse.Namespace) -> dict:
    import os

    C = _native.load()
    if not C.has_cuda() or not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a GPU and ctrak_fast._C built with CUDA")
    dev, sync = torch.device("cuda"), torch.cuda.synchronize
    g = torch.Generator(device=dev).manual_seed(0)
    f16 = torch.randn(args.n, args.dim, generator=g, device=dev, dtype=torch.float16)
    data = {"bfloat16": f16.bfloat16(), "float16": f16}
    ids = torch.arange(args.n, device=dev)
    dev_bw = device_bandwidth(dev)
    env = environment({"device_bandwidth_GBps": dev_bw / 1e9, "gpu": torch.cuda.get_device_name()})
    rows, sub = [], args.verify_rows
    for q in args.queries:
        u = torch.randn(q, args.dim, generator=torch.Generator().manual_seed(q)).to(dev)
        for dtype, feats in data.items():
            f_sub, i_sub = feats[:sub].cpu(), ids[:sub].cpu()
            ref = topk_reference(f_sub, i_sub, u.cpu(), args.k)
            exact = (f_sub.double() @ u.cpu().double().T).T
            for engine in ("mma", "simt"):
                os.environ["CTRAK_CUDA_ENGINE"] = engine
                bound = fp32_error_bound(f_sub, u.cpu(), "mma" if engine == "mma" else "fma")
                mine = topk((feats[:sub], ids[:sub]), u, args.k)
                verify(f"{dtype} {engine}", mine.top_ids, ref.top_ids, exact, bound)
                if engine == "simt" and dtype == "bfloat16":  # the CPU's exact bf16 search
                    cpu = topk((f_sub, i_sub), u.cpu(), args.k, backend="cpu")
                    if not torch.equal(cpu.top_values, mine.top_values):
                        raise SystemExit("cuda simt differs from the CPU bfloat16 search")
                t = time_fn(lambda u=u, f=feats: topk((f, ids), u, args.k), 1, args.repeat, sync)
                nbytes = feats.numel() * feats.element_size()
                rows.append(
                    {
                        "method": f"cuda {engine}, {dtype} rows",
                        "q": q,
                        "k": args.k,
                        "median_s": t.median,
                        "TFLOP/s": 2 * args.n * args.dim * q / t.median / 1e12,
                        "feat_GB/s": nbytes / t.median / 1e9,
                        "%device_bw": 100 * nbytes / t.median / dev_bw,
                    }
                )
            os.environ.pop("CTRAK_CUDA_ENGINE", None)
    return {"env": env, "config": vars(args), "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int, help="feature rows (default 10^6; 4 * 10^6 on cuda)")
    p.add_argument("--dim", type=int, help="feature dimension (default 512; 256 on cuda)")
    p.add_argument("--verify-rows", type=int, default=20_000, help="cuda: the verified subset")
    p.add_argument("--queries", type=int, nargs="+", default=[16, 256])
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="out/bench_topk_bf16.json")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.n = args.n or (4_000_000 if cuda else 1_000_000)
    args.dim = args.dim or (256 if cuda else 512)
    args.verify_rows = min(args.verify_rows, args.n)
    if cuda:
        result = run_cuda(args)
        print(f"\n{result['env']['gpu']}, git {result['env']['git_sha']}")
        print(f"N={args.n} dim={args.dim} rows on the device, k={args.k}, both tails\n")
        print(format_table(result["rows"]))
        print(f"\nwritten {write_json(args.out, result)}")
        return result
    result = run(args)
    env = result["env"]
    print(
        f"\n{env['cpu']} ({env['cores_usable']} usable cores), torch {env['torch']}, "
        f"ISA {env['cpu_isa']}, AVX512-BF16 {env['avx512bf16']}, git {env['git_sha']}, "
        f"fp32 FMA peak {env['fma_peak_GFLOPs']:.0f} GFLOP/s, load {env['load_avg_1m']:.2f}"
    )
    print(f"N={args.n} dim={args.dim}, k={args.k}, both tails\n")
    print(format_table(result["rows"]))
    print(f"\nwritten {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
