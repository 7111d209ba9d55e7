"""`ctrak t2i ...`: concept attribution for text-to-image models (diffusers pipelines).

    ctrak t2i featurize --model PIPELINE_DIR --images DIR --captions metadata.jsonl --out STORE
    ctrak t2i query     --model PIPELINE_DIR --prompt "a pikachu in the style of picasso" \\
                        --concept "a pikachu" --seed 7 --out q.safetensors
    ctrak t2i attribute --store STORE --query q.safetensors --k 10
    ctrak t2i bench     [text_benchmark options]   # the prompt concept benchmark

--model is a diffusers pipeline folder (model_index.json), a checkpoint of the tiny model, or
omitted (the shipped tiny model, whose training set is the shipped synthetic data). Imports are
lazy: building the parser imports neither torch nor diffusers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ctrak_fast.cli.arggroups import (
    DTYPES,
    add_preprocess_args,
    add_t2i_bench_args,
    add_t2i_model_args,
)
from ctrak_fast.cli.argtypes import (
    finite_float,
    nonneg_float,
    nonneg_int,
    positive_int,
)
from ctrak_fast.cli.inputs import named, preprocess
from ctrak_fast.exports import FORMATS
from ctrak_fast.method.methods import FEATURIZE_METHODS


def _adapter(a):
    import torch

    dtype = getattr(torch, a.dtype)
    if a.model and Path(a.model).is_dir():
        from ctrak_fast.models.text2image import TextToImageAdapter

        return TextToImageAdapter.from_pretrained(a.model, dtype=dtype)
    from ctrak_fast.train.tiny_text import load_t2i

    return load_t2i(a.model, dtype=dtype)


def _pixel_size(adapter) -> int:
    scale = 2 ** (len(adapter.vae.config.block_out_channels) - 1) if adapter.latent else 1
    return adapter.config["image_size"] * scale


def _training_set(a):
    """(images or image files, captions, ids, the sources record): a captioned folder, or the
    shipped synthetic data."""
    import torch

    from ctrak_fast.data.sources import dataset_sources, file_sources

    if a.images:
        from ctrak_fast.data.captions import read_captions

        files, captions = read_captions(a.images, a.captions, a.image_column, a.caption_column)
        ids = torch.arange(len(files), dtype=torch.int64)
        crop = preprocess(a)
        return (
            files,
            captions,
            ids,
            file_sources(a.images, files, captions, ids.tolist(), None, crop),
        )
    from ctrak_fast.data import SyntheticConfig, make_dataset
    from ctrak_fast.data.captions import caption
    from ctrak_fast.models.shipped import ASSETS

    data = make_dataset(SyntheticConfig.load_json(a.data or ASSETS / "shapes16.json"))
    if a.per_combo:
        data = data.train_subset(a.per_combo)
    captions = [caption(data.factors, data.values, row) for row in data.labels.tolist()]
    return data.images, captions, data.ids, dataset_sources(data, captions)


def _feature_spec(a, method: str = "concept-trak"):
    """The method table's FeatureSpec with the flags given (inversion settings where it inverts)."""
    from ctrak_fast.method.methods import get_method

    row = get_method(method)
    kw = {"param_filter": a.param_filter}
    if a.timesteps:
        kw["timesteps"] = tuple(a.timesteps)
    if row.inversion:
        kw.update(
            inversion=not a.no_inversion,
            inversion_guidance=a.inversion_guidance,
            inversion_steps=a.inversion_steps,
        )
    return row.feature_spec(**kw)


def _concept_spec(a, **fields):
    """The concept-slider settings of --draws, --n-draws and the inversion flags (the draws invert
    as the training features do), `fields` on top: `t2i query` and `t2i bench`."""
    from ctrak_fast.method.query import ConceptQuerySpec

    return ConceptQuerySpec(
        draws=a.draws,
        n_draws=a.n_draws,
        guidance=a.inversion_guidance,
        steps=a.inversion_steps,
        **fields,
    )


