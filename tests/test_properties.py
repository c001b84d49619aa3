"""Property-based: corrupted metadata, run records and TOML configurations only ever give trakjax's
documented errors (instances of trakjax.errors.TrakjaxError), and a failed call never changes a
store's complete results.

Hypothesis corrupts the files at random: values of the wrong type, missing keys, truncation,
garbage bytes. Example counts are bounded so that this module takes about a minute.
"""

import json
import math
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trakjax
from trakjax import cli, errors, inputs

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _store_helpers as helpers  # noqa: E402
from _cli_project import make_project, write_config  # noqa: E402

# A deeper search: TRAKJAX_HYPOTHESIS_EXAMPLES=1500 TRAKJAX_HYPOTHESIS_RANDOM=1 (passed, 72 s).
EXAMPLES = int(os.environ.get("TRAKJAX_HYPOTHESIS_EXAMPLES", 30))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("TRAKJAX_HYPOTHESIS_RANDOM"),
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=False, width=32) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


def _paths_in(value, prefix=()):
    """Every key path into a JSON value (to pick one to corrupt)."""
    yield prefix
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _paths_in(sub, prefix + (key,))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            yield from _paths_in(sub, prefix + (i,))


@st.composite
def corruptions(draw, text: str):
    """Bytes of a corrupted version of the JSON ``text``."""
    kind = draw(st.sampled_from(["retype", "drop", "truncate", "garbage", "replace"]))
    if kind == "truncate":
        return text.encode()[: draw(st.integers(0, max(len(text) - 1, 0)))]
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=40))
    if kind == "replace":
        return json.dumps(draw(json_values)).encode()
    record = json.loads(text)
    paths = [p for p in _paths_in(record) if p]
    path = draw(st.sampled_from(paths))
    parent = record
    for key in path[:-1]:
        parent = parent[key]
    if kind == "drop":
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return json.dumps(record).encode()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished store (2 checkpoints, 1 experiment) and its checkpoints."""
    root = tmp_path_factory.mktemp("finished") / "store"
    checkpoints = helpers.train_checkpoints()
    helpers.run_session(root, checkpoints)
    return root, checkpoints


def _results(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.name in ("scores.npy", "features.npy")}


def _calls(traker, checkpoints):
    yield lambda: traker.finalize_scores(helpers.EXPERIMENT)
    yield lambda: traker.top_k(helpers.EXPERIMENT, 3)
    yield lambda: traker.load_checkpoint(checkpoints[1], 1)
    yield lambda: traker.start_scoring_checkpoint(helpers.EXPERIMENT, checkpoints[0], 0, helpers.N_TARGETS)
    yield lambda: traker.finalize_features()


def _fails_only_documented(call, root) -> bool:
    """Run ``call``; True if it succeeded. A failure must be a TrakjaxError that left the
    complete results as they were."""
    before = _results(root)
    try:
        call()
    except errors.TrakjaxError:
        assert _results(root) == before, "a failed call changed complete results"
        return False
    return True


METADATA = ["trakjax_store.json", "models/0/model.json", f"experiments/{helpers.EXPERIMENT}/experiment.json"]


@SETTINGS
@given(data=st.data(), which=st.sampled_from(METADATA))
def test_corrupted_store_metadata_gives_only_documented_errors(finished, tmp_path_factory, data, which):
    source, checkpoints = finished
    root = tmp_path_factory.mktemp("corrupt") / "store"
    shutil.copytree(source, root)
    target = root / which
    target.write_bytes(data.draw(corruptions(target.read_text())))
    session = []
    if _fails_only_documented(lambda: session.append(
            trakjax.TRAKer(helpers.task(), helpers.N_TRAIN, root, **helpers.SESSION_KW)), root):
        for call in _calls(session[0], checkpoints):
            _fails_only_documented(call, root)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if math.isfinite(value) else "nan"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


toml_values = st.recursive(
    st.booleans() | st.integers(-5, 5000) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10) | st.sampled_from(["~/nowhere", "/", "ckpt/0", "auto", "rademacher"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=4,
)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("project"))


@SETTINGS
@given(data=st.data())
def test_corrupted_toml_configurations_give_only_config_errors(project, tmp_path_factory, data):
    directory = tmp_path_factory.mktemp("toml")
    text = write_config(directory, project).read_text()
    kind = data.draw(st.sampled_from(["retype", "drop", "add", "garbage"]))
    lines = text.splitlines()
    keyed = [i for i, line in enumerate(lines) if " = " in line]
    if kind == "garbage":
        lines = [data.draw(st.text(max_size=60))]
    elif kind == "add":
        lines.insert(0, f"{data.draw(st.sampled_from(['projdim', 'lambda_reg', 'k']))} = {_toml(data.draw(toml_values))}")
    else:
        i = data.draw(st.sampled_from(keyed))
        key = lines[i].split(" = ")[0]
        if kind == "drop":
            del lines[i]
        else:
            lines[i] = f"{key} = {_toml(data.draw(toml_values))}"
    path = directory / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    try:
        inputs.load(path)
    except errors.ConfigError:
        pass
    assert not (directory / "out").exists(), "loading a configuration must create nothing"


@pytest.fixture(scope="module")
def finished_run(project, tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    assert cli.main(["attribute", "--config", str(write_config(directory, project)), "--quiet"]) == 0
    return directory / "out"


@SETTINGS
@given(data=st.data())
def test_corrupted_run_records_make_show_fail_in_one_line(finished_run, tmp_path_factory, data, capsys):
    out = tmp_path_factory.mktemp("show") / "out"
    shutil.copytree(finished_run, out)
    target = out / "run.json"
    target.write_bytes(data.draw(corruptions(target.read_text())))
    before = _results(out / "store")
    capsys.readouterr()
    code = cli.main(["show", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code in (0, 2), err  # 1 would be an unexpected exception
    if code == 2:
        assert len([line for line in err.splitlines() if line.strip()]) == 1
    assert _results(out / "store") == before
    assert np.load(out / "store" / "experiments" / "targets" / "scores.npy").shape == (12, 3)


# --------------------------------------------------------------------------- task fingerprints


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=2), seed=st.integers(0, 2**16),
       position=st.integers(0, 15), delta=st.sampled_from([1e-6, -0.5, 3.0]),
       dtype=st.sampled_from(["float32", "float16", "int32"]))
def test_task_fingerprints_see_closed_over_arrays_by_content(shape, seed, position, delta, dtype):
    """Equal content gives one fingerprint whatever the array object; any changed element, shape
    or dtype gives another."""
    from trakjax.task_fingerprint import task_fingerprint
    from trakjax.tasks import Task

    values = np.random.default_rng(seed).normal(size=shape).astype(dtype)

    def task(constant):
        def output(params, example, state):
            import jax.numpy as jnp

            return (params["w"] * example).sum() + jnp.asarray(constant).astype(jnp.float32).sum() * params["w"][0]

        return Task(output=output, out_to_loss=lambda p, b, s: b.sum(axis=1), name="prop")

    params = {"w": np.ones(3, np.float32)}
    example = np.zeros(3, np.float32)
    base = task_fingerprint(task(values), params, example)
    assert task_fingerprint(task(values.copy()), params, example) == base
    changed = values.copy().reshape(-1)
    index = position % changed.size
    changed[index] = changed[index] + np.asarray(delta).astype(dtype) if dtype != "int32" else changed[index] + 1
    if not np.array_equal(changed, values.reshape(-1)):
        assert task_fingerprint(task(changed.reshape(values.shape)), params, example) != base
    assert task_fingerprint(task(values[None]), params, example) != base  # another shape
