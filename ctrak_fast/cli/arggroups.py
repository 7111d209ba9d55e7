"""Argument groups of the `ctrak` parser that several commands share: the feature knobs, the
recipe and draw knobs (method/recipes.py), the benchmarks' sizes, methods and query sampler, the
data flags, and the text-to-image model and benchmark options. Building them imports no torch.
"""

from __future__ import annotations

import argparse
from typing import Any

from ctrak_fast.cli.argtypes import (
    fraction,
    nonneg_float,
    nonneg_int,
    positive_int,
    regex,
    timestep_list,
)
from ctrak_fast.method.methods import FEATURIZE_METHODS, METHODS
from ctrak_fast.method.recipes import INVERSION_NEGATIVES, RECIPES


def add_feature_args(p):
    p.add_argument("--model", help="FactorUNet safetensors (default: the shipped model)")
    p.add_argument(
        "--method",
        choices=FEATURIZE_METHODS,
        help="the attribution method (a row of method/methods.py; default concept-trak, "
        "concept-trak-cond with --pipeline)",
    )
    p.add_argument("--k", type=positive_int, default=512, help="projection dimension")
    p.add_argument("--proj-seed", type=nonneg_int, default=0, help="seed of the random projection")
    p.add_argument(
        "--factorized",
        metavar="K_IN,K_OUT",
        help="LoGra-style per-layer Kronecker projection of Linear/Conv2d weights instead of the "
        "dense one (k = layers * K_IN * K_OUT; --k is ignored)",
    )
    p.add_argument(
        "--timesteps", type=timestep_list, help="comma-separated, default 99,199,...,899"
    )
    p.add_argument(
        "--no-inversion", action="store_true", help="fixed noise instead of DDIM inversion"
    )
    p.add_argument(
        "--inversion-guidance", type=nonneg_float, default=7.5, help="CFG of the DDIM inversion"
    )
    add_recipe_args(p)
    p.add_argument(
        "--no-normalize", action="store_true", help="skip per-timestep unit normalisation"
    )
    p.add_argument(
        "--param-filter", type=regex, help="regex on parameter names (default: all parameters)"
    )
    p.add_argument(
        "--grad-backend",
        default="hooks",
        choices=["hooks", "func"],
        help="per-sample gradients: fused hooks, or the torch.func reference",
    )


def add_recipe_args(p) -> None:
    """--recipe and the training-side knobs where the authors' code differs (recipes.py)."""
    p.add_argument(
        "--recipe",
        default="ours",
        choices=list(RECIPES),
        help="ours, or the authors' synthetic-benchmark code (paper); each flag below overrides it",
    )
    p.add_argument(
        "--inversion-eps",
        choices=["next", "current"],
        help="eps of the inversion step t_i -> t_i+1 at t_i+1 (ours), or at t_i (paper)",
    )
    p.add_argument(
        "--inversion-negative",
        choices=list(INVERSION_NEGATIVES),
        help="CFG negative of the training inversion: null token (ours), a random other value "
        "per factor redrawn every step (paper), or every factor flipped (two-valued factors)",
    )


def add_draw_args(p) -> None:
    """Query-side knobs where the authors' code differs (recipes.py)."""
    p.add_argument(
        "--negative",
        choices=["flip", "null", "random"],
        help="c- of a concept query: the factor flipped to each other value (the paper's "
        "synthetic setting; default), set to its null token, or one random other value per draw "
        "(paper)",
    )
    p.add_argument(
        "--draw-cfg",
        choices=["null", "negative"],
        help="CFG negative of local draws: the null token (ours) or the query's c- (paper)",
    )
    p.add_argument(
        "--global-sampler",
        choices=["ddim", "ddpm"],
        help="global draws: DDIM (ours) or ancestral DDPM (paper)",
    )
    p.add_argument(
        "--global-points",
        choices=["all", "random"],
        help="global draws used at every timestep (ours) or stopped at one random one (paper)",
    )


def add_method_args(p):
    """Concept-TRAK ablation switches of the benchmark commands."""
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated subset (ablations: concept-trak alone)",
    )
    p.add_argument(
        "--draws",
        default="local",
        choices=["local", "global"],
        help="query draws: stochastic DDIM inversions of the query image (local) or samples "
        "from noise (global)",
    )
    p.add_argument(
        "--inversion-guidance",
        type=nonneg_float,
        default=7.5,
        help="CFG of the DDIM inversions (training features, local query draws) and of global "
        "draws",
    )
    add_recipe_args(p)
    add_draw_args(p)
    p.add_argument(
        "--assets",
        help="folder with unet_/judge_NAME.safetensors, NAME.json (`ctrak train --out`; "
        "default: the shipped ones)",
    )
    p.add_argument(
        "--name",
        help="NAME of those files (default: shapes16 for demo, shapes16lat for bench quality, "
        "paper2x2 for bench paper)",
    )
    p.add_argument(
        "--param-filter",
        type=regex,
        help="regex on parameter names for Concept-TRAK's gradients (default: all), e.g. "
        "'time_emb_proj|factor_embeddings': the layers the condition enters through",
    )


