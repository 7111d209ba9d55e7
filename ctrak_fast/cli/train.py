"""`ctrak train`: the synthetic-concept model and judge, or a model and judge of your own
labelled image folder (`--folder DIR --labels FILE`)."""

from __future__ import annotations

from ctrak_fast.cli.argtypes import (
    fraction,
    nonneg_int,
    positive_float,
    positive_int,
    width_list,
)


def add_train_args(p) -> None:
    p.add_argument(
        "--out", help="output folder (default: the package's assets; required with --folder)"
    )
    p.add_argument("--name", help="NAME of the written files (default: shapes16, or folder)")
    p.add_argument("--folder", help="train on this image folder (with --labels)")
    p.add_argument(
        "--labels",
        help="labels file of --folder (JSON or CSV; held-out combinations are read from it)",
    )
    p.add_argument(
        "--image-size", type=positive_int, default=16, help="side of the training images"
    )
    p.add_argument("--per-combo", type=positive_int, default=250, help="synthetic data only")
    p.add_argument(
        "--n-heldout",
        type=nonneg_int,
        default=2,
        help="synthetic data only: Latin-square held-out pairs",
    )
    p.add_argument(
        "--preset",
        choices=["shapes", "paper"],
        default="shapes",
        help="synthetic data: shapes: 4 shapes x 4 colours; paper: the paper's 2 x 2 (outlined "
        "triangle/circle, red/blue, red triangle held out)",
    )
    p.add_argument(
        "--caption-drop",
        type=fraction,
        default=0.0,
        help="synthetic data only: leave each factor out of the caption (the model's null "
        "token) for this fraction of the training images, drawn per factor from --seed",
    )
    p.add_argument(
        "--mark-fraction",
        type=fraction,
        default=0.0,
        help="stamp an uncaptioned mark (a small glyph, position, size and tint jittered) on this "
        "fraction of the training images (synthetic or --folder), and train its detector "
        "(markjudge_NAME) for `ctrak bench mark`",
    )
    p.add_argument(
        "--seed", type=nonneg_int, default=0, help="seed of the data, initialisation and training"
    )
    p.add_argument(
        "--steps", type=positive_int, default=20_000, help="diffusion training steps at most"
    )
    p.add_argument(
        "--time-budget",
        type=positive_float,
        default=None,
        help="seconds of diffusion training at most",
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="training batch size")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    p.add_argument("--lr", type=positive_float, default=4e-4, help="learning rate (AdamW)")
    p.add_argument(
        "--judge-steps", type=positive_int, default=1500, help="training steps of the judge"
    )
    p.add_argument("--eval-n", type=positive_int, default=32, help="samples judged per combination")
    p.add_argument("--samples", default=None, help="PNG path for a sample grid (synthetic)")
    p.add_argument("--init-from", default=None, help="continue from this FactorUNet checkpoint")
    p.add_argument(
        "--channels",
        type=width_list,
        default=(32, 64, 64),
        help="UNet widths per resolution level, attention in the last (a new --folder model)",
    )
    p.add_argument(
        "--schedule",
        choices=["cosine", "linear"],
        default="cosine",
        help="noise schedule of a new model (ignored with --init-from)",
    )


def unet_kwargs(a, schedules: dict) -> dict:
    n = len(a.channels)
    return {
        "schedule": schedules[a.schedule],
        "block_out_channels": a.channels,
        "attention": (False,) * (n - 1) + (True,),
    }


def cmd_train(a) -> None:
    import torch

    from ctrak_fast.data import SyntheticConfig
    from ctrak_fast.data.synthetic import paper_config
    from ctrak_fast.engine.validation import InputError, check_input_dir, check_input_file
    from ctrak_fast.models.shipped import ASSETS
    from ctrak_fast.train.assets import SCHEDULES, train_all, train_folder

    if a.threads:
        torch.set_num_threads(a.threads)
    common = {
        "steps": a.steps,
        "time_budget_s": a.time_budget,
        "batch_size": a.batch_size,
        "lr": a.lr,
        "judge_steps": a.judge_steps,
        "eval_n": a.eval_n,
        "seed": a.seed,
    }
    if a.folder or a.labels:
        if not (a.folder and a.labels and a.out):
            raise InputError("--folder needs --labels and --out (where the model is written)")
        check_input_dir(a.folder, "image folder")
        check_input_file(a.labels, "labels file")
        paths = train_folder(
            a.out,
            a.folder,
            a.labels,
            name=a.name or "folder",
            image_size=a.image_size,
            **common,
            model_kwargs=unet_kwargs(a, SCHEDULES),
            mark_fraction=a.mark_fraction,
        )
    else:
        if a.preset == "paper":
            cfg = paper_config(per_combo=a.per_combo, image_size=a.image_size, seed=a.seed)
        else:
            cfg = SyntheticConfig(
                image_size=a.image_size,
                per_combo=a.per_combo,
                n_heldout=a.n_heldout,
                seed=a.seed,
                caption_drop=a.caption_drop,
                mark_fraction=a.mark_fraction,
            )
        paths = train_all(
            a.out or str(ASSETS),
            a.name or "shapes16",
            cfg,
            samples_png=a.samples,
            init_from=a.init_from,
            schedule=SCHEDULES[a.schedule],
            **common,
        )
    for what, path in paths.items():
        print(f"{what}: {path}")
