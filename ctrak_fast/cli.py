"""`ctrak` command line. Every failure is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_demo(a, **extra):
    """`ctrak demo` and `ctrak bench quality`: the benchmark at the sizes of their arguments."""
    from .benchmark import QualityConfig
    from .demo import ASSETS, run_demo

    cfg = QualityConfig(
        per_combo=a.per_combo,
        k=a.k,
        queries_per_combo=a.queries_per_combo,
        **_method_options(a),
        **extra,
    )
    run_demo(a.out, cfg, progress=not a.quiet, assets=a.assets or ASSETS)


def _method_options(a) -> dict:
    """Concept-TRAK options of `demo` / `bench quality` as QualityConfig fields."""
    from .benchmark import METHODS
    from .featurize import FeatureSpec
    from .query import ConceptQuerySpec

    methods = tuple(m.strip() for m in a.methods.split(","))
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} in --methods; choose from {list(METHODS)}")
    return {
        "methods": methods,
        "negative": a.negative,
        "query_guidance": a.query_guidance,
        "dps": FeatureSpec(inversion_guidance=a.inversion_guidance, param_filter=a.param_filter),
        "concept": ConceptQuerySpec(draws=a.draws, guidance=a.inversion_guidance),
    }


def _cmd_bench_quality(a):
    _cmd_demo(a, lambda_r=a.lambda_r)


def _cmd_train(a, rest):
    from .train import main

    main(rest)


def _load_data(a, model=None):
    """The dataset of --folder/--labels or --data; with `model`, labels index the model's values."""
    from .data import ConceptDataset, SyntheticConfig, load_image_folder, make_dataset
    from .validation import InputError, check_input_dir, check_input_file

    names = {}
    if model is not None and model.config.get("values"):
        names = {"factors": model.config["factors"], "values": model.config["values"]}
    if a.folder:
        check_input_dir(a.folder, "image folder")
        if not a.labels:
            raise InputError("--folder needs --labels (a JSON or CSV labels file)")
        check_input_file(a.labels, "labels file")
        return load_image_folder(a.folder, a.labels, image_size=a.image_size, **names)
    from .demo import ASSETS, DEFAULT_NAME

    path = check_input_file(a.data or ASSETS / f"{DEFAULT_NAME}.json", "dataset file")
    try:
        if path.suffix == ".safetensors":
            return ConceptDataset.load(path)
        return make_dataset(SyntheticConfig.load_json(path))
    except Exception as e:  # safetensors, JSON and config errors alike: the file is unusable
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a usable dataset ({first})") from e


def _load_model(path):
    from .demo import ASSETS, DEFAULT_NAME
    from .models import load_model
    from .validation import InputError, check_input_file

    path = check_input_file(path or ASSETS / f"unet_{DEFAULT_NAME}.safetensors", "model file")
    try:
        return load_model(path)
    except Exception as e:  # safetensors, JSON and state-dict errors alike: the file is unusable
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a usable model checkpoint ({first})") from e


def _feature_spec(a):
    from .featurize import FeatureSpec

    loss = {"concept-trak": "dps", "trak": "dsm", "d-trak": "eps-norm"}[a.method]
    timesteps = (
        tuple(int(t) for t in a.timesteps.split(",")) if a.timesteps else FeatureSpec().timesteps
    )
    inversion = a.method == "concept-trak" and not a.no_inversion
    return FeatureSpec(
        loss=loss,
        timesteps=timesteps,
        inversion=inversion,
        inversion_guidance=a.inversion_guidance,
        normalize=not a.no_normalize,
        param_filter=a.param_filter,
    )


def _featurizer(a, model):
    from .diffusion import NoiseSchedule
    from .featurize import Featurizer
    from .projection import ProjectionSpec

    projection = ProjectionSpec(k=a.k, seed=a.proj_seed)
    if a.factorized:
        from .projection import FactorizedSpec

        try:
            k_in, k_out = (int(v) for v in a.factorized.split(","))
        except ValueError:
            raise ValueError(f"--factorized wants K_IN,K_OUT, got {a.factorized!r}") from None
        projection = FactorizedSpec(k_in=k_in, k_out=k_out, seed=a.proj_seed)
    return Featurizer(
        model,
        NoiseSchedule.for_model(model),
        _feature_spec(a),
        projection,
        model.null_cond(1)[0],
        grad_backend=a.grad_backend,
    )


