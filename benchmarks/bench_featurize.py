"""Featurization of the synthetic training set with the tiny diffusers model, against traker.

    python benchmarks/bench_featurize.py                       # defaults below, ~10 min here
    python benchmarks/bench_featurize.py --n 32 --n-slow 16 --timesteps 99,899 --json out/f.json

Every path featurizes the same images of the shipped training set with the shipped FactorUNet
(1.1 M parameters, a diffusers UNet2DModel inside) and the same loss: TRAK's DSM loss at fixed
noise, summed over the same timesteps, gradient w.r.t. all parameters, no per-timestep
normalisation (TRAKer cannot normalise per timestep; the ``+norm`` rows add ours, exact norms).

- ``ours/dense``: batched hooks (per-sample gradients layer by layer, conv ones by one grouped
  conv backward), summed over timesteps, then one projection by the fused C++ kernel, written to a
  FeatureStore (on CUDA the device default is layerwise: see the next row).
- ``ours/dense layerwise`` (CPU) / ``ours/dense materialised`` (CUDA): the other dense strategy,
  each (batch, timestep) projected layer by layer (grads_layerwise.py; Triton-fused linear layers
  on CUDA), never forming the B x p gradient; same features to float32 rounding.
- ``ours/factorized``: LoGra-style Kronecker projection per Linear/Conv2d layer
  (``--factorized K_IN,K_OUT``, k = layers * K_IN * K_OUT, matching --k by default), never
  forming any per-sample gradient.
- ``ours/func+reference``: torch.func vmap per-sample gradients + the torch reference projector
  (the specification path).
- ``traker/TRAKer``: traker 0.3.2 ``TRAKer.featurize`` with a ModelOutput computing the same loss
  and its CPU ``BasicProjector`` (Rademacher, float32; it regenerates its matrix every batch).

Checks before anything is reported: ours/dense == ours/func+reference (float32 tolerance, same
matrix); traker's and our features preserve the same inner products (Pearson correlation of the
off-diagonal Gram entries; different random matrices, so JL-close rather than equal).

The ``floor`` row times one batched forward + backward of the loss per (batch, timestep) and
nothing else: no method that backpropagates per timestep can beat it, so traker's time over the
floor's bounds any speed-up on this model.

Rows: samples/s over the whole run (cold start included) and over batches after the first; peak
RSS above the start of the run (sampled); for ours/dense and ours/factorized also at 4x N, to show
memory independent of N. Achieved GFLOP/s of ours/dense: torch FLOPs of one batch
(torch.utils.flop_counter) plus 2*B*p*k of the projection, against a large float32 matmul timed in
the same run with the same threads. The slow paths run on the first --n-slow images.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import PeakRss, environment, format_table, write_json  # noqa: E402


def _setup(args):
    from ctrak_fast.api import shipped_dataset, shipped_model
    from ctrak_fast.method.diffusion import NoiseSchedule
    from ctrak_fast.method.featurize import FeatureSpec

    device = torch.device(getattr(args, "device", "cpu"))
    model = shipped_model().to(device)
    data = shipped_dataset()
    n_max = max(args.n * 4, args.n_slow)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.images), generator=gen)[:n_max]
    spec = FeatureSpec.baseline("dsm", timesteps=args.timesteps, normalize=False)
    images, labels = data.images[idx].to(device), data.labels[idx].to(device)
    return model, NoiseSchedule.for_model(model), spec, images, labels


def _featurizer(model, schedule, spec, projection, **kw):
    """A Featurizer of the shipped model (null condition from the model)."""
    from ctrak_fast.method.featurize import Featurizer

    return Featurizer(model, schedule, spec, projection, model.null_cond(1)[0], **kw)


def run_ours(fz, images, labels, batch, workdir):
    """featurize_dataset into a fresh store; returns (seconds, first-batch seconds, features)."""
    from ctrak_fast.engine.store import FeatureStore
    from ctrak_fast.method.dataset_features import featurize_dataset

    first = {}
    inner = fz.__call__

    class Timed:  # the featurizer, timing its first batch
        spec, projection, k = fz.spec, fz.projection, fz.k

        def meta(self):
            return fz.meta()

        def __call__(self, x, c):
            t0 = time.perf_counter()
            out = inner(x, c)
            first.setdefault("s", time.perf_counter() - t0)
            return out

    path = pathlib.Path(tempfile.mkdtemp(dir=workdir)) / "store"
    ids = torch.arange(len(images))
    t0 = time.perf_counter()
    featurize_dataset(
        Timed(), images, labels, ids, path, batch_size=batch, shard_rows=batch, progress=False
    )
    total = time.perf_counter() - t0
    return total, first["s"], FeatureStore.open(path).read_all()[0]


def run_traker(model, schedule, spec, images, labels, k, batch, workdir):
    from torch.func import functional_call
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    from ctrak_fast.method.diffusion import add_noise
    from ctrak_fast.method.featurize import fixed_noise

    device = images.device
    noise = fixed_noise(spec.noise_seed, spec.timesteps, tuple(images.shape[1:]))
    noise = {t: n.to(device) for t, n in noise.items()}

    class DSMOutput(AbstractModelOutput):
        """Sum over timesteps of mean((eps_theta(x_t) - eps)^2), x_t from the fixed noise."""

        def __init__(self):
            pass

        def get_output(self, model, weights, buffers, x0, cond):
            total = 0.0
            for t in spec.timesteps:
                tt = torch.full((1,), t, dtype=torch.long, device=device)
                eps = noise[t][None]
                x_t = add_noise(x0[None], eps, tt, schedule)
                out = functional_call(model, (weights, buffers), (x_t, tt, cond[None]))
                total = total + (out - eps).pow(2).mean()
            return total

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(len(batch[0]), 1, device=device)

    n_params = sum(p.numel() for p in model.parameters())
    projector = BasicProjector(
        grad_dim=n_params,
        proj_dim=k,
        seed=0,
        proj_type=ProjectionType.rademacher,
        device=str(device),
        dtype=torch.float32,
    )
    if device.type == "cuda" and importlib.util.find_spec("fast_jl") is not None:
        projector = None  # TRAKer's default on a GPU: fast_jl's CudaProjector
    traker = TRAKer(
        model=model,
        task=DSMOutput(),
        train_set_size=len(images),
        save_dir=tempfile.mkdtemp(dir=workdir),
        device=str(device),
        projector=projector,
        proj_dim=k,
        use_half_precision=False,
        logging_level=40,
    )
    traker.load_checkpoint(model.state_dict(), model_id=0)
    t0, first = time.perf_counter(), None
    for i in range(0, len(images), batch):
        tb = time.perf_counter()
        x, c = images[i : i + batch], labels[i : i + batch]
        traker.featurize(batch=(x, c), num_samples=len(x))
        first = first or time.perf_counter() - tb
    total = time.perf_counter() - t0
    feats = torch.as_tensor(traker.saver.current_store["grads"][: len(images)]).float()
    return total, first, feats


def worker(args) -> None:
    """One row in a fresh process, so that its peak RSS is its own."""
    from ctrak_fast.engine.projection import FactorizedSpec, ProjectionSpec

    model, schedule, spec, images, labels = _setup(args)
    images, labels, n = images[: args.n], labels[: args.n], args.n
    workdir = args.worker_out
    workdir.mkdir(parents=True, exist_ok=True)
    if images.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakRss() as mem:
        if args.mode == "floor":
            total, first, phi = run_floor(model, schedule, spec, images, labels, args.batch)
            k = 0
        elif args.mode == "traker":
            job = (model, schedule, spec, images, labels, args.k, args.batch, workdir)
            total, first, phi = run_traker(*job)
            k = args.k
        else:
            if args.mode == "factorized":
                k_in, k_out = (int(v) for v in args.factorized.split(","))
                projection = FactorizedSpec(k_in=k_in, k_out=k_out)
            else:
                projection = ProjectionSpec(k=args.k)
            spec = type(spec)(**{**spec.to_dict(), "normalize": args.normalize})
            layerwise = {"auto": None, "on": True, "off": False}[args.layerwise]
            fz = _featurizer(
                model, schedule, spec, projection, grad_backend=args.grad,
                projector_backend=args.proj, layerwise=layerwise,
            )  # fmt: skip
            total, first, phi = run_ours(fz, images, labels, args.batch, workdir)
            k = fz.k
    steady = (total - first) / (n - args.batch) if n > args.batch else first / n
    row = {
        "path": args.worker,
        "N": n,
        "k": k,
        "seconds": total,
        "samples/s": n / total,
        "samples/s steady": 1.0 / steady,
        "peak RSS MB": mem.delta / 2**20,
    }
    if images.is_cuda:
        row["peak GPU MB"] = torch.cuda.max_memory_allocated() / 2**20
    torch.save(phi[: args.n_slow].clone(), workdir / "features.pt")
    (workdir / "row.json").write_text(json.dumps(row))


def _passthrough(argv) -> list[str]:
    """The shared options of this run, for the workers."""
    args = sys.argv[1:] if argv is None else list(argv)
    out, skip_next = [], False
    for a in args:
        if skip_next:
            skip_next = False
        elif a in ("--n", "--json", "--plot", "--skip"):
            skip_next = True
        elif not a.startswith(("--n=", "--json=", "--plot=", "--skip=")):
            out.append(a)
    return out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_floor(model, schedule, spec, images, labels, batch):
    """The least any per-sample method must do: one batched forward + backward of the loss per
    (batch, timestep), no per-sample work, no projection."""
    from ctrak_fast.method.diffusion import add_noise
    from ctrak_fast.method.featurize import fixed_noise

    noise = fixed_noise(spec.noise_seed, spec.timesteps, tuple(images.shape[1:]))
    t0, first = time.perf_counter(), None
    for i in range(0, len(images), batch):
        tb = time.perf_counter()
        x0, c = images[i : i + batch], labels[i : i + batch]
        for t in spec.timesteps:
            tt = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
            eps = noise[t].to(x0.device).expand_as(x0)
            loss = (model(add_noise(x0, eps, tt, schedule), tt, c) - eps).pow(2).mean()
            loss.backward()
        _sync(x0.device)
        first = first or time.perf_counter() - tb
    return time.perf_counter() - t0, first, torch.zeros(len(images), 1)


def gram_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the off-diagonal entries of two Gram matrices."""
    ga, gb = a.double() @ a.double().T, b.double() @ b.double().T
    off = ~torch.eye(len(a), dtype=torch.bool)
    return float(torch.corrcoef(torch.stack([ga[off], gb[off]]))[0, 1])


