"""``trakjax attribute --config FILE``: TRAK over your own Flax model, data and orbax checkpoints.

The run is described by a TOML file (read with ``tomllib``). Relative paths are relative to the
file's directory, which is also put first on ``sys.path`` (with ``python_path``) so that a model
module next to the file imports::

    model = "my_model:model"            # "module:attribute", importable (required)
    model_kwargs = {}                   # keyword arguments to call the attribute with
    task = "image_classification"       # see TASKS (required)
    checkpoints = ["ckpt/0", "ckpt/1"]  # orbax checkpoint directories; model_id = position (required)
    output = "out"                      # output directory (required)

    proj_dim = 2048                     # k
    seed = 0                            # projection seed
    lambda = "auto"                     # or an absolute λ such as 0.01 (default: "auto")
    batch_size = 64                     # examples per featurize step
    projection = "rademacher"           # or "normal"
    top_k = 10                          # depth of topk.csv / topk.json
    experiment = "targets"              # the scoring experiment's name in the store
    grad_wrt = ["params"]               # '/'-joined path prefixes of differentiated leaves
    python_path = []                    # more directories to import the model module from
    apply_kwargs = {}                   # fixed keyword arguments of every model call (linen),
                                        # e.g. {train = false}

    [data]                              # .npy files (required, except labels for language_modeling)
    train_inputs = "train_x.npy"        # or a table of named arrays:
    train_labels = "train_y.npy"        #   train_inputs = {input_ids = "ids.npy", attention_mask = "mask.npy"}
    target_inputs = "test_x.npy"
    target_labels = "test_y.npy"

The model attribute is a ``flax.linen.Module``, a ``flax.nnx.Module``, or a callable returning
one (a factory or a Module class), called with ``model_kwargs`` (default: no arguments). Checkpoints are what orbax's ``StandardCheckpointer().save(path, tree)``
wrote, with ``tree`` the linen variables as ``module.init`` returns them (``{"params": …}``,
plus ``batch_stats`` and such, held fixed), or for NNX ``nnx.state(model)`` (or its
``nnx.to_pure_dict``); NNX variables other than ``nnx.Param`` are held fixed.

Everything is checked before the store is created (:func:`load`): the file and every path it
names, the model import, each checkpoint's tree against the first, and that the model applies to
the train and target inputs and fits the labels (the task's own check). A failed check raises
:class:`BadInput` with one line naming the file, the key and what is wrong. The run itself
(:func:`run`) goes through the :class:`trakjax.TRAKer` session, so a rerun of the same command
resumes: finished checkpoints and rows are skipped.

Outputs in ``output``: ``store/`` (the trakjax store; the score matrix is
``store/experiments/<experiment>/scores.npy``), ``topk.csv``, ``topk.json``, ``attributions.png``
(for image inputs), and ``run.json`` for ``trakjax show``.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

TASKS = ("image_classification", "text_classification", "binary_classification", "regression",
         "language_modeling")
"""Task names ``task`` may take: the tasks of :mod:`trakjax.tasks` whose examples are
``(inputs, labels)`` pairs (``inputs`` alone for language_modeling)."""
REQUIRED = ("model", "task", "checkpoints", "output", "data")
OPTIONAL = {
    "proj_dim": 2048, "seed": 0, "lambda": None, "batch_size": 64, "projection": "rademacher",
    "top_k": 10, "experiment": "targets", "grad_wrt": None, "apply_kwargs": {}, "python_path": [],
    "model_kwargs": None,
}
DATA_KEYS = ("train_inputs", "train_labels", "target_inputs", "target_labels")


class BadInput(ValueError):
    """A configuration, or what it names, that cannot be used; the CLI exits with code 2."""


class RunConfig(NamedTuple):
    """A checked run configuration (paths absolute)."""

    path: Path
    model: str
    task: str
    checkpoints: list[Path]
    output: Path
    data: dict[str, Any]
    proj_dim: int
    seed: int
    lambda_reg: float | None
    batch_size: int
    projection: str
    top_k: int
    experiment: str
    grad_wrt: list[str] | None
    apply_kwargs: dict
    python_path: list[Path]
    model_kwargs: dict | None


def _int(config_path: Path, key: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BadInput(f"{config_path}: {key} must be an integer >= {low}, got {value!r}")
    return value


def parse(path: str | os.PathLike) -> RunConfig:
    """Read and check the TOML file at ``path`` and that every file it names exists.

    Raises:
      BadInput: a missing or unreadable file, invalid TOML, an unknown or missing key, a value
        of the wrong type, or named files or checkpoint directories that do not exist (all of
        them listed).
    """
    path = Path(path).absolute()
    if not path.is_file():
        raise BadInput(f"config file {path} does not exist")
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise BadInput(f"{path} is not valid TOML: {err}") from err
    except OSError as err:
        raise BadInput(f"cannot read config file {path}: {err.strerror}") from err
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise BadInput(
            f"{path}: unknown keys {unknown}; valid keys are {sorted(REQUIRED + tuple(OPTIONAL))}"
        )
    missing = [key for key in REQUIRED if key not in raw]
    if missing:
        raise BadInput(f"{path}: missing required keys {missing}")
    settings = {**OPTIONAL, **raw}
    base = path.parent

    def resolve(value: str) -> Path:
        return Path(os.path.expanduser(value)) if os.path.isabs(os.path.expanduser(value)) else base / value

    model = settings["model"]
    if not isinstance(model, str) or model.count(":") != 1 or not all(model.split(":")):
        raise BadInput(f"{path}: model must be \"module:attribute\" (e.g. \"my_model:model\"), got {model!r}")
    task = settings["task"]
    if task not in TASKS:
        raise BadInput(f"{path}: task must be one of {list(TASKS)}, got {task!r}")
    checkpoints = settings["checkpoints"]
    if (not isinstance(checkpoints, list) or not checkpoints
            or not all(isinstance(c, str) for c in checkpoints)):
        raise BadInput(f"{path}: checkpoints must be a non-empty list of orbax directory paths")
    output = settings["output"]
    if not isinstance(output, str) or not output:
        raise BadInput(f"{path}: output must be a directory path, got {output!r}")
    data = settings["data"]
    if not isinstance(data, dict):
        raise BadInput(f"{path}: data must be a table ([data]) of .npy paths")
    needed = ["train_inputs", "target_inputs"] + ([] if task == "language_modeling" else
                                                  ["train_labels", "target_labels"])
    unknown = sorted(set(data) - set(DATA_KEYS))
    absent = [key for key in needed if key not in data]
    if unknown or absent:
        raise BadInput(
            f"{path}: [data] needs {needed} (task {task}); "
            + (f"missing {absent}" if absent else f"unknown keys {unknown}")
        )
    if task == "language_modeling" and ("train_labels" in data or "target_labels" in data):
        raise BadInput(f"{path}: task language_modeling takes no labels; remove data.train_labels/target_labels")
    resolved: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, str):
            resolved[key] = resolve(value)
        elif key.endswith("_inputs") and isinstance(value, dict) and value and all(
                isinstance(v, str) for v in value.values()):
            resolved[key] = {name: resolve(v) for name, v in value.items()}
        else:
            raise BadInput(
                f"{path}: data.{key} must be a .npy path"
                + (" or a table of named .npy paths" if key.endswith("_inputs") else "")
                + f", got {value!r}"
            )
    missing_files = []
    for key, value in resolved.items():
        for name, file in (value.items() if isinstance(value, dict) else [("", value)]):
            if not file.is_file():
                missing_files.append(f"data.{key}{'.' + name if name else ''} = {file}")
    checkpoint_paths = [resolve(c) for c in checkpoints]
    missing_files += [f"checkpoints[{m}] = {c}" for m, c in enumerate(checkpoint_paths) if not c.is_dir()]
    if missing_files:
        raise BadInput(f"{path} names files that do not exist: {'; '.join(missing_files)}")
    if len(set(checkpoint_paths)) != len(checkpoint_paths):
        raise BadInput(f"{path}: checkpoints lists a directory twice")
    lam = settings["lambda"]
    if lam == "auto":  # what the library's lambda_reg=None means
        lam = None
    if lam is not None and (isinstance(lam, bool) or not isinstance(lam, int | float)
                            or not math.isfinite(lam) or lam < 0):
        raise BadInput(f"{path}: lambda must be \"auto\" or a number >= 0, got {lam!r}")
    if settings["projection"] not in ("rademacher", "normal"):
        raise BadInput(f"{path}: projection must be \"rademacher\" or \"normal\", got {settings['projection']!r}")
    experiment = settings["experiment"]
    from trakjax import store as store_lib

    try:
        store_lib.check_experiment_name(experiment)
    except ValueError as err:
        raise BadInput(f"{path}: experiment: {err}") from err
    grad_wrt = settings["grad_wrt"]
    if grad_wrt is not None and (not isinstance(grad_wrt, list) or not grad_wrt
                                 or not all(isinstance(g, str) for g in grad_wrt)):
        raise BadInput(f"{path}: grad_wrt must be a non-empty list of '/'-joined path prefixes, got {grad_wrt!r}")
    python_path = settings["python_path"]
    if not isinstance(python_path, list) or not all(isinstance(p, str) for p in python_path):
        raise BadInput(f"{path}: python_path must be a list of directories, got {python_path!r}")
    python_path = [resolve(p) for p in python_path]
    absent = [str(p) for p in python_path if not p.is_dir()]
    if absent:
        raise BadInput(f"{path}: python_path names directories that do not exist: {absent}")
    model_kwargs = settings["model_kwargs"]
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise BadInput(f"{path}: model_kwargs must be a table, got {model_kwargs!r}")
    if not isinstance(settings["apply_kwargs"], dict):
        raise BadInput(f"{path}: apply_kwargs must be a table, got {settings['apply_kwargs']!r}")
    return RunConfig(
        path=path, model=model, task=task, checkpoints=checkpoint_paths, output=resolve(output),
        data=resolved, proj_dim=_int(path, "proj_dim", settings["proj_dim"], 1),
        seed=_int(path, "seed", settings["seed"], 0),
        lambda_reg=None if lam is None else float(lam),
        batch_size=_int(path, "batch_size", settings["batch_size"], 1),
        projection=settings["projection"], top_k=_int(path, "top_k", settings["top_k"], 1),
        experiment=experiment, grad_wrt=grad_wrt, apply_kwargs=dict(settings["apply_kwargs"]),
        python_path=python_path, model_kwargs=model_kwargs,
    )


# --------------------------------------------------------------------------- the model


class LoadedModel(NamedTuple):
    """The user's model in trakjax's terms.

    Attributes:
      apply_fn: ``(params, inputs) -> outputs``.
      template: abstract params (``jax.ShapeDtypeStruct`` leaves) every checkpoint must match.
      load: ``path -> params``, restoring an orbax checkpoint into ``template``'s structure.
      grad_wrt: path prefixes of the differentiated leaves.
      kind: "linen" or "nnx".
    """

    apply_fn: Callable[..., Any]
    template: Any
    load: Callable[[Path], Any]
    grad_wrt: list[str]
    kind: str


def import_model(config: RunConfig) -> Any:
    """The object ``config.model`` names (a linen or NNX module, after calling a factory).

    Raises:
      BadInput: the module cannot be imported (any exception during import is reported), has
        no such attribute, or the attribute is not (and does not return) a Flax module.
    """
    import flax.linen as linen
    from flax import nnx

    module_name, attribute = config.model.split(":")
    for where in reversed([config.path.parent, *config.python_path]):
        if str(where) not in sys.path:
            sys.path.insert(0, str(where))
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001  (any failure to import is the user's input)
        raise BadInput(
            f"{config.path}: model = {config.model!r}: cannot import module {module_name!r} "
            f"({type(err).__name__}: {_first_line(err)})"
        ) from err
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise BadInput(
                f"{config.path}: model = {config.model!r}: module {module_name!r} "
                f"({getattr(module, '__file__', '?')}) has no attribute {attribute!r}"
            )
        obj = getattr(obj, part)
    kwargs = config.model_kwargs
    if isinstance(obj, linen.Module | nnx.Module):
        if kwargs is not None:
            raise BadInput(
                f"{config.path}: model = {config.model!r} is a {type(obj).__name__} instance, "
                "which takes no model_kwargs; name its class or a factory instead"
            )
        return obj
    if not callable(obj):
        raise BadInput(
            f"{config.path}: model = {config.model!r} is a {type(obj).__name__}; expected a "
            "flax linen or NNX Module, or a callable returning one"
        )
    try:
        obj = obj(**(kwargs or {}))
    except Exception as err:  # noqa: BLE001
        raise BadInput(
            f"{config.path}: model = {config.model!r}: calling it with model_kwargs={kwargs or {}} "
            f"failed ({type(err).__name__}: {_first_line(err)})"
        ) from err
    if not isinstance(obj, linen.Module | nnx.Module):
        raise BadInput(
            f"{config.path}: model = {config.model!r} returned a {type(obj).__name__}; "
            "expected a flax linen or NNX Module"
        )
    return obj


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def strip_value_level(tree):
    """Replace every ``{"value": leaf}`` dict by ``leaf``: ``nnx.state`` saved by orbax comes back so."""
    if isinstance(tree, Mapping):
        if set(tree) == {"value"} and not isinstance(tree["value"], Mapping):
            return tree["value"]
        return {key: strip_value_level(value) for key, value in tree.items()}
    return tree


def orbax_tree(path: Path) -> Any:
    """The abstract tree (``jax.ShapeDtypeStruct`` leaves) of the orbax checkpoint at ``path``."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path)
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
    if tree is None:
        tree = getattr(metadata, "item_metadata", metadata)
    return jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype), tree,
        is_leaf=lambda leaf: hasattr(leaf, "shape") and hasattr(leaf, "dtype"),
    )