def _cmd_featurize(a):
    """Single process, or one rank of a torchrun job (RANK/WORLD_SIZE in the environment)."""
    from .benchmark import train_subset
    from .distributed import DistContext, featurize_distributed
    from .validation import check_data_matches_model, check_output_dir, check_positive

    # Everything that can be checked is checked before the output is touched.
    for name in ("k", "batch_size", "shard_rows"):
        check_positive("--" + name.replace("_", "-"), getattr(a, name))
    check_output_dir(a.out, "--out")
    das = Path(a.das_out) if a.das_out else None
    if das is not None:
        check_output_dir(das, "--das-out")
    model = _load_model(a.model)
    data = _load_data(a, model)
    if a.per_combo:
        data = train_subset(data, a.per_combo)
    check_data_matches_model(
        data.images, data.labels, data.ids, model.config, data.factors, data.values
    )
    fz = _featurizer(a, model)
    with DistContext.from_env(device=next(model.parameters()).device) as ctx:
        store = featurize_distributed(
            fz,
            data.images,
            data.labels,
            data.ids,
            a.out,
            batch_size=a.batch_size,
            shard_rows=a.shard_rows,
            dtype=a.dtype,
            das_path=das,
            nan_policy=a.nan_policy,
            progress=ctx.rank == 0 and sys.stderr.isatty(),
            dist_ctx=ctx,
        )
    if ctx.rank != 0:
        return
    print(f"{store.n_rows} rows x k={store.k} in {a.out}")
    zeroed = store.zeroed_ids()
    if zeroed:
        shown = ", ".join(map(str, zeroed[:5])) + (", ..." if len(zeroed) > 5 else "")
        print(
            f"ctrak: warning: {len(zeroed)} sample(s) had non-finite features and are stored as "
            f"zero rows (ids {shown}); {a.out}/manifest.json lists them",
            file=sys.stderr,
        )


def _parse_cond(text: str, model) -> list[int]:
    """'shape=triangle,colour=red' -> value indices (unnamed factors null)."""
    cfg = model.config
    factors, values = cfg["factors"], cfg.get("values") or {}
    cond = list(model.n_values)
    for part in filter(None, text.split(",")):
        if "=" not in part:
            raise ValueError(f"bad condition {part!r}: expected factor=value")
        f, v = (s.strip() for s in part.split("=", 1))
        if f not in factors:
            raise ValueError(f"unknown factor {f!r}; the model has {factors}")
        names = values.get(f, [])
        if v not in names:
            raise ValueError(f"unknown value {v!r} of factor {f!r}; expected one of {names}")
        cond[factors.index(f)] = names.index(v)
    return cond