def _featurizer(a, adapter, method="concept-trak"):
    from ctrak_fast.engine.projection import ProjectionSpec
    from ctrak_fast.models.t2i_features import make_featurizer

    return make_featurizer(
        adapter, _feature_spec(a, method), ProjectionSpec(k=a.k, seed=a.proj_seed)
    )


def _cmd_featurize(a):
    from ctrak_fast.method.pipeline import featurize
    from ctrak_fast.models.latent_cache import encode_images_cached

    adapter = _adapter(a)
    images, captions, ids, sources = _training_set(a)
    fz = _featurizer(a, adapter, a.method)
    x0 = encode_images_cached(
        adapter, images, ids, a.out, image_size=_pixel_size(adapter), preprocess=preprocess(a)
    )
    conds = adapter.prompt_ids(captions)
    store = featurize(
        fz,
        x0,
        conds,
        ids,
        a.out,
        batch_size=a.batch_size,
        dtype=a.store_dtype,
        das_path=Path(a.das_out) if a.das_out else None,
        progress=True,
        sources=sources,
    )
    print(f"{store.n_rows} rows x k={store.k} in {a.out}")


def _scheduler(name: str | None, adapter):
    if not name:
        return None
    import diffusers

    classes = {
        "ddim": "DDIMScheduler",
        "ddpm": "DDPMScheduler",
        "euler": "EulerDiscreteScheduler",
        "euler-a": "EulerAncestralDiscreteScheduler",
        "dpm": "DPMSolverMultistepScheduler",
        "pndm": "PNDMScheduler",
    }
    return getattr(diffusers, classes[name]).from_config(adapter.scheduler.config)


def _cmd_query(a):
    from ctrak_fast.data.images import load_image
    from ctrak_fast.engine.validation import check_outputs
    from ctrak_fast.models.prompts import concept_prompts
    from ctrak_fast.models.t2i_features import prompt_query_features
    from ctrak_fast.results import Query

    model = Path(a.model) / "model_index.json" if a.model and Path(a.model).is_dir() else a.model
    check_outputs({"--out": a.out}, {"--model": model, "--image": a.image})
    out = Path(a.out)
    adapter = _adapter(a)
    negatives = concept_prompts(a.prompt, a.concept or (), a.negative_prompt or ())
    labels = [f"-{c}" for c in a.concept or ()] + [f"vs {n!r}" for n in a.negative_prompt or ()]
    fz = _featurizer(a, adapter)
    spec = _concept_spec(a, weight=a.weight, seed=a.seed, timesteps=fz.spec.timesteps)
    if a.image:
        image = load_image(Path(a.image), _pixel_size(adapter))[None]
        x0 = adapter.encode_images(image)
    else:  # the query image is regenerated from its prompt and seed
        x0 = adapter.generate(
            a.prompt,
            "",
            a.guidance,
            a.steps,
            seed=a.seed,
            scheduler=_scheduler(a.scheduler, adapter),
        )
        image = adapter.decode_latents(x0)
        if not adapter.latent:  # a pixel model's query image is the clamped sample
            x0 = image
    q = prompt_query_features(fz, spec, a.prompt, negatives, x0[0] if a.draws == "local" else None)
    meta = {
        **fz.meta(),
        "kind": "concept",
        "query": spec.to_dict(),
        "prompt": a.prompt,
        "negatives": negatives,
    }
    Query(q, tuple(labels), meta, image[0].float()).save(out)
    print(f"{len(q)} query feature(s) for {a.prompt!r} (c-: {negatives}) -> {out}")