def restore(path: Path) -> Any:
    """The orbax checkpoint at ``path`` as a tree of numpy arrays."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path)
    return jax.tree_util.tree_map(np.asarray, restored)


def _flat(tree) -> dict[str, Any]:
    import jax

    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in p): leaf
        for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _tree_lines(wanted: dict, found: dict) -> list[str]:
    lines = [f"missing {p}" for p in wanted if p not in found]
    lines += [f"unexpected {p}" for p in found if p not in wanted]
    for p, leaf in wanted.items():
        if p in found and (tuple(found[p].shape) != tuple(leaf.shape)
                           or np.dtype(found[p].dtype) != np.dtype(leaf.dtype)):
            lines.append(f"{p}: {tuple(found[p].shape)} {np.dtype(found[p].dtype)}, expected "
                         f"{tuple(leaf.shape)} {np.dtype(leaf.dtype)}")
    return lines


def load_model(config: RunConfig) -> LoadedModel:
    """Import the model and check every checkpoint's tree (orbax metadata, no array read).

    The first checkpoint's tree is the reference for linen models; NNX models give their own
    (``nnx.state`` of the module as built), which every checkpoint must match.

    Raises:
      BadInput: see :func:`import_model`; a checkpoint directory that orbax cannot read; or a
        checkpoint whose tree differs (each difference listed, up to five).
    """
    import jax
    from flax import nnx

    import trakjax.flax as trakjax_flax

    obj = import_model(config)
    trees = []
    for m, path in enumerate(config.checkpoints):
        try:
            trees.append(strip_value_level(orbax_tree(path)))
        except Exception as err:  # noqa: BLE001  (orbax raises many types for unreadable dirs)
            raise BadInput(
                f"{config.path}: checkpoints[{m}] = {path} is not a readable orbax checkpoint "
                f"({type(err).__name__}: {_first_line(err)})"
            ) from err
    if isinstance(obj, nnx.Module):
        adapted = trakjax_flax.from_nnx(obj)
        template = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), adapted.params)
        wanted = {}
        for part in (trakjax_flax.PARAMS, trakjax_flax.STATE):
            wanted.update(_flat(template[part]))
        reference = "the NNX module's state"
        apply_fn = adapted.apply_fn
        grad_wrt = adapted.grad_wrt
        kind = "nnx"

        def load(path: Path):
            flat = _flat(strip_value_level(restore(path)))
            return {
                part: jax.tree_util.tree_map_with_path(
                    lambda p, _: flat["/".join(str(getattr(k, "key", k)) for k in p)], template[part]
                )
                for part in (trakjax_flax.PARAMS, trakjax_flax.STATE)
            }
    else:
        template = trees[0]
        wanted = _flat(template)
        reference = f"checkpoints[0] = {config.checkpoints[0]}"
        kwargs = dict(config.apply_kwargs)
        adapted = trakjax_flax.from_linen(obj, template, **kwargs) if "params" in template else None
        if adapted is None:
            raise BadInput(
                f"{config.path}: checkpoints[0] = {config.checkpoints[0]} holds no 'params' "
                f"collection (top-level keys {sorted(template)}); save the variables dict that "
                "module.init returns"
            )
        apply_fn = adapted.apply_fn
        grad_wrt = adapted.grad_wrt
        kind = "linen"

        def load(path: Path):
            return restore(path)
    for m, (path, tree) in enumerate(zip(config.checkpoints, trees, strict=True)):
        lines = _tree_lines(wanted, _flat(tree))
        if lines:
            shown = "; ".join(lines[:5]) + (f"; … {len(lines) - 5} more" if len(lines) > 5 else "")
            raise BadInput(
                f"{config.path}: checkpoints[{m}] = {path} does not match {reference}: {shown}"
            )
    return LoadedModel(apply_fn, template, load, config.grad_wrt or grad_wrt, kind)


# --------------------------------------------------------------------------- data


def load_arrays(config: RunConfig) -> dict[str, Any]:
    """The ``[data]`` arrays, memory-mapped: each ``*_inputs`` an array or a dict of arrays.

    Raises:
      BadInput: a file that is not a readable ``.npy`` array.
    """
    out = {}
    for key, value in config.data.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        loaded = {}
        for name, file in items:
            try:
                array = np.load(file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise BadInput(
                    f"{config.path}: data.{key}{'.' + name if name else ''} = {file} is not a "
                    f".npy array ({_first_line(err)})"
                ) from err
            loaded[name] = array
        out[key] = loaded if isinstance(value, dict) else loaded[None]
    return out


def make_task(name: str, apply_fn):
    from trakjax import tasks

    return getattr(tasks, name)(apply_fn)


def examples(task: str, arrays: dict, split: str):
    """A split's examples as the task takes them: ``(inputs, labels)``, or inputs alone for LM."""
    inputs = arrays[f"{split}_inputs"]
    if task == "language_modeling":
        return inputs
    return (inputs, arrays[f"{split}_labels"])


