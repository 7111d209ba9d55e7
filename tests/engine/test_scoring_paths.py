"""The memory-bounded scoring paths (engine/gram.py, engine/scoring.py, sweep.solve_queries):
each against the plain float64 formula on fresh random inputs.

Tolerances: float64 paths agree with the direct float64 solve to 1e-9 relative (rounding of
different summation orders); the mixed-precision Gram is within 1e-5 of float64 (float32
products of one chunk)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctrak_fast.engine import gram as gram_mod
from ctrak_fast.engine import scoring
from ctrak_fast.engine.gram import gram, kernel, load_features, mirror_lower, phi_matmul
from ctrak_fast.engine.scoring import (
    DualPreconditioner,
    Preconditioner,
    choose_path,
    damping,
    precondition,
)
from ctrak_fast.engine.store import FeatureStore
from ctrak_fast.engine.sweep import solve_queries
from ctrak_fast.results import Query

ROOT = Path(__file__).resolve().parents[2]


def _direct(phi: torch.Tensor, q: torch.Tensor, lambda_r: float) -> torch.Tensor:
    p = phi.double()
    g = p.T @ p
    lam = damping(g, lambda_r)
    return torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=torch.float64), q.double().T).T


def _spectrum_features(n: int, k: int, seed: int) -> torch.Tensor:
    """Features with a decaying spectrum (as gradients have), not white noise."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -3, k)
    return torch.randn(n, k, generator=gen) * scale


