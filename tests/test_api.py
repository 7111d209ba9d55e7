"""The public API, used the way an embedding tool would: only `import ctrak_fast` and names of its
`__all__` (test_only_public_names_used enforces that on this file's source).

One small store on the shipped model (14 images, one timestep, k=32) serves every test.
"""

from __future__ import annotations

import ast
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ctrak_fast as cf

ROOT = Path(__file__).resolve().parents[1]
FAST = cf.FeatureSpec(timesteps=(499,), inversion_steps=10)
FAST_QUERY = {"draws": "global", "n_draws": 1, "steps": 10}


@pytest.fixture(scope="module")
def data() -> cf.ConceptDataset:
    return cf.shipped_dataset(per_combo=1)  # 14 images: one per seen (shape, colour)


@pytest.fixture(scope="module")
def att() -> cf.Attributor:
    return cf.Attributor(cf.shipped_model(), feature=FAST, projection=cf.ProjectionSpec(k=32))


@pytest.fixture(scope="module")
def store(att, data, tmp_path_factory) -> cf.FeatureStore:
    return att.featurize(data, tmp_path_factory.mktemp("api") / "store", batch_size=7)


@pytest.fixture(scope="module")
def query(att) -> cf.Query:
    return att.query("shape=triangle,colour=red", **FAST_QUERY)


# ---- the surface ---------------------------------------------------------------------------------


def test_all_is_public_documented_and_complete():
    names = cf.__all__
    assert len(names) == len(set(names))
    private = [n for n in names if n.startswith("_") and n != "__version__"]
    assert not private, f"private names leaked into ctrak_fast.__all__: {private}"
    for name in names:
        obj = getattr(cf, name)  # every name resolves
        module = getattr(obj, "__module__", None)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            parts = module.split(".")
            assert parts[0] == "ctrak_fast" and not any(p.startswith("_") for p in parts), (
                f"{name} is defined in the private module {module}"
            )
    assert dir(cf) == sorted(names)
    with pytest.raises(AttributeError):
        cf.Featurizer  # noqa: B018  (engine names are reachable through their modules only)
    documented = set(
        line.split("`")[1]
        for line in (ROOT / "docs" / "API.md").read_text().splitlines()
        if line.startswith("| [`") or line.startswith("| `__version__`")
    )
    assert documented == set(names), "docs/API.md lists other names: run tools/gen_api_docs.py"


