"""Triton kernels against their torch references (ctrak_fast.kernels).

Without CUDA the kernels run on CPU tensors under the Triton interpreter, which must be selected
before triton is first imported in the process. This module sets TRITON_INTERPRET=1 at import; if
another module imported triton in compiled mode earlier in the same pytest run (``import diffusers``
does), the in-process cases skip and ``test_interpreter_lane_in_subprocess`` runs this file again in
a fresh process. Interpreter cases are tiny (the interpreter runs each program in numpy).

Tolerance policy: the kernels' products are exact (signs are +-1; float32 inputs are split into
three bfloat16 pieces), so their error is float32 accumulation, like the float32 reference's. A
kernel result must be within 2x the reference's own error (both measured against a float64 oracle)
plus 4e-6 of the row's magnitude sum_i |x_i| |P_ij|, which absorbs differences in summation order
(and tf32x3 for float32 linear-layer inputs on GPU).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything below imports triton

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from ctrak_fast.engine.projection import FactorizedSpec  # noqa: E402
from ctrak_fast.engine.rademacher import rademacher_project, rademacher_project_blocks  # noqa: E402
from ctrak_fast.kernels import hashing  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


K = importlib.import_module("ctrak_fast.kernels")
# The kernel modules of two ops (for their launchers' n_splits).
rp = importlib.import_module("ctrak_fast.kernels.rademacher_project.triton")
lgp = importlib.import_module("ctrak_fast.kernels.linear_grad_project.triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
RUNNABLE = K.HAS_TRITON and (CUDA or K.INTERPRET)

# Set for the subprocess lane, which must not recurse: there the kernels have to be runnable.
_LANE_ENV = "CTRAK_KERNEL_TEST_LANE"
if os.environ.get(_LANE_ENV) and not RUNNABLE:
    raise RuntimeError("kernel test lane: triton is still not in interpreter mode")

pytestmark = pytest.mark.triton
in_process = pytest.mark.skipif(
    not RUNNABLE,
    reason="triton was imported in compiled mode before this module; "
    "test_interpreter_lane_in_subprocess covers these cases",
)


# ----------------------------------------------------------------------------- helpers


def dense_P(seed: int, row0: int, n: int, k: int, device=DEVICE) -> torch.Tensor:
    """[n, k] float64 projection matrix from hashing.sign_bits, built on ``device`` in chunks."""
    out = torch.empty(n, k, dtype=torch.float64, device=device)
    cols = torch.arange(k, device=device)
    step = max(1, (1 << 22) // k)
    for s in range(0, n, step):
        rows = torch.arange(row0 + s, row0 + min(n, s + step), device=device)
        neg = hashing.sign_bits(seed, rows, cols)
        out[s : s + rows.numel()] = 1.0 - 2.0 * neg.double()
    return out / k**0.5


def assert_fp32_close(y, ref, oracle, mag):
    """y, ref: [B, k] float32 (kernel, reference); oracle: float64; mag: [B] sum_i |x_i||P_ij|."""
    assert y.dtype == torch.float32 and y.shape == oracle.shape
    assert torch.isfinite(y).all()
    y, ref, oracle = y.double(), ref.double(), oracle.double()
    ref_err = (ref - oracle).abs().max().item()
    bound = 2 * ref_err + 4e-6 * mag.double()[:, None].to(y.device)
    err = (y - oracle).abs()
    assert (err <= bound).all(), f"max err {err.max().item():.3g}, reference err {ref_err:.3g}"


def rand(*shape, dtype=torch.float32, device=DEVICE):
    # Magnitudes spread over ~5 decades (so that splitting float32 into bfloat16 pieces matters),
    # bounded so that float16 cannot overflow.
    log_mag = (2 * torch.randn(*shape, device=device)).clamp(-6, 6)
    x = torch.randn(*shape, device=device) * torch.exp(log_mag)
    return x.to(dtype)


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- hash


@in_process
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 + 5, -7], ids=lambda s: f"seed{s}")
def test_sign_matrix_bit_exact(seed):
    rows = torch.tensor(
        [0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**62 + 7],
        device=DEVICE,
    )
    cols = torch.cat([torch.arange(70), torch.tensor([2**20 + 3, 2**31 - 1])]).to(DEVICE)
    got = K.sign_matrix(seed, rows, cols)
    want = hashing.sign_bits(seed, rows.cpu(), cols.cpu())
    assert torch.equal(got.cpu(), want)


@in_process
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("row0", [0, 2**32 - 23, 2**45 + 1], ids=lambda r: f"row{r}")
def test_projection_signs_bit_exact(dtype, row0):
    # Projecting identity rows reads back the kernel's matrix: every entry is exactly +-1/sqrt(k).
    p, k = 45, 37
    eye = torch.eye(p, dtype=dtype, device=DEVICE)
    P = rademacher_project(eye, seed=9, k=k, row_offset=row0, force="triton") * k**0.5
    assert torch.equal(P.abs(), torch.ones_like(P))
    want = hashing.sign_bits(9, torch.arange(row0, row0 + p), torch.arange(k))
    assert torch.equal((P < 0).cpu(), want)


def test_premixed_hash_identities():
    # hash.py's shortcuts: mix32's first step distributes over XOR and its last keeps bit 31.
    g = torch.Generator().manual_seed(1)
    r, c = (torch.randint(0, 2**32, (1000,), generator=g) for _ in range(2))
    h = r ^ c
    assert torch.equal(h ^ (h >> 16), (r ^ (r >> 16)) ^ (c ^ (c >> 16)))
    assert torch.equal((h ^ (h >> 16)) >> 31, h >> 31)


# ----------------------------------------------------------------------------- rademacher_project

RP_CASES = [
    # B, p, k, row_offset, dtype, n_splits
    pytest.param(1, 1, 1, 0, "f32", None, id="B1-p1-k1"),
    pytest.param(1, 200, 1, 7, "f32", None, id="k1"),
    pytest.param(3, 200, 37, 2**32 - 50, "f32", None, id="odd-cross2^32"),
    pytest.param(5, 300, 130, 7, "f16", 3, id="f16-split3"),
    pytest.param(17, 100, 20, 2**40, "bf16", 2, id="bf16-B17-split2"),
    pytest.param(2, 129, 16, 0, "f32", 2, id="p129-split2"),
    pytest.param(70, 33, 5, 3, "f32", None, id="B70-two-btiles"),
]


@in_process
@pytest.mark.parametrize("B,p,k,row_offset,dtype,n_splits", RP_CASES)
def test_rademacher_project_matches_reference(B, p, k, row_offset, dtype, n_splits):
    x = rand(B, p, dtype=DTYPES[dtype])
    out = torch.full((B, k), float("nan"), device=DEVICE)  # every element must be written
    y = rp.rademacher_project_triton(x, 11, k, row_offset, out, n_splits=n_splits)
    ref = K.rademacher_project_reference(x, 11, k, row_offset)
    P = dense_P(11, row_offset, p, k)
    assert_fp32_close(y, ref, x.double() @ P, x.double().abs().sum(1) / k**0.5)


@in_process
def test_rademacher_project_strided_input_and_accumulate():
    x = rand(40, 6)[::2].t()  # [6, 20], non-contiguous along p
    base = rand(6, 24)
    out = base.clone()
    y = rademacher_project(x, 3, 24, 5, out, accumulate=True, force="triton")
    assert y is out
    ref = base + K.rademacher_project_reference(x, 3, 24, 5)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


@in_process
def test_rademacher_project_blocks_equals_zero_filled_vector():
    x = rand(3, 50)
    blocks = [(2**32 + 40, x[:, 40:]), (2**32, x[:, :13]), (2**32 + 20, x[:, 20:31])]
    y = rademacher_project_blocks(blocks, seed=4, k=19, force="triton")
    full = torch.zeros_like(x)
    for off, b in blocks:
        full[:, off - 2**32 : off - 2**32 + b.shape[1]] = b
    ref = K.rademacher_project_reference(full, 4, 19, 2**32)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


@in_process
def test_rademacher_project_empty_and_errors():
    assert rademacher_project(rand(0, 5), 0, 8, force="triton").shape == (0, 8)
    empty_p = rademacher_project(rand(2, 0), 0, 8, force="triton")
    assert torch.equal(empty_p.cpu(), torch.zeros(2, 8))
    with pytest.raises(TypeError):
        rademacher_project(torch.ones(2, 3, dtype=torch.int32), 0, 4)
    with pytest.raises(ValueError):
        rademacher_project(rand(2, 3), 0, 0)
    with pytest.raises(ValueError):
        rademacher_project(rand(2, 3), 0, 4, row_offset=-1)
    with pytest.raises(ValueError):
        rademacher_project(rand(2, 3), 0, 4, out=torch.empty(2, 5))
    with pytest.raises(ValueError):
        rademacher_project(rand(2, 3), 0, 4, force="gpu")


def test_rademacher_project_cpu_dispatches_to_the_cpu_kernel_or_reference():
    from ctrak_fast.engine.native import native_available

    x = torch.randn(2, 30)
    ref = K.rademacher_project_reference(x, 1, 8)
    if not native_available():
        assert torch.equal(rademacher_project(x, 1, 8), ref)
        with pytest.raises(RuntimeError, match="ctrak_fast._C"):
            rademacher_project(x, 1, 8, force="cpu")
        return
    got = rademacher_project(x, 1, 8)
    assert torch.equal(got, rademacher_project(x, 1, 8, force="cpu"))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # strided input, a non-contiguous out, accumulate, float16 input, offsets past 2**32
    xs = torch.randn(50, 3).T.half()
    out = torch.ones(8, 3).T
    rademacher_project(xs, 5, 8, 2**32 + 1, out, accumulate=True, force="cpu")
    want = 1 + K.rademacher_project_reference(xs.float(), 5, 8, 2**32 + 1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- linear_grad_project

LG_CASES = [
    # B, T, in, out, k, row_offset, dtype, n_splits
    pytest.param(1, 1, 1, 1, 1, 0, "f32", None, id="all-ones"),
    pytest.param(3, 5, 20, 17, 37, 2**32 - 100, "f32", None, id="odd-cross2^32"),
    pytest.param(2, 33, 18, 9, 70, 5, "bf16", 2, id="bf16-T33-split2"),
    pytest.param(17, 3, 7, 5, 16, 2**40, "f16", None, id="f16-B17"),
    pytest.param(2, 4, 35, 33, 3, 0, "f32", 4, id="3x3tiles-split4"),
]


def _lg_oracle(A, G, seed, k, row_offset, bias_offset):
    A, G = A.double(), G.double()
    B, _, d_in = A.shape
    d_out = G.shape[2]
    W = torch.einsum("bto,bti->boi", G, A).reshape(B, -1)
    y = W @ dense_P(seed, row_offset, d_in * d_out, k, A.device)
    mag = torch.einsum("bto,bti->b", G.abs(), A.abs())
    if bias_offset is not None:
        y += G.sum(1) @ dense_P(seed, bias_offset, d_out, k, A.device)
        mag += G.abs().sum((1, 2))
    return y, mag / k**0.5


@in_process
@pytest.mark.parametrize("B,T,d_in,d_out,k,row_offset,dtype,n_splits", LG_CASES)
def test_linear_grad_project_matches_reference(B, T, d_in, d_out, k, row_offset, dtype, n_splits):
    A = rand(B, T, d_in, dtype=DTYPES[dtype])
    G = rand(B, T, d_out, dtype=DTYPES[dtype])
    y = lgp.linear_grad_project_triton(A, G, 5, k, row_offset, n_splits=n_splits)
    ref = K.linear_grad_project_reference(A, G, 5, k, row_offset)
    assert_fp32_close(y, ref, *_lg_oracle(A, G, 5, k, row_offset, None))


@in_process
def test_linear_grad_project_bias_scale_out():
    B, T, d_in, d_out, k, off = 3, 6, 11, 9, 21, 2**33 + 1
    A = rand(B, T, d_in).transpose(0, 1).contiguous().transpose(0, 1)  # strided batch dim
    G = rand(B, T, d_out, dtype=torch.bfloat16)  # mixed dtypes: computed in float32
    scale = torch.rand(B, device=DEVICE) + 0.5
    kw = dict(bias_offset=off + d_in * d_out, scale=scale)
    out = torch.full((B, k), float("nan"), device=DEVICE)
    y = K.linear_grad_project(A, G, 2, k, off, out=out, force="triton", **kw)
    assert y is out
    ref = K.linear_grad_project_reference(A, G, 2, k, off, **kw)
    oracle, mag = _lg_oracle(A, G, 2, k, off, kw["bias_offset"])
    assert_fp32_close(y, ref, oracle * scale.double()[:, None], mag * scale)
    y2 = K.linear_grad_project(
        A, G, 2, k, off, out=y.clone(), accumulate=True, force="triton", **kw
    )
    torch.testing.assert_close(y2, 2 * y, rtol=1e-6, atol=0)


@pytest.mark.parametrize("T,d_in,d_out", [(2, 30, 40), (50, 3, 4)], ids=["ghost", "materialise"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_grad_sq_norm(T, d_in, d_out, bias):
    A, G = torch.randn(4, T, d_in), torch.randn(4, T, d_out, dtype=torch.float16)
    W = torch.einsum("bto,bti->boi", G.double(), A.double())
    want = W.square().sum((1, 2)) + (G.double().sum(1).square().sum(1) if bias else 0)
    got = K.linear_grad_sq_norm(A, G, bias=bias)
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_linear_grad_project_errors():
    with pytest.raises(ValueError):
        K.linear_grad_project(torch.randn(2, 3, 4), torch.randn(2, 4, 5), 0, 8)
    with pytest.raises(TypeError):
        K.linear_grad_project(torch.randn(2, 3, 4).double(), torch.randn(2, 3, 5), 0, 8)
    with pytest.raises(ValueError):
        K.linear_grad_project(torch.randn(2, 3, 4), torch.randn(2, 3, 5), 0, 8, bias_offset=-1)


# ----------------------------------------------------------------------------- factorized


def test_factorized_spec_roundtrip_and_seeds():
    spec = FactorizedSpec(k_in=16, k_out=8, seed=3)
    assert FactorizedSpec.from_dict(spec.to_dict()) == spec and spec.k == 128
    assert spec.to_dict()["kind"] == "factorized"
    with pytest.raises(ValueError):
        FactorizedSpec.from_dict({**spec.to_dict(), "kind": "rademacher"})
    with pytest.raises(ValueError):
        FactorizedSpec(k_in=0, k_out=8)
    seeds = [s for layer in range(50) for s in K.factorized_seeds(3, layer)]
    assert len(set(seeds)) == 100


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_factorized_reference_is_kronecker_projection(bias):
    # vec((G P_out)^T (A P_in)) == vec(W) @ (P_out kron P_in), W = G^T A (with a 1-input for bias).
    spec = FactorizedSpec(k_in=6, k_out=5, seed=1)
    A, G = torch.randn(2, 7, 9), torch.randn(2, 7, 4)
    y = K.factorized_project_reference(A, G, spec.k_in, spec.k_out, spec.seed, layer=3, bias=bias)
    s_in, s_out = K.factorized_seeds(1, 3)
    P_in = hashing.rademacher_block(s_in, 0, 9 + bias, 6, torch.float64)
    P_out = hashing.rademacher_block(s_out, 0, 4, 5, torch.float64)
    A1 = torch.cat([A, torch.ones(2, 7, 1)], 2) if bias else A
    W = torch.einsum("bto,bti->boi", G.double(), A1.double()).flatten(1)
    torch.testing.assert_close(y.double(), W @ torch.kron(P_out, P_in), rtol=1e-5, atol=1e-5)


@in_process
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_factorized_project_matches_reference(bias, dtype):
    spec = FactorizedSpec(k_in=20, k_out=3, seed=2**33 + 1)
    A = rand(3, 5, 33, dtype=DTYPES[dtype])
    G = rand(3, 5, 7, dtype=DTYPES[dtype])
    y = K.factorized_project(
        A, G, spec.k_in, spec.k_out, spec.seed, layer=11, bias=bias, force="triton"
    )
    ref = K.factorized_project_reference(
        A, G, spec.k_in, spec.k_out, spec.seed, layer=11, bias=bias
    )
    assert y.shape == (3, 60) and y.dtype == torch.float32
    scale = ref.abs().max().item()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * scale)


# ----------------------------------------------------------------------------- process lane


@pytest.mark.skipif(RUNNABLE or not K.HAS_TRITON, reason="kernel cases ran in this process")
def test_interpreter_lane_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1", _LANE_ENV: "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


# ----------------------------------------------------------------------------- sm_90 compile

# Runs in a fresh process with the interpreter off: Triton lowers each kernel to PTX and cubin for
# Hopper (its bundled ptxas) without a GPU, catching what the interpreter cannot (minimum dot sizes,
# layouts, unsupported casts). Signatures follow the kernels' parameter lists.
_COMPILE_SM90 = """
import sys
sys.path.insert(0, sys.argv[1])
import importlib, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
K = importlib.import_module("ctrak_fast.kernels")
assert not K.INTERPRET
rp = importlib.import_module("ctrak_fast.kernels.rademacher_project.triton")
lg = importlib.import_module("ctrak_fast.kernels.linear_grad_project.triton")
hs = importlib.import_module("ctrak_fast.kernels.hashing.triton")
c = "constexpr"
def build(fn, sig, consts, num_warps):
    sig = {**sig, **{n: c for n in consts}}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert "cubin" in k.asm, fn
