"""The attribution engine end to end on a toy classifier (no diffusion model): seconds on a CPU.

    synthetic 8x8 images (4 classes) -> small MLP -> per-sample loss gradients (torch.func)
    -> Projector -> FeatureStore -> Gram + Preconditioner -> top-k search over the shards

The score is TRAK's, score_i = q (Phi^T Phi + lam I)^-1 phi_i, with phi_i the projected unit-norm
gradient of training sample i's cross-entropy and q that of a test point. Training points of the
test point's class should dominate its top-5: the returned dict reports that fraction.

Run: ``python -m ctrak_fast.bench.engine_example OUT_DIR``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ctrak_fast.engine.gram import gram
from ctrak_fast.engine.projection import ProjectionSpec
from ctrak_fast.engine.projector import Projector
from ctrak_fast.engine.scoring import Preconditioner, score_dense
from ctrak_fast.engine.store import FeatureStore, model_fingerprint

CLASSES = ("horizontal bar", "vertical bar", "diagonal", "blob")


log = logging.getLogger(__name__)


def make_bars(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n noisy 8x8 images of 4 classes at random positions and intensities.

    Returns:
        x [n, 64] float32, y [n] int64 (balanced, in the repeating order 0, 1, 2, 3, ...).
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % len(CLASSES)
    img = torch.zeros(n, 8, 8)
    pos = torch.randint(0, 8, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    r = torch.arange(8)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    for i in range(n):
        p = int(pos[i])
        if y[i] == 0:
            img[i, p, :] = 1
        elif y[i] == 1:
            img[i, :, p] = 1
        elif y[i] == 2:
            img[i] = torch.eye(8).flip(1) if flip[i] else torch.eye(8)
        else:
            cy, cx = 1.5 + 5 * torch.rand(2, generator=g)
            img[i] = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0)
    amp = 0.5 + torch.rand(n, 1, 1, generator=g)
    img = amp * img + 0.3 * torch.randn(n, 8, 8, generator=g)
    return img.reshape(n, 64), y


def _train(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 300) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, len(CLASSES)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _grad_blocks(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> list[tuple[int, torch.Tensor]]:
    """Unit-norm per-sample gradients of the cross-entropy as [(global_offset, [B, n_param]), ...].

    Normalising (as Concept-TRAK does per timestep) keeps well-fit samples, whose gradients are
    tiny, from being ranked by their noise; unnormalised, the top-5 class agreement drops to ~0.6.
    """
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = [grads[name].reshape(x.shape[0], -1) for name in params]
    inv_norm = torch.stack([g.square().sum(1) for g in flat]).sum(0).rsqrt()[:, None]
    blocks, offset = [], 0
    for g, p in zip(flat, params.values(), strict=True):
        blocks.append((offset, g * inv_norm))
        offset += p.numel()
    return blocks


def _topk(store: FeatureStore, u: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Both tails of the scores phi_i . u_j: (top values, top ids, bottom ids) [m, k] each, and
    the name of the engine that ran."""
    try:
        from ctrak_fast.method.pipeline import search
    except ImportError as e:
        log.warning("the native search is unavailable (%s): dense scores + torch.topk", e)
        scores = score_dense(store, u).T  # [m, N]
        ids = store.done_ids()
        vals, top = torch.topk(scores, k, dim=1)
        bottom = torch.topk(scores, k, dim=1, largest=False).indices
        return vals.float(), ids[top], ids[bottom], "score_dense+torch.topk"
    res = search(store, u, k, tails="both")
    return res.top_values, res.top_ids, res.bottom_ids, "search.topk"


