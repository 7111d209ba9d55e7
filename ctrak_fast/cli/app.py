"""`ctrak` command line. Every failure is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import sys

from ctrak_fast.cli.argtypes import (
    CliParser,
    finite_float,
    fraction,
    lambda_list,
    nonneg_float,
    nonneg_int,
    positive_int,
    regex,
    region_box,
    timestep_list,
)
from ctrak_fast.cli.bench import cmd_demo
from ctrak_fast.cli.commands import (
    cmd_attribute,
    cmd_example,
    cmd_featurize,
    cmd_labels,
    cmd_query,
    cmd_report,
    cmd_store,
)
from ctrak_fast.cli.guard import run_guarded
from ctrak_fast.cli.train import add_train_args, cmd_train
from ctrak_fast.engine.scoring_options import PATHS, PRECISIONS
from ctrak_fast.method.methods import FEATURIZE_METHODS, METHODS
from ctrak_fast.method.recipes import INVERSION_NEGATIVES, RECIPES


def _add_feature_args(p):
    p.add_argument("--model", help="FactorUNet safetensors (default: the shipped model)")
    p.add_argument("--method", default="concept-trak", choices=FEATURIZE_METHODS)
    p.add_argument("--k", type=positive_int, default=512, help="projection dimension")
    p.add_argument("--proj-seed", type=nonneg_int, default=0)
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
    p.add_argument("--inversion-guidance", type=nonneg_float, default=7.5)
    _add_recipe_args(p)
    p.add_argument(
        "--no-normalize", action="store_true", help="skip per-timestep unit normalisation"
    )
    p.add_argument(
        "--param-filter", type=regex, help="regex on parameter names (default: all parameters)"
    )
    p.add_argument("--grad-backend", default="hooks", choices=["hooks", "func"])


def _add_recipe_args(p) -> None:
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


def _add_draw_args(p) -> None:
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


def _add_method_args(p):
    """Concept-TRAK ablation switches of the benchmark commands."""
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated subset (ablations: concept-trak alone)",
    )
    p.add_argument("--draws", default="local", choices=["local", "global"])
    p.add_argument(
        "--inversion-guidance",
        type=nonneg_float,
        default=7.5,
        help="CFG of the DDIM inversions (training features, local query draws) and of global "
        "draws",
    )
    _add_recipe_args(p)
    _add_draw_args(p)
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
# paper`, whose model draws the held-out red triangle only under contrast guidance (README).
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


def _add_query_args(p, defaults: dict) -> None:
    for flag, key, kind, text in QUERY_FLAGS:
        p.add_argument(flag, type=kind, default=defaults[key], help=text)


def _add_benchmark_args(
    p, out: str, per_combo: int, queries: int, heldout: int, sampler: dict = PLAIN_QUERIES
) -> None:
    """Sizes and switches of `demo` and `bench quality|paper` (their defaults differ)."""
    p.add_argument("--out", default=out)
    p.add_argument(
        "--per-combo", type=positive_int, default=per_combo, help="training images per combo"
    )
    p.add_argument("--k", type=positive_int, default=2048)
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
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    p.add_argument(
        "--min-test-queries",
        type=nonneg_int,
        default=8,
        help="refuse (before any featurization) a split with fewer judge-confirmed test queries",
    )
    _add_query_args(p, sampler)
    _add_method_args(p)


TRUTH_HELP = (
    "what the images show where their captions leave a factor out (a labels file of the same "
    "format; default: the captions): the benchmark's ground truth, never what the model is told"
)


def _add_data_args(p):
    p.add_argument(
        "--data",
        help="SyntheticConfig JSON, or a ConceptDataset .safetensors file (default: shipped JSON)",
    )
    p.add_argument("--folder", help="a folder of images (with --labels) instead of synthetic data")
    p.add_argument("--labels", help="labels file (JSON or CSV) for --folder")
    p.add_argument("--image-size", type=positive_int, default=16)


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="ctrak", description="Concept-level training-data attribution.")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser(
        "demo", help="benchmark every method on the shipped model; table, JSON, gallery"
    )
    _add_benchmark_args(d, "demo_out", per_combo=30, queries=2, heldout=8)

    b = sub.add_parser("bench", help="benchmarks: `ctrak bench quality|paper|partial`")
    bsub = b.add_subparsers(dest="bench", required=True)
    q = bsub.add_parser(
        "quality", help="the concept benchmark: synthetic, or a labelled folder (--folder)"
    )
    _add_benchmark_args(q, "out/quality", per_combo=250, queries=5, heldout=8)
    q.add_argument("--folder", help="benchmark on this labelled image folder (with --labels)")
    q.add_argument("--labels", help="labels file of --folder (held-out combinations in it)")
    q.add_argument("--truth", help=TRUTH_HELP)
    q.add_argument("--model", help="the FactorUNet trained on --folder (`ctrak train --folder`)")
    q.add_argument("--judge", help="its judge (default: judge_NAME beside unet_NAME)")
    q.add_argument("--image-size", type=positive_int, default=16, help="of --folder's images")
    q.add_argument(
        "--keep-unconfirmed",
        action="store_true",
        help="use generated query images the judge does not confirm (a model that cannot draw "
        "its concepts yet; results.json records it)",
    )
    pp = bsub.add_parser(
        "paper", help="the paper's own 2 x 2 synthetic setting, in the paper's table layout"
    )
    _add_benchmark_args(
        pp, "out/paper", per_combo=200, queries=8, heldout=16, sampler=PAPER_QUERIES
    )

    pc = bsub.add_parser(
        "partial",
        help="incomplete captions: half of each factor's captions left out of training; scored "
        "against what the images show (AP, recall of the uncaptioned carriers)",
    )
    # 24 candidates: the held-out combinations are drawn less often by this model (README)
    sampler = {**PLAIN_QUERIES, "candidates": 24}
    _add_benchmark_args(pc, "out/partial", per_combo=30, queries=2, heldout=8, sampler=sampler)
    pc.add_argument(
        "--select-lambda-by",
        choices=["ap", "p@10"],
        default="ap",
        help="the validation metric that chooses lambda_r (P@10 saturates on captioned carriers)",
    )

    tr = sub.add_parser(
        "train", help="train a FactorUNet and its judge: synthetic data, or --folder --labels"
    )
    add_train_args(tr)

    f = sub.add_parser("featurize", help="write training features into a store")
    _add_feature_args(f)
    _add_data_args(f)
    f.add_argument("--out", required=True, help="store directory (resumed if it exists)")
    f.add_argument("--das-out", help="also write DAS rows here (d-trak only)")
    f.add_argument(
        "--per-combo",
        type=nonneg_int,
        default=0,
        help="first N images of each combination (0: all)",
    )
    f.add_argument("--batch-size", type=positive_int, default=32)
    f.add_argument(
        "--shard-rows",
        type=positive_int,
        default=256,
        help="feature rows per shard file, the unit of resume (256: a checkpoint every ~40 s "
        "of concept-trak on 2 CPU cores)",
    )
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
    qp.add_argument(
        "--n-draws", type=positive_int, help="default 4 (the paper recipe's global draws: 36)"
    )
    qp.add_argument("--weight", type=finite_float, default=7.5)
    qp.add_argument(
        "--guidance", type=nonneg_float, default=3.0, help="CFG of the generated query image"
    )
    qp.add_argument("--image", help="the query image file (default: generated from --concept)")
    where = qp.add_mutually_exclusive_group()
    where.add_argument(
        "--region",
        type=region_box,
        help="x0,y0,x1,y1: the part of the query image the concept is in (pixels of the image "
        "at the model's size); the query's loss is restricted to it",
    )
    where.add_argument(
        "--mask", help="a PNG of the query image's size: its non-black pixels are the region"
    )
    _add_draw_args(qp)
    qp.add_argument("--seed", type=nonneg_int, default=0)
    qp.add_argument("--out", required=True, help="query safetensors file")

    at = sub.add_parser("attribute", help="top-k (both tails) of queries against a store")
    at.add_argument("--store", required=True)
    at.add_argument("--query", required=True)
    at.add_argument("--k", type=positive_int, default=10)
    at.add_argument(
        "--lambda-r",
        type=lambda_list,
        default=[1.0],
        help="relative damping, or a comma-separated sweep (one eigendecomposition for all)",
    )
    at.add_argument(
        "--scoring-path",
        default="auto",
        choices=list(PATHS),
        help="primal: factor the k x k Gram; dual: the N x N kernel (auto: dual when N < k)",
    )
    at.add_argument(
        "--gram-precision",
        default="float64",
        choices=list(PRECISIONS),
        help="mixed: float32 products per chunk, float64 sums across chunks (2x faster)",
    )
    at.add_argument("--device", default=None, help="where the Gram is built and factored")
    at.add_argument("--out", help="JSON file (default: stdout)")
    at.add_argument(
        "--verify",
        default="crc",
        choices=["crc", "ids", "full", "none"],
        help="shard checks while reading: block CRC-32C of every byte (default, ~free), sha256 "
        "of the ids, of whole files, or none",
    )
    at.add_argument(
        "--allow-partial",
        action="store_true",
        help="score an incomplete store (a killed or running featurize) over the rows it has",
    )
    at.add_argument("--export-scores", help="also write all scores (safetensors, streamed)")
    at.add_argument("--export-queries", help="comma-separated query indices to export (all)")

    r = sub.add_parser("report", help="PNG gallery of an attribute result")
    _add_data_args(r)
    r.add_argument("--result", required=True)
    r.add_argument(
        "--query",
        help="its query file (default: the result's 'query' field, followed only inside the "
        "result's folder or the current directory)",
    )
    r.add_argument("--out", required=True)

    lb = sub.add_parser(
        "labels", help="check a labelled image folder: images, factors, values, held-out combos"
    )
    lb.add_argument("--folder", required=True)
    lb.add_argument("--labels", required=True, help="labels file (JSON or CSV)")
    lb.add_argument("--truth", help=TRUTH_HELP)
    lb.add_argument("--image-size", type=positive_int, default=16)

    s = sub.add_parser("store", help="inspect or verify a feature store")
    s.add_argument("action", choices=["info", "verify"])
    s.add_argument("path")

    e = sub.add_parser("example", help="the engine's end-to-end example on a small MLP")
    e.add_argument("--out", default="out/engine_example")
    e.add_argument("--k", type=positive_int, default=256)

    from ctrak_fast.cli.t2i import add_t2i_commands

    add_t2i_commands(sub)
    return p


def _cmd_t2i(a):
    from ctrak_fast.cli.t2i import run_t2i

    run_t2i(a)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The library logs (training progress, fallbacks); the CLI shows them on stderr.
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    a = build_parser().parse_args(argv)
    handlers = {
        "demo": cmd_demo,
        "featurize": cmd_featurize,
        "query": cmd_query,
        "attribute": cmd_attribute,
        "report": cmd_report,
        "store": cmd_store,
        "labels": cmd_labels,
        "train": cmd_train,
        "example": cmd_example,
        "bench": cmd_demo,
        "t2i": _cmd_t2i,
    }
    return run_guarded(lambda: handlers[a.cmd](a))


if __name__ == "__main__":
    sys.exit(main())
