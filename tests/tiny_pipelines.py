"""Tiny random transformer pipelines (DiT, PixArt-alpha, SD3) that test files share: a few
thousand parameters each, 16x16 images (8x8 latents of the tiny VAE), nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import VOCAB, perturb, tiny_clip, tiny_vae

DIT_CLASSES = 3
DIT_LABELS = {"0": "circle, round", "1": "triangle", "2": "square"}  # as DiT's id2label
SD3_BLOCKS = 2


def tiny_dit(out_channels=8):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return perturb(
        DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=4,
            in_channels=4,
            out_channels=out_channels,  # 8: learned sigma, as the released DiT
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=DIT_CLASSES,
            norm_num_groups=1,
        )
    )


def tiny_dit_pipeline():
    from diffusers import DDIMScheduler, DiTPipeline

    return DiTPipeline(transformer=tiny_dit(), vae=tiny_vae(), scheduler=DDIMScheduler())


def save_dit_folder(folder: Path) -> Path:
    """The tiny DiTPipeline saved to `folder`, its model_index.json naming the classes
    (id2label, as the released DiT folders do: save_pretrained does not write it)."""
    tiny_dit_pipeline().save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "id2label": DIT_LABELS}))
    return folder


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return perturb(
        PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=4,
            in_channels=4,
            out_channels=8,  # learned sigma, as the released PixArt
            num_layers=2,
            sample_size=8,
            patch_size=2,
            cross_attention_dim=8,
            caption_channels=12,
            norm_num_groups=1,
        )
    )


def tiny_t5():
    import transformers

    torch.manual_seed(4)
    cfg = transformers.T5Config(
        vocab_size=len(VOCAB), d_model=12, d_kv=4, d_ff=24, num_layers=1, num_heads=2
    )
    return transformers.T5EncoderModel(cfg).eval()


def tiny_pixart_pipeline(folder: Path):
    """A PixArtAlphaPipeline of the tiny parts (its vocabulary written to folder/vocab.txt)."""
    from diffusers import DDPMScheduler, PixArtAlphaPipeline

    _, tokenizer = tiny_clip(folder)
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_t5(),
        vae=tiny_vae(),
        transformer=tiny_pixart(),
        scheduler=DDPMScheduler(),
    )


def tiny_sd3_pipeline(folder: Path):
    """A StableDiffusion3Pipeline: two CLIPs and a T5 from configs, a flow-matching scheduler
    (its vocabulary written to folder/vocab.txt)."""
    import transformers
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    _, tokenizer = tiny_clip(folder)
    clip = transformers.CLIPTextConfig(
        vocab_size=len(VOCAB),
        hidden_size=12,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        projection_dim=6,
        bos_token_id=2,  # [CLS]
        eos_token_id=3,  # [SEP]: the pooled state, which has read the whole prompt
        pad_token_id=0,
    )
    t5 = transformers.T5Config(
        vocab_size=len(VOCAB), d_model=24, d_kv=4, d_ff=24, num_layers=1, num_heads=2
    )
    torch.manual_seed(0)
    transformer = perturb(
        SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=SD3_BLOCKS,
            attention_head_dim=4,
            num_attention_heads=2,
            joint_attention_dim=24,  # = T5's d_model >= the two CLIPs' 12 + 12
            caption_projection_dim=8,
            pooled_projection_dim=12,  # the two CLIP projections, 6 + 6
            pos_embed_max_size=8,
        )
    )
    torch.manual_seed(5)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.1),
        text_encoder=transformers.CLIPTextModelWithProjection(clip).eval(),
        tokenizer=tokenizer,
        text_encoder_2=transformers.CLIPTextModelWithProjection(clip).eval(),
        tokenizer_2=tokenizer,
        text_encoder_3=transformers.T5EncoderModel(t5).eval(),
        tokenizer_3=tokenizer,
    )