def _cmd_attribute(a):
    from ctrak_fast.engine.store import FeatureStore
    from ctrak_fast.engine.sweep import choose_path
    from ctrak_fast.engine.validation import check_outputs
    from ctrak_fast.exports import require_format
    from ctrak_fast.method.pipeline import score_topk
    from ctrak_fast.results import Attribution, Query, check_query_store, write_attribution

    require_format(a.format)  # a missing pyarrow is said before any work
    inputs = {"--store": Path(a.store) / "manifest.json", "--query": a.query}
    check_outputs({"--out": a.out}, inputs)
    store = FeatureStore.open(a.store)
    store.check_complete()
    query = Query.load(a.query)
    q, meta = query.features, query.meta
    if "text2image" not in meta:
        raise ValueError(f"{a.query}: not a text-to-image query (made by `ctrak t2i query`?)")
    # Same model, text encoder, VAE, projection and parameter subset, or the scores mean nothing.
    check_query_store(store, meta)
    if a.k > store.n_rows:
        raise ValueError(f"k={a.k} is larger than the store's {store.n_rows} rows")
    path = choose_path(store.n_rows, store.k, "auto")
    res, _, _ = score_topk(store, q, a.k, [a.lambda_r], path=path)
    header = {
        "store": str(a.store),
        "query": str(a.query),
        "prompt": meta.get("prompt"),
        "removed": list(query.labels),
    }
    attribution = named(Attribution.from_topk(res, query.labels, a.lambda_r), store)
    text = write_attribution(a.out, attribution, a.format, **header)
    print(f"top-{a.k} of {len(q)} queries -> {a.out}" if a.out else text.rstrip("\n"))


def _cmd_bench(a):
    """The benchmark on the shipped tiny model and judge: table.md, results.json, gallery.png."""
    import torch

    from ctrak_fast.bench.demo import write_gallery
    from ctrak_fast.bench.tables import format_table
    from ctrak_fast.bench.text_quality import T2IQualityConfig, run_t2i_quality
    from ctrak_fast.data import SyntheticConfig, make_dataset
    from ctrak_fast.method.featurize import FeatureSpec
    from ctrak_fast.method.methods import parse_methods
    from ctrak_fast.models.factor_unet import load_model
    from ctrak_fast.models.shipped import ASSETS
    from ctrak_fast.train.tiny_text import load_t2i

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = T2IQualityConfig(
        per_combo=a.per_combo,
        k=a.k,
        queries_per_combo=a.queries_per_combo,
        heldout_queries_per_combo=a.heldout_queries_per_combo,
        query_candidates=a.query_candidates,
        query_guidance=a.query_guidance,
        param_filter=a.param_filter,
        methods=parse_methods(a.methods),
        lambda_r=a.lambda_r,
        select_lambda_by=a.select_lambda_by,
        dps=FeatureSpec(inversion_steps=a.inversion_steps, inversion_guidance=a.inversion_guidance),
        concept=_concept_spec(a),
    )
    data = make_dataset(SyntheticConfig.load_json(a.data or ASSETS / "shapes16.json"))
    judge = load_model(a.judge or ASSETS / "judge_shapes16.safetensors")
    res = run_t2i_quality(load_t2i(a.model), judge, data, cfg, a.out, not a.quiet)
    table = format_table(res)
    (Path(a.out) / "table.md").write_text(table + "\n")
    write_gallery(res, data.values, data.factors, Path(a.out) / "gallery.png")
    print(table)


