"""`ctrak` command line. Every failure is one line on stderr: exit 2 for a usage error (the
parser's, argtypes.CliParser), 1 for any other."""

from __future__ import annotations

import argparse
import logging
import sys

from ctrak_fast._version import __version__
from ctrak_fast.cli.arggroups import (
    PAPER_QUERIES,
    PLAIN_QUERIES,
    TRUTH_HELP,
    add_benchmark_args,
    add_counterfactual_parser,
    add_data_args,
    add_draw_args,
    add_feature_args,
    add_mark_parser,
)
from ctrak_fast.cli.argtypes import (
    CliParser,
    finite_float,
    nonneg_float,
    nonneg_int,
    positive_int,
    region_box,
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
from ctrak_fast.cli.pipeline_args import add_attribute_args, add_pipeline_args, add_prompt_args
from ctrak_fast.cli.train import add_train_args, cmd_train


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="ctrak", description="Concept-level training-data attribution.")
    p.add_argument("--version", action="version", version=f"ctrak {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser(
        "demo", help="benchmark every method on the shipped model; table, JSON, gallery"
    )
    add_benchmark_args(d, "demo_out", per_combo=30, queries=2, heldout=8)

    b = sub.add_parser(
        "bench", help="benchmarks: `ctrak bench quality|paper|partial|mark|counterfactual`"
    )
    bsub = b.add_subparsers(dest="bench", required=True)
    q = bsub.add_parser(
        "quality", help="the concept benchmark: synthetic, or a labelled folder (--folder)"
    )
    add_benchmark_args(q, "out/quality", per_combo=250, queries=5, heldout=8)
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
    add_benchmark_args(pp, "out/paper", per_combo=200, queries=8, heldout=16, sampler=PAPER_QUERIES)

    pc = bsub.add_parser(
        "partial",
        help="incomplete captions: half of each factor's captions left out of training; scored "
        "against what the images show (AP, recall of the uncaptioned carriers)",
    )
    # 24 candidates: the held-out combinations are drawn less often by this model (docs/RESULTS.md)
    sampler = {**PLAIN_QUERIES, "candidates": 24}
    add_benchmark_args(pc, "out/partial", per_combo=30, queries=2, heldout=8, sampler=sampler)
    pc.add_argument(
        "--select-lambda-by",
        choices=["ap", "p@10"],
        default="ap",
        help="the validation metric that chooses lambda_r (P@10 saturates on captioned carriers)",
    )

    add_mark_parser(bsub)
    add_counterfactual_parser(bsub)

    tr = sub.add_parser(
        "train", help="train a FactorUNet and its judge: synthetic data, or --folder --labels"
    )
    add_train_args(tr)

    f = sub.add_parser("featurize", help="write training features into a store")
    add_feature_args(f)
    add_data_args(f)
    f.add_argument("--out", required=True, help="store directory (resumed if it exists)")
    f.add_argument("--das-out", help="also write DAS rows here (d-trak only)")
    f.add_argument(
        "--per-combo",
        type=nonneg_int,
        default=0,
        help="first N images of each combination (0: all)",
    )
    f.add_argument("--batch-size", type=positive_int, default=32, help="samples per gradient batch")
    f.add_argument(
        "--shard-rows",
        type=positive_int,
        default=256,
        help="feature rows per shard file, the unit of resume (256: a checkpoint every ~40 s "
        "of concept-trak on 2 CPU cores)",
    )
    add_pipeline_args(f, featurize=True)
    f.add_argument(
        "--nan-policy",
        default="fail",
        choices=["fail", "zero"],
        help="samples with NaN/Inf features: fail naming their ids (default), or store zero "
        "rows that the manifest lists",
    )

    qp = sub.add_parser("query", help="concept-slider query features for one concept")
    add_feature_args(qp)
    add_pipeline_args(qp, featurize=False)
    add_prompt_args(qp)
    qp.add_argument(
        "--concept",
        action="append",
        help="c+, e.g. 'shape=triangle,colour=red'; with --pipeline: a phrase of --prompt to "
        "attribute (repeatable), c- = the prompt without it",
    )
    qp.add_argument("--remove", help="factor(s) removed for c- (default: each factor in turn)")
    qp.add_argument(
        "--draws",
        default="local",
        choices=["local", "global"],
        help="query draws: stochastic DDIM inversions of the query image (local) or samples "
        "from noise (global)",
    )
    qp.add_argument(
        "--n-draws", type=positive_int, help="default 4 (the paper recipe's global draws: 36)"
    )
    qp.add_argument(
        "--weight", type=finite_float, help="slider weight w (default 7.5; 3 with --pipeline)"
    )
    qp.add_argument(
        "--guidance",
        type=nonneg_float,
        help="CFG of the generated query image (default 3; 7.5 with --pipeline)",
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
    add_draw_args(qp)
    qp.add_argument(
        "--seed", type=nonneg_int, default=0, help="seed of the query image and of the draws"
    )
    qp.add_argument("--out", required=True, help="query safetensors file")

    at = sub.add_parser("attribute", help="top-k (both tails) of queries against a store")
    add_attribute_args(at)

    r = sub.add_parser(
        "report", help="PNG gallery of an attribute result: the images its store records"
    )
    r.add_argument("--result", required=True, help="attribute JSON (`ctrak attribute --out`)")
    r.add_argument(
        "--query",
        help="its query file (default: the result's 'query' field, followed only inside the "
        "result's folder or the current directory)",
    )
    r.add_argument(
        "--store",
        help="its feature store, whose sources.json names the training images (default: the "
        "result's 'store' field, followed as --query is)",
    )
    r.add_argument(
        "--image-root",
        help="where the store's image folder is now, if it moved (default: the folder the "
        "store records)",
    )
    r.add_argument("--out", required=True, help="PNG file")

    lb = sub.add_parser(
        "labels", help="check a labelled image folder: images, factors, values, held-out combos"
    )
    lb.add_argument("--folder", required=True, help="the image folder")
    lb.add_argument("--labels", required=True, help="labels file (JSON or CSV)")
    lb.add_argument("--truth", help=TRUTH_HELP)
    lb.add_argument(
        "--image-size", type=positive_int, default=16, help="side the images are resized to"
    )

    s = sub.add_parser("store", help="inspect or verify a feature store")
    s.add_argument(
        "action",
        choices=["info", "verify"],
        help="info: manifest summary; verify: re-read and check every byte",
    )
    s.add_argument("path", help="store directory")

    e = sub.add_parser("example", help="the engine's end-to-end example on a small MLP")
    e.add_argument("--out", default="out/engine_example", help="output folder")
    e.add_argument("--k", type=positive_int, default=256, help="projection dimension")

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
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.cmd == "query" and not a.pipeline and (not a.concept or len(a.concept) > 1):
        parser.error("query: --concept is required once (c+), or give --pipeline and --prompt")
    if a.cmd == "query" and a.pipeline and not a.prompt:
        parser.error("query --pipeline: --prompt is required (c+, the prompt with the concept)")
    if getattr(a, "format", "json") == "parquet" and not a.out:
        parser.error("--format parquet needs --out (a binary file, not for stdout)")
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
