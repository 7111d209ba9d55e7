"""`ctrak featurize | query | attribute | report | store | example`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ctrak_fast.cli import pipeline_cmds
from ctrak_fast.cli.inputs import (
    feature_spec,
    featurizer,
    load_data,
    load_model,
    projection,
    read_result,
    recipe_knobs,
    result_store,
    warn_unnamed,
)


def cmd_featurize(a):
    """Single process, or one rank of a torchrun job (RANK/WORLD_SIZE in the environment);
    --pipeline: a diffusers pipeline folder (cli/pipeline_cmds.py)."""
    from ctrak_fast.data.sources import dataset_sources
    from ctrak_fast.engine.validation import InputError, check_output_dir, check_positive

    if a.pipeline:
        return pipeline_cmds.cmd_featurize(a)
    check_factor_model_flags(a)
    from ctrak_fast.method.distributed import DistContext
    from ctrak_fast.method.pipeline import featurize
    from ctrak_fast.models.factor_unet import check_data_matches_model

    # Everything that can be checked is checked before the output is touched.
    for name in ("k", "batch_size", "shard_rows"):
        check_positive("--" + name.replace("_", "-"), getattr(a, name))
    check_output_dir(a.out, "--out")
    das = Path(a.das_out) if a.das_out else None
    if das is not None:
        check_output_dir(das, "--das-out")
        if das.resolve() == Path(a.out).resolve():
            raise InputError(f"--das-out and --out name the same store {das}")
    model = load_model(a.model)
    data = load_data(a, model, decode=False)  # a folder is read a batch at a time
    if a.per_combo:
        data = data.train_subset(a.per_combo)
    check_data_matches_model(
        data.images, data.captions, data.ids, model.config, data.factors, data.values
    )
    fz = featurizer(a, model)
    saved = a.data if a.data and not a.folder and Path(a.data).suffix == ".safetensors" else None
    sources = dataset_sources(data, dataset_file=saved)  # the store names each row's image
    with DistContext.from_env(device=next(model.parameters()).device) as ctx:
        store = featurize(
            fz,
            data.images,
            data.captions,  # what the model is told: a left-out factor is its null token
            data.ids,
            a.out,
            batch_size=a.batch_size,
            shard_rows=a.shard_rows,
            dtype=a.store_dtype,
            das_path=das,
            nan_policy=a.nan_policy,
            progress=ctx.rank == 0,  # a bar on a terminal, log lines otherwise
            dist_ctx=ctx,
            sources=sources,
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


def check_factor_model_flags(a: Any) -> None:
    """The flags of the pipeline path are refused on the FactorUNet path (not silently ignored)."""
    from ctrak_fast.engine.validation import InputError

    if a.dtype not in ("fp32", "float32"):
        raise InputError(
            f"--dtype {a.dtype} (execution precision) needs --pipeline; the features' storage "
            "dtype is --store-dtype"
        )
    given = [f for f in ("lora", "device", "images", "prompt") if getattr(a, f, None)]
    if given:
        raise InputError(f"--{given[0]} needs --pipeline (a diffusers pipeline folder)")
    a.method = a.method or "concept-trak"


def cmd_query(a):
    """Query features of --concept through the Attributor of --method: a concept query (the
    method's slider, c- per removed factor) or, for whole-image methods, the query image's."""
    from ctrak_fast.api import Attributor
    from ctrak_fast.data.images import load_image, load_mask
    from ctrak_fast.engine.validation import check_input_file, check_outputs
    from ctrak_fast.method.losses import region_mask
    from ctrak_fast.method.recipes import recipe_options

    if a.pipeline:
        return pipeline_cmds.cmd_query(a, a.prompt, a.concept or [], a.negative_prompt or [])
    check_factor_model_flags(a)
    a.concept = a.concept[0]
    check_outputs({"--out": a.out}, {"--model": a.model, "--image": a.image, "--mask": a.mask})
    out = Path(a.out)
    model = load_model(a.model)
    att = Attributor(
        model,
        a.method,
        feature=feature_spec(a),
        projection=projection(a),
        grad_backend=a.grad_backend,
    )
    size = int(model.config["image_size"])
    if a.region:  # refused before any image is read or drawn
        region_mask(a.region, size, size)
    if a.image:
        image = load_image(check_input_file(a.image, "query image"), size)
    else:  # the query image is generated from the concept and the seed
        guidance = 3.0 if a.guidance is None else a.guidance
        image = att.generate(a.concept, seed=a.seed, guidance=guidance)[0]
    _, concept = recipe_options(a.recipe, a.draws, recipe_knobs(a))
    weight = 7.5 if a.weight is None else a.weight
    spec = {"n_draws": 4, **concept, "draws": a.draws, "weight": weight, "seed": a.seed}
    if a.n_draws:
        spec["n_draws"] = a.n_draws
    remove = a.remove.split(",") if a.remove else None
    region = a.region
    if a.mask:
        region = load_mask(check_input_file(a.mask, "region mask"), image.shape[-2:])
    q = att.query(a.concept, remove=remove, image=image, region=region, **spec)
    q.save(out)
    print(f"{q.m} query feature(s) for {a.concept!r} ({', '.join(q.labels)}) -> {out}")


def cmd_attribute(a):
    from ctrak_fast.engine.export import export_scores
    from ctrak_fast.engine.store import FeatureStore
    from ctrak_fast.engine.sweep import choose_path
    from ctrak_fast.engine.validation import check_device, check_outputs
    from ctrak_fast.exports import require_format
    from ctrak_fast.method.pipeline import score_topk
    from ctrak_fast.results import Attribution, Query, check_query_store, write_attribution

    require_format(a.format)  # a missing pyarrow is said before any work
    check_device(a.device)
    check_outputs(
        {"--out": a.out, "--export-scores": a.export_scores},
        {"--store": Path(a.store) / "manifest.json", "--query": a.query},
    )
    store = FeatureStore.open(a.store)
    if not a.allow_partial:
        store.check_complete(", or pass --allow-partial to score the rows it has")
    query = Query.load(a.query)
    q = query.features
    check_query_store(store, query.meta)
    if a.k > store.n_rows:
        raise ValueError(f"k={a.k} is larger than the store's {store.n_rows} rows")
    sel = [int(i) for i in a.export_queries.split(",")] if a.export_queries else None
    lambdas = a.lambda_r
    path = choose_path(store.n_rows, store.k, a.scoring_path)
    # Under torchrun every rank searches its block of shards; the lists are merged exactly.
    res, u, rank = score_topk(
        store,
        q,
        a.k,
        lambdas,
        path=path,
        precision=a.gram_precision,
        device=a.device,
        verify=a.verify,
    )
    if rank != 0:
        return
    labels, removed = list(query.labels), list(query.labels)
    if len(lambdas) > 1:
        labels = [f"{lab} @ lambda_r={r:g}" for r in lambdas for lab in query.labels]
        removed = removed * len(lambdas)
    lam = lambdas[0] if len(lambdas) == 1 else list(lambdas)
    if a.export_scores:
        info = {"store": str(a.store), "query": str(a.query), "lambda_r": lam}
        export_scores(store, u, a.export_scores, queries=sel, verify=a.verify, meta=info)
        print(f"scores of {len(sel or u)} queries x {store.n_rows} rows -> {a.export_scores}")
    attribution = Attribution.from_topk(res, labels, lam).named(store)
    header = {
        "store": str(a.store),
        "query": str(a.query),
        "concept": query.meta.get("concept") or query.meta.get("prompt"),
        "removed": removed,
        "scoring_path": path,
    }
    text = write_attribution(a.out, attribution, a.format, **header)
    print(f"top-{a.k} of {len(u)} queries -> {a.out}" if a.out else text.rstrip("\n"))
    warn_unnamed(store)


def cmd_report(a):
    """The gallery of an attribute result, drawn from the images its store records (files under
    the store's data folder, or its generator); refused, naming what is missing, when they
    cannot be found."""
    import torch

    from ctrak_fast.bench.report import gallery
    from ctrak_fast.data.sources import source_images, source_names
    from ctrak_fast.engine.store import FeatureStore
    from ctrak_fast.engine.store.sources import read_sources
    from ctrak_fast.engine.validation import InputError, check_outputs
    from ctrak_fast.results import Query

    check_outputs({"--out": a.out}, {"--result": a.result, "--query": a.query})
    res, qpath = read_result(a.result, a.query)
    store_path = result_store(a.result, res, a.store)
    check_outputs({"--out": a.out}, {"the query": qpath, "the store": store_path / "manifest.json"})
    query = Query.load(qpath)
    if query.image is None:
        raise InputError(f"{qpath}: the query file holds no query image to show")
    image, region = query.image, query.meta.get("region")
    store = FeatureStore.open(store_path)
    record = read_sources(store.path, store.meta)
    shown = sorted({int(i) for row in res["top"] + res["bottom"] for i in row["ids"]})
    try:
        images = source_images(record, shown, int(image.shape[-1]), a.image_root)
    except ValueError as e:
        raise InputError(f"{a.result}: {e}") from None
    captions = source_names(record, shown).get("captions") or [""] * len(shown)
    row_of = {i: r for r, i in enumerate(shown)}
    rows = []
    for top, bottom in zip(res["top"], res["bottom"], strict=True):
        scores = torch.full((len(shown),), float("nan"))
        for i, s in zip(top["ids"] + bottom["ids"], top["scores"] + bottom["scores"], strict=True):
            scores[row_of[int(i)]] = s
        # An image shown for another row sits between the tails of this one.
        mid = 0.5 * (max(bottom["scores"]) + min(top["scores"]))
        scores = torch.where(scores.isnan(), torch.tensor(mid), scores)
        # The concept asked for, then the row's question: which factor c- removed (and lambda).
        asked = res.get("concept") or res.get("prompt") or "whole image"
        rows.append(
            {
                "title": f"{asked} · {top['label']}",
                "query": image,
                "scores": scores,
                "region": region,
            }
        )
    n_top = min(10, len(res["top"][0]["ids"]))
    n_bottom = min(5, len(res["bottom"][0]["ids"]))
    gallery(rows, images, lambda r: captions[r], a.out, n_top=n_top, n_bottom=n_bottom)
    print(f"gallery -> {a.out}")


def cmd_labels(a):
    data = load_data(a)
    counts: dict[tuple, int] = {}
    for row, gap in zip(data.captions.tolist(), data.uncaptioned.any(1).tolist(), strict=True):
        if not gap:
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    print(f"{len(data)} images of {data.image_size}x{data.image_size} in {a.folder}")
    missing = data.uncaptioned.sum(0).tolist()
    for f, n in zip(data.factors, missing, strict=True):
        gap = f"; {n} image(s) without it (the model's null token)" if n else ""
        print(f"  {f}: {len(data.values[f])} values {data.values[f]}{gap}")
    if counts:
        print(
            f"  {len(counts)} combinations fully captioned, {min(counts.values())}-"
            f"{max(counts.values())} images each"
        )
    for combo in data.heldout:
        print("  held out: " + data.describe(combo))
    unknown = (~data.known).sum().item()
    if unknown:
        print(f"  {unknown} image(s) with a value nobody states (no caption, no --truth)")


def cmd_store(a):
    from ctrak_fast.engine.store import FeatureStore

    store = FeatureStore.open(a.path)
    if a.action == "info":
        info = {
            "path": str(a.path),
            "rows": store.n_rows,
            "k": store.k,
            "dtype": store.dtype,
            "shards": len(store.shards),
            "complete": store.complete,
            "expected_rows": store.expected_rows,
            "meta": store.meta,
        }
        print(json.dumps(info, indent=1))
        return
    problems = store.verify()
    if problems:
        raise ValueError(f"store {a.path} is corrupt: " + "; ".join(problems))
    store.check_complete()  # intact but unfinished is not "ok": attribute would refuse it
    print(f"ok: {store.n_rows} rows in {len(store.shards)} shards, complete, checksums match")


def cmd_example(a):
    from ctrak_fast.bench.engine_example import run_engine_example

    run_engine_example(a.out, k=a.k)
