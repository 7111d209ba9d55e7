"""Cost of concept attribution on a text-to-image model: per training image and per query.

    python benchmarks/bench_t2i_cost.py                       # shipped tiny model, SD 1.x estimate
    python benchmarks/bench_t2i_cost.py --json out/t2i_cost.json --batch 16

Measured on the tiny model (this machine): wall time per training image of the Concept-TRAK
featurizer (DPS loss, 50-step DDIM inversion with CFG, 9 timesteps, cross-attention parameters,
projection to k) and of the whole-image baselines, and per concept query (4 local or global
draws x 9 timesteps, one c-). Method: each case is checked (finite, right shape), run once to warm
up, then timed `--reps` times; median (min-max).

Counted (both models): FLOPs of the same calls, by a dispatch-level counter over torch's FLOP
formulas (matmuls, convolutions, attention; elementwise ops are not counted), plus the projection,
2 * p_selected * k per projected vector. Stable Diffusion 1.x is counted on the meta device from
its UNet config (860 M parameters, 64x64x4 latents, 77x768 text states): no weights, no compute.

Estimated for SD 1.x: its FLOPs divided by (a) the FLOP rate the tiny model achieved here, and (b)
an assumed sustained GPU rate (`--gpu-tflops`, default 150: about half of an A100's dense bf16
peak, a third of an H100's); both are assumptions, printed as such.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import environment, format_table, time_fn  # noqa: E402

from ctrak_fast.engine.projection import ProjectionSpec  # noqa: E402
from ctrak_fast.method import featurize  # noqa: E402
from ctrak_fast.method.featurize import FeatureSpec  # noqa: E402
from ctrak_fast.method.query import ConceptQuerySpec  # noqa: E402
from ctrak_fast.models.t2i_features import make_featurizer, prompt_query_features  # noqa: E402
from ctrak_fast.models.text2image import TextToImageAdapter  # noqa: E402

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SD15_TEXT = (77, 768)


class FlopCount(TorchDispatchMode):
    """Sums torch's registered FLOP formulas over every op dispatched inside the block.

    (torch's FlopCounterMode also tracks modules with backward hooks, which refuses the
    autograd.grad(loss, x_t) of the DPS guidance.)
    """

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


class CountingProjector:
    """Stand-in projector for FLOP counts: 2 * n * k per block column, zeros on x's device."""

    def __init__(self, k: int):
        self.k = k
        self.flops = 0

    def project_blocks(self, blocks):
        b = blocks[0][1].shape[0]
        self.flops += sum(2 * blk.shape[0] * blk.shape[1] * self.k for _, blk in blocks)
        return torch.zeros(b, self.k, device=blocks[0][1].device)


@contextlib.contextmanager
def _dsm_on_cpu():
    """Featurizer sums the per-sample DSM loss (DAS weights) into a CPU tensor; on the meta device
    that sum cannot be formed, and its value does not matter for FLOPs: hand back CPU zeros."""
    real = featurize.residual

    def residual(*args, **kw):
        r, dsm = real(*args, **kw)
        return r, torch.zeros(dsm.shape) if dsm.is_meta else dsm

    featurize.residual = residual
    try:
        yield
    finally:
        featurize.residual = real


def feature_specs(args) -> dict[str, FeatureSpec]:
    t = dict(inversion_steps=args.inversion_steps)
    return {
        "concept-trak": FeatureSpec(**t),
        "concept-trak, all UNet params": FeatureSpec(param_filter=".*", **t),
        "trak / d-trak (fixed noise)": FeatureSpec.baseline("dsm"),
    }


def query_specs(args) -> dict[str, ConceptQuerySpec]:
    base = dict(n_draws=args.n_draws, steps=args.inversion_steps, weight=3.0)
    return {f"query {d}": ConceptQuerySpec(draws=d, **base) for d in ("local", "global")}


def count_flops(adapter, args, k: int, batch: int, pos, neg) -> dict[str, float]:
    """FLOPs per training image (per spec) and per query (per draw kind) of `adapter`; pos / neg:
    one condition each (prompt id [1] or embedding [L, D]), c+ and c- of the query."""
    dev = adapter.device
    c, s = adapter.config["in_channels"], adapter.config["image_size"]
    x0 = torch.randn(batch, c, s, s, device=dev)
    cond = pos[None].expand(batch, *pos.shape)
    out = {}
    for name, spec in feature_specs(args).items():
        fz = make_featurizer(adapter, spec, ProjectionSpec(k=k))
        fz._projector = proj = CountingProjector(k)
        with FlopCount() as fc, _dsm_on_cpu():
            fz(x0, cond)
        out[name] = (fc.flops + proj.flops) / batch
        out[f"{name}: p_selected"] = fz.grads.n_selected
    fz = make_featurizer(adapter, FeatureSpec(), ProjectionSpec(k=k))
    for name, spec in query_specs(args).items():
        fz._projector = proj = CountingProjector(k)
        with FlopCount() as fc:
            prompt_query_features(fz, spec, pos, [neg], x0[0])
        out[name] = fc.flops + proj.flops
    with FlopCount() as fc, torch.no_grad():
        adapter(x0[:1], torch.tensor([500]), cond[:1])
    out["unet forward"] = fc.flops
    return out


