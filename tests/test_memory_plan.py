import json
import subprocess
import sys

import numpy as np

from cm3leon_jax import memory_plan
from tests.helpers import tiny_config
from tests.test_train import REPO


def test_plan_counts_sharded_bytes_exactly():
    config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    plan = memory_plan.plan(config)
    m = config.model
    pos = m.max_length * m.d_model
    total = plan["num_params"]
    # every parameter is split over fsdp x tensor = 4 devices except positions (fsdp only)
    expected = ((total - pos) / 4 + pos / 2) * 4 / 2 ** 30
    np.testing.assert_allclose(plan["params_gib"], expected, rtol=1e-9)
    np.testing.assert_allclose(plan["optimizer_state_gib"], 2 * expected, rtol=1e-3)  # Adam mu + nu
    assert plan["activations_and_temporaries_gib"] > 0
    assert plan["total_gib"] > plan["params_gib"] + plan["optimizer_state_gib"]


def test_cli_simulates_a_larger_slice_without_allocating():
    out = subprocess.run([sys.executable, "-m", "cm3leon_jax.memory_plan", "--config", "experiments/tiny_cpu.py",
                          "--num_devices", "16", "--config.mesh.data=4", "--config.mesh.fsdp=4",
                          "--device_memory_gib", "0.001"],
                         cwd=REPO, capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["num_devices"] == 16 and result["mesh"] == {"data": 4, "fsdp": 4, "tensor": 1}
    assert result["fits"] is False and "NO" in out.stdout
