"""`ctrak demo`, `ctrak bench quality|paper`: the benchmarks behind the CLI."""

from __future__ import annotations


def cmd_demo(a):
    """`ctrak demo`, `ctrak bench quality|paper|partial`: the benchmark at the sizes of their
    arguments, on the assets `a.name` (default: the demo's shapes16, the Latin-square
    shapes16lat for `bench quality`, the paper's 2 x 2 replica for `bench paper`, shapes16partial,
    trained on incomplete captions, for `bench partial`)."""
    from ctrak_fast.bench.demo import run_benchmark, run_demo, summary
    from ctrak_fast.bench.paper import PAPER_NAME, paper_table
    from ctrak_fast.bench.quality import QualityConfig
    from ctrak_fast.models.shipped import ASSETS, FULL_SIZE, PARTIAL, SHIPPED

    if getattr(a, "threads", None):
        import torch

        torch.set_num_threads(a.threads)
    if getattr(a, "bench", None) == "mark":
        return cmd_mark(a)
    if getattr(a, "bench", None) == "counterfactual":
        return cmd_counterfactual(a)

    cfg = QualityConfig(
        per_combo=a.per_combo,
        k=a.k,
        queries_per_combo=a.queries_per_combo,
        heldout_queries_per_combo=a.heldout_queries_per_combo,
        lambda_r=a.lambda_r,
        confirm_queries=not getattr(a, "keep_unconfirmed", False),
        select_lambda_by=getattr(a, "select_lambda_by", "p@10"),
        min_test_queries=a.min_test_queries,
        **method_options(a),
    )
    bench = getattr(a, "bench", None)
    paper = bench == "paper"
    name = a.name or {"paper": PAPER_NAME, "quality": FULL_SIZE, "partial": PARTIAL}.get(
        bench, SHIPPED
    )
    if getattr(a, "folder", None) or getattr(a, "labels", None):
        model, judge, data = folder_benchmark_inputs(a)
        results = run_benchmark(model, judge, data, a.out, cfg, progress=not a.quiet)
    else:
        results = run_demo(a.out, cfg, progress=not a.quiet, assets=a.assets or ASSETS, name=name)
    print(summary(results, a.out))
    if paper:
        print("\nThe paper's layout (P@10 averaged over the two concepts of each query):\n")
        print(paper_table(results))


def method_options(a) -> dict:
    """Concept-TRAK options of `demo` / `bench quality` as QualityConfig fields."""
    from ctrak_fast.cli.inputs import recipe_knobs
    from ctrak_fast.method.featurize import FeatureSpec
    from ctrak_fast.method.methods import parse_methods
    from ctrak_fast.method.query import ConceptQuerySpec
    from ctrak_fast.method.recipes import recipe_options

    methods = parse_methods(a.methods)
    # --recipe sets concept-trak's knobs (concept-trak-cond keeps its own, the method table's)
    feature, concept = recipe_options(a.recipe, a.draws, recipe_knobs(a))
    return {
        "methods": methods,
        "negative": concept.pop("negative", "flip"),
        "query_guidance": a.query_guidance,
        "query_contrast": a.query_contrast,
        "query_confidence": a.query_confidence,
        "query_candidates": a.query_candidates,
        "dps": FeatureSpec(
            inversion_guidance=a.inversion_guidance, param_filter=a.param_filter, **feature
        ),
        "concept": ConceptQuerySpec(draws=a.draws, guidance=a.inversion_guidance, **concept),
    }


def folder_benchmark_inputs(a):
    """(model, judge, data) of `bench quality --folder DIR --labels FILE --model M [--judge J]`:
    the judge defaults to judge_NAME beside unet_NAME (as `ctrak train --folder` writes them)."""
    from pathlib import Path

    from ctrak_fast.cli.inputs import load_data, load_model
    from ctrak_fast.engine.validation import InputError

    if not (a.folder and a.labels and a.model):
        raise InputError(
            "bench quality --folder needs --labels and --model (`ctrak train --folder`)"
        )
    model = load_model(a.model)
    judge_path = Path(a.judge) if a.judge else None
    if judge_path is None:
        stem = Path(a.model).name.removeprefix("unet_")
        judge_path = Path(a.model).with_name(f"judge_{stem}")
        if not judge_path.is_file():
            raise InputError(f"no judge beside {a.model} ({judge_path.name}): pass --judge")
    judge = load_model(judge_path, judge=True)
    if judge.config.get("factors") != model.config.get("factors"):
        raise InputError(
            f"{judge_path}: a judge of factors {judge.config.get('factors')}, the "
            f"model's are {model.config.get('factors')}"
        )
    return model, judge, load_data(a, model)


