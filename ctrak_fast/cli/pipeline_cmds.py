"""`ctrak featurize|query --pipeline DIR`: a diffusers pipeline folder (SD 1.x/2.x, SDXL, PixArt,
SD3; DiT through pipeline_classes.py: captions name classes), or the shipped tiny text-to-image
model, with a captioned image folder. `ctrak t2i featurize|query` are aliases that run these
same functions (cli/t2i.py only translates their flag names).

Every flag of the pipeline path is read here: --pipeline / --lora / --lora-scope, --dtype (the
UNet's execution precision; --store-dtype is the features' storage), --device, --method (default
concept-trak-cond), the feature and inversion knobs. Errors raised inside diffusers or
transformers become one line naming the pipeline (`diffusers_errors`).
"""

from __future__ import annotations

import contextlib
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ctrak_fast.cli.pipeline_args import EXEC_DTYPES
from ctrak_fast.cli.pipeline_classes import (
    class_conds,
    class_featurizer,
    class_query,
    is_class_conditional,
)

DEFAULT_METHOD = "concept-trak-cond"  # the shipped lead (README); the paper's is concept-trak


@contextlib.contextmanager
def diffusers_errors(what: str) -> Iterator[None]:
    """TypeError / RuntimeError / AttributeError / IndexError from inside a diffusers or
    transformers model become one ValueError naming `what` (the CLI prints it as one line)."""
    try:
        yield
    except (TypeError, RuntimeError, AttributeError, IndexError, AssertionError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{what}: {type(e).__name__}: {first[:300]}") from e


def source(a: Namespace) -> str | None:
    """The model the flags name: --pipeline, else (`t2i` alias) --model; None: the shipped one."""
    return getattr(a, "pipeline", None) or getattr(a, "model", None)


def load_adapter(a: Namespace) -> Any:
    """The adapter of the flags (a TextToImageAdapter: SD, SDXL, PixArt, SD3 or the tiny model;
    a DiTAdapter), on --device, executing in --dtype, with --lora on its UNet."""
    import torch

    from ctrak_fast.engine.validation import InputError, check_device

    device = check_device(getattr(a, "device", None))
    dtype = getattr(torch, EXEC_DTYPES[a.dtype])
    path = source(a)
    lora = getattr(a, "lora", None)
    if path and Path(path).is_dir():
        from ctrak_fast.models.pipeline_adapter import load_pipeline_adapter
        from ctrak_fast.models.text2image import TextToImageAdapter

        with diffusers_errors(f"{path}: the pipeline could not be loaded"):
            adapter = load_pipeline_adapter(path, dtype=dtype, lora=lora)
        if not (isinstance(adapter, TextToImageAdapter) or is_class_conditional(adapter)):
            raise InputError(
                f"{path}: a {type(adapter).__name__} pipeline; the CLI's --pipeline takes "
                "text-to-image and DiT pipelines (use Attributor.from_pipeline for the others)"
            )
    else:
        if lora:
            raise InputError("--lora needs a diffusers pipeline folder (--pipeline DIR)")
        from ctrak_fast.train.tiny_text import load_t2i

        adapter = load_t2i(path, dtype=dtype)
    if device is not None:
        adapter.to(device)
    return adapter


def pixel_size(adapter: Any) -> int:
    scale = 2 ** (len(adapter.vae.config.block_out_channels) - 1) if adapter.latent else 1
    return int(adapter.config["image_size"]) * scale


def param_filter(a: Namespace, adapter: Any, method: str) -> str | None:
    """--param-filter, else the --lora-scope's filter when a LoRA is loaded, else None (the
    method's own: the condition path for concept-trak-cond, cross-attention otherwise)."""
    if a.param_filter:
        return str(a.param_filter)
    if getattr(a, "lora", None):
        from ctrak_fast.models.pipeline_adapter import lora_param_filter

        return lora_param_filter(a.lora_scope, adapter.condition_param_filter)
    return None


def feature_spec(a: Namespace, adapter: Any, method: str) -> Any:
    """The method table's FeatureSpec with the flags given (inversion settings where it inverts)."""
    from ctrak_fast.method.methods import get_method

    row = get_method(method)
    kw: dict[str, Any] = {}
    flt = param_filter(a, adapter, method)
    if flt is not None:
        kw["param_filter"] = flt
    if a.timesteps:
        kw["timesteps"] = tuple(a.timesteps)
    if row.inversion:
        kw.update(
            inversion=not a.no_inversion,
            inversion_guidance=a.inversion_guidance,
            inversion_steps=a.inversion_steps,
        )
    return row.feature_spec(**kw)


def featurizer(a: Namespace, adapter: Any, method: str) -> Any:
    from ctrak_fast.engine.projection import ProjectionSpec
    from ctrak_fast.models.t2i_features import make_featurizer

    spec = feature_spec(a, adapter, method)
    proj = ProjectionSpec(k=a.k, seed=a.proj_seed)
    with diffusers_errors("the parameter filter"):
        if is_class_conditional(adapter):
            return class_featurizer(adapter, spec, proj, method)
        return make_featurizer(adapter, spec, proj, method=method)


def training_set(a: Namespace) -> tuple[Any, list[str], Any, Any]:
    """(images or image files, captions, ids, the sources record the store keeps): a captioned
    folder, or the shipped synthetic data."""
    import torch

    from ctrak_fast.cli.inputs import preprocess
    from ctrak_fast.data.sources import dataset_sources, file_sources

    if a.images:
        from ctrak_fast.data.captions import read_captions

        files, captions = read_captions(a.images, a.captions, a.image_column, a.caption_column)
        ids = torch.arange(len(files), dtype=torch.int64)
        sources = file_sources(a.images, files, captions, ids.tolist(), None, preprocess(a))
        return files, captions, ids, sources
    from ctrak_fast.data import SyntheticConfig, make_dataset
    from ctrak_fast.data.captions import caption
    from ctrak_fast.models.shipped import ASSETS

    data = make_dataset(SyntheticConfig.load_json(a.data or ASSETS / "shapes16.json"))
    if a.per_combo:
        data = data.train_subset(a.per_combo)
    captions = [caption(data.factors, data.values, row) for row in data.labels.tolist()]
    return data.images, captions, data.ids, dataset_sources(data, captions)


def cmd_featurize(a: Namespace) -> None:
    """Training features of the captioned images into --out: one process, or every rank of a
    torchrun job (each rank featurizes its units; the latents are encoded once, by rank 0)."""
    from ctrak_fast.cli.inputs import preprocess
    from ctrak_fast.engine.validation import check_output_dir, check_positive
    from ctrak_fast.method.distributed import DistContext
    from ctrak_fast.method.pipeline import featurize
    from ctrak_fast.models.latent_cache import encode_images_cached

    method = a.method or DEFAULT_METHOD
    for name in ("k", "batch_size"):
        check_positive("--" + name.replace("_", "-"), getattr(a, name))
    check_output_dir(a.out, "--out")
    adapter = load_adapter(a)
    images, captions, ids, sources = training_set(a)
    fz = featurizer(a, adapter, method)
    if is_class_conditional(adapter):  # captions name classes: checked before any image is read
        conds = class_conds(adapter, captions, images if a.images else ids.tolist())
    what = f"{source(a) or 'the shipped model'}: featurization failed"
    with DistContext.from_env(device=adapter.device) as ctx:

        def latents() -> Any:
            size = pixel_size(adapter)
            with diffusers_errors(f"{source(a)}: the VAE failed"):
                return encode_images_cached(
                    adapter, images, ids, a.out, image_size=size, preprocess=preprocess(a)
                )

        ctx.on_rank0(lambda: latents() is None)  # type: ignore[no-untyped-call]  # rank 0 writes the cache, the others read it
        x0 = latents()
        if not is_class_conditional(adapter):
            conds = adapter.prompt_ids(captions)
        with diffusers_errors(what):
            store = featurize(
                fz,
                x0,
                conds,
                ids,
                a.out,
                batch_size=a.batch_size,
                shard_rows=shard_rows(a),
                dtype=a.store_dtype,
                das_path=Path(a.das_out) if a.das_out else None,
                progress=ctx.rank == 0,
                dist_ctx=ctx,
                sources=sources,
            )
    if ctx.rank == 0:
        print(f"{store.n_rows} rows x k={store.k} ({method}) in {a.out}")


def shard_rows(a: Namespace) -> int | None:
    """--shard-rows rounded up to whole batches (None: 16 batches)."""
    rows = getattr(a, "shard_rows", None)
    return None if rows is None else -(-rows // a.batch_size) * a.batch_size


def _scheduler(name: str | None, adapter: Any) -> Any:
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


def query_image(a: Namespace, adapter: Any, prompt: str) -> tuple[Any, Any]:
    """(x0 [1,C,h,w], the image [1,3,H,W]) of --image, or regenerated from the prompt and --seed."""
    from ctrak_fast.data.images import load_image

    with diffusers_errors(f"{source(a)}: the query image"):
        if a.image:
            image = load_image(Path(a.image), pixel_size(adapter))[None]
            return adapter.encode_images(image), image
        x0 = adapter.generate(
            prompt,
            "",
            adapter_guidance(a),
            a.steps,
            seed=a.seed,
            scheduler=_scheduler(a.scheduler, adapter),
        )
        image = adapter.decode_latents(x0)
    return (image if not adapter.latent else x0), image  # a pixel model's x0 is the clamped one


def adapter_guidance(a: Namespace) -> float:
    return 7.5 if a.guidance is None else float(a.guidance)


def cmd_query(a: Namespace, prompt: str, phrases: list[str], negative_prompts: list[str]) -> None:
    """Query features of `prompt` into --out: the concept slider of c+ = `prompt` against each c-
    (the prompt without each phrase, then each negative prompt), or, for whole-image methods
    (trak, d-trak, das), the method's loss on the query image under `prompt`."""
    from ctrak_fast.engine.validation import InputError, check_outputs
    from ctrak_fast.method.methods import get_method
    from ctrak_fast.method.query import ConceptQuerySpec, image_query_features
    from ctrak_fast.models.prompts import concept_prompts
    from ctrak_fast.models.t2i_features import check_concept_changes, prompt_query_features
    from ctrak_fast.results import Query

    method = a.method or DEFAULT_METHOD
    row = get_method(method)
    model = source(a)
    model_file = Path(model) / "model_index.json" if model and Path(model).is_dir() else model
    flag = "--pipeline" if getattr(a, "pipeline", None) else "--model"  # the t2i alias's name
    check_outputs({"--out": a.out}, {flag: model_file, "--image": a.image})
    out = Path(a.out)
    adapter = load_adapter(a)
    fz = featurizer(a, adapter, method)
    if is_class_conditional(adapter):
        q = class_query(a, adapter, fz, method, prompt, phrases, negative_prompts)
        q.save(out)
        rows = ", ".join(q.labels)
        print(
            f"{len(q.features)} query feature(s) for class {prompt!r} ({rows}; {method}) -> {out}"
        )
        return
    meta = {**fz.meta(), "prompt": prompt, "method": method}
    if row.query != "concept":
        if phrases or negative_prompts:
            raise InputError(f"{method} queries are whole-image: no --concept to remove")
        x0, image = query_image(a, adapter, prompt)
        with diffusers_errors(f"{model}: the query features"):
            q = image_query_features(fz, x0, adapter.prompt_ids([prompt]))
        Query(q, ("image",), {**meta, "kind": "image"}, image[0].float()).save(out)
        print(f"{len(q)} whole-image query feature(s) for {prompt!r} ({method}) -> {out}")
        return
    negatives = concept_prompts(prompt, phrases, negative_prompts)
    labels = [f"-{c}" for c in phrases] + [f"vs {n!r}" for n in negative_prompts]
    check_concept_changes(adapter, prompt, negatives, labels)
    spec = ConceptQuerySpec(
        **{
            **row.concept,
            "draws": a.draws,
            "n_draws": a.n_draws or 4,
            "guidance": a.inversion_guidance,
            "steps": a.inversion_steps,
            "weight": 3.0 if a.weight is None else a.weight,  # the paper's text-to-image w
            "seed": a.seed,
            "timesteps": fz.spec.timesteps,
        }
    )
    x0, image = query_image(a, adapter, prompt) if a.draws == "local" else (None, None)
    with diffusers_errors(f"{model}: the query features"):
        q = prompt_query_features(fz, spec, prompt, negatives, None if x0 is None else x0[0])
    zero = [lab for lab, row_q in zip(labels, q, strict=True) if not row_q.abs().sum() > 0]
    if zero:
        raise InputError(
            f"the query of {prompt!r} is all zeros for {zero}: that concept does not change "
            "the model's condition (its gradient vanishes); name another phrase"
        )
    if image is None:  # global draws: show the prompt's sample
        with diffusers_errors(f"{model}: the query image"):
            image = adapter.decode_latents(adapter.generate(prompt, "", 7.5, 20, seed=a.seed))
    meta.update(kind="concept", query=spec.to_dict(), negatives=negatives)
    Query(q, tuple(labels), meta, image[0].float()).save(out)
    print(f"{len(q)} query feature(s) for {prompt!r} (c-: {negatives}; {method}) -> {out}")
