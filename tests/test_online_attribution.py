"""examples/online_attribution.py, run tiny: its jitted probe scores equal trakjax.attribute."""

import importlib.util
import pathlib

import numpy as np

import trakjax

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "online_attribution.py"


def load_example():
    spec = importlib.util.spec_from_file_location("online_attribution", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_online_attribution_scores_equal_attribute_at_the_refresh_parameters():
    example = load_example()
    lines = []
    result = example.main(
        train_size=48, probe_size=4, steps=5, refresh_every=2, batch_size=16, proj_dim=32,
        hidden=8, log=lines.append,
    )
    refresh = result["last_refresh"]
    assert refresh["step"] == 4
    assert len(result["losses"]) == 5 and np.isfinite(result["losses"]).all()
    assert any("top proponents" in line for line in lines)
    expected = trakjax.attribute(
        result["task"], [refresh["params"]], result["train"], result["probe"],
        **result["attribution_kwargs"],
    )
    assert refresh["scores"].shape == (48, 4)
    rel = np.linalg.norm(refresh["scores"] - expected) / np.linalg.norm(expected)
    assert rel < 1e-5, rel
    top = np.argsort(-expected, axis=0)[:3].T
    np.testing.assert_array_equal(refresh["top"], top)
