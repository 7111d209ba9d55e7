"""The flags of the diffusers-pipeline path (`ctrak featurize|query --pipeline`, their `ctrak t2i`
aliases) and of `ctrak attribute`, which both fronts share. Building them imports no torch."""

from __future__ import annotations

from argparse import ArgumentParser

from ctrak_fast.cli.argtypes import (
    lambda_list,
    nonneg_float,
    nonneg_int,
    positive_int,
    regex,
    timestep_list,
)
from ctrak_fast.engine.scoring_options import PATHS, PRECISIONS
from ctrak_fast.exports import FORMATS
from ctrak_fast.method.methods import FEATURIZE_METHODS

DTYPES = ("float32", "float16", "bfloat16")
# --dtype: the model's execution precision (short and long spellings); storage is --store-dtype
EXEC_DTYPES = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    **{d: d for d in DTYPES},
}
LORA_SCOPES = ("lora", "base", "both")  # = models.pipeline_adapter.LORA_SCOPES (no torch here)


def add_exec_args(p: ArgumentParser) -> None:
    """Where and in what precision the model runs, and the LoRA on it (every t2i path)."""
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=list(EXEC_DTYPES),
        help="execution precision of the model (fp32, bf16, fp16); the features are stored in "
        "--store-dtype",
    )
    p.add_argument("--device", help="where the model runs (cpu, cuda, cuda:1; default: cpu)")
    p.add_argument(
        "--lora",
        help="a diffusers/peft LoRA (pytorch_lora_weights.safetensors, or its folder) loaded onto "
        "the pipeline's UNet (needs peft)",
    )
    p.add_argument(
        "--lora-scope",
        default="lora",
        choices=list(LORA_SCOPES),
        help="with --lora: gradients of the LoRA parameters (the fine-tuning question; default), "
        "of the base condition path, or both",
    )


def add_pipeline_args(p: ArgumentParser, featurize: bool) -> None:
    """`ctrak featurize|query --pipeline DIR`: a diffusers pipeline folder and its own knobs."""
    p.add_argument(
        "--pipeline",
        help="a local diffusers pipeline folder (SD 1.x/2.x, SDXL, PixArt, SD3, DiT; "
        "model_index.json) instead of --model; default method concept-trak-cond. DiT: captions "
        "and --prompt name a class (an id2label name, or its number)",
    )
    p.add_argument(
        "--inversion-steps", type=positive_int, default=50, help="DDIM steps of the inversion"
    )
    add_exec_args(p)
    if featurize:
        p.add_argument("--images", help="--pipeline: the captioned image folder")
        p.add_argument(
            "--captions",
            help="metadata.jsonl / .csv (file_name plus text or caption) or {file: caption} "
            ".json (default: <images>/metadata.jsonl, else <images>/metadata.csv)",
        )
        p.add_argument(
            "--image-column", help="the file-name column of --captions (default: file_name)"
        )
        p.add_argument(
            "--caption-column",
            help="the caption column of --captions (default: text, else caption)",
        )
        # (--random-crop / --flip: add_data_args's, which `ctrak featurize` has)
        p.add_argument(
            "--store-dtype", default="float32", choices=DTYPES, help="storage dtype of the features"
        )


def add_t2i_model_args(p: ArgumentParser, methods: tuple[str, ...] = FEATURIZE_METHODS) -> None:
    """The flags of `ctrak t2i featurize|query` (aliases of `ctrak featurize|query --pipeline`)."""
    p.add_argument(
        "--model", help="diffusers pipeline folder or tiny-model checkpoint (default: shipped)"
    )
    p.add_argument(
        "--method",
        choices=methods,
        help="the attribution method (a row of method/methods.py; default concept-trak-cond)",
    )
    add_exec_args(p)
    p.add_argument("--k", type=positive_int, default=512, help="projection dimension")
    p.add_argument("--proj-seed", type=nonneg_int, default=0, help="seed of the random projection")
    p.add_argument(
        "--param-filter",
        type=regex,
        help="regex on UNet parameter names (default: the method's: the condition path, "
        r"cross-attention '\.attn2\.' (+ SDXL's add_embedding); '.*': all)",
    )
    p.add_argument(
        "--timesteps", type=timestep_list, help="comma-separated, default 99,199,...,899"
    )
    p.add_argument(
        "--inversion-steps", type=positive_int, default=50, help="DDIM steps of the inversion"
    )
    p.add_argument(
        "--inversion-guidance", type=nonneg_float, default=7.5, help="CFG of the DDIM inversion"
    )
    p.add_argument(
        "--no-inversion", action="store_true", help="fixed noise instead of DDIM inversion"
    )


def add_prompt_args(p: ArgumentParser, prompt: bool = True) -> None:
    """The prompt query's flags (`ctrak query --pipeline`, `ctrak t2i query`) beside --concept."""
    if prompt:
        p.add_argument("--prompt", help="--pipeline: c+, e.g. 'a pikachu in the style of picasso'")
    p.add_argument("--negative-prompt", action="append", help="an explicit c- (repeatable)")
    p.add_argument(
        "--steps", type=positive_int, default=50, help="sampling steps of a regenerated image"
    )
    p.add_argument(
        "--scheduler",
        choices=["ddim", "ddpm", "euler", "euler-a", "dpm", "pndm"],
        help="sampler of the regenerated query image (default: the pipeline's own)",
    )


def add_attribute_args(p: ArgumentParser) -> None:
    """`ctrak attribute` (and its alias `ctrak t2i attribute`)."""
    p.add_argument("--store", required=True, help="feature store directory (`ctrak featurize`)")
    p.add_argument("--query", required=True, help="query file (`ctrak query`)")
    p.add_argument(
        "--k", type=positive_int, default=10, help="training samples kept per query and tail"
    )
    p.add_argument(
        "--lambda-r",
        type=lambda_list,
        default=[1.0],
        help="relative damping, or a comma-separated sweep (one eigendecomposition for all)",
    )
    p.add_argument(
        "--scoring-path",
        default="auto",
        choices=list(PATHS),
        help="primal: factor the k x k Gram; dual: the N x N kernel (auto: dual when N < k)",
    )
    p.add_argument(
        "--gram-precision",
        default="float64",
        choices=list(PRECISIONS),
        help="mixed: float32 products per chunk, float64 sums across chunks (2x faster)",
    )
    p.add_argument("--device", default=None, help="where the Gram is built and factored")
    p.add_argument("--out", help="output file (default: stdout; parquet needs a file)")
    p.add_argument(
        "--format",
        default="json",
        choices=list(FORMATS),
        help="json: the result with its header; csv / parquet: one row per (query, tail, rank) "
        "with id and score (parquet needs pyarrow)",
    )
    p.add_argument(
        "--verify",
        default="crc",
        choices=["crc", "ids", "full", "none"],
        help="shard checks while reading: block CRC-32C of every byte (default, ~free), sha256 "
        "of the ids, of whole files, or none",
    )
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="score an incomplete store (a killed or running featurize) over the rows it has",
    )
    p.add_argument("--export-scores", help="also write all scores (safetensors, streamed)")
    p.add_argument("--export-queries", help="comma-separated query indices to export (all)")