def cmd_mark(a) -> None:
    """`ctrak bench mark`: the uncaptioned-mark benchmark on the assets `a.name` (default: the
    shipped shapes16mark; or a folder model of `ctrak train --folder --mark-fraction`): table,
    results.json and a gallery of one test query."""
    from pathlib import Path

    from ctrak_fast.bench.mark import MarkConfig, run_mark, write_mark_gallery
    from ctrak_fast.bench.mark_scoring import mark_table
    from ctrak_fast.engine.validation import InputError
    from ctrak_fast.method.methods import parse_methods
    from ctrak_fast.models.factor_unet import load_model
    from ctrak_fast.models.shipped import ASSETS, MARKED, asset_dataset, shipped

    name, assets = a.name or MARKED, Path(a.assets) if a.assets else ASSETS
    mark_path = assets / f"markjudge_{name}.safetensors"
    if not mark_path.is_file():
        raise InputError(f"no mark judge {mark_path} (`ctrak train --mark-fraction` writes it)")
    model, _, spec = shipped(name, assets)
    if not getattr(spec, "mark_fraction", 0):
        raise InputError(f"{name}: its training set has no stamped mark (--mark-fraction)")
    cfg = MarkConfig(
        per_combo=a.per_combo,
        k=a.k,
        candidates=a.candidates,
        queries=a.queries,
        min_test_queries=a.min_test_queries,
        guidance=a.guidance,
        methods=parse_methods(a.methods),
    )
    results = run_mark(
        model, load_model(mark_path), asset_dataset(spec, model), cfg, a.out, not a.quiet
    )
    png = write_mark_gallery(results, Path(a.out) / "gallery.png")
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in results["timings"].items())
    print(f"{mark_table(results)}\n\nwrote {Path(a.out) / 'results.json'}, {png}")
    print(f"total {results['seconds']:.0f} s; {timings}")


def cmd_counterfactual(a) -> None:
    """`ctrak bench counterfactual`: LDS and remove-and-retrain tables from a ground-truth
    folder (default: the shipped one); --retrain first runs its retraining queue."""
    from pathlib import Path

    from ctrak_fast.bench.counterfactual.bench import refresh_removal, run_counterfactual
    from ctrak_fast.bench.counterfactual.ground_truth import read_masks
    from ctrak_fast.bench.counterfactual.regenerate import retrain_lds, retrain_removal
    from ctrak_fast.bench.counterfactual.tables import counterfactual_tables
    from ctrak_fast.bench.quality import QualityConfig
    from ctrak_fast.engine.validation import InputError, check_device
    from ctrak_fast.method.methods import parse_methods
    from ctrak_fast.models.shipped import COUNTERFACTUAL

    check_device(a.device)  # before any work: cuda on a CPU-only machine is one line
    truth = Path(a.truth) if a.truth else COUNTERFACTUAL
    for flag, folder in (("--out", Path(a.out)), ("--work", Path(a.work))):
        if folder.resolve() == truth.resolve() or truth.resolve() in folder.resolve().parents:
            raise InputError(f"{flag} {folder} is inside the ground-truth folder {truth}")
    cfg = QualityConfig(k=a.k, methods=parse_methods(a.methods))
    left = None
    if a.retrain:
        left = retrain_lds(
            truth, Path(a.work), a.workers, a.max_jobs, a.setting, not a.quiet, a.device
        )
    elif not (truth / "setting.json").is_file():
        raise InputError(f"{truth}: no setting.json (a ground-truth folder; --retrain makes one)")
    # scores every method; once every LDS model is measured, writes the removal arms
    results = run_counterfactual(truth, a.out, cfg, progress=not a.quiet)
    if a.retrain and "removal" in read_masks(truth):
        retrain_removal(truth, Path(a.work), a.workers, left, a.device)
        results = refresh_removal(results, truth, Path(a.out))
    print(counterfactual_tables(results))
    print(f"\nwrote {Path(a.out) / 'results.json'}, {Path(a.out) / 'lds_scatter.png'}")