def _cmd_query(a):
    import torch
    from safetensors.torch import save_file

    from . import diffusion
    from .models import drop_factor
    from .query import ConceptQuerySpec, concept_query_features

    model = _load_model(a.model)
    fz = _featurizer(a, model)
    cond = torch.tensor(_parse_cond(a.concept, model))
    factors = model.config["factors"]
    removed = [f.strip() for f in a.remove.split(",")] if a.remove else factors
    for f in removed:
        if f not in factors:
            raise ValueError(f"unknown factor to remove {f!r}; the model has {factors}")
    negs = [drop_factor(cond[None], factors.index(f), model)[0] for f in removed]
    spec = ConceptQuerySpec(draws=a.draws, n_draws=a.n_draws, weight=a.weight, seed=a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    image, _ = diffusion.ddim_sample(model, cond[None], guidance=a.guidance, generator=gen)
    q = concept_query_features(fz, spec, cond, negs, image=image[0].clamp(-1, 1))
    meta = {**fz.meta(), "query": spec.to_dict(), "concept": a.concept, "removed": removed}
    tmp = Path(a.out).with_suffix(".tmp")
    save_file(
        {"queries": q.contiguous(), "image": image.contiguous()},
        str(tmp),
        metadata={"ctrak": json.dumps(meta)},
    )
    os.replace(tmp, a.out)
    removed_txt = ", ".join(removed)
    print(f"{len(removed)} query feature(s) for {a.concept!r} (removed: {removed_txt}) -> {a.out}")


def _cmd_attribute(a):
    from safetensors import safe_open

    from .export import export_scores
    from .scoring import Preconditioner, gram
    from .search import iter_store_shards, topk
    from .search_distributed import distributed_session, gram_distributed, topk_distributed
    from .store import FeatureStore, SpecMismatch

    store = FeatureStore.open(a.store)
    with safe_open(a.query, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("ctrak", "{}"))
        q = f.get_tensor("queries")
    store.check_compatible({k: v for k, v in meta.items() if k in ("model", "projection")})
    # Gradients of other parameters live in other projection rows: refuse a query made with
    # another parameter filter (the loss may differ: concept queries score any training loss).
    q_filter = meta.get("feature", {}).get("param_filter")
    s_filter = store.meta.get("feature", {}).get("param_filter")
    if "feature" in meta and q_filter != s_filter:
        raise SpecMismatch(store.path, "feature.param_filter", s_filter, q_filter)
    if a.k > store.n_rows:
        raise ValueError(f"k={a.k} is larger than the store's {store.n_rows} rows")
    sel = [int(i) for i in a.export_queries.split(",")] if a.export_queries else None
    # Under torchrun every rank searches its block of shards; the lists are merged exactly.
    with distributed_session() as (rank, world):
        if world > 1:
            u = Preconditioner(gram_distributed(store, verify=a.verify), a.lambda_r).solve(q)
            res = topk_distributed(store, u, a.k, tails="both", verify=a.verify)
        else:
            g = gram(iter_store_shards(store, verify=a.verify))
            u = Preconditioner(g, a.lambda_r).solve(q)
            res = topk(store, u, a.k, tails="both", verify=a.verify)
    if rank != 0:
        return
    if a.export_scores:
        info = {"store": str(a.store), "query": str(a.query), "lambda_r": a.lambda_r}
        export_scores(store, u, a.export_scores, queries=sel, verify=a.verify, meta=info)
        print(f"scores of {len(sel or q)} queries x {store.n_rows} rows -> {a.export_scores}")
    out = {
        "store": str(a.store),
        "query": str(a.query),
        "removed": meta.get("removed"),
        "top": [
            {"ids": i.tolist(), "scores": v.tolist()}
            for i, v in zip(res.top_ids, res.top_values, strict=True)
        ],
        "bottom": [
            {"ids": i.tolist(), "scores": v.tolist()}
            for i, v in zip(res.bottom_ids, res.bottom_values, strict=True)
        ],
    }
    text = json.dumps(out, indent=1)
    if a.out:
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, a.out)
        print(f"top-{a.k} of {len(q)} queries -> {a.out}")
    else:
        print(text)


def _cmd_report(a):
    import torch
    from safetensors import safe_open

    from .report import gallery

    data = _load_data(a)
    res = json.loads(Path(a.result).read_text())
    with safe_open(res["query"], framework="pt") as f:
        image = f.get_tensor("image")[0]
    row_of = {int(i): r for r, i in enumerate(data.ids.tolist())}
    rows = []
    for qi, (top, bottom) in enumerate(zip(res["top"], res["bottom"], strict=True)):
        scores = torch.full((len(data),), float("nan"))
        for i, s in zip(top["ids"] + bottom["ids"], top["scores"] + bottom["scores"], strict=True):
            scores[row_of[int(i)]] = s
        finite = torch.where(torch.isnan(scores), torch.zeros(()), scores)
        mid = scores.isnan()
        finite[mid] = 0.5 * (max(bottom["scores"]) + min(top["scores"])) if top["scores"] else 0.0
        removed = (res.get("removed") or [""] * len(res["top"]))[qi]
        rows.append({"title": f"query {qi}\nconcept: {removed}", "query": image, "scores": finite})

    def describe(i):
        return " ".join(
            data.values[f][int(v)] for f, v in zip(data.factors, data.labels[i], strict=True)
        )

    gallery(
        rows, data.images, describe, a.out, n_top=min(10, len(res["top"][0]["ids"])), n_bottom=5
    )
    print(f"gallery -> {a.out}")