def check_data(config: RunConfig, model: LoadedModel, arrays: dict) -> None:
    """Check that the data fit each other and the model, without computing the model.

    Leading axes of each split agree; ``apply_fn`` applies (``jax.eval_shape``) to the train and
    target inputs with the checkpoints' parameters; the task's own ``validate`` passes (output
    shapes, label dtype and range).

    Raises:
      BadInput: naming the data keys, their shapes and the model's complaint.
    """
    import jax

    from trakjax.tasks import describe_shapes

    task = make_task(config.task, model.apply_fn)
    for split in ("train", "target"):
        batch = examples(config.task, arrays, split)
        lengths = {}
        for key in (f"{split}_inputs", f"{split}_labels"):
            if key in arrays:
                for path, leaf in jax.tree_util.tree_leaves_with_path(arrays[key]):
                    name = f"data.{key}{jax.tree_util.keystr(path)}"
                    if np.ndim(leaf) == 0:
                        raise BadInput(f"{config.path}: {name} is a scalar; it needs a leading example axis")
                    lengths[name] = np.shape(leaf)
        if len({shape[0] for shape in lengths.values()}) > 1:
            listed = ", ".join(f"{name} {shape}" for name, shape in lengths.items())
            raise BadInput(f"{config.path}: the {split} arrays disagree on the number of examples: {listed}")
        if not next(iter(lengths.values()))[0]:
            raise BadInput(f"{config.path}: the {split} arrays hold no example")
        inputs = arrays[f"{split}_inputs"]
        sample = jax.tree_util.tree_map(lambda x: x[:2], inputs)
        try:
            jax.eval_shape(model.apply_fn, model.template, sample)
        except Exception as err:  # noqa: BLE001  (flax and jax raise many types on a shape clash)
            raise BadInput(
                f"{config.path}: data.{split}_inputs of shape {describe_shapes(inputs)} do not fit the "
                f"model {config.model} with the checkpoints' parameters ({type(err).__name__}: "
                f"{_first_line(err)})"
            ) from err
        if task.validate is not None:
            try:
                task.validate(model.template, batch)
            except ValueError as err:
                raise BadInput(f"{config.path}: data.{split}_*: {_first_line(err)}") from err