def matmul_gflops(n: int = 2048, reps: int = 3, device="cpu") -> float:
    device = torch.device(device)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def _conv_backward_flops(grad_out, _x, w, *_args, out_shape=None, **_kw) -> int:
    """Grouped-conv-aware count: each of grad input and grad weight costs the forward's
    2 * |out| * |w[0]| (torch's default rule ignores groups, overcounting the batch-as-groups
    per-sample weight gradients of grads_hooks.conv_weight_grads by the batch size)."""
    mask = _args[-1]
    fwd = 2 * math.prod(grad_out) * math.prod(w[1:])
    return fwd * (int(mask[0]) + int(mask[1]))


def torch_flops(fz, images, labels) -> int:
    """FLOPs of the torch ops of one featurizer call (the C++ projection is not among them)."""
    from torch.utils.flop_counter import FlopCounterMode

    rules = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=rules) as counter:
        fz(images, labels)
    return counter.get_total_flops()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=128, help="images for the fast paths")
    p.add_argument("--n-slow", type=int, default=32, help="images for func+reference and traker")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--factorized", default="4,4", help="K_IN,K_OUT per layer")
    p.add_argument("--timesteps", default="99,199,299,399,499,599,699,799,899")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, or cuda (Triton kernels; traker with fast_jl if installed)",
    )
    p.add_argument("--skip", default="", help="comma-separated: reference,traker,scaling")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG bar chart of samples/s")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=pathlib.Path, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="dense", help=argparse.SUPPRESS)
    p.add_argument("--grad", default="hooks", help=argparse.SUPPRESS)
    p.add_argument("--proj", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--normalize", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layerwise", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.timesteps = tuple(int(t) for t in args.timesteps.split(","))
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(args.threads)

    from ctrak_fast.engine.projection import ProjectionSpec

    if args.worker:
        return worker(args)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench_featurize_"))
    rows, feats = [], {}

    def record(name, n, mode="dense", normalize=False, grad="hooks", proj="auto", layerwise="auto"):
        out = workdir / f"row{len(rows)}"
        cmd = [sys.executable, __file__, "--worker", name, "--worker-out", str(out)]
        cmd += [f"--n={n}", f"--mode={mode}", f"--grad={grad}", f"--proj={proj}"]
        cmd += [f"--layerwise={layerwise}"]
        cmd += ["--normalize"] * normalize + _passthrough(argv)
        subprocess.run(cmd, check=True)
        row = json.loads((out / "row.json").read_text())
        rows.append(row)
        feats.setdefault(name, torch.load(out / "features.pt", weights_only=True))
        print(format_table([row]), flush=True)

    n, ns = args.n, args.n_slow
    record("ours/dense", n)
    record("ours/factorized", n, mode="factorized")
    record("ours/dense+norm", n, normalize=True)
    record("ours/factorized+norm", n, mode="factorized", normalize=True)
    # The other dense strategy than this device's default (grads_layerwise.py): layer by layer
    # per timestep is the CUDA default (no B x p buffer), summing then projecting the CPU's.
    if args.device == "cpu":
        record("ours/dense layerwise", n, layerwise="on")
    else:
        record("ours/dense materialised", n, layerwise="off")
    if "scaling" not in skip:
        record("ours/dense", 4 * n)
        record("ours/factorized", 4 * n, mode="factorized")
    record("floor: forward+backward only", n, mode="floor")
    checks = {}
    if "reference" not in skip:
        record("ours/func+reference", ns, grad="func", proj="reference")
        ref = feats["ours/func+reference"]
        err = float((feats["ours/dense"][:ns] - ref).abs().max() / ref.abs().max())
        checks["max |dense - reference| / max |reference|"] = err
        print(f"check: ours/dense vs func+reference max |diff| / max |ref| = {err:.2e}")
        if err > 1e-4:
            raise SystemExit("ours/dense does not match the reference path")
    if "traker" not in skip:
        record("traker/TRAKer", ns, mode="traker")
        for other in ("ours/dense", "ours/factorized"):
            c = gram_correlation(feats["traker/TRAKer"], feats[other][:ns])
            checks[f"gram corr traker vs {other}"] = c
            print(f"check: Gram correlation traker vs {other}: {c:.3f}")
        if checks["gram corr traker vs ours/dense"] < 0.9:
            raise SystemExit("traker's features do not preserve the same inner products as ours")
        base = next(r for r in rows if r["path"] == "traker/TRAKer")
        for r in rows:
            r["vs traker"] = r["samples/s"] / base["samples/s"]
            r["vs traker steady"] = r["samples/s steady"] / base["samples/s steady"]

    model, schedule, spec, images, labels = _setup(args)
    fz_dense = _featurizer(model, schedule, spec, ProjectionSpec(k=args.k))
    n_params = sum(p.numel() for p in model.parameters())
    ceiling = matmul_gflops(device=args.device)
    flops = torch_flops(fz_dense, images[: args.batch], labels[: args.batch])
    flops += 2 * args.batch * n_params * args.k
    steady = next(r for r in rows if r["path"] == "ours/dense")["samples/s steady"]
    achieved = flops / args.batch * steady / 1e9
    print()
    print(format_table(rows))
    print(
        f"\nours/dense: {flops / args.batch / 1e9:.2f} GFLOP per sample (torch ops + projection), "
        f"{achieved:.1f} GFLOP/s steady = {achieved / ceiling:.0%} of a 2048^3 float32 matmul "
        f"({ceiling:.1f} GFLOP/s, {args.threads} thread(s))"
    )
    payload = {
        "environment": environment({"threads": args.threads}),
        "args": {**vars(args), "timesteps": list(args.timesteps)},
        "params": n_params,
        "rows": rows,
        "checks": checks,
        "gflop_per_sample": flops / args.batch / 1e9,
        "achieved_gflops": achieved,
        "matmul_gflops": ceiling,
    }
    if args.json:
        write_json(args.json, payload)
    if args.plot:
        plot(rows, args.plot)


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = {}
    for r in rows:
        best.setdefault(r["path"], r)
    names = list(best)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1))
    ax.barh(names, [best[n]["samples/s"] for n in names], color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("samples/s (log), all timesteps, whole run")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _small_featurizer(projection):
    args = argparse.Namespace(n=4, n_slow=16, timesteps=(99, 499))
    model, schedule, spec, images, labels = _setup(args)
    return _featurizer(model, schedule, spec, projection), images[:16], labels[:16]


def test_featurize_dense_small(benchmark):
    """pytest-benchmark entry: 16 images, 2 timesteps, dense k = 512 (after one warm-up call)."""
    from ctrak_fast.engine.projection import ProjectionSpec

    fz, x, c = _small_featurizer(ProjectionSpec(k=512))
    fz(x, c)
    phi, _ = benchmark(fz, x, c)
    assert phi.shape == (16, 512)


def test_featurize_factorized_small(benchmark):
    """pytest-benchmark entry: the same with the factorised projection (4 x 4 per layer)."""
    from ctrak_fast.engine.projection import FactorizedSpec

    fz, x, c = _small_featurizer(FactorizedSpec(k_in=4, k_out=4))
    phi, _ = benchmark(fz, x, c)
    assert phi.shape == (16, fz.k)


if __name__ == "__main__":
    main()
