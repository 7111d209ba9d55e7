"""Samples/s of featurization per transformer model kind (DiT, PixArt, SD3) at tiny size.

    python benchmarks/bench_transformer_kinds.py                        # CPU, every kind
    python benchmarks/bench_transformer_kinds.py --device cuda --kinds sd3 --json out/k.json

Each kind is a tiny random diffusers pipeline built here (no download: 16x16 pixels, 4x8x8
latents, two transformer blocks of width 8, text encoders from configs), wrapped by
`Attributor.from_pipeline` with the default method (concept-trak: DPS loss, DDIM inversion with
CFG; for SD3 the Euler flow ODE) at the --timesteps, --inversion-steps inversion steps and
k = --k. Method: each case featurizes once and is checked (n rows, finite), then featurizes
--reps times into fresh stores; the table gives the median samples/s (min-max). Tiny models
measure the method's overhead per model call, not a real model's FLOPs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import environment, format_table, time_fn  # noqa: E402

import ctrak_fast as cf  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "triangle", "circle"]
CAPTIONS = ["a red triangle", "a blue circle", "a red circle", "a blue triangle"]


def tokenizer(folder: Path) -> Any:
    import transformers

    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return transformers.BertTokenizer(str(folder / "vocab.txt"), model_max_length=8)


def vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


def dit(folder: Path) -> Any:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    net = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=4, norm_num_groups=1,
    )  # fmt: skip
    return randomize(DiTPipeline(transformer=net, vae=vae(), scheduler=DDIMScheduler()))


def pixart(folder: Path) -> Any:
    import transformers
    from diffusers import DDPMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    net = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=8, caption_channels=12,
        norm_num_groups=1,
    )  # fmt: skip
    t5 = transformers.T5Config(
        vocab_size=len(VOCAB), d_model=12, d_kv=4, d_ff=24, num_layers=1, num_heads=2
    )
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer(folder),
        text_encoder=transformers.T5EncoderModel(t5).eval(),
        vae=vae(),
        transformer=net,
        scheduler=DDPMScheduler(),
    )
    return randomize(pipe)


def sd3(folder: Path) -> Any:
    import transformers
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    clip = transformers.CLIPTextConfig(
        vocab_size=len(VOCAB), hidden_size=12, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=8, projection_dim=6, bos_token_id=2,
        eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    t5 = transformers.T5Config(
        vocab_size=len(VOCAB), d_model=24, d_kv=4, d_ff=24, num_layers=1, num_heads=2
    )
    net = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=4, num_attention_heads=2, joint_attention_dim=24,
        caption_projection_dim=8, pooled_projection_dim=12, pos_embed_max_size=8,
    )  # fmt: skip
    tok = tokenizer(folder)
    pipe = StableDiffusion3Pipeline(
        transformer=net,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(),
        text_encoder=transformers.CLIPTextModelWithProjection(clip).eval(),
        tokenizer=tok,
        text_encoder_2=transformers.CLIPTextModelWithProjection(clip).eval(),
        tokenizer_2=tok,
        text_encoder_3=transformers.T5EncoderModel(t5).eval(),
        tokenizer_3=tok,
    )
    return randomize(pipe)


def randomize(pipe: Any) -> Any:
    """Random weights everywhere in the transformer: diffusers zero-inits output layers (and
    adaLN-zero gates), which would make every gradient before them zero."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return pipe


# kind -> (pipeline builder, the training conditions of n images)
CASES: dict[str, tuple[Callable[[Path], Any], Callable[[int], Any]]] = {
    "dit": (dit, lambda n: [i % 4 for i in range(n)]),
    "pixart": (pixart, lambda n: [CAPTIONS[i % 4] for i in range(n)]),
    "sd3": (sd3, lambda n: [CAPTIONS[i % 4] for i in range(n)]),
}


def run_case(kind: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    build, conds = CASES[kind]
    torch.manual_seed(0)
    pipe = build(work).to(args.device)
    spec = cf.FeatureSpec(
        timesteps=tuple(int(t) for t in args.timesteps.split(",")),
        inversion_steps=args.inversion_steps,
    )
    att = cf.Attributor.from_pipeline(pipe, projection=cf.ProjectionSpec(k=args.k), feature=spec)
    gen = torch.Generator().manual_seed(0)
    data = (torch.rand(args.n, 3, 16, 16, generator=gen) * 2 - 1, conds(args.n))
    runs = iter(range(10**6))

    def featurize() -> Any:
        return att.featurize(data, work / f"{kind}-{next(runs)}", batch_size=args.batch)

    store = featurize()  # verified before it is timed
    feats, _ = store.read_all()
    if store.n_rows != args.n or not torch.isfinite(feats.float()).all() or not feats.any():
        raise RuntimeError(f"{kind}: featurization gave {store.n_rows} rows, non-finite or zero")
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else None
    timing = time_fn(featurize, warmup=0, repeat=args.reps, sync=sync)
    params = sum(p.numel() for p in att.model.parameters())
    return {
        "kind": kind,
        "schedule": type(att.featurizer.schedule).__name__,
        "params": params,
        "n": args.n,
        "samples_per_s": args.n / timing.median,
        "spread_s": timing.spread(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=16, help="training images per featurization")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--timesteps", default="299,599,899", help="on the inversion's DDIM grid")
    ap.add_argument("--inversion-steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:  # a failing kind is reported; the others still run
            try:
                rows.append(run_case(kind, args, Path(tmp)))
            except Exception as e:  # noqa: BLE001
                failed.append(kind)
                print(f"{kind}: FAILED: {type(e).__name__}: {e}", flush=True)
                continue
            print(format_table(rows[-1:]), flush=True)
    env = environment({"device": args.device, "args": {k: str(v) for k, v in vars(args).items()}})
    print(json.dumps(env))
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
