"""What the CLI reads from its arguments: the data set, the model, the feature spec and the
featurizer (every input checked here, with one clear error)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ctrak_fast.data.images import Preprocess
    from ctrak_fast.engine.store import FeatureStore


def load_data(a, model=None, decode=True):
    """The dataset of --folder/--labels or --data; with `model`, labels index the model's values.
    decode=False: a folder's images stay on disk (an ImageSequence, read a batch at a time)."""
    from ctrak_fast.data import ConceptDataset, SyntheticConfig, load_image_folder, make_dataset
    from ctrak_fast.engine.validation import InputError, check_input_dir, check_input_file

    names = {}
    if model is not None and model.config.get("values"):
        names = {"factors": model.config["factors"], "values": model.config["values"]}
    if a.folder:
        check_input_dir(a.folder, "image folder")
        if not a.labels:
            raise InputError("--folder needs --labels (a JSON or CSV labels file)")
        check_input_file(a.labels, "labels file")
        truth = getattr(a, "truth", None)
        if truth:
            check_input_file(truth, "truth file")
        return load_image_folder(
            a.folder,
            a.labels,
            image_size=a.image_size,
            truth_file=truth,
            preprocess=preprocess(a),
            decode=decode,
            **names,
        )
    from ctrak_fast.models.shipped import ASSETS, SHIPPED

    path = check_input_file(a.data or ASSETS / f"{SHIPPED}.json", "dataset file")
    try:
        if path.suffix == ".safetensors":
            return ConceptDataset.load(path)
        return make_dataset(SyntheticConfig.load_json(path))
    except Exception as e:  # safetensors, JSON and config errors alike: the file is unusable
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a usable dataset ({first})") from e


def preprocess(a: Any) -> Preprocess:
    """The crop and flip of --random-crop / --flip (flags absent: centre crop, no flip)."""
    from ctrak_fast.data.images import Preprocess

    return Preprocess(
        center_crop=not getattr(a, "random_crop", False), flip=getattr(a, "flip", False)
    )


def load_model(path, judge: bool = False):
    """The FactorUNet checkpoint at `path` (default: the shipped one), or with `judge` a
    ConceptJudge; any other file, or a model of the other kind, is one InputError."""
    from ctrak_fast.engine.validation import InputError, check_input_file
    from ctrak_fast.models.factor_unet import ConceptJudge, FactorUNet, load_model
    from ctrak_fast.models.shipped import ASSETS, SHIPPED

    path = check_input_file(path or ASSETS / f"unet_{SHIPPED}.safetensors", "model file")
    try:
        model = load_model(path)
    except Exception as e:  # safetensors, JSON and state-dict errors alike: the file is unusable
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        first = first.removeprefix(f"{path}: ")
        raise InputError(f"{path}: not a usable model checkpoint ({first})") from e
    # A judge has none of a diffusion model's methods, and the other way round.
    kind, what = (ConceptJudge, "a judge") if judge else (FactorUNet, "a diffusion model")
    if not isinstance(model, kind):
        raise InputError(
            f"{path}: a {type(model).__name__} checkpoint, not {what} ({kind.__name__})"
        )
    return model


def feature_spec(a):
    """The --method's FeatureSpec (the method table's defaults) with the flags given."""
    from ctrak_fast.method.methods import get_method
    from ctrak_fast.method.recipes import recipe_options

    feature, _ = recipe_options(a.recipe, getattr(a, "draws", "local"), recipe_knobs(a))
    kw = {"inversion_guidance": a.inversion_guidance, **feature}
    if a.timesteps:
        kw["timesteps"] = tuple(a.timesteps)
    if a.no_inversion:
        kw["inversion"] = False
    if a.no_normalize:
        kw["normalize"] = False
    if a.param_filter:
        kw["param_filter"] = a.param_filter
    return get_method(a.method).feature_spec(**kw)


def projection(a):
    """The projection of --k / --proj-seed, or --factorized K_IN,K_OUT."""
    from ctrak_fast.engine.projection import FactorizedSpec, ProjectionSpec

    if not a.factorized:
        return ProjectionSpec(k=a.k, seed=a.proj_seed)
    try:
        k_in, k_out = (int(v) for v in a.factorized.split(","))
    except ValueError:
        raise ValueError(f"--factorized wants K_IN,K_OUT, got {a.factorized!r}") from None
    return FactorizedSpec(k_in=k_in, k_out=k_out, seed=a.proj_seed)