def test_every_public_name_has_examples_and_shapes():
    for name in cf.__all__:
        obj = getattr(cf, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        doc = inspect.getdoc(obj) or ""
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert doc, name
            continue
        assert "Examples:" in doc or "Examples" in (inspect.getdoc(inspect.getmodule(obj)) or ""), (
            f"{name} has no Examples block"
        )


def test_only_public_names_used():
    """This file touches ctrak_fast only through `cf.<name in __all__>`."""
    tree = ast.parse(Path(__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("ctrak_fast"), ast.unparse(node)
        if isinstance(node, ast.Import):
            assert all(a.name == "ctrak_fast" for a in node.names if "ctrak" in a.name)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "cf" and node.attr not in ("__all__", "Featurizer"):
                assert node.attr in cf.__all__, f"cf.{node.attr} is not public"


# ---- featurize -> query -> attribute -------------------------------------------------------------


def test_featurize_query_attribute(att, data, store, query):
    assert (store.n_rows, store.k, store.dtype) == (14, 32, "float32")
    feats, ids = store.read_all()
    assert torch.equal(ids, data.ids) and torch.isfinite(feats).all()
    meta = dict(store.meta)
    sources = meta.pop("sources")  # the store's own record of where its rows came from
    assert meta == json.loads(json.dumps(att.meta()))
    assert sources["rows"] == 14 and len(sources["sha256"]) == 64
    assert query.features.shape == (2, 32) and query.features.dtype == torch.float32
    assert query.labels == ("-shape", "-colour")  # one row per factor removed
    assert torch.isfinite(query.features).all() and (query.features.norm(dim=1) > 0).all()

    res = att.attribute(query, store, k=5)
    assert res.top_ids.shape == res.bottom_ids.shape == (2, 5)
    assert res.top_ids.dtype == torch.int64 and res.top_scores.dtype == torch.float32
    assert res.labels == query.labels
    # The engine's answer is the exact ranking of score_i = phi_i . (G + lam I)^-1 q.
    u = cf.Preconditioner(cf.gram(store), lambda_r=1.0).solve(query.features)
    dense = feats.double() @ u.double().T  # [14, 2]
    for j in range(2):
        order = torch.argsort(dense[:, j], descending=True)
        assert res.top_ids[j].tolist() == ids[order[:5]].tolist()
        assert res.bottom_ids[j].tolist() == ids[order.flip(0)[:5]].tolist()
        torch.testing.assert_close(
            res.top_scores[j].double(), dense[order[:5], j], atol=1e-5, rtol=1e-4
        )


def test_lambda_sweep_and_tails(att, store, query):
    feats, ids = store.read_all()
    for lam in (0.1, 10.0):
        res = att.attribute(query, store, k=3, lambda_r=lam, tails="top")
        assert res.bottom_ids is None and res.lambda_r == lam
        u = cf.Preconditioner(cf.gram(feats), lambda_r=lam).solve(query.features)
        best = torch.sort(feats.double() @ u.double().T, dim=0, descending=True).values[:3].T
        torch.testing.assert_close(res.top_scores.double(), best, atol=1e-5, rtol=1e-4)
    raw = att.attribute(query.features[1], store, k=3)  # a bare [k] tensor is one query row
    assert raw.labels == ("query 0",)
    assert raw.top_ids.tolist() == att.attribute(query, store, k=3).top_ids[1:].tolist()


def test_query_file_roundtrip_and_cli(att, store, query, tmp_path):
    path = query.save(tmp_path / "q.safetensors")
    back = cf.Query.load(path)
    assert torch.equal(back.features, query.features) and back.labels == query.labels
    res = att.attribute(back, store, k=4)
    assert res.to_dict() == att.attribute(query, store, k=4).to_dict()
    out = tmp_path / "hits.json"
    cmd = [sys.executable, "-m", "ctrak_fast.cli", "attribute", "--store", str(store.path)]
    cmd += ["--query", str(path), "--k", "4", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    cli = json.loads(out.read_text())
    assert [t["ids"] for t in cli["top"]] == res.top_ids.tolist()
    assert cli["removed"] == list(query.labels)


def test_store_and_query_must_match(att, data, store, query, tmp_path):
    other_seed = cf.Attributor(
        cf.shipped_model(), feature=FAST, projection=cf.ProjectionSpec(k=32, seed=1)
    )
    with pytest.raises(cf.SpecMismatch, match="projection.seed"):
        other_seed.attribute(query.features, store, k=3)
    trak = cf.Attributor(
        cf.shipped_model(),
        "trak",
        feature=cf.FeatureSpec.baseline("dsm", timesteps=(499,)),
        projection=cf.ProjectionSpec(k=32),
    )
    with pytest.raises(cf.SpecMismatch, match="feature"):
        att.attribute(trak.image_query(data.images[:1], data.labels[:1]), store, k=3)
    with pytest.raises(ValueError, match="k=16"):
        att.attribute(torch.zeros(1, 16), store, k=3)
    # A store written by a newer format than this build reads is refused, not misread.
    newer = tmp_path / "newer"
    shutil.copytree(store.path, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["format_version"] = cf.STORE_FORMAT_VERSION + 1
    (newer / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(cf.StoreError, match="format version"):
        att.attribute(query, newer, k=3)


def test_conditions_and_errors(att, data):
    # Four spellings of one condition generate the same image.
    a = att.generate("shape=triangle,colour=red", steps=5)
    for spelling in ({"shape": "triangle", "colour": "red"}, {"shape": 2, "colour": 0}):
        assert torch.equal(att.generate(spelling, steps=5), a)
    assert torch.equal(att.generate(torch.tensor([2, 0]), steps=5), a)
    assert a.shape == (1, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    with pytest.raises(ValueError, match="unknown factor"):
        att.query("size=large")
    with pytest.raises(ValueError, match="unknown value"):
        att.query("shape=hexagon")
    with pytest.raises(ValueError, match="expected factor=value"):
        att.query("triangle")
    with pytest.raises(ValueError, match="not set"):
        att.query("shape=triangle", remove="colour")
    with pytest.raises(ValueError, match="unknown method"):
        cf.Attributor(cf.shipped_model(), "tracin")
    with pytest.raises(ValueError, match="uses loss"):
        cf.Attributor(cf.shipped_model(), "trak", feature=cf.FeatureSpec())
    with pytest.raises(ValueError, match="ids must be"):
        att.featurize((data.images, data.labels, data.ids[:3]), "unused")


def test_one_factor_query_and_image_query(att, data, store):
    q = att.query({"shape": "circle"}, **FAST_QUERY)  # colour unnamed: null token
    assert q.labels == ("-shape",) and q.features.shape == (1, 32)
    neg = att.query("shape=circle,colour=blue", negatives=["shape=circle,colour=red"], **FAST_QUERY)
    assert neg.labels == ("vs 'shape=circle,colour=red'",)
    iq = att.image_query(data.images[:2], data.labels[:2])
    assert iq.features.shape == (2, 32) and iq.labels == ("image 0", "image 1")
    # Whole-image features of training images are the training rows themselves.
    feats, _ = store.read_all()
    torch.testing.assert_close(iq.features, feats[:2], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_baselines_and_das(data, tmp_path):
    base = cf.FeatureSpec.baseline("eps-norm", timesteps=(499,))
    proj = cf.ProjectionSpec(k=32)
    das = cf.Attributor(cf.shipped_model(), "das", feature=base, projection=proj)
    st = das.featurize(data, tmp_path / "dtrak", batch_size=7)
    das_rows, das_ids = cf.FeatureStore.open(cf.das_store_path(tmp_path / "dtrak")).read_all()
    rows, ids = st.read_all()
    assert torch.equal(das_ids, ids)
    ratio = das_rows / rows  # DAS rows are D-TRAK rows scaled by each sample's summed DSM loss
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=0)
    assert (ratio[:, 0] > 0).all()
    q = das.query("shape=square,colour=green", image=data.images[3])
    assert q.labels == ("image",)
    res = das.attribute(q, st, k=3)
    u = cf.Preconditioner(cf.gram(st)).solve(q.features)  # D-TRAK's Gram, DAS rows
    order = torch.argsort((das_rows.double() @ u.double().T)[:, 0], descending=True)
    assert res.top_ids[0].tolist() == ids[order[:3]].tolist()
    with pytest.raises(ValueError, match="whole-image"):
        das.query("shape=square", remove="shape")
    trak = cf.Attributor(cf.shipped_model(), "trak", projection=proj, feature=None)
    assert trak.feature_spec.loss == "dsm" and not trak.feature_spec.inversion
