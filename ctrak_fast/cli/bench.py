"""`ctrak demo`, `ctrak bench quality`, `ctrak train`: the benchmarks behind the CLI."""

from __future__ import annotations


def cmd_demo(a, **extra):
    """`ctrak demo` and `ctrak bench quality`: the benchmark at the sizes of their arguments."""
    from ctrak_fast.bench.demo import run_demo, summary
    from ctrak_fast.bench.quality import QualityConfig
    from ctrak_fast.models.shipped import ASSETS

    cfg = QualityConfig(
        per_combo=a.per_combo,
        k=a.k,
        queries_per_combo=a.queries_per_combo,
        **method_options(a),
        **extra,
    )
    results = run_demo(a.out, cfg, progress=not a.quiet, assets=a.assets or ASSETS)
    print(summary(results, a.out))


def method_options(a) -> dict:
    """Concept-TRAK options of `demo` / `bench quality` as QualityConfig fields."""
    from ctrak_fast.method.featurize import FeatureSpec
    from ctrak_fast.method.methods import parse_methods
    from ctrak_fast.method.query import ConceptQuerySpec

    methods = parse_methods(a.methods)
    return {
        "methods": methods,
        "negative": a.negative,
        "query_guidance": a.query_guidance,
        "dps": FeatureSpec(inversion_guidance=a.inversion_guidance, param_filter=a.param_filter),
        "concept": ConceptQuerySpec(draws=a.draws, guidance=a.inversion_guidance),
    }


def cmd_bench_quality(a):
    cmd_demo(a, lambda_r=a.lambda_r)


def cmd_train(a, rest):
    from ctrak_fast.bench.train import main

    main(rest)
