"""ctrak_fast as an attributor of the attribution benchmark library dattri.

`CTRAKAttributor` takes any dattri ``AttributionTask`` (a model, its checkpoint, and the loss /
target functions in torch.func style) and scores it with ctrak_fast's engine: per-sample gradients
of the task's loss (train) and target (test) functions, optionally unit-normalised (Concept-TRAK's
per-gradient normalisation), projected with the deterministic Rademacher projection, kept in a
FeatureStore, and scored in the TRAK form of METHOD.md §3,

    score[i, j] = φ_i · (ΦᵀΦ + λI)⁻¹ q_j,     λ = lambda_r · 0.1 · tr(ΦᵀΦ) / k,

with one float64 Cholesky factor; :meth:`CTRAKAttributor.topk` answers top-k queries with the
exact C++ search instead of the dense [n_train, n_test] matrix. Positive scores mean the training
sample helps (lowers the test target), dattri's convention.

It follows dattri's attributor protocol (`cache(full_train_dataloader)`, then
`attribute(test_dataloader, train_dataloader=None) -> Tensor [n_train, n_test]`, as
dattri's TRAKAttributor), so dattri's metrics (`dattri.metric.lds`, `loo_corr`,
`mislabel_detection_auc`) take its output directly.

dattri is optional: importing this module without it raises ImportError with the install line.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from dattri.task import AttributionTask
    >>> model = nn.Linear(4, 3)
    >>> def loss(params, batch):  # one sample: dattri vmaps over the batch
    ...     x, y = batch
    ...     out = torch.func.functional_call(model, params, x[None])
    ...     return nn.functional.cross_entropy(out, y[None])
    >>> task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    >>> train = DataLoader(TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,))), 8)
    >>> test = DataLoader(TensorDataset(torch.randn(5, 4), torch.randint(0, 3, (5,))), 8)
    >>> att = CTRAKAttributor(task, projection=ProjectionSpec(k=8))
    >>> att.cache(train)
    >>> att.attribute(test).shape              # [n_train, n_test] float32
    torch.Size([20, 5])
    >>> att.topk(test, k=3).top_ids.shape      # [n_test, 3] row indices of the training set
    torch.Size([5, 3])
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

try:
    from dattri.algorithm.base import BaseAttributor
    from dattri.task import AttributionTask
except ImportError as e:  # pragma: no cover - exercised only without dattri
    raise ImportError(
        "ctrak_fast.integrations.dattri needs dattri: pip install dattri (tested with 0.3.0)"
    ) from e

from ctrak_fast.engine.projection import ProjectionSpec
from ctrak_fast.engine.projector import Projector
from ctrak_fast.engine.scoring import DualPreconditioner, Preconditioner, precondition
from ctrak_fast.engine.search import topk
from ctrak_fast.engine.search_inputs import TopK
from ctrak_fast.engine.store import FeatureStore, model_fingerprint

__all__ = ["CTRAKAttributor"]

GradFn = Callable[[Tensor, tuple[Tensor, ...]], Tensor]


class CTRAKAttributor(BaseAttributor):  # type: ignore[misc]
    """ctrak_fast's projected, damped gradient-inner-product attribution as a dattri attributor.

    Args:
        task: the dattri AttributionTask (one checkpoint: ctrak_fast does not ensemble).
        projection: the Rademacher projection (default k=512, seed 0).
        lambda_r: relative damping of ΦᵀΦ (METHOD.md §3; default 1, the paper's).
        normalize: unit-normalise every per-sample gradient before projecting (train and test),
            Concept-TRAK's per-gradient normalisation; off by default (plain TRAK form).
        layer_name: parameter name(s) that get gradients, as in dattri (None: all).
        device: where dattri computes the gradients; projection and scoring run on the CPU.
        store: directory for the training features, new or empty (default: a temporary one).
        store_dtype: "float32", "float16" or "bfloat16".
        projector_backend: "auto", "cpu" or "reference".

    See the module docstring for a complete example.
    """

    def __init__(
        self,
        task: AttributionTask,
        projection: ProjectionSpec | None = None,
        lambda_r: float = 1.0,
        normalize: bool = False,
        layer_name: str | list[str] | None = None,
        device: str = "cpu",
        store: str | os.PathLike[str] | None = None,
        store_dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        projector_backend: str = "auto",
    ) -> None:
        if len(task.get_checkpoints()) != 1:
            raise ValueError("CTRAKAttributor scores one checkpoint; average several yourself")
        self.task = task
        self.projection = projection or ProjectionSpec(k=512)
        self.lambda_r = float(lambda_r)
        self.normalize = normalize
        self.layer_name = layer_name
        self.device = device
        self.store_dtype = store_dtype
        self._store_path = Path(store) if store is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        params, _ = task.get_param(0, layer_name=layer_name)
        self._params: Tensor = params.detach().to(device)
        self._projector = Projector(
            self.projection, int(self._params.numel()), backend=projector_backend
        )
        self._store: FeatureStore | None = None
        self._pre: Preconditioner | DualPreconditioner | None = None

    # -- features --

    def _grad_fn(self, side: Literal["loss", "target"]) -> GradFn:
        kw: dict[str, Any] = {"in_dims": (None, 0)}
        if self.layer_name is not None:
            kw.update(layer_name=self.layer_name, ckpt_idx=0)
        get = self.task.get_grad_loss_func if side == "loss" else self.task.get_grad_target_func
        fn: GradFn = get(**kw)
        return fn

    def _features(
        self, loader: DataLoader[Any], side: Literal["loss", "target"]
    ) -> Iterator[Tensor]:
        """Projected per-sample gradients [B, k] float32, batch by batch in loader order."""
        if isinstance(loader.sampler, RandomSampler):
            raise ValueError("the dataloader shuffles: attribution rows would not follow the data")
        grad_fn = self._grad_fn(side)
        for batch in loader:
            data = tuple(
                t.to(self.device) for t in (batch if isinstance(batch, list | tuple) else [batch])
            )
            g = torch.nan_to_num(grad_fn(self._params, data)).detach().float().cpu()
            if self.normalize:
                norm = g.norm(dim=1, keepdim=True)
                g = torch.where(norm > 0, g / norm.clamp_min(1e-30), torch.zeros_like(g))
            yield self._projector.project(g)

    def _meta(self) -> dict[str, Any]:
        model = self.task.get_model()
        return {
            "model": model_fingerprint(model),
            "projection": self.projection.to_dict(),
            "dattri": {"normalize": self.normalize, "layer_name": self.layer_name},
        }

    # -- dattri protocol --

    def cache(self, full_train_dataloader: DataLoader[Any]) -> None:
        """Featurize the training set into the store and factor ΦᵀΦ + λI.

        Args:
            full_train_dataloader: the training set, not shuffled; row i of every score matrix
                is its i-th sample.
        """
        if self._store_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ctrak-dattri-")
            path = Path(self._tmp.name) / "store"
        else:
            path = self._store_path
        batch = full_train_dataloader.batch_size or 1
        store = FeatureStore.create(
            path,
            k=self.projection.k,
            dtype=self.store_dtype,
            meta=self._meta(),
            shard_rows=max(batch, 4096 // batch * batch),
        )
        n = 0
        with store.writer() as w:
            for phi in self._features(full_train_dataloader, "loss"):
                w.append(phi, torch.arange(n, n + len(phi)))
                n += len(phi)
        self._store = FeatureStore.open(path)
        self._pre = precondition(self._store, self.lambda_r)

    @property
    def store(self) -> FeatureStore:
        """The FeatureStore of the cached training features (ids = row index)."""
        if self._store is None:
            raise RuntimeError("call cache(train_dataloader) first")
        return self._store

    def _queries(self, test_dataloader: DataLoader[Any]) -> Tensor:
        """u = (ΦᵀΦ + λI)⁻¹ q for every test sample: [n_test, k] float32."""
        if self._pre is None:
            raise RuntimeError("call cache(train_dataloader) first")
        q = torch.cat(list(self._features(test_dataloader, "target")))
        return self._pre.solve(q)

    def attribute(
        self,
        test_dataloader: DataLoader[Any],
        train_dataloader: DataLoader[Any] | None = None,
    ) -> Tensor:
        """Scores of every (training, test) pair.

        Args:
            test_dataloader: test samples (not shuffled).
            train_dataloader: training samples to score; default: the cached set. Without a
                cached set it is cached first (it then also defines ΦᵀΦ).

        Returns:
            [n_train, n_test] float32.
        """
        if self._pre is None:
            if train_dataloader is None:
                raise ValueError("no training data: call cache() or pass train_dataloader")
            self.cache(train_dataloader)
            train_dataloader = None
        u = self._queries(test_dataloader)
        rows: Iterable[Tensor] = (
            (f for f, _ in self.store.iter_shards())
            if train_dataloader is None
            else self._features(train_dataloader, "loss")
        )
        return torch.cat([f.float() @ u.T for f in rows])

    def topk(
        self,
        test_dataloader: DataLoader[Any],
        k: int = 10,
        tails: Literal["top", "bottom", "both"] = "both",
    ) -> TopK:
        """Exact top-k cached training rows per test sample (C++ engine, no dense matrix).

        Returns:
            TopK: top_ids / bottom_ids int64 [n_test, k] (row indices of the cached training
            set), top_values / bottom_values float32 [n_test, k].
        """
        return topk(self.store, self._queries(test_dataloader), k, tails=tails)
