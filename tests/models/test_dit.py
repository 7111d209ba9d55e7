"""The DiT kind (models/dit.py): a tiny random DiTPipeline saved and loaded from tmp_path,
featurized, queried and attributed through Attributor.from_pipeline; its condition path."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import DIT_CLASSES as N_CLASSES
from tiny_pipelines import tiny_dit_pipeline

import ctrak_fast as cf
from ctrak_fast.method.grads.layout import parameter_layout
from ctrak_fast.models.dit import DiTAdapter, DiTKind
from ctrak_fast.models.registry import kind_of, kind_of_pipeline

T1 = cf.FeatureSpec(timesteps=(299, 699), inversion_steps=10)


@pytest.fixture
def dit_pipe(tmp_path):
    from diffusers import DiTPipeline

    tiny_dit_pipeline().save_pretrained(tmp_path / "dit")
    return DiTPipeline.from_pretrained(tmp_path / "dit", local_files_only=True)


def test_dit_end_to_end(dit_pipe, tmp_path):
    assert kind_of_pipeline(dit_pipe) is DiTKind
    att = cf.Attributor.from_pipeline(dit_pipe, projection=cf.ProjectionSpec(k=16), feature=T1)
    model = att.model
    assert isinstance(model, DiTAdapter) and model.transformer is dit_pipe.transformer
    assert model.null_class == N_CLASSES  # the extra row of the label table
    assert kind_of(att.model).pixel_size() == 16  # 8x8 latents of a 2-level VAE
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    store = att.featurize((images, [0, 1, 2, 0, 1, 2]), tmp_path / "store", batch_size=3)
    assert store.n_rows == 6 and store.meta["dit"]["vae"] is not None
    q = att.query(1, n_draws=1, steps=10)  # class 1 against the unconditional class
    assert q.labels == ("-class 1",) and q.features.shape == (1, 16)
    assert torch.isfinite(q.features).all() and q.features.abs().sum() > 0
    res = att.attribute(q, store, k=3)
    assert res.top_ids.shape == (1, 3) and torch.isfinite(res.top_scores).all()
    assert set(res.top_ids[0].tolist()) <= set(range(6))
    vs = att.query(1, negatives=[2], n_draws=1, steps=10)  # an explicit c-: another class
    assert vs.labels == ("vs 2",) and not torch.equal(vs.features, q.features)


def test_dit_eps_is_the_first_half_of_a_learned_sigma_output(dit_pipe):
    from diffusers import DDIMScheduler

    model = DiTAdapter(dit_pipe.transformer, DDIMScheduler())
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([100, 800]), torch.tensor([[0], [3]])
    with torch.no_grad():
        raw = dit_pipe.transformer(x, timestep=t, class_labels=c[:, 0]).sample
        assert raw.shape[1] == 8
        torch.testing.assert_close(model(x, t, c), raw[:, :4])
    assert model.null_cond(2).tolist() == [[3], [3]]


def test_dit_condition_path(dit_pipe):
    """The rule's parameters are exactly the class embedding tables and the adaLN modulation
    linears; those are exactly the layers whose input the class changes while the noisy input
    does not; and the featurizer's @condition gradient is the full gradient at those
    parameters, nothing else."""
    from diffusers import DDIMScheduler

    model = DiTAdapter(dit_pipe.transformer, DDIMScheduler())
    names = {s.name for s in parameter_layout(model, "@condition")}
    expected = {"transformer.proj_out_1.weight", "transformer.proj_out_1.bias"}
    for i in range(2):
        block = f"transformer.transformer_blocks.{i}.norm1."
        expected |= {block + "linear.weight", block + "linear.bias"}
        expected.add(block + "emb.class_embedder.embedding_table.weight")
    assert names == expected

    # which layers read the class but not x_t: record every leaf layer's input
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0].detach().clone()))
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))
    ]
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])

    def inputs(x_t, label):
        seen.clear()
        with torch.no_grad():
            model(x_t, t, torch.tensor([[label]]))
        return dict(seen)

    base, other_x, other_c = inputs(x, 0), inputs(x + 1, 0), inputs(x, 2)
    for h in hooks:
        h.remove()
    reads_class_only = {
        n for n in base if torch.equal(base[n], other_x[n]) and not torch.equal(base[n], other_c[n])
    }
    assert {n + ".weight" for n in reads_class_only} == {n for n in names if n.endswith("weight")}

    # the @condition gradient = the full per-sample gradient at exactly those parameters
    fz = cf.Attributor(model, "concept-trak-cond", feature=None).featurizer
    xt, tt, cond = torch.randn(2, 4, 8, 8), torch.tensor([300, 600]), torch.tensor([[0], [2]])
    r = torch.randn(2, 4, 8, 8)
    blocks = fz.grads(xt, tt, cond, r)
    assert {s.name for s in fz.grads.slots} == names
    check_against_single_sample_loop(model, fz.grads.slots, blocks, xt, tt, cond, r)


def check_against_single_sample_loop(model, slots, blocks, xt, tt, cond, r):
    """Per-sample blocks (2/D) J^T r against one backward pass per sample over every parameter;
    the parameters outside the slots are not in the blocks."""
    params = dict(model.named_parameters())
    assert [off for off, _ in blocks] == [s.offset for s in slots]
    for i in range(len(xt)):
        out = model(xt[i : i + 1], tt[i : i + 1], cond[i : i + 1])
        loss = (out * r[i : i + 1]).sum() * (2.0 / xt[0].numel())
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        full = dict(zip(params, grads, strict=True))
        for slot, (_, b) in zip(slots, blocks, strict=True):
            want = full[slot.name]
            want = torch.zeros_like(params[slot.name]) if want is None else want
            torch.testing.assert_close(b[i], want.flatten(), rtol=1e-4, atol=1e-6)
