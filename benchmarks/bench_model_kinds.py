"""Training-feature throughput per diffusers model kind, at tiny size: samples/s of the
concept-trak-cond featurizer (DPS loss, DDIM inversion, the condition path, projection to k).

    python benchmarks/bench_model_kinds.py                           # CPU, every kind
    python benchmarks/bench_model_kinds.py --device cuda --dtype bf16 --json out/kinds.json

Each case builds a tiny random pipeline of its kind (no download), saves it with
`save_pretrained`, loads it back as the CLI does (`load_pipeline_adapter`, with --lora for the
LoRA case) and featurizes --n random latents with captions. Method (BENCHMARKS.md): the features
are checked (finite, [n, k]) on the warm-up call, then the call is timed --reps times; median
(min-max). Kinds are rows of CASES; a new kind adds its builder there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import environment, format_table, time_fn, write_json  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "triangle", "circle"]
UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,
    norm_num_groups=4,
)
VAE = dict(
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)


def _text_parts(tmp: Path, projection: bool):
    import transformers

    (tmp / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    cfg = transformers.CLIPTextConfig(
        vocab_size=len(VOCAB),
        hidden_size=12,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=8,
        eos_token_id=3,
        bos_token_id=2,
        projection_dim=8,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    tok = transformers.BertTokenizer(str(tmp / "vocab.txt"), model_max_length=8)
    return cls(cfg).eval(), tok


def build_sd(tmp: Path) -> Path:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    te, tok = _text_parts(tmp, projection=False)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE),
        text_encoder=te,
        tokenizer=tok,
        unet=UNet2DConditionModel(**UNET, cross_attention_dim=12),
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp / "sd")
    return tmp / "sd"


def build_sdxl(tmp: Path) -> Path:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    te, tok = _text_parts(tmp, projection=False)
    te2, tok2 = _text_parts(tmp, projection=True)
    unet = UNet2DConditionModel(
        **UNET,
        cross_attention_dim=24,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4,
    )
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**VAE),
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
    )
    pipe.save_pretrained(tmp / "sdxl")
    return tmp / "sdxl"


def build_sd_lora(tmp: Path) -> tuple[Path, Path]:
    """The SD case with a rank-4 LoRA on every attention projection (random, not trained)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder = build_sd(tmp)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    targets = ["to_k", "to_q", "to_v", "to_out.0"]
    pipe.unet.add_adapter(LoraConfig(r=4, init_lora_weights="gaussian", target_modules=targets))
    StableDiffusionPipeline.save_lora_weights(
        tmp / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet)
    )
    return folder, tmp / "lora"


# kind -> builder of (pipeline folder, LoRA or None); DiT / PixArt / SD3 rows go here.
CASES: dict[str, Callable[[Path], tuple[Path, Path | None]]] = {
    "sd": lambda tmp: (build_sd(tmp), None),
    "sdxl": lambda tmp: (build_sdxl(tmp), None),
    "sd+lora": build_sd_lora,
}


def run_case(name: str, args) -> dict:
    from ctrak_fast.engine.projection import ProjectionSpec
    from ctrak_fast.method.methods import get_method
    from ctrak_fast.models.pipeline_adapter import load_pipeline_adapter, lora_param_filter
    from ctrak_fast.models.t2i_features import make_featurizer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        folder, lora = CASES[name](Path(tmp))
        ad = load_pipeline_adapter(folder, dtype=dtype, lora=lora).to(args.device)
    kw = {"timesteps": (99, 499), "inversion_steps": 10}
    if lora is not None:
        kw["param_filter"] = lora_param_filter("lora", ad.condition_param_filter)
    spec = get_method("concept-trak-cond").feature_spec(**kw)
    fz = make_featurizer(ad, spec, ProjectionSpec(k=args.k), method="concept-trak-cond")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.n, 4, 8, 8, generator=g).to(args.device)
    conds = ad.prompt_ids([["a red triangle", "a blue circle"][i % 2] for i in range(args.n)])
    phi, _ = fz(x0, conds)  # the check
    if phi.shape != (args.n, args.k) or not torch.isfinite(phi).all():
        raise RuntimeError(f"{name}: features {list(phi.shape)} not finite / not [n, k]")
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else None
    t = time_fn(lambda: fz(x0, conds), warmup=0, repeat=args.reps, sync=sync)
    return {
        "kind": name,
        "device": args.device,
        "dtype": args.dtype,
        "param_filter": spec.param_filter if lora is None else "lora",
        "samples/s": args.n / t.median,
        "s (median)": t.median,
        "s (min-max)": t.spread(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--kinds", default=",".join(CASES), help="comma-separated rows of CASES")
    ap.add_argument("--n", type=int, default=8, help="samples per timed call")
    ap.add_argument("--k", type=int, default=256, help="projection dimension")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="write the rows and the environment here")
    args = ap.parse_args()
    rows = [run_case(name, args) for name in args.kinds.split(",")]
    print(format_table(rows))
    if args.json:
        write_json(args.json, {"environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
