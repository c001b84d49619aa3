"""``trakjax attribute --config FILE``: TRAK over your own Flax model, data and orbax checkpoints.

The run is described by a TOML file (read with ``tomllib``). Relative paths are relative to the
file's directory, which is also put first on ``sys.path`` (with ``python_path``) so that a model
module next to the file imports; ``~`` is expanded everywhere::

    model = "my_model:model"            # "module:attribute", importable (required)
    model_kwargs = {}                   # keyword arguments to call the attribute with
    task = "image_classification"       # see TASKS (required)
    checkpoints = ["ckpt/0", "ckpt/1"]  # orbax checkpoint directories; model_id = position (required)
    output = "out"                      # output directory (required)

    proj_dim = 2048                     # k ("all" with projection = "factorized": every feature)
    seed = 0                            # projection seed
    lambda = "auto"                     # or an absolute λ such as 0.01 (default: "auto")
    kernel = "auto"                     # or "gauss-newton" (ΦᵀHΦ + λI), "trak" (ΦᵀΦ + λI)
    batch_size = 64                     # examples per featurize step
    projection = "auto"                 # or "rademacher", "normal", "factorized" (per-layer Kronecker projections)
    factor_dims = 64                    # factorized only: factor sizes, or [k_in, k_out] (unset: from proj_dim)
    factor_kind = "rademacher"          # factorized only: or "normal"
    dtype = "float32"                   # feature storage: or "bfloat16", "float16"
    precision = "highest"               # projection matmuls: or "high", "default"
    backend = "auto"                    # projection backend: or "xla", "pallas"
    top_k = 10                          # depth of topk.csv / topk.json
    experiment = "targets"              # the scoring experiment's name in the store
    grad_wrt = ["params"]               # '/'-joined path prefixes of differentiated leaves
    python_path = []                    # more directories to import the model module from
    apply_kwargs = {}                   # fixed keyword arguments of every model call (linen),
                                        # e.g. {train = false}
    decoder = "bytes"                   # token inputs as text in the explorer (index.html): byte
                                        # ids 0..255, or a vocabulary file (.json list or
                                        # {token: id}, else one token per line); default: ids

    [data]                              # .npy files (required, except labels for language_modeling)
    train_inputs = "train_x.npy"        # or a table of named arrays:
    train_labels = "train_y.npy"        #   train_inputs = {input_ids = "ids.npy", attention_mask = "mask.npy"}
    target_inputs = "test_x.npy"
    target_labels = "test_y.npy"

Each key is one row of :data:`KEYS` (its check and default); the settings that decide or run the
attribution build one :class:`trakjax.Config`. Everything is checked before anything is written
(:func:`load`): the file and every path it names, the model import, each checkpoint's tree, that
the model applies to the train and target inputs and fits the labels, and that an existing
output was made with the same settings. A failed check raises
:class:`~trakjax.errors.ConfigError` with one line naming the file, the key and what is wrong.
The run itself (:func:`run`) is :meth:`trakjax.TRAKer.run` over a store in ``output``, so a
rerun of the same command resumes, and a rerun whose inputs changed is refused (``overwrite``
recomputes).

Outputs in ``output``: ``store/`` (the trakjax store; the score matrix is
``store/experiments/<experiment>/scores.npy``), ``topk.csv``, ``topk.json``, ``attributions.png``
(for image inputs), ``index.html`` (the explorer, :mod:`trakjax.explorer`) and ``run.json`` for
``trakjax show``.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from trakjax import store as store_lib
from trakjax.config import Config
from trakjax.errors import ConfigError, TrakjaxError

TASKS = ("image_classification", "text_classification", "binary_classification", "regression",
         "language_modeling")
"""Task names ``task`` may take: the tasks of :mod:`trakjax.tasks` whose examples are
``(inputs, labels)`` pairs (``inputs`` alone for language_modeling)."""
DATA_KEYS = ("train_inputs", "train_labels", "target_inputs", "target_labels")
STORE_DIR = "store"


class _Invalid(Exception):
    """A key's value is invalid; the message says what is valid (wrapped into ConfigError)."""


# --------------------------------------------------------------------------- value checks