for dt in ("fp32", "bf16", "fp16"):
    for B in (16, 64):
        bb, bp, bk, nw = rp.block_sizes(B, 2048)
        sig = {"x_ptr": "*" + dt, "out_ptr": "*fp32", "skey": "i64", "row_offset": "i64",
               "scale": "fp32", "B": "i32", "P": "i32", "K": "i32", "rows_per_split": "i32",
               "stride_xb": "i32", "stride_os": "i32", "stride_ob": "i32"}
        consts = {"stride_xp": 1, "stride_ok": 1, "BLOCK_B": bb, "BLOCK_P": bp, "BLOCK_K": bk,
                  "ACCUMULATE": B == 64}
        build(rp.rademacher_project_kernel, sig, consts, nw)
for dt in ("fp32", "bf16"):
    sig = {"a_ptr": "*" + dt, "g_ptr": "*" + dt, "out_ptr": "*fp32", "skey": "i64",
           "row_offset": "i64", "scale": "fp32", "B": "i32", "T": "i32", "D_IN": "i32",
           "D_OUT": "i32", "K": "i32", "tiles_per_split": "i32", "stride_ab": "i32",
           "stride_at": "i32", "stride_gb": "i32", "stride_gt": "i32", "stride_os": "i32",
           "stride_ob": "i32"}
    consts = {"stride_ai": 1, "stride_go": 1, "stride_ok": 1, "BLOCK_B": 16, "BLOCK_T": 16,
              "BLOCK_O": 16, "BLOCK_I": 16, "BLOCK_K": 64}
    build(lg.linear_grad_project_kernel, sig, consts, 8)
