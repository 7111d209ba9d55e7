"""Ranks of a torch.distributed run (torchrun), and the rule that every rank fails together.

Two ways to run a step on every rank, both ending the same way: the failing rank re-raises its own
error and every other rank raises too (instead of waiting at the next collective until the
timeout):

- :meth:`DistContext.run_everywhere` / :meth:`DistContext.on_rank0` (object collectives; the
  featurization of method.distributed): the others raise :class:`RankFailed`;
- :func:`all_or_none` (one fixed-size tensor collective, so it runs on NCCL as on gloo; the
  distributed search): the others re-raise the failing rank's error class where it is a user
  error (StoreError, ValueError, ...), else :class:`RankFailed`.

:func:`distributed_session` and :meth:`DistContext.from_env` create the process group from the
environment torchrun sets; :func:`rank_shards` splits a store's shards over the ranks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ctrak_fast.engine.store import StoreError
from ctrak_fast.engine.validation import InputError


class RankFailed(RuntimeError):
    """Another rank failed; the message names that rank and its error."""


def rank_shards(rows: list[int], world: int, rank: int) -> list[int]:
    """Shard indices of one rank: contiguous blocks, balanced by rows.

    Shard i goes to the rank whose equal share of the rows holds its middle row, so every shard
    goes to exactly one rank and a rank's rows differ from N / world by less than a shard.

    Args:
        rows: row count of every shard, in store order.
        world, rank: 0 <= rank < world.

    Examples:
        >>> rank_shards([100, 100, 100, 50], 2, 0), rank_shards([100, 100, 100, 50], 2, 1)
        ([0, 1], [2, 3])
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    total = sum(rows)
    out, start = [], 0
    for i, n in enumerate(rows):
        if (2 * start + n) * world // (2 * max(total, 1)) == rank:
            out.append(i)
        start += n
    return out


DEFAULT_TIMEOUT = timedelta(hours=24)


@dataclass
class DistContext:
    """This process's place in a run: rank and world size, and the collectives the run needs.

    Without a process group (a single process) the collectives are the identity.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls, device=None, timeout: timedelta = DEFAULT_TIMEOUT) -> DistContext:
        """The context torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (single process when
        they are absent); initialises the process group (rendezvous from MASTER_ADDR/PORT) unless
        the caller already has: NCCL when ``device`` is a CUDA device, else gloo."""
        env = os.environ
        if "RANK" not in env and "WORLD_SIZE" not in env:
            return cls()
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env.get("LOCAL_RANK", rank))
        except (KeyError, ValueError):
            raise InputError(
                "RANK and WORLD_SIZE must both be integers (torchrun sets them), got "
                f"RANK={env.get('RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r}"
            ) from None
        if not 0 <= rank < world:
            raise InputError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
        if dist.is_initialized():
            if (dist.get_rank(), dist.get_world_size()) != (rank, world):
                raise InputError("the process group does not match RANK / WORLD_SIZE")
            return cls(rank, world, local, owns_group=False)
        if world == 1:
            return cls(0, 1, local)
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(local)  # NCCL's object collectives run on the current device
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        return cls(rank, world, local, owns_group=True)

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    @property
    def _grouped(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self._grouped:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order."""
        if not self._grouped:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def run_everywhere(self, fn):
        """Run ``fn`` on every rank; if it fails anywhere, fail everywhere with that error.

        The failing rank re-raises its own exception; the others raise :class:`RankFailed` with
        the first failing rank's message. Without this, the others would wait at the next
        collective until the timeout.
        """
        try:
            result, error = fn(), None
        except Exception as e:  # reported to the other ranks, then re-raised
            result, error = None, e
        message = None if error is None else one_line(error)
        failed = [(r, m) for r, m in enumerate(self.all_gather(message)) if m is not None]
        if error is not None:
            raise error
        if failed:
            raise RankFailed(f"rank {failed[0][0]} failed: {failed[0][1]}")
        return result

    def on_rank0(self, fn):
        """Run ``fn`` on rank 0 only and give its result (or its error) to every rank."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:  # reported to the other ranks, then re-raised
                error = e
        message, result = self.broadcast((None if error is None else one_line(error), result))
        if error is not None:
            raise error
        if message is not None:
            raise RankFailed(f"rank 0 failed: {message}")
        return result


def one_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if not isinstance(e, (ValueError, StoreError)) else text


# Errors re-raised on every rank under their own class, so that the CLI reports them the same way
# on all of them (one line); anything else becomes RankFailed.
_RERAISED = {c.__name__: c for c in (StoreError, ValueError, TypeError, OSError, KeyError)}
_NAME_BYTES, _MSG_BYTES = 32, 480


@contextlib.contextmanager
def all_or_none(group, what: str) -> Iterator[None]:
    """Run a rank's local step; if it fails on any rank, every rank raises (the failing one its
    own error, the others the first failing rank's message) instead of waiting in the next
    collective until the timeout. One all_gather of a fixed-size status per call:
    [failed, class name (32 bytes), utf-8 message (480 bytes)]."""
    error: Exception | None = None
    try:
        yield
    except Exception as e:  # re-raised below, after the other ranks have been told
        error = e
    status = torch.zeros(1 + _NAME_BYTES + _MSG_BYTES, dtype=torch.uint8)
    if error is not None:
        status[0] = 1
        # The nearest re-raisable base class (FileNotFoundError -> OSError), else the class.
        mro = type(error).__mro__
        name = next((c.__name__ for c in mro if c in _RERAISED.values()), mro[0].__name__)
        name = name.encode()[:_NAME_BYTES]
        text = (str(error).splitlines() or [type(error).__name__])[0].encode()[:_MSG_BYTES]
        for off, raw in ((1, name), (1 + _NAME_BYTES, text)):
            status[off : off + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    status = status.to(collective_device(group))
    every = [torch.empty_like(status) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, status, group=group)
    if error is not None:
        raise error
    for rank, st in enumerate(every):
        if st[0].item():
            raw = bytes(st[1:].cpu().tolist())
            name = raw[:_NAME_BYTES].rstrip(b"\0").decode(errors="replace")
            msg = raw[_NAME_BYTES:].rstrip(b"\0").decode(errors="replace")
            cls = _RERAISED.get(name)
            if cls is not None:
                raise cls(f"{what}: rank {rank}: {msg}")
            raise RankFailed(f"{what}: rank {rank} failed with {name}: {msg}")


def collective_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def distributed_session() -> Iterator[tuple[int, int]]:
    """(rank, world) of this process; under torchrun (WORLD_SIZE > 1) a process group is created
    from the environment (nccl when CUDA is available, else gloo) and destroyed on exit. An
    existing process group is used as is."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    if world <= 1:
        yield 0, 1
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()