# --------------------------------------------------------------------------- the run


class Prepared(NamedTuple):
    config: RunConfig
    model: LoadedModel
    arrays: dict


def load(path: str | os.PathLike) -> Prepared:
    """Read the config and check everything it names; creates nothing.

    Raises:
      BadInput: see :func:`parse`, :func:`load_model`, :func:`check_data`, and an output
        directory that cannot be written.
    """
    from trakjax import report

    config = parse(path)
    try:
        report.check_writable(config.output, "output")
    except ValueError as err:
        raise BadInput(f"{config.path}: {err}") from err
    model = load_model(config)
    arrays = load_arrays(config)
    check_data(config, model, arrays)
    return Prepared(config, model, arrays)


def _bar(total: int, desc: str, quiet: bool, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, leave=False, dynamic_ncols=True)


def run(prepared: Prepared, *, quiet: bool = False) -> dict:
    """Featurize, finalize and score through the store; write the top-k table and picture.

    Resumable: rerunning with the same configuration skips finished checkpoints, rows and
    score blocks.

    Returns:
      :func:`trakjax.report.render`'s dict plus ``"scores"`` (the path of the score matrix).
    """
    import trakjax
    from trakjax import data as data_lib
    from trakjax import report

    config, model, arrays = prepared
    task = make_task(config.task, model.apply_fn)
    train = examples(config.task, arrays, "train")
    targets = examples(config.task, arrays, "target")
    n = data_lib.num_examples(train, "train")
    t = data_lib.num_examples(targets, "targets")
    out = config.output
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "kind": "attribute", "complete": False, "config": str(config.path), "store": "store",
        "experiment": config.experiment, "top_k": min(config.top_k, n),
        "data": {key: str(value) for key, value in config.data.items() if not isinstance(value, dict)},
        "picture_targets": list(range(min(8, t))),
        "title": f"trakjax attribute: {config.model}, {len(config.checkpoints)} checkpoints, k={config.proj_dim}",
    }
    report.write_run_record(out, record)
    traker = trakjax.TRAKer(
        task, train_set_size=n, save_dir=out / "store", proj_dim=config.proj_dim, seed=config.seed,
        projection=config.projection, lambda_reg=config.lambda_reg, grad_wrt=model.grad_wrt,
        batch_size=config.batch_size,
    )
    store = traker.store
    bar = _bar(n * len(config.checkpoints), "featurize", quiet, "example")
    for m, path in enumerate(config.checkpoints):
        if store.has_model(m) and store.is_finalized(m):
            bar.update(n)
            continue
        traker.load_checkpoint(model.load(path), model_id=m)
        for start, batch in data_lib.iterate_batches(train, config.batch_size, "train"):
            size = data_lib.num_examples(batch)
            traker.featurize(_numpy(batch), inds=np.arange(start, start + size))
            bar.update(size)
    bar.close()
    bar = _bar(len(config.checkpoints), "finalize", quiet, "checkpoint")
    for m in range(len(config.checkpoints)):
        traker.finalize_features([m])
        bar.update(1)
    bar.close()
    bar = _bar(t * len(config.checkpoints), "score", quiet, "target")
    for m, path in enumerate(config.checkpoints):
        info = store.experiment_info(config.experiment) if store.has_experiment(config.experiment) else None
        if info is not None and m in info["model_ids"] and not store.missing_targets(config.experiment, m).size:
            bar.update(t)
            continue
        traker.start_scoring_checkpoint(config.experiment, model.load(path), m, num_targets=t)
        for start, batch in data_lib.iterate_batches(targets, config.batch_size, "targets"):
            size = data_lib.num_examples(batch)
            traker.score(_numpy(batch), inds=np.arange(start, start + size))
            bar.update(size)
    bar.close()
    traker.finalize_scores(config.experiment)
    top = traker.top_k(config.experiment, record["top_k"])
    outputs = report.render(out, record, top)
    record["complete"] = True
    report.write_run_record(out, record)
    outputs["scores"] = store.root / "experiments" / config.experiment / "scores.npy"
    return outputs


def _numpy(batch):
    import jax

    return jax.tree_util.tree_map(np.asarray, batch)
