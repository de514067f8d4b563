"""Shared fixtures of the distillation tests: a teacher-data cache and one adaptor trained at the test budget."""

from __future__ import annotations

from pathlib import Path

import pytest

# The test budget (test_quality.py checks what it reaches on held-out prompts): every prompt of the default set,
# the cpu-fp32 recipe's schedule (8 DPM++ steps, clock 2, guidance 7.5), 4 epochs at a raised learning rate.
TRAIN_EPOCHS = 4
TRAIN_LR = 3e-3


@pytest.fixture(scope="session")
def distill_cache(tmp_path_factory) -> Path:
    """Teacher data shared by the distillation tests (same settings -> one unroll)."""
    return tmp_path_factory.mktemp("distill-cache")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on shared, busy cores a second thread makes these CPU-bound tests several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_model, distill_cache, tmp_path_factory) -> Path:
    import torch

    from cw_export.distill.train import DistillOptions, distill

    out = tmp_path_factory.mktemp("trained") / "adaptor.safetensors"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        distill(DistillOptions(model="tiny-random", epochs=TRAIN_EPOCHS, lr=TRAIN_LR, out=out, cache=distill_cache,
                               progress=False), model=tiny_model)
    finally:
        torch.set_num_threads(before)
    return out
