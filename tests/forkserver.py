"""A fork server for tests that run `ctrak` as a subprocess many times.

Importing torch, diffusers and ctrak_fast takes ~3 s on the 2-core build machine; the server
imports them once and forks one child per command. A child is a real process running
``ctrak_fast.cli.main(argv)``: its exit status is the CLI's, and it can be SIGKILLed at any
instant, which is what the fault-injection tests need. Children run single-threaded, so their
results are bit-comparable with each other and with torchrun ranks (torchrun sets
OMP_NUM_THREADS=1).

A child can also kill itself at its n-th guarded syscall (a write, fsync, rename, link or unlink:
the points where a store changes on disk); a write chosen that way is torn in half first.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GUARDED = ("write", "fsync", "replace", "link", "unlink")

SERVER = textwrap.dedent(
    """
    import contextlib, io, json, os, signal, sys, tempfile, traceback
    from pathlib import Path
    os.environ["OMP_NUM_THREADS"] = "1"
    sys.path[:0] = [{repo!r}, {tests!r}]
    import torch
    torch.set_num_threads(1)
    import torch.distributed
    import ctrak_fast.bench.quality, ctrak_fast.cli, ctrak_fast.method.distributed
    import ctrak_fast.models.factor_unet
    import forkserver
    import tqdm
    tqdm.tqdm.monitor_interval = 0  # no monitor thread

    # One featurize run here does the lazy imports and kernel set-up that would otherwise cost
    # each child ~0.5 s; the server must still be single-threaded to fork safely.
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        model, data = forkserver.tiny_assets(Path(tmp))
        ctrak_fast.cli.main(
            ["featurize", "--model", str(model), "--data", str(data), "--method", "d-trak",
             "--timesteps", "99", "--k", "8", "--batch-size", "4", "--out", tmp + "/s"]
        )
    assert len(os.listdir("/proc/self/task")) == 1, "the fork server must not start threads"

    def child(req):
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        for target, name in ((1, req["stdout"]), (2, req["stderr"])):
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, target)
            os.close(fd)
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        real = {{name: getattr(os, name) for name in {guarded!r}}}
        count = [0]

        def guard(name):
            def call(*args, **kwargs):
                count[0] += 1
                if count[0] == req["kill_at"]:
                    if name == "write":  # torn write: half the bytes reach the file
                        real["write"](args[0], bytes(args[1])[: len(args[1]) // 2])
                    os.kill(os.getpid(), signal.SIGKILL)
                return real[name](*args, **kwargs)
            return call

        for name in real:
            setattr(os, name, guard(name))
        try:
            rc = ctrak_fast.cli.main(req["argv"])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            rc = 70
        sys.stdout.flush()
        sys.stderr.flush()
        with open(req["stdout"] + ".calls", "w") as f:
            f.write(str(count[0]))
        os._exit(rc)

    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "run":
            pid = os.fork()
            if pid == 0:
                child(req)
            reply = {{"pid": pid}}
        else:
            _, status = os.waitpid(req["pid"], 0)
            reply = {{"status": os.waitstatus_to_exitcode(status)}}
        print(json.dumps(reply), flush=True)
    """
)


@dataclass
class Child:
    pid: int
    stdout_path: Path
    started: float

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


@dataclass
class Result:
    rc: int  # the exit status; -9 when SIGKILLed
    stdout: str
    stderr: str
    calls: int | None  # guarded syscalls made (None when killed)
    seconds: float


class ForkServer:
    def __init__(self, tmp: Path) -> None:
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._n = 0
        script = SERVER.format(repo=str(REPO), tests=str(REPO / "tests"), guarded=GUARDED)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (exit {self.proc.wait()})")
        return json.loads(line)

    def start(self, argv, env=None, kill_at: int = 0, cwd=None) -> Child:
        """Fork a child running `ctrak *argv`; with kill_at, it SIGKILLs itself at that syscall."""
        self._n += 1
        out = self.tmp / f"child{self._n}.out"
        out.touch()  # a child killed before it opens its logs has empty ones
        out.with_suffix(".err").touch()
        req = {
            "op": "run",
            "argv": [str(a) for a in argv],
            "env": {k: str(v) for k, v in (env or {}).items()},
            "kill_at": kill_at,
            "cwd": str(cwd or self.tmp),
            "stdout": str(out),
            "stderr": str(out.with_suffix(".err")),
        }
        return Child(self._ask(req)["pid"], out, time.monotonic())

    def wait(self, child: Child, timeout: float = 120) -> Result:
        """The child's result; a child still running after ``timeout`` seconds is SIGKILLed (so
        a hung child fails its test instead of hanging the suite)."""
        deadline = time.monotonic() + timeout
        while _running(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if _running(child.pid):
            child.kill()
        rc = self._ask({"op": "wait", "pid": child.pid})["status"]
        seconds = time.monotonic() - child.started
        calls = Path(str(child.stdout_path) + ".calls")
        return Result(
            rc,
            child.stdout_path.read_text(),
            child.stdout_path.with_suffix(".err").read_text(),
            int(calls.read_text()) if calls.exists() else None,
            seconds,
        )

    def run(self, argv, **kw) -> Result:
        return self.wait(self.start(argv, **kw))

    def close(self) -> None:
        self.proc.kill()  # it holds no state; its children have all been waited for
        self.proc.wait()


def _running(pid: int) -> bool:
    """True until the (unreaped) child has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


_shared: ForkServer | None = None


def shared_server(tmp_path_factory) -> ForkServer:
    """One server for the whole test session (its start-up costs seconds)."""
    global _shared
    if _shared is None:
        _shared = ForkServer(tmp_path_factory.mktemp("forkserver"))
        atexit.register(_shared.close)
    return _shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    """What torchrun gives each worker (loopback rendezvous)."""
    return {
        "RANK": rank,
        "WORLD_SIZE": world,
        "LOCAL_RANK": rank,
        "LOCAL_WORLD_SIZE": world,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
    }


def tiny_assets(
    tmp: Path, *, image_size: int = 8, in_channels: int = 3, nan_label=None, seed: int = 0
):
    """A tiny FactorUNet checkpoint and a 24-image synthetic data config in ``tmp``.

    Images are grouped by (shape, colour): ids 0-5 circle/red, 6-11 circle/green, 12-17
    square/red, 18-23 square/green. nan_label: (factor, value) whose embedding row is NaN, so that
    exactly the samples with that label get NaN per-sample gradients.
    """
    import torch

    from ctrak_fast.data import SyntheticConfig
    from ctrak_fast.models.factor_unet import FactorUNet, save_model

    torch.manual_seed(seed)
    model = FactorUNet(
        [2, 2],
        image_size=image_size,
        in_channels=in_channels,
        block_out_channels=(8, 16),
        attention=(False, True),
        norm_num_groups=4,
        factors=["shape", "colour"],
        values={"shape": ["circle", "square"], "colour": ["red", "green"]},
    )
    if nan_label is not None:
        with torch.no_grad():
            model.factor_embeddings[nan_label[0]].weight[nan_label[1]] = float("nan")
    tmp.mkdir(parents=True, exist_ok=True)
    name = f"unet{image_size}c{in_channels}s{seed}" + ("" if nan_label is None else "nan")
    save_model(model, tmp / f"{name}.safetensors")
    cfg = SyntheticConfig(
        image_size=image_size,
        shapes=("circle", "square"),
        colours=("red", "green"),
        per_combo=6,
        n_heldout=0,
    )
    cfg.save_json(tmp / f"data{image_size}.json")
    return tmp / f"{name}.safetensors", tmp / f"data{image_size}.json"


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store directory but the (empty) lock file, by name."""
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.name != ".lock"}


PROGRESS = re.compile(r"\[\d\d:\d\d:\d\d\] featurize [\w -]+: \d+/\d+ (batch|unit) ")


def not_progress(stderr: str) -> list[str]:
    """stderr lines without the progress log lines (ctrak_fast.progress: stderr of a child is
    not a terminal, so progress comes as log lines beside the one error line)."""
    return [line for line in stderr.splitlines() if not PROGRESS.match(line)]
