"""The torch.distributed context of a featurization run (torchrun): rank, world size, the
collectives the run needs, and the one-line failure that stops every rank."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ctrak_fast.engine.store import StoreError
from ctrak_fast.engine.validation import InputError

DEFAULT_TIMEOUT = timedelta(hours=24)


class RankFailed(RuntimeError):
    """Another rank failed; the message is that rank's error."""


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