def time_tiny(adapter, args) -> dict[str, dict]:
    """Seconds per training image (per spec) and per query (per draw kind), measured."""
    torch.manual_seed(0)
    b = args.batch
    c, s = adapter.config["in_channels"], adapter.config["image_size"]
    x0 = torch.rand(b, c, s, s) * 2 - 1
    cond = adapter.prompt_ids(["a red triangle"] * b)
    rows = {}
    for name, spec in feature_specs(args).items():
        fz = make_featurizer(adapter, spec, ProjectionSpec(k=args.k))
        phi, _ = fz(x0, cond)
        assert phi.shape == (b, args.k) and torch.isfinite(phi).all(), name
        t = time_fn(lambda fz=fz: fz(x0, cond), warmup=0, repeat=args.reps)
        rows[name] = {
            "per": "training image",
            "s": t.median / b,
            "spread": f"{t.min / b:.3g}-{t.max / b:.3g}",
        }
    fz = make_featurizer(adapter, FeatureSpec(), ProjectionSpec(k=args.k))
    negs = ["a triangle"]
    for name, spec in query_specs(args).items():
        q = prompt_query_features(fz, spec, "a red triangle", negs, x0[0])
        assert q.shape == (1, args.k) and torch.isfinite(q).all(), name

        def run(spec=spec):
            return prompt_query_features(fz, spec, "a red triangle", negs, x0[0])

        t = time_fn(run, warmup=0, repeat=args.reps)
        rows[name] = {"per": "query (one c-)", "s": t.median, "spread": t.spread()}
    return rows


def sd15_adapter():
    from diffusers import DDPMScheduler, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    ad = TextToImageAdapter(unet, DDPMScheduler(**SD15_SCHEDULE))
    ad.set_null_cond(torch.zeros(*SD15_TEXT, device="meta"))
    return ad


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="tiny t2i checkpoint (default: the shipped one)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--k", type=int, default=512, help="projection dimension of the tiny runs")
    p.add_argument("--sd-k", type=int, default=32768, help="projection dimension for SD (paper)")
    p.add_argument("--inversion-steps", type=int, default=50)
    p.add_argument("--n-draws", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--gpu-tflops", type=float, default=150.0, help="assumed sustained GPU rate")
    p.add_argument("--json", default="out/t2i_cost.json")
    args = p.parse_args(argv)

    from ctrak_fast.train.tiny_text import load_t2i

    tiny = load_t2i(args.model)
    measured = time_tiny(tiny, args)
    ids = tiny.prompt_ids(["a red triangle", "a triangle"])
    tiny_flops = count_flops(tiny, args, args.k, args.batch, ids[0], ids[1])
    text = torch.zeros(*SD15_TEXT, device="meta")  # SD's text states: the values do not matter
    sd_flops = count_flops(sd15_adapter(), args, args.sd_k, 1, text, text)

    rows = []
    for name, m in measured.items():
        rate = tiny_flops[name] / m["s"]  # achieved FLOP/s of this case on this machine
        sd = sd_flops[name]
        rows.append(
            {
                "case": name,
                "per": m["per"],
                "tiny s": m["s"],
                "tiny spread": m["spread"],
                "tiny GFLOP": tiny_flops[name] / 1e9,
                "tiny GFLOP/s": rate / 1e9,
                "SD1.x TFLOP": sd / 1e12,
                "SD1.x fwd-equiv": sd / sd_flops["unet forward"],
                "SD1.x CPU h (this rate)": sd / rate / 3600,
                f"SD1.x s @{args.gpu_tflops:g} TFLOP/s": sd / (args.gpu_tflops * 1e12),
            }
        )
    table = format_table(rows)
    print(table)
    notes = {
        "tiny unet forward GFLOP": tiny_flops["unet forward"] / 1e9,
        "SD1.x unet forward GFLOP": sd_flops["unet forward"] / 1e9,
        "tiny attn2 params": tiny_flops["concept-trak: p_selected"],
        "SD1.x attn2 params": sd_flops["concept-trak: p_selected"],
        "SD1.x all UNet params": sd_flops["concept-trak, all UNet params: p_selected"],
        "k (tiny, SD)": [args.k, args.sd_k],
    }
    print(json.dumps(notes, indent=1))
    out = {"env": environment(), "args": vars(args), "rows": rows, "notes": notes, "table": table}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
