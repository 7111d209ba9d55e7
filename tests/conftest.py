"""Shared test configuration: markers and seeding.

Markers (declared here, enforced with --strict-markers in pyproject.toml):
  cuda   - needs a CUDA device; skipped automatically where none is present.
  slow   - takes more than a few seconds on the 2-core build machine.
  triton - runs Triton kernels (under TRITON_INTERPRET=1 on CPU).
"""

from __future__ import annotations

import os
import shutil

# Without a GPU, Triton kernels can only run in the interpreter, and Triton reads this variable when
# it is first imported (diffusers imports it): set it before anything else is imported.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "slow: slow on the 2-core build machine")
    config.addinivalue_line("markers", "triton: runs Triton kernels (interpreter on CPU)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(no_cuda)


# One thread: the models under test are tiny, where thread start-up costs more than it gains, and
# results must not depend on the machine's core count.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after: a test that runs in-process what a command
    runs may change it (spinning OpenMP threads crawl on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyCondUNet(torch.nn.Module):
    """A few-thousand-parameter conditional diffusers UNet for gradient tests (random weights)."""

    def __init__(self, n_values=(3, 2), size=8, attention_head_dim=8):
        super().__init__()
        from diffusers import UNet2DModel
        from diffusers.models.attention_processor import AttnProcessor

        self.unet = UNet2DModel(
            sample_size=size,
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
            attention_head_dim=attention_head_dim,
            class_embed_type="identity",
        )
        for mod in self.unet.modules():
            if hasattr(mod, "set_processor"):
                mod.set_processor(AttnProcessor())
        dim = self.unet.time_embedding.linear_1.out_features
        self.embed = torch.nn.ModuleList(torch.nn.Embedding(n + 1, dim) for n in n_values)
        self.n_values = list(n_values)

    def forward(self, x, t, cond):
        emb = sum(e(cond[:, i]) for i, e in enumerate(self.embed))
        return self.unet(x, t, class_labels=emb).sample


@pytest.fixture
def tiny_unet():
    torch.manual_seed(1)
    model = TinyCondUNet()
    # Random weights everywhere (diffusers zero-inits some output layers, which hides bugs).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()