def _resolve(value: str, base: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def _model_ref(value, base):
    if not isinstance(value, str) or value.count(":") != 1 or not all(value.split(":")):
        raise _Invalid(f'must be "module:attribute" (e.g. "my_model:model"), got {value!r}')
    return value


def _choice(choices):
    def check(value, base):
        if value not in choices:
            raise _Invalid(f"must be one of {list(choices)}, got {value!r}")
        return value

    return check


def _paths(value, base):
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise _Invalid("must be a non-empty list of orbax directory paths")
    paths = [_resolve(c, base) for c in value]
    if len(set(paths)) != len(paths):
        raise _Invalid("lists a directory twice")
    return paths


def _output(value, base):
    if not isinstance(value, str) or not value:
        raise _Invalid(f"must be a directory path, got {value!r}")
    return _resolve(value, base)


def _integer(low: int):
    def check(value, base):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _Invalid(f"must be an integer >= {low}, got {value!r}")
        return value

    return check


def _proj_dim(value, base):
    if value == "all":
        return value
    return _integer(1)(value, base)


def _factor_dims(value, base):
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        return tuple(value)
    raise _Invalid(f"must be a positive integer or a pair [k_in, k_out] of them, got {value!r}")


def _lambda(value, base):
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise _Invalid(f'must be "auto" or a number >= 0, got {value!r}')
    return float(value)


def _decoder(value, base):
    if value is None or value == "bytes":
        return value
    if not isinstance(value, str) or not value:
        raise _Invalid(f'must be "bytes" or a vocabulary file path, got {value!r}')
    path = _resolve(value, base)
    if not path.is_file():
        raise _Invalid(f"names a vocabulary file that does not exist: {path}")
    return path


def _experiment(value, base):
    try:
        store_lib.check_experiment_name(value)
    except TrakjaxError as err:
        raise _Invalid(str(err)) from err
    return value


def _prefixes(value, base):
    if value is not None and (not isinstance(value, list) or not value
                              or not all(isinstance(g, str) for g in value)):
        raise _Invalid(f"must be a non-empty list of '/'-joined path prefixes, got {value!r}")
    return value


def _directories(value, base):
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise _Invalid(f"must be a list of directories, got {value!r}")
    paths = [_resolve(p, base) for p in value]
    absent = [str(p) for p in paths if not p.is_dir()]
    if absent:
        raise _Invalid(f"names directories that do not exist: {absent}")
    return paths


def _table(optional: bool):
    def check(value, base):
        if not isinstance(value, dict) and not (optional and value is None):
            raise _Invalid(f"must be a table, got {value!r}")
        return None if value is None else dict(value)

    return check


def _data(value, base):
    if not isinstance(value, dict):
        raise _Invalid("must be a table ([data]) of .npy paths")
    resolved: dict[str, Any] = {}
    for key, entry in value.items():
        if isinstance(entry, str):
            resolved[key] = _resolve(entry, base)
        elif key.endswith("_inputs") and isinstance(entry, dict) and entry and all(
                isinstance(v, str) for v in entry.values()):
            resolved[key] = {name: _resolve(v, base) for name, v in entry.items()}
        else:
            kind = " or a table of named .npy paths" if key.endswith("_inputs") else ""
            raise _Invalid(f".{key} must be a .npy path{kind}, got {entry!r}")
    return resolved


# --------------------------------------------------------------------------- the keys

_REQUIRED = object()


class Key(NamedTuple):
    """One key of the TOML file: its check ``(value, config directory) -> value`` and default
    (``_REQUIRED`` for required keys); ``setting`` names the :class:`trakjax.Config` field it
    sets, if any."""

    check: Callable[[Any, Path], Any]
    default: Any = _REQUIRED
    setting: str | None = None


KEYS: dict[str, Key] = {
    "model": Key(_model_ref),
    "task": Key(_choice(TASKS)),
    "checkpoints": Key(_paths),
    "output": Key(_output),
    "data": Key(_data),
    "model_kwargs": Key(_table(optional=True), None),
    "proj_dim": Key(_proj_dim, 2048, "proj_dim"),
    "seed": Key(_integer(0), 0, "seed"),
    "lambda": Key(_lambda, "auto", "lambda_reg"),
    "kernel": Key(_choice(("auto", "trak", "gauss-newton")), "auto", "kernel"),
    "batch_size": Key(_integer(1), 64, "batch_size"),
    "projection": Key(_choice(("auto", "rademacher", "normal", "factorized")), "auto", "projection"),
    "factor_dims": Key(_factor_dims, None, "factor_dims"),
    "factor_kind": Key(_choice(("rademacher", "normal")), "rademacher", "factor_kind"),
    "dtype": Key(_choice(("float32", "bfloat16", "float16")), "float32", "dtype"),
    "precision": Key(_choice(("highest", "high", "default")), "highest", "precision"),
    "backend": Key(_choice(("auto", "xla", "pallas")), "auto", "backend"),
    "top_k": Key(_integer(1), 10),
    "experiment": Key(_experiment, "targets"),
    "grad_wrt": Key(_prefixes, None),
    "python_path": Key(_directories, []),
    "apply_kwargs": Key(_table(optional=False), {}),
    "decoder": Key(_decoder, None),
}
"""Every key of the TOML file."""
REQUIRED = tuple(name for name, key in KEYS.items() if key.default is _REQUIRED)
OPTIONAL = {name: key.default for name, key in KEYS.items() if key.default is not _REQUIRED}


class RunConfig(NamedTuple):
    """A checked run configuration (paths absolute).

    ``settings`` is the :class:`trakjax.Config` the attribution runs with (its ``grad_wrt`` is
    filled in from the model when the file gives none, see :func:`trakjax.inputs.load_model`).
    """

    path: Path
    model: str
    task: str
    checkpoints: list[Path]
    output: Path
    data: dict[str, Any]
    top_k: int
    experiment: str
    grad_wrt: list[str] | None
    apply_kwargs: dict
    python_path: list[Path]
    model_kwargs: dict | None
    settings: Config
    decoder: str | Path | None = None


def _read_toml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err


def _check_data_files(path: Path, task: str, data: dict, checkpoints: list[Path]) -> None:
    needed = ["train_inputs", "target_inputs"] + ([] if task == "language_modeling" else
                                                  ["train_labels", "target_labels"])
    unknown = sorted(set(data) - set(DATA_KEYS))
    absent = [key for key in needed if key not in data]
    if unknown or absent:
        raise ConfigError(f"{path}: [data] needs {needed} (task {task}); "
                          + (f"missing {absent}" if absent else f"unknown keys {unknown}"))
    if task == "language_modeling" and ("train_labels" in data or "target_labels" in data):
        raise ConfigError(f"{path}: task language_modeling takes no labels; remove data.train_labels/target_labels")
    missing = [f"data.{key}{'.' + name if name else ''} = {file}"
               for key, value in data.items()
               for name, file in (value.items() if isinstance(value, dict) else [("", value)])
               if not file.is_file()]
    missing += [f"checkpoints[{m}] = {c}" for m, c in enumerate(checkpoints) if not c.is_dir()]
    if missing:
        raise ConfigError(f"{path} names files that do not exist: {'; '.join(missing)}")


def parse(path: str | os.PathLike) -> RunConfig:
    """Read and check the TOML file at ``path`` and that every file it names exists.

    Raises:
      ConfigError: a missing or unreadable file, invalid TOML, an unknown or missing key, a
        value of the wrong type, or named files or checkpoint directories that do not exist
        (all of them listed).
    """
    path = Path(os.path.expanduser(os.fspath(path))).absolute()
    raw = _read_toml(path)
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; valid keys are {sorted(KEYS)}")
    missing = [name for name in REQUIRED if name not in raw]
    if missing:
        raise ConfigError(f"{path}: missing required keys {missing}")
    values = {}
    for name, key in KEYS.items():
        try:
            values[name] = key.check(raw.get(name, key.default), path.parent)
        except _Invalid as err:
            message = str(err)
            raise ConfigError(f"{path}: {name}{'' if message.startswith('.') else ' '}{message}") from err
    _check_data_files(path, values["task"], values["data"], values["checkpoints"])
    try:
        # only the keys the file gives: the others are unset, and adopt an existing store's values
        settings = Config.create(**{key.setting: values[name] for name, key in KEYS.items()
                                    if key.setting and name in raw})
    except TrakjaxError as err:
        raise ConfigError(f"{path}: {err}") from err
    return RunConfig(
        path=path, settings=settings, **{name: values[name] for name in RunConfig._fields
                                         if name not in ("path", "settings")},
    )
