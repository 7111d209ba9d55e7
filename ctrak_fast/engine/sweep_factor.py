"""A primal lambda sweep at the cost of ~one Cholesky: one factor, then shifted Krylov solves.

u(lam) = (G + lam I)^-1 q^T for every lam of a grid. One Cholesky L L^T = G + lam0 I (lam0 inside
the grid), then two Krylov sequences, each serving EVERY lambda from one basis (Krylov spaces are
shift-invariant), run in lockstep over the m query columns:

- preconditioned: with M = L^-1 L^-T, L^-1 (G + lam I) L^-T = I + (lam - lam0) M, a shift family
  of M; eigenvalues (e + lam) / (e + lam0) for G's eigenvalues e, so it is fast for lam near lam0
  and for lam below G's spectrum. One step: two triangular solves (trsm).
- plain, on A0 = G + lam0 I = L L^T: G + lam I = A0 + (lam - lam0) I, for lam >= lam0; fast once
  lam passes G's spectrum (cond(G + lam I) -> 1), where the preconditioned one is slow. One
  step: two triangular products (trmm).

Each is D-Lanczos (Saad, Iterative Methods, alg. 6.18) with one tridiagonal recurrence per shift:
mathematically CG on that shift's system. A lambda is done when its relative residual, in the
norm its sequence minimises, is <= tol in either sequence. Afterwards every solution's residual is
recomputed from the factor (not from the recurrence); a lambda that did not converge in max_iter
steps or fails that check is solved by its own Cholesky (the buffer's untouched triangle still
holds G: gram_factor.py), so a failure costs time, never a wrong answer.

Cost: one step reads L's triangle four times (k^2 * 16 bytes; m = 16 columns make it memory
bound), against ~k^3 / 3 flops for the factorisation; benchmarks/bench_lambda_sweep.py measures
the ratio and the steps (docs/ENGINE.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ctrak_fast.engine.gram_factor import SharedGramFactor

TOL = 1e-6  # relative residual per lambda (tests/engine/test_sweep_factor.py: top-k ids equal)
MAX_ITER = 100  # steps before the unconverged lambdas fall back to their own Cholesky
CHECK_SLACK = 10.0  # the recomputed residual may exceed tol by this (recurrence drift)


@dataclass
class SweepResult:
    """u [n_lambda, m, k] float64 and how it was obtained.

    iterations: Krylov steps taken (both sequences in lockstep). lambda_r0: the factored
    damping. by_krylov / by_cholesky: the lambda_r values solved each way (by_cholesky: those
    that did not converge or failed the residual check, plus lambda_r0's if the check failed).
    """

    u: torch.Tensor
    iterations: int
    lambda_r0: float
    by_krylov: list[float] = field(default_factory=list)
    by_cholesky: list[float] = field(default_factory=list)


class ShiftedLanczos:
    """D-Lanczos for the family (c0_s I + c1_s A) y_s = c, A SPD, all shifts from one basis.

    Args:
        apply: v [k, m] -> (A v, the image of v in the solution space); the solutions x_s are
            accumulated from the images (a linear map), so a split preconditioner can hand back
            L^-T v and the caller never maps y back.
        c: [k, m] right-hand sides (each column its own Lanczos run, vectorised).
        c0, c1: [S] shift coefficients (each c0_s I + c1_s A must be positive definite).

    Attributes:
        x: [S, k, m] solutions so far. residual: [S, m] |r| / |c| from the recurrence.
        live: [S, m] still iterating (residual > tol and no breakdown). failed: [S, m] a
        non-positive pivot (not SPD in floating point): left to the caller's fallback.
    """

    def __init__(
        self,
        apply: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        c: torch.Tensor,
        c0: torch.Tensor,
        c1: torch.Tensor,
        tol: float,
    ) -> None:
        self.apply, self.tol, self.c0, self.c1 = apply, tol, c0[:, None], c1[:, None]
        s, (k, m) = len(c0), c.shape
        self.norm_c = c.norm(dim=0)  # [m]
        safe = torch.where(self.norm_c > 0, self.norm_c, 1.0)
        self.v, self.v_old = c / safe, torch.zeros_like(c)
        self.beta = torch.zeros(m, dtype=c.dtype)
        self.x = torch.zeros(s, k, m, dtype=c.dtype)
        self.p = torch.zeros(s, k, m, dtype=c.dtype)
        self.eta = torch.ones(s, m, dtype=c.dtype)
        self.zeta = self.norm_c.expand(s, m).clone()
        self.residual = torch.where(self.norm_c > 0, 1.0, 0.0).expand(s, m).clone()
        self.live = self.residual > tol
        self.failed = torch.zeros(s, m, dtype=torch.bool)
        self.steps = 0

    def step(self) -> None:
        av, image = self.apply(self.v)
        w = av - self.beta * self.v_old
        alpha = (w * self.v).sum(0)
        w -= alpha * self.v
        beta_next = w.norm(dim=0)
        a_s, b_s = self.c0 + self.c1 * alpha, self.c1 * self.beta  # this shift's tridiagonal
        lam = b_s / self.eta if self.steps else torch.zeros_like(a_s)
        eta = a_s - lam * b_s
        bad = self.live & ~(eta > 0)  # SPD in exact arithmetic: a pivot <= 0 is a breakdown
        self.failed |= bad
        live = self.live & ~bad
        zeta = -lam * self.zeta if self.steps else self.zeta
        safe_eta = torch.where(live, eta, 1.0)
        p = (image[None] - b_s[:, None, :] * self.p) / safe_eta[:, None, :]
        self.p = torch.where(live[:, None, :], p, self.p)
        self.x += torch.where(live, zeta, 0.0)[:, None, :] * self.p
        res = (self.c1 * beta_next * zeta / safe_eta).abs() / torch.where(
            self.norm_c > 0, self.norm_c, 1.0
        )
        self.residual = torch.where(live, res, self.residual)
        self.eta, self.zeta = torch.where(live, eta, self.eta), torch.where(live, zeta, self.zeta)
        self.live = live & (self.residual > self.tol)
        # An invariant subspace (beta = 0) leaves residual 0: every shift of that column is done.
        safe_beta = torch.where(beta_next > 0, beta_next, 1.0)
        self.v_old, self.v, self.beta = self.v, w / safe_beta, beta_next
        self.steps += 1


def default_lambda_r0(lambda_rs: Sequence[float]) -> float:
    """The factored damping: the grid value nearest 3/8 of the way up its log range (the plain
    sequence serves the top of the grid, so the factor sits below the geometric middle).

    Examples:
        >>> default_lambda_r0([1e-4, 1e-3, 1e-2, 1e-1, 1, 10, 1e2, 1e3, 1e4])
        0.1
    """
    pos = sorted(r for r in lambda_rs if r > 0)
    if not pos:
        raise ValueError("a sweep needs a lambda_r > 0 to factor")
    lo, hi = math.log(pos[0]), math.log(pos[-1])
    target = lo + 0.375 * (hi - lo)
    return min(pos, key=lambda r: abs(math.log(r) - target))


def sweep_solve(
    gram: torch.Tensor,
    q: torch.Tensor,
    lambda_rs: Sequence[float],
    *,
    lambda_r0: float | None = None,
    tol: float = TOL,
    max_iter: int = MAX_ITER,
    inplace: bool = False,
) -> SweepResult:
    """(G + lam I)^-1 q^T for every lambda_r, from one Cholesky (module docstring).

    Args:
        gram: [k, k] G = Phi^T Phi. inplace: use gram's storage (a contiguous CPU float64
            tensor; overwritten: it ends holding L and G's upper triangle).
        q: [m, k] queries (float64 is used). lambda_rs: relative dampings,
            lam = lambda_r * 0.1 * trace(G) / k.
        lambda_r0: the factored one (default_lambda_r0 by default). tol, max_iter: as above.

    Returns:
        SweepResult with u [n_lambda, m, k] float64, in lambda_rs's order.

    Examples:
        >>> phi, q = torch.randn(200, 24, dtype=torch.float64), torch.randn(3, 24)
        >>> g = phi.T @ phi
        >>> res = sweep_solve(g, q, [1e-3, 1.0, 1e3])
        >>> lam = 1e-3 * 0.1 * float(g.trace()) / 24
        >>> ref = torch.linalg.solve(g + lam * torch.eye(24, dtype=torch.float64), q.double().T)
        >>> torch.allclose(res.u[0], ref.T, rtol=1e-4, atol=1e-8), res.by_cholesky
        (True, [])
    """
    lambda_rs = [float(r) for r in lambda_rs]
    q64 = q.detach().to(device="cpu", dtype=torch.float64).reshape(-1, gram.shape[-1])
    r0 = default_lambda_r0(lambda_rs) if lambda_r0 is None else float(lambda_r0)
    k = gram.shape[-1]
    scale = 0.1 * float(gram.diagonal().sum()) / k
    factor = SharedGramFactor(gram, r0 * scale, inplace=inplace)
    lams = torch.tensor([r * scale for r in lambda_rs], dtype=torch.float64)
    u = torch.full((len(lambda_rs), k, q64.shape[0]), float("nan"), dtype=torch.float64)
    done = torch.zeros(len(lambda_rs), dtype=torch.bool)
    steps = 0
    if factor.factored:
        steps = _krylov(factor, q64.T.contiguous(), lams, tol, max_iter, u, done)
    result = SweepResult(u.transpose(1, 2), steps, r0)
    for i, r in enumerate(lambda_rs):
        (result.by_krylov if done[i] else result.by_cholesky).append(r)
        if not done[i]:
            if not factor.refactor(float(lams[i])):
                raise ValueError(
                    f"G + lam*I is not positive definite for lambda_r={r} (k={k}, "
                    f"trace(G)={factor.trace:.3g}): raise lambda_r"
                )
            u[i] = factor.solve_upper(factor.solve_lower(q64.T.contiguous()))
    return result


def _krylov(
    factor: SharedGramFactor,
    b: torch.Tensor,
    lams: torch.Tensor,
    tol: float,
    max_iter: int,
    u: torch.Tensor,
    done: torch.Tensor,
) -> int:
    """Both sequences in lockstep; fills u[i] and done[i] for the lambdas they solve and
    verify. Returns the steps taken."""
    delta = lams - factor.lam
    ones = torch.ones_like(delta)

    def preconditioned(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = factor.solve_upper(v)  # L^-T v: v's image in x-space
        return factor.solve_lower(image), image

    def plain(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return factor.mul_lower(factor.mul_upper(v)), v

    c = factor.solve_lower(b)
    pre = ShiftedLanczos(preconditioned, c, ones, delta, tol)
    above = (delta >= 0).nonzero().flatten()  # the plain family is positive definite only there
    top = ShiftedLanczos(plain, b, delta[above], ones[above], tol)
    steps = 0
    while steps < max_iter:
        conv_pre = (pre.residual <= tol).all(1) & ~pre.failed.any(1)
        conv_top = torch.zeros_like(conv_pre)
        conv_top[above] = (top.residual <= tol).all(1) & ~top.failed.any(1)
        solved = conv_pre | conv_top
        pre.live &= ~solved[:, None]  # a lambda solved by either sequence stops in both
        top.live &= ~solved[above][:, None]
        if not bool(pre.live.any() or top.live.any()):
            break
        for seq in (pre, top):
            if bool(seq.live.any()):
                seq.step()
        steps += 1
    # Each candidate's residual recomputed from the factor (not the recurrence), in the norm of
    # the sequence that solved it, all in one trmm pair and one trsm.
    picks = [(i, pre.x[i], True) for i in range(len(lams)) if bool(conv_pre[i])]
    picks += [
        (int(i), top.x[j], False)
        for j, i in enumerate(above.tolist())
        if bool(conv_top[i]) and not bool(conv_pre[i])
    ]
    if not picks:
        return steps
    m = b.shape[1]
    x = torch.cat([p[1] for p in picks], dim=1)  # [k, n_pick * m]
    shift = torch.cat([delta[i].expand(m) for i, _, _ in picks])
    r = b.repeat(1, len(picks)) - factor.mul_lower(factor.mul_upper(x)) - shift * x
    in_pre = torch.tensor([p[2] for p in picks]).repeat_interleave(m)
    if bool(in_pre.any()):
        r[:, in_pre] = factor.solve_lower(r[:, in_pre].contiguous())
    ref = torch.where(in_pre, c.norm(dim=0).repeat(len(picks)), b.norm(dim=0).repeat(len(picks)))
    rel = (r.norm(dim=0) / torch.where(ref > 0, ref, 1.0)).reshape(len(picks), m)
    for (i, xi, _), rel_i in zip(picks, rel, strict=True):
        if bool((rel_i <= CHECK_SLACK * tol).all()) and bool(torch.isfinite(xi).all()):
            u[i], done[i] = xi, True
    return steps


__all__ = ["MAX_ITER", "TOL", "ShiftedLanczos", "SweepResult", "default_lambda_r0", "sweep_solve"]