def add_t2i_commands(subparsers) -> argparse.ArgumentParser:
    """Register `t2i featurize|query|attribute|bench` under the main parser's subparsers.

    Each leaf parser sets `t2i_handler`; the main CLI runs `a.t2i_handler(a)` (see run_t2i).
    """
    t = subparsers.add_parser(
        "t2i", help="text-to-image models: prompt concepts (see `ctrak t2i -h`)"
    )
    sub = t.add_subparsers(dest="t2i_cmd", required=True)

    f = sub.add_parser("featurize", help="training features of a captioned image set into a store")
    add_t2i_model_args(f)
    f.add_argument("--images", help="image folder (default: the shipped synthetic data)")
    f.add_argument(
        "--captions",
        help="metadata.jsonl / .csv (file_name plus text or caption) or {file: caption} .json "
        "(default: <images>/metadata.jsonl, else <images>/metadata.csv)",
    )
    f.add_argument("--image-column", help="the file-name column of --captions (default: file_name)")
    f.add_argument(
        "--caption-column", help="the caption column of --captions (default: text, else caption)"
    )
    add_preprocess_args(f)
    f.add_argument("--data", help="SyntheticConfig JSON (without --images)")
    f.add_argument(
        "--per-combo", type=positive_int, default=0, help="synthetic data: first N per combination"
    )
    f.add_argument(
        "--method",
        default="concept-trak",
        choices=FEATURIZE_METHODS,
        help="the attribution method (a row of method/methods.py)",
    )
    f.add_argument("--out", required=True, help="store directory (resumed if it exists)")
    f.add_argument("--das-out", help="also write DAS rows here (d-trak only)")
    f.add_argument("--batch-size", type=positive_int, default=32, help="samples per gradient batch")
    f.add_argument(
        "--store-dtype", default="float32", choices=DTYPES, help="storage dtype of the features"
    )
    f.set_defaults(t2i_handler=_cmd_featurize)

    q = sub.add_parser("query", help="concept query features of a prompt")
    add_t2i_model_args(q)
    q.add_argument("--prompt", required=True, help="c+, e.g. 'a pikachu in the style of picasso'")
    q.add_argument(
        "--concept",
        action="append",
        help="phrase to attribute (repeatable): c- = prompt without it",
    )
    q.add_argument("--negative-prompt", action="append", help="an explicit c- (repeatable)")
    q.add_argument(
        "--draws",
        default="local",
        choices=["local", "global"],
        help="query draws: stochastic DDIM inversions of the query image (local) or samples "
        "from noise (global)",
    )
    q.add_argument("--n-draws", type=positive_int, default=4, help="query draws per query")
    q.add_argument(
        "--weight", type=finite_float, default=3.0, help="slider weight w (paper: 3 for text)"
    )
    q.add_argument(
        "--image", help="the generated query image (PNG/JPG); default: regenerate from --seed"
    )
    q.add_argument(
        "--seed", type=nonneg_int, default=0, help="seed of the query image and of the draws"
    )
    q.add_argument(
        "--guidance", type=nonneg_float, default=7.5, help="CFG of the regenerated query image"
    )
    q.add_argument(
        "--steps", type=positive_int, default=50, help="sampling steps of the regenerated image"
    )
    q.add_argument(
        "--scheduler",
        choices=["ddim", "ddpm", "euler", "euler-a", "dpm", "pndm"],
        help="sampler of the regenerated query image (default: the pipeline's own)",
    )
    q.add_argument("--out", required=True, help="query safetensors file")
    q.set_defaults(t2i_handler=_cmd_query)

    at = sub.add_parser("attribute", help="top-k (both tails) of t2i queries against a store")
    at.add_argument("--store", required=True, help="feature store (`ctrak t2i featurize`)")
    at.add_argument("--query", required=True, help="query file (`ctrak t2i query`)")
    at.add_argument(
        "--k", type=positive_int, default=10, help="training samples kept per query and tail"
    )
    at.add_argument(
        "--lambda-r", type=nonneg_float, default=1.0, help="relative damping of the Gram"
    )
    at.add_argument("--out", help="output file (default: stdout; parquet needs a file)")
    at.add_argument(
        "--format",
        default="json",
        choices=list(FORMATS),
        help="as in `ctrak attribute` (parquet needs pyarrow)",
    )
    at.set_defaults(t2i_handler=_cmd_attribute)

    b = sub.add_parser("bench", help="the prompt concept benchmark on the shipped tiny model")
    add_t2i_bench_args(b)
    b.set_defaults(t2i_handler=_cmd_bench)
    return t


def run_t2i(a) -> None:
    """Handler of the `t2i` command for the main CLI's dispatch table."""
    a.t2i_handler(a)
