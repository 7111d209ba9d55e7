"""`ctrak t2i ...`: aliases of `ctrak featurize|query|attribute --pipeline` (the same functions,
cli/pipeline_cmds.py and cli/commands.py; only --model names the pipeline here), and the prompt
benchmark on the shipped tiny model.

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

from ctrak_fast.cli import pipeline_cmds
from ctrak_fast.cli.arggroups import add_preprocess_args, add_t2i_bench_args
from ctrak_fast.cli.argtypes import finite_float, nonneg_float, nonneg_int, positive_int
from ctrak_fast.cli.commands import cmd_attribute
from ctrak_fast.cli.pipeline_args import (
    DTYPES,
    add_attribute_args,
    add_prompt_args,
    add_t2i_model_args,
)
from ctrak_fast.method.methods import GRADIENT_METHODS


def _concept_spec(a, **fields):
    """The concept-slider settings of --draws, --n-draws and the inversion flags (the draws invert
    as the training features do), `fields` on top: `t2i bench`."""
    from ctrak_fast.method.query import ConceptQuerySpec

    return ConceptQuerySpec(
        draws=a.draws,
        n_draws=a.n_draws,
        guidance=a.inversion_guidance,
        steps=a.inversion_steps,
        **fields,
    )


def _cmd_featurize(a):
    pipeline_cmds.cmd_featurize(a)


def _cmd_query(a):
    # t2i's --prompt is c+ and --concept the phrases removed, as in `ctrak query --pipeline`
    pipeline_cmds.cmd_query(a, a.prompt, a.concept or [], a.negative_prompt or [])


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
        min_test_queries=a.min_test_queries,
        confirm_queries=not a.keep_underpowered,
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
    f.add_argument("--out", required=True, help="store directory (resumed if it exists)")
    f.add_argument("--das-out", help="also write DAS rows here (d-trak only)")
    f.add_argument("--batch-size", type=positive_int, default=32, help="samples per gradient batch")
    f.add_argument(
        "--shard-rows",
        type=positive_int,
        default=256,
        help="feature rows per shard, the unit of resume (as `ctrak featurize`)",
    )
    f.add_argument(
        "--store-dtype", default="float32", choices=DTYPES, help="storage dtype of the features"
    )
    f.set_defaults(t2i_handler=_cmd_featurize)

    q = sub.add_parser("query", help="concept query features of a prompt")
    add_t2i_model_args(q, GRADIENT_METHODS)
    q.add_argument("--prompt", required=True, help="c+, e.g. 'a pikachu in the style of picasso'")
    q.add_argument(
        "--concept",
        action="append",
        help="phrase to attribute (repeatable): c- = prompt without it",
    )
    add_prompt_args(q, prompt=False)
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
    q.add_argument("--out", required=True, help="query safetensors file")
    q.set_defaults(t2i_handler=_cmd_query)

    at = sub.add_parser("attribute", help="top-k (both tails) of queries against a store")
    add_attribute_args(at)
    at.set_defaults(t2i_handler=cmd_attribute)

    b = sub.add_parser("bench", help="the prompt concept benchmark on the shipped tiny model")
    add_t2i_bench_args(b)
    b.set_defaults(t2i_handler=_cmd_bench)
    return t


def run_t2i(a) -> None:
    """Handler of the `t2i` command for the main CLI's dispatch table."""
    a.t2i_handler(a)