# The query sampler of `demo` / `bench quality` (plain CFG 2, the judge's argmax), and of `bench
# paper`, whose model draws the held-out red triangle only under contrast guidance
# (docs/RESULTS.md).
PLAIN_QUERIES = {"guidance": 2.0, "contrast": 0.0, "confidence": 0.0, "candidates": 8}
PAPER_QUERIES = {"guidance": 1.0, "contrast": 3.0, "confidence": 0.95, "candidates": 160}


# flag, key of the defaults above, type, help
QUERY_FLAGS = (
    ("--query-guidance", "guidance", nonneg_float, "CFG of the generated query images"),
    (
        "--query-contrast",
        "contrast",
        nonneg_float,
        "contrast guidance of the query images: each factor pushed away from its other values "
        "(0: off)",
    ),
    (
        "--query-confidence",
        "confidence",
        fraction,
        "the judge's softmax a query needs on every factor (0: its argmax alone)",
    ),
    (
        "--query-candidates",
        "candidates",
        positive_int,
        "images generated per combination (at least 2 x the queries kept)",
    ),
)


def add_query_args(p, defaults: dict) -> None:
    for flag, key, kind, text in QUERY_FLAGS:
        p.add_argument(flag, type=kind, default=defaults[key], help=text)


def add_benchmark_args(
    p, out: str, per_combo: int, queries: int, heldout: int, sampler: dict = PLAIN_QUERIES
) -> None:
    """Sizes and switches of `demo` and `bench quality|paper` (their defaults differ)."""
    p.add_argument("--out", default=out, help="output folder (tables, results.json, PNGs)")
    p.add_argument(
        "--per-combo", type=positive_int, default=per_combo, help="training images per combo"
    )
    p.add_argument("--k", type=positive_int, default=2048, help="projection dimension")
    p.add_argument(
        "--queries-per-combo", type=positive_int, default=queries, help="per seen combination"
    )
    p.add_argument(
        "--heldout-queries-per-combo",
        type=positive_int,
        default=heldout,
        help="per held-out combination (half validation, half test)",
    )
    p.add_argument("--lambda-r", type=nonneg_float, default=1.0, help="the fixed-lambda protocol's")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    p.add_argument(
        "--min-test-queries",
        type=nonneg_int,
        default=8,
        help="refuse (before any featurization) a split with fewer judge-confirmed test queries",
    )
    add_query_args(p, sampler)
    add_method_args(p)


TRUTH_HELP = (
    "what the images show where their captions leave a factor out (a labels file of the same "
    "format; default: the captions): the benchmark's ground truth, never what the model is told"
)


def add_data_args(p):
    p.add_argument(
        "--data",
        help="SyntheticConfig JSON, or a ConceptDataset .safetensors file (default: shipped JSON)",
    )
    p.add_argument("--folder", help="a folder of images (with --labels) instead of synthetic data")
    p.add_argument("--labels", help="labels file (JSON or CSV) for --folder")
    p.add_argument(
        "--image-size", type=positive_int, default=16, help="side the images are resized to"
    )
    add_preprocess_args(p)


def add_preprocess_args(p: Any) -> None:
    """How folder images are cropped and flipped: diffusers' training scripts' choices."""
    p.add_argument(
        "--random-crop",
        "--no-center-crop",
        dest="random_crop",
        action="store_true",
        help="crop a random square (seeded by the image's row) instead of the centre, as "
        "diffusers' training scripts do without --center_crop (default: the centre)",
    )
    p.add_argument(
        "--flip",
        action="store_true",
        help="mirror half the images (seeded by row), as diffusers' --random_flip (default: off)",
    )