def run_engine_example(
    out_dir: str | Path, k: int = 256, seed: int = 0, progress: bool = True
) -> dict:
    """Attribute 8 test points of a toy classifier to its 2,000 training points.

    Args:
        out_dir: where the feature store (``out_dir/store``) and ``result.json`` go; a rerun
            resumes the existing store (nothing left to append).
        k: projection dimension. seed: data, model and projection seed.
        progress: print the steps and the per-test-point table.

    Returns:
        dict with the timings, ``"search"`` (which top-k backend ran), per test point its label,
        the top-5 (most supporting) training ids, labels and scores and the bottom-5 (most
        opposing) ids and labels, and ``"top5_same_class"``: the fraction of
        those training points that share the test point's class (chance: 0.25).

    Examples:
        >>> res = run_engine_example("/tmp/ctrak_engine", progress=False)  # doctest: +SKIP
        >>> res["top5_same_class"] > 0.8  # doctest: +SKIP
        True
    """
    threads = torch.get_num_threads()
    # Matrices this small gain nothing from threads, which only contend on a busy machine.
    torch.set_num_threads(1)
    try:
        return _run(Path(out_dir), k, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir: Path, k: int, seed: int, progress: bool) -> dict:
    say = print if progress else (lambda *a, **kw: None)
    t0 = time.perf_counter()
    times = {}

    x_train, y_train = make_bars(2000, seed)
    x_test, y_test = make_bars(8, seed + 1)
    model = _train(x_train, y_train, seed)
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    dim = sum(p.numel() for p in model.parameters())
    times["train_s"] = time.perf_counter() - t0
    say(f"trained a {dim}-parameter MLP in {times['train_s']:.2f} s (test accuracy {acc:.2f})")

    spec = ProjectionSpec(k=k, seed=seed)
    projector = Projector(spec, dim)
    meta = {
        "model": model_fingerprint(model),
        "projection": spec.to_dict(),
        "loss": "cross_entropy",
        "data": {"name": "bars8x8", "n": 2000, "seed": seed},
    }
    t = time.perf_counter()
    store = FeatureStore.open_or_create(
        out_dir / "store", k=k, dtype="float32", meta=meta, shard_rows=512
    )
    n_done = store.n_rows
    with store.writer() as w:
        for start in range(n_done, 2000, 250):
            xb, yb = x_train[start : start + 250], y_train[start : start + 250]
            w.append(
                projector.project_blocks(_grad_blocks(model, xb, yb)),
                torch.arange(start, start + len(yb)),
            )
    times["featurize_s"] = time.perf_counter() - t
    say(
        f"featurized {store.n_rows - n_done} training points into {store.path} "
        f"({len(store.shards)} shards, k={k}, backend {projector.tile_backend}) "
        f"in {times['featurize_s']:.2f} s"
    )

    t = time.perf_counter()
    pre = Preconditioner(gram(store), lambda_r=1.0)
    u = pre.solve(projector.project_blocks(_grad_blocks(model, x_test, y_test)))
    top_values, top_ids, bottom_ids, backend = _topk(store, u, 5)
    times["score_s"] = time.perf_counter() - t
    say(f"Gram + Cholesky (lam={pre.lam:.3g}) + top-5 via {backend} in {times['score_s']:.2f} s")

    rows, same = [], 0
    for j in range(len(y_test)):
        ids = top_ids[j].tolist()
        labels = y_train[ids].tolist()
        same += sum(lab == int(y_test[j]) for lab in labels)
        rows.append(
            {
                "test_id": j,
                "label": int(y_test[j]),
                "top_ids": ids,
                "top_labels": labels,
                "top_scores": [round(float(v), 6) for v in top_values[j]],
                "bottom_ids": bottom_ids[j].tolist(),
                "bottom_labels": y_train[bottom_ids[j]].tolist(),
            }
        )
        say(
            f"  test {j} ({CLASSES[int(y_test[j])]:>14}): top-5 train ids {ids} "
            f"labels {[CLASSES[lab][:5] for lab in labels]}"
        )
    result = {
        "store": str(store.path),
        "n_train": store.n_rows,
        "dim": dim,
        "k": k,
        "test_accuracy": acc,
        "search": backend,
        "lambda": pre.lam,
        "tests": rows,
        "top5_same_class": same / (5 * len(y_test)),
        "seconds": {**times, "total_s": time.perf_counter() - t0},
    }
    say(f"top-5 share the test point's class: {result['top5_same_class']:.2f} (chance 0.25)")
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_engine_example(sys.argv[1] if len(sys.argv) > 1 else "engine_example_out")
