"""The native engines behind topk(): the C++ CPU engine and the CUDA engine of ctrak_fast._C,
run shard by shard; results converted back to tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from ctrak_fast.engine import native
from ctrak_fast.engine.search_inputs import (
    TopK,
    check_k,
)

NATIVE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def run_cpu(shards, u: Tensor, k: int, tails, num_threads: int, bf16_search: bool = True) -> TopK:
    """bfloat16 shards (the first shard decides) take the exact bfloat16 search
    (``Bf16TopKState``: AVX512-BF16 scores, float32 re-scoring; the same ids and values) unless
    ``bf16_search`` is False; it runs the float32 engine itself where the CPU lacks AVX512-BF16."""
    C = native.load()
    q = u.detach().to("cpu", torch.float32).contiguous().numpy()
    state = None
    for feats, ids in shards:
        feats = feats.detach().cpu()
        if feats.dtype not in NATIVE_DTYPES:
            feats = feats.float()
        feats = feats.contiguous()
        if state is None:
            bf16 = bf16_search and feats.dtype == torch.bfloat16
            state = (C.Bf16TopKState if bf16 else C.TopKState)(q, k, tails, num_threads)
        # numpy has no bfloat16: hand over the raw bits, the engine decodes them.
        arr = feats.view(torch.int16).numpy() if feats.dtype == torch.bfloat16 else feats.numpy()
        state.add(arr, ids.detach().to("cpu", torch.int64).contiguous().numpy())
        del feats, ids, arr  # release a memory-mapped shard before the next one is mapped
    check_k(k, state.rows_seen if state is not None else 0)
    assert state is not None  # check_k refuses a source without rows
    return TopK.from_tails(as_tensors(state.result()), tails)


def run_cuda(shards, u: Tensor, k: int, tails, device: torch.device | None) -> TopK:
    C = native.load()
    if not C.has_cuda():
        raise RuntimeError(
            "backend 'cuda' needs ctrak_fast._C built with CUDA: install a CUDA build of torch and "
            "rebuild with `pip install --no-build-isolation -e .` (CTRAK_NO_CUDA unset)"
        )
    if u.is_cuda:
        device = u.device
    elif device is None or device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        q = u.detach().to(device, torch.float32).contiguous()
        state = C.CudaTopKState(
            q.data_ptr(), q.shape[0], q.shape[1], k, tails, device.index, stream.cuda_stream
        )
        for feats, ids in shards:
            if not feats.is_cuda:
                # Host shards (memory-mapped store shards): the engine streams them through its
                # pinned double buffers, copying chunk c + 1 while chunk c is scored.
                f = feats.detach()
                if f.dtype not in NATIVE_DTYPES:
                    f = f.float()
                f = f.contiguous()
                arr = f.view(torch.int16).numpy() if f.dtype == torch.bfloat16 else f.numpy()
                state.add_host(
                    arr, ids.detach().to(torch.int64).contiguous().numpy(), 0, stream.cuda_stream
                )
                continue
            # Temporaries are allocated on `stream`, so the caching allocator reuses them only
            # after the kernels queued here: no explicit synchronisation per shard.
            f = feats.detach().to(device, non_blocking=True)
            if f.dtype not in NATIVE_DTYPES:
                f = f.float()
            f = f.contiguous()
            i = ids.detach().to(device, torch.int64, non_blocking=True).contiguous()
            state.add(
                f.data_ptr(),
                f.shape[0],
                NATIVE_DTYPES[f.dtype],
                i.data_ptr(),
                0,
                stream.cuda_stream,
            )
        check_k(k, state.rows_seen)
        return TopK.from_tails(as_tensors(state.result(stream.cuda_stream)), tails)


def as_tensors(result) -> dict[str, tuple[Tensor, Tensor]]:
    tv, ti, bv, bi = result
    out = {}
    if tv is not None:
        out["top"] = (torch.from_numpy(tv), torch.from_numpy(ti))
    if bv is not None:
        out["bottom"] = (torch.from_numpy(bv), torch.from_numpy(bi))
    return out
