"""README.md: its two set-up commands come first, CI runs the test command verbatim, and every
Python block runs (in order, in one namespace, in a temporary directory), so the README cannot rot."""

import pathlib
import re
import tomllib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```$", flags=re.S | re.M)
KNOWN_FENCES = {"python", "toml", "bash", "bash no-run", "text"}


def _blocks(text, language):
    return [body for info, body in FENCE.findall(text) if info.strip() == language]


def test_readme_opens_with_the_two_set_up_commands_and_ci_runs_the_test_one():
    readme = README
    first_fence = readme.index("```")
    assert "```" not in readme[:first_fence]
    shell = _blocks(readme, "bash")
    demo, test = shell[0].strip(), shell[1].strip()
    assert readme.index(shell[1]) < readme.index("\n\n", readme.index(shell[1])) < len(readme)
    assert "demo" in demo and "[demo]" in demo
    assert "pytest" in test and "[test]" in test
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci, "the CI script must run README's test command verbatim"
    assert "for version in 3.11 3.12; do" in ci, "CI runs it on the oldest and the newest supported JAX"
    # Nothing but the title precedes the two commands.
    head = readme[:readme.index(shell[1]) + len(shell[1])]
    assert [line for line in head.splitlines() if line and not line.startswith(("```", "#"))] == [demo, test]


def test_every_fence_is_run_checked_or_marked_as_not_executed():
    infos = [info.strip() for info, _ in FENCE.findall(README)]
    assert set(infos) <= KNOWN_FENCES, f"unknown fence info strings: {set(infos) - KNOWN_FENCES}"
    assert infos.count("bash") == 2, "shell blocks other than the set-up commands must be 'bash no-run'"
    assert README.count("```") == 2 * len(infos), "an unterminated or indented fence"
    assert infos.count("python") >= 6


def test_the_15_line_example_attributes_targets_to_training_digits_of_their_class():
    first = _blocks(README, "python")[0]
    assert "trakjax.attribute(" in first and len(first.strip().splitlines()) <= 15  # as its heading says
    namespace = {"__name__": "readme"}
    exec(compile(first, "README.md python block 0", "exec"), namespace)
    scores, train, targets = namespace["scores"], namespace["train"], namespace["targets"]
    assert scores.shape == (300, 4) and np.isfinite(scores).all()
    for j in range(4):  # training digits of the target's class push its margin up, on average
        same = train[1] == targets[1][j]
        assert scores[same, j].mean() > 3 * max(scores[~same, j].mean(), 0.0) + 1e-6


def test_the_toml_configuration_is_valid_for_trakjax_attribute():
    from trakjax import run_config

    (block,) = _blocks(README, "toml")
    config = tomllib.loads(block)
    assert set(run_config.REQUIRED) <= set(config)
    assert set(config) <= set(run_config.REQUIRED) | set(run_config.OPTIONAL)
    assert set(config["data"]) == set(run_config.DATA_KEYS)
    assert config["task"] in run_config.TASKS
    documented = set(re.findall(r"^#? ?(\w+) = ", block, flags=re.M)) - set(run_config.DATA_KEYS)
    assert documented == set(run_config.REQUIRED + tuple(run_config.OPTIONAL)) - {"data"}, (
        "the README's TOML must show every key of the schema"
    )


def test_python_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for number, block in enumerate(_blocks(README, "python")):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as err:  # noqa: BLE001  (name the block that failed)
            pytest.fail(f"README python block {number} raised {type(err).__name__}: {err}\n{block}")
    out = capsys.readouterr().out
    assert "strongest proponents of target 0" in out
    assert namespace["scores"].shape == (300, 4)
