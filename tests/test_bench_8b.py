"""Smoke test of bench/train_step_8b.py (the GPU MFU benchmark) at shrunk dimensions on the 4
fake CPU devices, so the script a lent GPU runs does not rot between sessions."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))


def test_train_step_8b_tiny_runs_a_dpo_step_on_the_mesh(capsys):
    import train_step_8b
    out = train_step_8b.main(["--tiny", "--layers", "2", "--reps", "2", "--prompt", "64",
                              "--response", "32", "--peak-n", "256"])
    printed = capsys.readouterr().out
    assert "rows of 128 tokens" in printed and " 4 x " in printed  # 8 rows over 4 devices
    assert math.isclose(out["losses"][0], math.log(2), abs_tol=1e-4)  # first DPO step: ln 2
    assert out["losses"][-1] < out["losses"][0]
    assert 0.0 < out["mfu"] < 5.0 and out["step_s"] > 0
    # The memory report counts at least each device's shard of the fp32 params, RMSprop
    # moments (4 + 4 bytes) and bf16 reference copy (2) over 4 devices.
    from cosa_jax.models.config import LlamaConfig
    n_params = LlamaConfig(**dict(train_step_8b.TINY, num_layers=2)).num_params
    assert 10 * n_params / 4 <= out["peak_gib"] * 2**30 < 2**30


def test_train_step_8b_refuses_the_full_shape_on_cpu():
    import train_step_8b
    with pytest.raises(SystemExit, match="no accelerator"):
        train_step_8b.main(["--layers", "1"])