def add_mark_parser(bsub) -> None:
    from ctrak_fast.bench.mark import MARK_METHODS

    pm = bsub.add_parser(
        "mark",
        help="an uncaptioned mark stamped on 15%% of the training images: find them from a "
        "region of a generated image that shows it",
    )
    pm.add_argument("--out", default="out/mark", help="output folder (tables, results.json)")
    pm.add_argument("--per-combo", type=positive_int, default=30, help="training images per combo")
    pm.add_argument("--k", type=positive_int, default=2048, help="projection dimension")
    pm.add_argument(
        "--candidates", type=positive_int, default=320, help="samples the mark judge looks at"
    )
    pm.add_argument(
        "--queries", type=positive_int, default=24, help="kept: half validation, half test"
    )
    pm.add_argument(
        "--min-test-queries",
        type=nonneg_int,
        default=8,
        help="refuse (before any featurization) a split with fewer test queries",
    )
    pm.add_argument("--guidance", type=nonneg_float, default=2.0, help="CFG of the samples")
    pm.add_argument("--methods", default=",".join(MARK_METHODS), help="comma-separated subset")
    pm.add_argument("--assets", help="folder with unet_/judge_/markjudge_NAME, NAME.json")
    pm.add_argument("--name", help="NAME of those files (default: shapes16mark)")
    pm.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    pm.add_argument("--quiet", action="store_true", help="no progress output")


def add_counterfactual_parser(bsub) -> None:
    pc = bsub.add_parser(
        "counterfactual",
        help="every method judged by what the training data did: LDS over retrained subsets "
        "and remove-and-retrain, from the shipped ground truth (--retrain regenerates it)",
    )
    pc.add_argument("--out", default="out/counterfactual", help="output folder (tables, JSON)")
    pc.add_argument(
        "--truth",
        help="ground-truth folder (setting.json, masks, measured outputs; default: the shipped "
        "one); --retrain regenerates into it",
    )
    pc.add_argument(
        "--retrain",
        action="store_true",
        help="run the retraining queue first: resumes where a killed run stopped",
    )
    pc.add_argument("--setting", help="with --retrain into a new --truth folder: its setting JSON")
    pc.add_argument(
        "--workers", type=positive_int, default=2, help="retraining processes (one core each)"
    )
    pc.add_argument(
        "--max-jobs", type=positive_int, help="stop after this many retrained models (a sitting)"
    )
    pc.add_argument(
        "--work", default="out/counterfactual_work", help="checkpoints of models in training"
    )
    pc.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the retrained models train (measured on the CPU)",
    )
    pc.add_argument("--k", type=positive_int, default=2048, help="projection dimension")
    pc.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    pc.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    pc.add_argument("--quiet", action="store_true", help="no progress output")


def add_t2i_bench_args(p: argparse.ArgumentParser) -> None:
    """Options of the prompt benchmark (`ctrak t2i bench`)."""
    p.add_argument("--out", default="out/t2i_quality", help="output folder (tables, JSON)")
    p.add_argument("--model", help="t2i checkpoint (default: the shipped one)")
    p.add_argument("--judge", help="ConceptJudge checkpoint (default: the shipped one)")
    p.add_argument("--data", help="SyntheticConfig JSON (default: the shipped one)")
    p.add_argument(
        "--select-lambda-by",
        choices=["ap", "p@10"],
        default="p@10",
        help="the validation metric that chooses lambda_r (ap where captions are incomplete)",
    )
    p.add_argument(
        "--min-test-queries",
        type=nonneg_int,
        default=8,
        help="refuse (before any featurization) a split with fewer judge-confirmed test queries",
    )
    p.add_argument(
        "--keep-underpowered",
        action="store_true",
        help="run a split below --min-test-queries anyway, its cells marked underpowered",
    )
    p.add_argument(
        "--per-combo", type=positive_int, default=50, help="training images per combination"
    )
    p.add_argument("--k", type=positive_int, default=2048, help="projection dimension")
    p.add_argument("--queries-per-combo", type=positive_int, default=2, help="per seen combination")
    p.add_argument(
        "--heldout-queries-per-combo",
        type=positive_int,
        default=8,
        help="half validation, half test",
    )
    p.add_argument(
        "--query-candidates", type=positive_int, default=8, help="generated per combination"
    )
    p.add_argument(
        "--query-guidance", type=nonneg_float, default=3.0, help="CFG of the query images"
    )
    p.add_argument(
        "--inversion-steps", type=positive_int, default=50, help="DDIM steps of the inversion"
    )
    p.add_argument(
        "--inversion-guidance", type=nonneg_float, default=7.5, help="CFG of DDIM inversion"
    )
    p.add_argument("--n-draws", type=positive_int, default=4, help="query draws per query")
    p.add_argument(
        "--draws",
        default="local",
        choices=["local", "global"],
        help="query draws: stochastic DDIM inversions of the query image (local) or samples "
        "from noise (global)",
    )
    p.add_argument(
        "--lambda-r", type=nonneg_float, default=1.0, help="relative damping of the Gram"
    )
    p.add_argument(
        "--param-filter", type=regex, default=r"\.attn2\.", help="default: cross-attention"
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from the table")
    p.add_argument("--threads", type=positive_int, help="torch threads (1 on a shared machine)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
