"""What the CLI reads from its arguments: the data set, the model, the feature spec and the
featurizer (every input checked here, with one clear error)."""

from __future__ import annotations


def load_data(a, model=None):
    """The dataset of --folder/--labels or --data; with `model`, labels index the model's values."""
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
            a.folder, a.labels, image_size=a.image_size, truth_file=truth, **names
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


def load_model(path):
    from ctrak_fast.engine.validation import InputError, check_input_file
    from ctrak_fast.models.factor_unet import load_model
    from ctrak_fast.models.shipped import ASSETS, SHIPPED

    path = check_input_file(path or ASSETS / f"unet_{SHIPPED}.safetensors", "model file")
    try:
        return load_model(path)
    except Exception as e:  # safetensors, JSON and state-dict errors alike: the file is unusable
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a usable model checkpoint ({first})") from e


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