def featurizer(a, model):
    from ctrak_fast.method.diffusion import NoiseSchedule
    from ctrak_fast.method.featurize import Featurizer

    return Featurizer(
        model,
        NoiseSchedule.for_model(model),
        feature_spec(a),
        projection(a),
        model.null_cond(1)[0],
        grad_backend=a.grad_backend,
    )


def recipe_knobs(a) -> dict:
    """The recipe knobs given as flags (None: the recipe's)."""
    return {
        "inversion_eps": a.inversion_eps,
        "inversion_negative": a.inversion_negative,
        "negative": getattr(a, "negative", None),
        "draw_cfg": getattr(a, "draw_cfg", None),
        "sampler": getattr(a, "global_sampler", None),
        "points": getattr(a, "global_points", None),
    }


def read_json(path, what: str):
    """A JSON file's value; InputError naming the file if it is not JSON, not UTF-8, or nested
    too deep for the parser (RecursionError)."""
    from ctrak_fast.engine.validation import InputError, check_input_file

    path = check_input_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a JSON {what} ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise InputError(f"{path}: not a JSON {what} (nested too deeply)") from None


def read_result(path, query=None) -> tuple[dict, Path]:
    """An attribute result (`ctrak attribute --out`) and its query file: `query` if given, else
    the result's 'query' field, followed only to a file inside the result's folder or the
    current directory (where `attribute` was run), symlinks resolved."""
    from ctrak_fast.engine.validation import InputError, check_input_file

    res = read_json(path, "attribute result")
    top, bottom = (res.get(t) if isinstance(res, dict) else None for t in ("top", "bottom"))
    if (
        not isinstance(top, list)
        or not isinstance(bottom, list)
        or not top
        or len(top) != len(bottom)
    ):
        raise InputError(f"{path}: not a result of `ctrak attribute` (no top and bottom lists)")
    for row in top + bottom:
        ok = isinstance(row, dict) and isinstance(row.get("label"), str)
        lists = ok and [row.get(key) for key in ("ids", "scores")]
        if (
            not ok
            or not all(isinstance(v, list) and v for v in lists)
            or len(lists[0]) != len(lists[1])
        ):
            raise InputError(f"{path}: a result row is not {{label, ids, scores}}: {row!r:.80}")
        if not all(type(i) is int for i in lists[0]) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in lists[1]
        ):
            raise InputError(f"{path}: a result row holds ids or scores that are not numbers")
    if query is not None:
        return res, check_input_file(query, "query file")
    return res, check_input_file(followed(path, res, "query"), "query file")


def followed(path: str | Path, res: dict[str, Any], key: str) -> Path:
    """The file a result names under `key` ("query", "store"), followed only when it lies inside
    the result's folder or the current directory (where `attribute` ran), symlinks resolved."""
    from ctrak_fast.engine.validation import InputError

    named = res.get(key)
    if not isinstance(named, str) or not named:
        raise InputError(f"{path}: names no {key}: pass --{key}")
    real = Path(named).resolve()
    folders = (Path(path).resolve().parent, Path.cwd().resolve())
    if not any(real == f or f in real.parents for f in folders):
        raise InputError(
            f"{path}: its {key} {named!r} is outside the result's folder and the current "
            f"directory: pass --{key}"
        )
    return Path(named)


def result_store(path: str | Path, res: dict[str, Any], store: str | None = None) -> Path:
    """The store of an attribute result: `store` if given, else the result's "store" field
    (followed as its query is); InputError unless it is a store directory."""
    from ctrak_fast.engine.validation import InputError

    p = Path(store) if store is not None else followed(path, res, "store")
    if not (p / "manifest.json").is_file():
        raise InputError(f"{p}: not a feature store (no manifest.json): pass --store")
    return p


def warn_unnamed(store: FeatureStore) -> None:
    """A warning line when the store records no sources (its result names ids only). Printed
    after the result is written: a command that fails prints its error line alone."""
    import sys

    if "sources" not in store.meta:
        print(
            f"ctrak: warning: store {store.path} records no sources of its rows (made by an "
            "older version): the result names ids only; featurize again to name files",
            file=sys.stderr,
        )