sig = {"rows_ptr": "*i64", "cols_ptr": "*i64", "out_ptr": "*i8", "skey": "i64", "n_rows": "i32",
       "n_cols": "i32"}
build(hs.sign_matrix_kernel, sig, {"BLOCK_R": 32, "BLOCK_C": 32}, 4)
print("compiled")
"""


def _has_nvidia_backend() -> bool:
    return K.HAS_TRITON and importlib.util.find_spec("triton.backends.nvidia") is not None


@pytest.mark.skipif(CUDA or not _has_nvidia_backend(), reason="needs triton's NVIDIA backend")
@pytest.mark.skipif(bool(os.environ.get(_LANE_ENV)), reason="the parent process runs it")
def test_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-c", _COMPILE_SM90, str(ROOT)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]


# ----------------------------------------------------------------------------- CUDA, larger shapes

cuda = pytest.mark.cuda


@cuda
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cuda_rademacher_project_large(dtype):
    B, p, k, off = 16, 200_003, 2048, 2**32 - 100_000
    x = rand(B, p, dtype=dtype)
    y = rademacher_project(x, 7, k, off)
    P = dense_P(7, off, p, k)
    oracle = x.double() @ P
    ref = (x.float() @ P.float()).float()
    assert_fp32_close(y, ref, oracle, x.double().abs().sum(1) / k**0.5)
    assert torch.equal(y, rademacher_project(x, 7, k, off)), "not bitwise reproducible"


@cuda
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cuda_linear_grad_project_large(dtype):
    B, T, d_in, d_out, k, off = 24, 77, 333, 650, 1024, 2**33 + 3
    A = rand(B, T, d_in, dtype=dtype)
    G = rand(B, T, d_out, dtype=dtype)
    kw = dict(bias_offset=off + d_in * d_out)
    y = K.linear_grad_project(A, G, 1, k, off, **kw)
    oracle, mag = _lg_oracle(A, G, 1, k, off, kw["bias_offset"])
    ref = K.linear_grad_project(A, G, 1, k, off, force="reference", **kw)
    assert_fp32_close(y, ref, oracle, mag)
    assert torch.equal(y, K.linear_grad_project(A, G, 1, k, off, **kw)), "not reproducible"


@cuda
def test_cuda_factorized_and_blocks():
    spec = FactorizedSpec(k_in=64, k_out=32, seed=5)
    A, G = rand(8, 100, 700), rand(8, 100, 300)
    y = K.factorized_project(A, G, spec.k_in, spec.k_out, spec.seed, layer=2, bias=True)
    ref = K.factorized_project_reference(A, G, spec.k_in, spec.k_out, spec.seed, layer=2, bias=True)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    x = rand(4, 10_000)
    blocks = [(0, x[:, :3000]), (3000, x[:, 3000:])]
    torch.testing.assert_close(
        rademacher_project_blocks(blocks, 0, 512),
        rademacher_project(x, 0, 512),
        rtol=1e-5,
        atol=1e-5 * x.abs().sum(1).max().item() / 512**0.5,
    )