@pytest.mark.parametrize("n,k", [(37, 11), (5, 23), (64, 64)])
def test_blocked_lower_triangle_gram_equals_the_full_product(monkeypatch, n, k):
    monkeypatch.setattr(gram_mod, "BLOCK_COLS", 4)  # many column blocks, ragged last one
    monkeypatch.setattr(gram_mod, "CHUNK_BYTES", 8 * k * 3)  # 3 rows per float64 chunk
    phi = torch.randn(n, k)
    ref = phi.double().T @ phi.double()
    for blocks in (phi, [phi[:7], phi[7:]], (phi, torch.arange(n))):
        g = gram(blocks)
        assert torch.equal(g, g.T)  # mirrored exactly
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)
    mixed = gram(phi, precision="mixed")
    assert torch.equal(mixed, mixed.T)
    torch.testing.assert_close(mixed, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_gram_refuses_bad_blocks_and_precisions():
    with pytest.raises(ValueError, match="precision must be one of"):
        gram(torch.randn(3, 2), precision="half")
    with pytest.raises(ValueError, match=r"feature blocks must be \[n, 2\]"):
        gram([torch.randn(3, 2), torch.randn(3, 4)])
    with pytest.raises(ValueError, match="no features"):
        gram([])


def test_mirror_kernel_and_chunked_products(monkeypatch):
    a = torch.randn(9, 9)
    m = mirror_lower(a.clone(), block=2)
    assert torch.equal(m, m.T) and torch.equal(m.tril(), a.tril())
    monkeypatch.setattr(gram_mod, "CHUNK_BYTES", 8 * 5 * 2)  # two columns at a time
    phi, x, y = torch.randn(5, 13), torch.randn(13, 3), torch.randn(5, 3)
    torch.testing.assert_close(kernel(phi), phi.double() @ phi.double().T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(phi_matmul(phi, x), phi.double() @ x.double())
    torch.testing.assert_close(phi_matmul(phi, y, transpose=True), phi.double().T @ y.double())
    assert load_features([phi[:2], phi[2:]]).tolist() == phi.tolist()


@pytest.mark.parametrize("lambda_r", [1e-3, 1.0, 100.0])
def test_in_place_primal_and_dual_equal_the_direct_solve(lambda_r):
    for n, k in [(60, 24), (12, 48)]:  # N > k and N < k
        phi = _spectrum_features(n, k, seed=n)
        q = torch.randn(5, k)
        ref = _direct(phi, q, lambda_r)
        if n < k and lambda_r < 1e-2:
            continue  # G singular and lam tiny: ill-conditioned either way
        g = gram(phi)
        pre = Preconditioner(g, lambda_r, inplace=True)
        assert pre.gram is None and pre.factor.data_ptr() == g.data_ptr()  # G's own storage
        u = pre.solve(q, dtype=torch.float64)
        torch.testing.assert_close(u, ref, rtol=1e-8, atol=1e-9 * float(ref.abs().max()))
        dual = DualPreconditioner(phi, lambda_r).solve(q, dtype=torch.float64)
        torch.testing.assert_close(dual, ref, rtol=1e-7, atol=1e-8 * float(ref.abs().max()))
        # Scores through both paths rank the training rows identically.
        s_primal, s_dual = phi.double() @ u.T, phi.double() @ dual.T
        assert torch.equal(s_primal.argsort(0), s_dual.argsort(0))


def test_blocked_solve_and_lambda_changes(monkeypatch):
    monkeypatch.setattr(scoring, "SOLVE_BLOCK", 2)  # 7 queries in 4 blocks
    phi, q = torch.randn(40, 16), torch.randn(7, 16)
    pre = Preconditioner(gram(phi), 1.0)
    torch.testing.assert_close(pre.solve(q, torch.float64), _direct(phi, q, 1.0))
    assert pre.solve(q[0]).shape == (16,)  # one bare row
    other = pre.with_lambda(10.0)
    assert other.gram.data_ptr() == pre.gram.data_ptr()
    torch.testing.assert_close(other.solve(q, torch.float64), _direct(phi, q, 10.0))
    small = torch.randn(8, 30)
    dual = DualPreconditioner(small, 1.0).with_lambda(0.5)
    ones = torch.ones(2, 30)
    torch.testing.assert_close(dual.solve(ones, torch.float64), _direct(small, ones, 0.5))
    with pytest.raises(ValueError, match="factored its Gram in place"):
        Preconditioner(gram(phi), 1.0, inplace=True).with_lambda(2.0)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="inplace=True needs a contiguous float64"):
        Preconditioner(torch.eye(3), 1.0, inplace=True)
    with pytest.raises(ValueError, match="dual path needs lambda_r > 0"):
        DualPreconditioner(torch.randn(3, 8), 0.0)
    with pytest.raises(ValueError, match="K \\+ lam\\*I is not positive definite"):
        DualPreconditioner(torch.zeros(3, 8), 1.0)
    with pytest.raises(ValueError, match="lambda_r must be finite"):
        Preconditioner(torch.eye(3, dtype=torch.float64), float("nan"))
    with pytest.raises(ValueError, match="scoring path must be one of"):
        choose_path(3, 4, "cholesky")


def test_precondition_picks_the_cheaper_path_and_agrees(tmp_path):
    phi_small, phi_tall = torch.randn(10, 40), torch.randn(50, 8)
    assert precondition(phi_small).path == "dual"
    assert precondition(phi_tall).path == "primal"
    assert precondition(phi_small, path="primal").path == "primal"
    q = torch.randn(3, 40)
    a = precondition(phi_small, 2.0, path="primal").solve(q, torch.float64)
    b = precondition(phi_small, 2.0, path="dual").solve(q, torch.float64)
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    # A store: N and k come from the manifest; blocks of unknown N take the primal path.
    st = FeatureStore.create(tmp_path / "s", k=40, meta={"t": 1})
    with st.writer() as w:
        w.append(phi_small, torch.arange(10))
    st = FeatureStore.open(tmp_path / "s")
    assert precondition(st).path == "dual"
    stored = precondition(st.read_all()[0], 2.0, path="primal").solve(q, torch.float64)
    torch.testing.assert_close(precondition(st, 2.0).solve(q, torch.float64), stored)
    assert precondition(iter([phi_small]), 2.0).path == "primal"


@pytest.mark.parametrize("path", ["primal", "dual"])
def test_solve_queries_sweeps_equal_single_lambdas(path):
    phi, q = _spectrum_features(30, 20, seed=3), torch.randn(4, 20)
    lambdas = [0.1, 1.0, 10.0]
    u = solve_queries(phi, q, lambdas, path=path)
    assert u.shape == (3, 4, 20) and u.dtype == torch.float32
    for i, r in enumerate(lambdas):
        one = solve_queries(phi, q, [r], path=path)[0]
        torch.testing.assert_close(u[i], one, rtol=1e-4, atol=1e-5 * float(one.abs().max()))
        ref = _direct(phi, q, r).float()
        torch.testing.assert_close(u[i], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    g = gram(phi)
    torch.testing.assert_close(
        solve_queries(None, q, lambdas, gram_matrix=g.clone()),
        u,
        rtol=1e-4,
        atol=1e-5 * float(u.abs().max()),
    )


def test_primal_sweeps_too_large_for_eigh_take_one_factor_and_krylov_solves(monkeypatch):
    import ctrak_fast.engine.sweep as sweep

    phi, q = _spectrum_features(30, 20, seed=4), torch.randn(3, 20)
    lambdas = [0.1, 1.0, 10.0]
    by_eigh = solve_queries(phi, q, lambdas, path="primal")
    monkeypatch.setattr(sweep, "eigh_fits", lambda k, memory_bytes=None: False)
    by_krylov = sweep.solve_queries(phi, q, lambdas, path="primal")
    torch.testing.assert_close(
        by_krylov, by_eigh, rtol=1e-4, atol=1e-5 * float(by_eigh.abs().max())
    )


@pytest.mark.cuda
def test_gram_and_factor_on_cuda_equal_cpu():
    phi, q = torch.randn(300, 96), torch.randn(4, 96)
    g = gram(phi, device="cuda")
    assert g.is_cuda
    torch.testing.assert_close(g.cpu(), gram(phi), rtol=1e-10, atol=1e-10)
    u = Preconditioner(g, 1.0, inplace=True).solve(q.cuda(), torch.float64)
    torch.testing.assert_close(u.cpu(), _direct(phi, q, 1.0), rtol=1e-8, atol=1e-10)
    mixed = gram(phi, precision="mixed", device="cuda")  # float32 products: no TF32 allowed
    torch.testing.assert_close(mixed.cpu(), gram(phi), rtol=1e-5, atol=1e-4)


def test_cli_attribute_paths_and_sweep_agree(tmp_path):
    k, n = 48, 20
    phi = _spectrum_features(n, k, seed=7)
    st = FeatureStore.create(tmp_path / "s", k=k, meta={"t": 1})
    with st.writer() as w:
        w.append(phi, torch.arange(100, 100 + n))
    q = torch.randn(2, k)
    Query(q, ("a", "b")).save(tmp_path / "q.safetensors")

    def run(*extra):
        out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
        cmd = [sys.executable, "-m", "ctrak_fast.cli", "attribute", "--store", str(tmp_path / "s")]
        cmd += ["--query", str(tmp_path / "q.safetensors"), "--k", "5", "--out", str(out), *extra]
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
        return json.loads(out.read_text())

    dual, primal = run("--scoring-path", "dual"), run("--scoring-path", "primal")
    assert dual["scoring_path"] == "dual" and primal["scoring_path"] == "primal"
    assert [t["ids"] for t in dual["top"]] == [t["ids"] for t in primal["top"]]
    sweep = run("--lambda-r", "0.5,2")
    assert sweep["lambda_r"] == [0.5, 2.0] and len(sweep["top"]) == 4
    assert sweep["top"][0]["label"] == "a @ lambda_r=0.5"
    single = run("--lambda-r", "2", "--gram-precision", "mixed")
    assert [t["ids"] for t in single["top"]] == [t["ids"] for t in sweep["top"][2:]]
    ref = phi.double() @ _direct(phi, q, 2.0).T
    assert single["top"][0]["ids"] == (ref[:, 0].argsort(descending=True)[:5] + 100).tolist()