def _cmd_store(a):
    from .store import FeatureStore

    store = FeatureStore.open(a.path)
    if a.action == "info":
        info = {
            "path": str(a.path),
            "rows": store.n_rows,
            "k": store.k,
            "dtype": store.dtype,
            "shards": len(store.shards),
            "meta": store.meta,
        }
        print(json.dumps(info, indent=1))
        return
    problems = store.verify()
    if problems:
        raise ValueError(f"store {a.path} is corrupt: " + "; ".join(problems))
    print(f"ok: {store.n_rows} rows in {len(store.shards)} shards, checksums match")


def _cmd_example(a):
    from .engine_example import run_engine_example

    run_engine_example(a.out, k=a.k)


def _add_feature_args(p):
    p.add_argument("--model", help="FactorUNet safetensors (default: the shipped model)")
    p.add_argument("--method", default="concept-trak", choices=["concept-trak", "trak", "d-trak"])
    p.add_argument("--k", type=int, default=512, help="projection dimension")
    p.add_argument("--proj-seed", type=int, default=0)
    p.add_argument(
        "--factorized",
        metavar="K_IN,K_OUT",
        help="LoGra-style per-layer Kronecker projection of Linear/Conv2d weights instead of the "
        "dense one (k = layers * K_IN * K_OUT; --k is ignored)",
    )
    p.add_argument("--timesteps", help="comma-separated, default 99,199,...,899")
    p.add_argument(
        "--no-inversion", action="store_true", help="fixed noise instead of DDIM inversion"
    )
    p.add_argument("--inversion-guidance", type=float, default=7.5)
    p.add_argument(
        "--no-normalize", action="store_true", help="skip per-timestep unit normalisation"
    )
    p.add_argument("--param-filter", help="regex on parameter names (default: all parameters)")
    p.add_argument("--grad-backend", default="hooks", choices=["hooks", "func"])


def _add_method_args(p):
    """Concept-TRAK ablation switches of the benchmark commands."""
    p.add_argument(
        "--methods",
        default="concept-trak,trak,d-trak,das,pixel",
        help="comma-separated subset (ablations: concept-trak alone)",
    )
    p.add_argument(
        "--negative",
        default="flip",
        choices=["flip", "null"],
        help="c- of a concept query: the factor flipped to each other value (the paper's "
        "synthetic setting), or set to its null token",
    )
    p.add_argument("--draws", default="local", choices=["local", "global"])
    p.add_argument(
        "--inversion-guidance",
        type=float,
        default=7.5,
        help="CFG of the DDIM inversions (training features, local query draws) and of global "
        "draws",
    )
    p.add_argument(
        "--query-guidance", type=float, default=2.0, help="CFG of the generated query images"
    )
    p.add_argument(
        "--assets",
        help="folder with unet_/judge_shapes16.safetensors, shapes16.json (`ctrak train --out`; "
        "default: the shipped ones)",
    )
    p.add_argument(
        "--param-filter",
        help="regex on parameter names for Concept-TRAK's gradients (default: all), e.g. "
        "'time_emb_proj|factor_embeddings': the layers the condition enters through",
    )


