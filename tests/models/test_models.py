"""FactorUNet / ConceptJudge: shapes, null tokens, checkpoints."""

from __future__ import annotations

import pytest
import torch

from ctrak_fast.engine.store import model_fingerprint
from ctrak_fast.models.factor_unet import (
    ConceptJudge,
    FactorUNet,
    drop_factor,
    load_model,
    null_cond,
    save_model,
)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return FactorUNet(
        [4, 3], image_size=8, block_out_channels=(16, 16), attention=(False, True)
    ).eval()


def test_forward_shape_and_timestep_forms(unet):
    x = torch.randn(5, 3, 8, 8)
    cond = torch.tensor([[0, 0], [1, 2], [3, 1], [4, 3], [2, 3]])  # includes both null tokens
    with torch.no_grad():
        eps = unet(x, torch.full((5,), 10), cond)
        assert eps.shape == x.shape and torch.isfinite(eps).all()
        assert torch.allclose(unet(x, 10, cond), eps, atol=1e-6)
        assert torch.allclose(unet(x, torch.tensor(10), cond), eps, atol=1e-6)


def test_condition_changes_output(unet):
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a = unet(x, 500, torch.tensor([[0, 0], [0, 0]]))
        b = unet(x, 500, torch.tensor([[1, 0], [0, 1]]))
    assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_null_cond_and_drop_factor(unet):
    assert unet.null_cond(3).tolist() == [[4, 3]] * 3
    assert torch.equal(null_cond(unet, 3), unet.null_cond(3)) and null_cond([2], 1).tolist() == [
        [2]
    ]
    cond = torch.tensor([[1, 2], [3, 0]])
    assert drop_factor(cond, 0, unet).tolist() == [[4, 2], [4, 0]]
    assert drop_factor(cond, 1, [4, 3]).tolist() == [[1, 3], [3, 3]]
    assert cond.tolist() == [[1, 2], [3, 0]]  # not modified in place
    assert [e.num_embeddings for e in unet.factor_embeddings] == [5, 4]


def test_classic_attention_processor(unet):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    procs = [m.processor for m in unet.modules() if isinstance(m, Attention)]
    assert procs and all(type(p) is AttnProcessor for p in procs)


def test_save_load_exact(tmp_path, unet):
    save_model(unet, tmp_path / "m.safetensors")
    back = load_model(tmp_path / "m.safetensors")
    assert isinstance(back, FactorUNet) and back.config == unet.config
    for (k, v), (k2, v2) in zip(unet.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    x, cond = torch.randn(2, 3, 8, 8), torch.tensor([[0, 1], [4, 3]])
    with torch.no_grad():
        assert torch.equal(unet(x, 7, cond), back(x, 7, cond))
    assert model_fingerprint(back) == model_fingerprint(unet)
    assert not list(tmp_path.glob("*.tmp"))


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a ctrak model"):
        load_model(tmp_path / "x.safetensors")


def test_judge_predict_and_round_trip(tmp_path):
    judge = ConceptJudge([4, 3], width=16).eval()
    x = torch.randn(6, 3, 16, 16)
    pred = judge.predict(x)
    assert pred.shape == (6, 2) and pred.dtype == torch.int64
    assert pred[:, 0].max() < 4 and pred[:, 1].max() < 3
    save_model(judge, tmp_path / "j.safetensors", dtype=torch.float16)
    back = load_model(tmp_path / "j.safetensors")
    assert isinstance(back, ConceptJudge)
    assert torch.allclose(back(x)[0], judge(x)[0], atol=1e-2)


def test_per_sample_grads_with_vmap(unet):
    """torch.func per-sample gradients work (classic attention has a vmap rule) and match a loop."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in unet.named_parameters()}
    x, t, cond = (
        torch.randn(3, 3, 8, 8),
        torch.tensor([5, 400, 900]),
        torch.tensor([[0, 1], [4, 3], [2, 0]]),
    )

    def loss(p, xi, ti, ci):
        out = functional_call(unet, p, (xi[None], ti[None], ci[None]))
        return out.pow(2).mean()

    per = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, t, cond)
    name = "factor_embeddings.0.weight"
    for i in range(3):
        ref = torch.autograd.grad(
            loss(dict(unet.named_parameters()), x[i], t[i], cond[i]), unet.get_parameter(name)
        )[0]
        assert torch.allclose(per[name][i], ref, atol=1e-6)


def test_train_diffusion_smoke_and_resume(tmp_path):
    """A few steps on a tiny model: checkpoints load, continue-from works, EMA != raw init."""
    from ctrak_fast.data import SyntheticConfig, make_dataset
    from ctrak_fast.train.diffusion import train_diffusion

    ds = make_dataset(SyntheticConfig(image_size=8, per_combo=2, seed=1))
    kw = {"block_out_channels": (16, 16), "attention": (False, True)}
    path = tmp_path / "u.safetensors"
    ema = train_diffusion(
        ds, path, steps=3, batch_size=4, model_kwargs=kw, progress=False, checkpoint_every=2
    )
    assert not list(tmp_path.glob("*.partial"))  # periodic checkpoint removed once final is written
    back = load_model(path)
    assert back.config == ema.config and back.config["values"] == ds.values
    assert model_fingerprint(back) == model_fingerprint(ema)
    more = train_diffusion(ds, tmp_path / "u2.safetensors", steps=2, batch_size=4, init_from=path)
    assert more.config == ema.config and model_fingerprint(more) != model_fingerprint(ema)
