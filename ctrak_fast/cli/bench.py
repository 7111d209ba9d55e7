"""`ctrak demo`, `ctrak bench quality|paper`, `ctrak train`: the benchmarks behind the CLI."""

from __future__ import annotations


def cmd_demo(a):
    """`ctrak demo`, `ctrak bench quality` and `ctrak bench paper`: the benchmark at the sizes of
    their arguments, on the assets `a.name` (the paper's 2 x 2 replica for `bench paper`)."""
    from ctrak_fast.bench.demo import run_demo, summary
    from ctrak_fast.bench.paper import PAPER_NAME, paper_table
    from ctrak_fast.bench.quality import QualityConfig
    from ctrak_fast.models.shipped import ASSETS, SHIPPED

    cfg = QualityConfig(
        per_combo=a.per_combo,
        k=a.k,
        queries_per_combo=a.queries_per_combo,
        heldout_queries_per_combo=a.heldout_queries_per_combo,
        lambda_r=a.lambda_r,
        **method_options(a),
    )
    paper = getattr(a, "bench", None) == "paper"
    name = a.name or (PAPER_NAME if paper else SHIPPED)
    results = run_demo(a.out, cfg, progress=not a.quiet, assets=a.assets or ASSETS, name=name)
    print(summary(results, a.out))
    if paper:
        print("\nThe paper's layout (P@10 averaged over the two concepts of each query):\n")
        print(paper_table(results))


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
        "dps": FeatureSpec(
            inversion_guidance=a.inversion_guidance,
            inversion_eps=a.inversion_eps,
            param_filter=a.param_filter,
        ),
        "concept": ConceptQuerySpec(draws=a.draws, guidance=a.inversion_guidance),
    }


def cmd_train(a, rest):
    from ctrak_fast.bench.train import main

    main(rest)