def _add_data_args(p):
    p.add_argument(
        "--data",
        help="SyntheticConfig JSON, or a ConceptDataset .safetensors file (default: shipped JSON)",
    )
    p.add_argument("--folder", help="a folder of images (with --labels) instead of synthetic data")
    p.add_argument("--labels", help="labels file (JSON or CSV) for --folder")
    p.add_argument("--image-size", type=int, default=16)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctrak", description="Concept-level training-data attribution."
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser(
        "demo", help="benchmark every method on the shipped model; table, JSON, gallery"
    )
    d.add_argument("--out", default="demo_out")
    d.add_argument("--per-combo", type=int, default=30)
    d.add_argument("--k", type=int, default=512)
    d.add_argument("--queries-per-combo", type=int, default=2)
    d.add_argument("--quiet", action="store_true")
    _add_method_args(d)

    b = sub.add_parser("bench", help="benchmarks: `ctrak bench quality`")
    bsub = b.add_subparsers(dest="bench", required=True)
    q = bsub.add_parser("quality", help="the synthetic concept benchmark")
    q.add_argument("--out", default="out/quality")
    q.add_argument("--per-combo", type=int, default=250)
    q.add_argument("--k", type=int, default=1024)
    q.add_argument("--queries-per-combo", type=int, default=4)
    q.add_argument("--lambda-r", type=float, default=1.0)
    q.add_argument("--quiet", action="store_true")
    _add_method_args(q)

    sub.add_parser(
        "train",
        help="train the synthetic-concept model and judge (see `ctrak train -h`)",
        add_help=False,
    )

    f = sub.add_parser("featurize", help="write training features into a store")
    _add_feature_args(f)
    _add_data_args(f)
    f.add_argument("--out", required=True, help="store directory (resumed if it exists)")
    f.add_argument("--das-out", help="also write DAS rows here (d-trak only)")
    f.add_argument(
        "--per-combo", type=int, default=0, help="first N images of each combination (0: all)"
    )
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--shard-rows", type=int, default=1024, help="rows per shard (x batch size)")
    f.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    f.add_argument(
        "--nan-policy",
        default="fail",
        choices=["fail", "zero"],
        help="samples with NaN/Inf features: fail naming their ids (default), or store zero "
        "rows that the manifest lists",
    )

    qp = sub.add_parser("query", help="concept-slider query features for one concept")
    _add_feature_args(qp)
    qp.add_argument("--concept", required=True, help="c+, e.g. 'shape=triangle,colour=red'")
    qp.add_argument("--remove", help="factor(s) removed for c- (default: each factor in turn)")
    qp.add_argument("--draws", default="local", choices=["local", "global"])
    qp.add_argument("--n-draws", type=int, default=4)
    qp.add_argument("--weight", type=float, default=7.5)
    qp.add_argument("--guidance", type=float, default=3.0, help="CFG of the generated query image")
    qp.add_argument("--seed", type=int, default=0)
    qp.add_argument("--out", required=True, help="query safetensors file")

    at = sub.add_parser("attribute", help="top-k (both tails) of queries against a store")
    at.add_argument("--store", required=True)
    at.add_argument("--query", required=True)
    at.add_argument("--k", type=int, default=10)
    at.add_argument("--lambda-r", type=float, default=1.0)
    at.add_argument("--out", help="JSON file (default: stdout)")
    at.add_argument(
        "--verify",
        default="ids",
        choices=["ids", "full", "none"],
        help="shard checks while reading: sha256 of the ids (default), of whole files, or none",
    )
    at.add_argument("--export-scores", help="also write all scores (safetensors, streamed)")
    at.add_argument("--export-queries", help="comma-separated query indices to export (all)")

    r = sub.add_parser("report", help="PNG gallery of an attribute result")
    _add_data_args(r)
    r.add_argument("--result", required=True)
    r.add_argument("--out", required=True)

    s = sub.add_parser("store", help="inspect or verify a feature store")
    s.add_argument("action", choices=["info", "verify"])
    s.add_argument("path")

    e = sub.add_parser("example", help="the engine's end-to-end example on a small MLP")
    e.add_argument("--out", default="out/engine_example")
    e.add_argument("--k", type=int, default=256)

    from .adapters.cli import add_t2i_commands

    add_t2i_commands(sub)
    return p


def _cmd_t2i(a):
    from .adapters.cli import run_t2i

    run_t2i(a)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return _run(lambda: _cmd_train(None, argv[1:]))
    a = build_parser().parse_args(argv)
    handlers = {
        "demo": _cmd_demo,
        "featurize": _cmd_featurize,
        "query": _cmd_query,
        "attribute": _cmd_attribute,
        "report": _cmd_report,
        "store": _cmd_store,
        "example": _cmd_example,
        "bench": _cmd_bench_quality,
        "t2i": _cmd_t2i,
    }
    return _run(lambda: handlers[a.cmd](a))


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "this input cannot be used": one line, no traceback. The package's own
    error classes are looked up only if their module was imported (no import cost otherwise)."""
    errors = [ValueError, OSError, ImportError, KeyError]
    for module, name in (("store", "StoreError"), ("distributed", "RankFailed")):
        loaded = sys.modules.get(f"{__package__}.{module}")
        if loaded is not None:
            errors.append(getattr(loaded, name))
    return tuple(errors)


def _run(fn) -> int:
    try:
        fn()
    except Exception as e:
        if os.environ.get("CTRAK_DEBUG") or not isinstance(e, _user_errors()):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"ctrak: error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
