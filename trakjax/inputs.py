"""The inputs a run configuration names, loaded and checked without computing anything.

* :func:`import_model`: the user's Flax module (linen or NNX), imported from ``"module:attr"``.
* :func:`load_model`: that module in trakjax's terms (``apply_fn``, parameter template, how to
  restore each orbax checkpoint into it, ``grad_wrt``), with every checkpoint's tree checked from
  orbax's metadata alone.
* :func:`load_arrays` and :func:`check_data`: the ``.npy`` data, memory-mapped, checked against
  each other and against the model (``jax.eval_shape``) and the task's own checks.

Every failure is a :class:`~trakjax.errors.ConfigError` naming the configuration file, the key
and what is wrong (the command line prints it as one line and exits with code 2).
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from trakjax import checkpoints as checkpoints_lib
from trakjax import featurize, manifest, report, run_config, tasks, trees
from trakjax import flax as trakjax_flax
from trakjax import store as store_lib
from trakjax.errors import ConfigError, StoreError, TrakjaxError
from trakjax.run_config import RunConfig
from trakjax.session import TRAKer
from trakjax.tasks import describe_shapes


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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


def _import_module(config: RunConfig, module_name: str):
    for where in reversed([config.path.parent, *config.python_path]):
        if str(where) not in sys.path:
            sys.path.insert(0, str(where))
    try:
        return importlib.import_module(module_name)
    except (Exception, SystemExit) as err:  # noqa: BLE001  (any failure to import is the user's input)
        raise ConfigError(
            f"{config.path}: model = {config.model!r}: cannot import module {module_name!r} "
            f"({type(err).__name__}: {first_line(err)})"
        ) from err


def _call_factory(config: RunConfig, factory):
    kwargs = config.model_kwargs or {}
    try:
        return factory(**kwargs)
    except (Exception, SystemExit) as err:  # noqa: BLE001
        raise ConfigError(
            f"{config.path}: model = {config.model!r}: calling it with model_kwargs={kwargs} "
            f"failed ({type(err).__name__}: {first_line(err)})"
        ) from err


def import_model(config: RunConfig) -> Any:
    """The object ``config.model`` names (a linen or NNX module, after calling a factory).

    Raises:
      ConfigError: the module cannot be imported (any exception during import, ``SystemExit``
        included, is reported), has no such attribute, or the attribute is not (and does not
        return) a Flax module.
    """
    import flax.linen as linen
    from flax import nnx

    module_name, attribute = config.model.split(":")
    obj = module = _import_module(config, module_name)
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(
                f"{config.path}: model = {config.model!r}: module {module_name!r} "
                f"({getattr(module, '__file__', '?')}) has no attribute {attribute!r}"
            )
        obj = getattr(obj, part)
    if isinstance(obj, linen.Module | nnx.Module):
        if config.model_kwargs is not None:
            raise ConfigError(
                f"{config.path}: model = {config.model!r} is a {type(obj).__name__} instance, "
                "which takes no model_kwargs; name its class or a factory instead"
            )
        return obj
    if not callable(obj):
        raise ConfigError(
            f"{config.path}: model = {config.model!r} is a {type(obj).__name__}; expected a "
            "flax linen or NNX Module, or a callable returning one"
        )
    obj = _call_factory(config, obj)
    if not isinstance(obj, linen.Module | nnx.Module):
        raise ConfigError(
            f"{config.path}: model = {config.model!r} returned a {type(obj).__name__}; "
            "expected a flax linen or NNX Module"
        )
    return obj


def _checkpoint_trees(config: RunConfig) -> list:
    found = []
    for m, path in enumerate(config.checkpoints):
        try:
            found.append(checkpoints_lib.strip_value_level(checkpoints_lib.abstract_tree(path)))
        except TrakjaxError as err:
            raise ConfigError(f"{config.path}: checkpoints[{m}] = {path}: {first_line(err)}") from err
    return found


def _nnx_model(obj) -> LoadedModel:
    adapted = trakjax_flax.from_nnx(obj)
    template = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), adapted.params)
    parts = (trakjax_flax.PARAMS, trakjax_flax.STATE)

    def load(path: Path):
        flat = trees.leaves_by_path(checkpoints_lib.strip_value_level(checkpoints_lib.restore(path)))
        return {
            part: jax.tree_util.tree_map_with_path(lambda p, _: flat[trees.path_string(p)], template[part])
            for part in parts
        }

    return LoadedModel(adapted.apply_fn, template, load, adapted.grad_wrt, "nnx")


def _linen_model(config: RunConfig, obj, template) -> LoadedModel:
    if not isinstance(template, dict) or "params" not in template:
        keys = sorted(template) if isinstance(template, dict) else type(template).__name__
        raise ConfigError(
            f"{config.path}: checkpoints[0] = {config.checkpoints[0]} holds no 'params' "
            f"collection (top-level keys {keys}); save the variables dict that module.init returns"
        )
    adapted = trakjax_flax.from_linen(obj, template, **config.apply_kwargs)
    return LoadedModel(adapted.apply_fn, template, checkpoints_lib.restore, adapted.grad_wrt, "linen")


def load_model(config: RunConfig) -> LoadedModel:
    """Import the model and check every checkpoint's tree (orbax metadata, no array read).

    The first checkpoint's tree is the reference for linen models; NNX models give their own
    (``nnx.state`` of the module as built), which every checkpoint must match.

    Raises:
      ConfigError: see :func:`import_model`; a checkpoint directory that orbax cannot read; or a
        checkpoint whose tree differs (each difference listed, up to five).
    """
    from flax import nnx

    obj = import_model(config)
    found = _checkpoint_trees(config)
    if isinstance(obj, nnx.Module):
        model = _nnx_model(obj)
        reference = "the NNX module's state"
        # an nnx.State (or its pure dict) holds params and state side by side, without the
        # adapter's "params"/"state" split
        wanted = trees.tree_record({**trees.leaves_by_path(model.template["params"]),
                                    **trees.leaves_by_path(model.template["state"])})
    else:
        model = _linen_model(config, obj, found[0])
        reference = f"checkpoints[0] = {config.checkpoints[0]}"
        wanted = trees.tree_record(model.template)
    for m, (path, tree) in enumerate(zip(config.checkpoints, found, strict=True)):
        lines = trees.tree_differences(wanted, trees.tree_record(trees.leaves_by_path(tree)), check_order=False,
                                       names=("expected tree", "checkpoint"))
        if lines:
            shown = "; ".join(lines[:5]) + (f"; … {len(lines) - 5} more" if len(lines) > 5 else "")
            raise ConfigError(f"{config.path}: checkpoints[{m}] = {path} does not match {reference}: {shown}")
    return model._replace(grad_wrt=config.grad_wrt or model.grad_wrt)


# --------------------------------------------------------------------------- data


def load_arrays(config: RunConfig) -> dict[str, Any]:
    """The ``[data]`` arrays, memory-mapped: each ``*_inputs`` an array or a dict of arrays.

    Raises:
      ConfigError: a file that is not a readable ``.npy`` array.
    """
    out = {}
    for key, value in config.data.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        loaded = {}
        for name, file in items:
            try:
                loaded[name] = np.load(file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise ConfigError(
                    f"{config.path}: data.{key}{'.' + name if name else ''} = {file} is not a "
                    f".npy array ({first_line(err)})"
                ) from err
        out[key] = loaded if isinstance(value, dict) else loaded[None]
    return out


def make_task(name: str, apply_fn):
    """The :mod:`trakjax.tasks` task ``name`` over ``apply_fn``."""
    return getattr(tasks, name)(apply_fn)


def examples(task: str, arrays: dict, split: str):
    """A split's examples as the task takes them: ``(inputs, labels)``, or inputs alone for LM."""
    inputs = arrays[f"{split}_inputs"]
    if task == "language_modeling":
        return inputs
    return (inputs, arrays[f"{split}_labels"])


def _check_lengths(config: RunConfig, arrays: dict, split: str) -> None:
    lengths = {}
    for key in (f"{split}_inputs", f"{split}_labels"):
        for path, leaf in jax.tree_util.tree_leaves_with_path(arrays.get(key, {})):
            name = f"data.{key}{jax.tree_util.keystr(path)}"
            if np.ndim(leaf) == 0:
                raise ConfigError(f"{config.path}: {name} is a scalar; it needs a leading example axis")
            lengths[name] = np.shape(leaf)
    if len({shape[0] for shape in lengths.values()}) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in lengths.items())
        raise ConfigError(f"{config.path}: the {split} arrays disagree on the number of examples: {listed}")
    if not next(iter(lengths.values()))[0]:
        raise ConfigError(f"{config.path}: the {split} arrays hold no example")


def check_data(config: RunConfig, model: LoadedModel, arrays: dict) -> None:
    """Check that the data fit each other and the model, without computing the model.

    Leading axes of each split agree; ``apply_fn`` applies (``jax.eval_shape``) to the train and
    target inputs with the checkpoints' parameters; the task's own ``validate`` passes (output
    shapes, label dtype and range).

    Raises:
      ConfigError: naming the data keys, their shapes and the model's complaint.
    """
    task = make_task(config.task, model.apply_fn)
    for split in ("train", "target"):
        _check_lengths(config, arrays, split)
        inputs = arrays[f"{split}_inputs"]
        try:
            jax.eval_shape(model.apply_fn, model.template, jax.tree_util.tree_map(lambda x: x[:2], inputs))
        except Exception as err:  # noqa: BLE001  (flax and jax raise many types on a shape clash)
            raise ConfigError(
                f"{config.path}: data.{split}_inputs of shape {describe_shapes(inputs)} do not fit the "
                f"model {config.model} with the checkpoints' parameters ({type(err).__name__}: "
                f"{first_line(err)})"
            ) from err
        if task.validate is not None:
            try:
                task.validate(model.template, examples(config.task, arrays, split))
            except ValueError as err:
                raise ConfigError(f"{config.path}: data.{split}_*: {first_line(err)}") from err


# --------------------------------------------------------------------------- the configured run


class Prepared(NamedTuple):
    """A configuration with its model and data, all checked."""

    config: RunConfig
    model: LoadedModel
    arrays: dict


def load(path) -> Prepared:
    """Read the config and check everything it names; creates nothing.

    Raises:
      ConfigError: see :func:`trakjax.run_config.parse`, :func:`load_model`, :func:`check_data`,
        an output directory that cannot be written, or a ``grad_wrt`` that selects nothing.
    """
    config = run_config.parse(path)
    try:
        report.check_writable(config.output, "output")
    except TrakjaxError as err:
        raise ConfigError(f"{config.path}: {err}") from err
    model = load_model(config)
    try:
        featurize.select_parameters(model.template, model.grad_wrt)
    except TrakjaxError as err:
        raise ConfigError(f"{config.path}: grad_wrt: {first_line(err)}") from err
    arrays = load_arrays(config)
    check_data(config, model, arrays)
    return Prepared(config, model, arrays)


def model_record(config: RunConfig) -> dict:
    """The model settings a store records and compares: ``model``, ``model_kwargs`` and
    ``apply_kwargs`` (as JSON, values JSON cannot hold as their text)."""
    record = {"model": config.model, "model_kwargs": config.model_kwargs or {},
              "apply_kwargs": config.apply_kwargs}
    return json.loads(json.dumps(record, default=str, sort_keys=True))


def _open_session(prepared: Prepared, overwrite: bool):
    """The TRAKer over ``output/store``; with ``overwrite``, a store of other settings has its
    files removed first (only trakjax's own files: anything else is listed and refused)."""
    config, model, arrays = prepared
    root = config.output / run_config.STORE_DIR
    settings = config.settings.replace(grad_wrt=model.grad_wrt)
    task = make_task(config.task, model.apply_fn)
    n = int(np.shape(jax.tree_util.tree_leaves(examples(config.task, arrays, "train"))[0])[0])

    def session():
        return TRAKer(task, n, root, settings, params_template=model.template,
                      store_record=model_record(config))

    try:
        return session()
    except StoreError:
        if not (overwrite and (root / store_lib.METADATA_FILE).is_file()):
            raise
    manifest.remove_own_files(root, manifest.STORE, what="the store")
    return session()


TOKEN_TASKS = ("language_modeling", "text_classification")
"""Tasks whose inputs are token ids (shown as text or ids in the explorer)."""


def run_summary(config: RunConfig, num_train: int, num_targets: int, seconds: dict) -> dict:
    """What the explorer shows on top of an attribute run: the settings, the sizes and the
    seconds per stage of this command (a resumed run times only what it computed)."""
    settings = {"model": config.model, "task": config.task, "checkpoints": len(config.checkpoints),
                **config.settings.result.record(), "batch_size": config.settings.run.batch_size}
    settings["lambda_reg"] = settings["lambda_reg"] if settings["lambda_reg"] is not None else "auto"
    return {"settings": settings, "train examples": num_train, "targets": num_targets, "seconds": seconds}


def run(prepared: Prepared, *, quiet: bool = False, overwrite: bool = False) -> dict:
    """Featurize, finalize and score through the store; write the top-k table and picture.

    Resumable: rerunning with the same configuration and inputs skips finished checkpoints,
    rows and score blocks. A rerun whose inputs or settings changed is refused
    (:class:`~trakjax.errors.InputsChangedError`, :class:`~trakjax.errors.StoreError`) and
    leaves the earlier result as it was, unless ``overwrite``: then it is recomputed.

    Returns:
      :func:`trakjax.report.render`'s dict plus ``"scores"`` (the path of the score matrix).
    """
    config, model, arrays = prepared
    report.check_output_directory(config.output, overwrite=overwrite)
    traker = _open_session(prepared, overwrite)
    train = examples(config.task, arrays, "train")
    targets = examples(config.task, arrays, "target")
    n, t = traker.train_set_size, int(np.shape(jax.tree_util.tree_leaves(targets)[0])[0])
    record = {
        "kind": "attribute", "complete": False, "config": str(config.path), "store": "store",
        "experiment": config.experiment, "top_k": min(config.top_k, n),
        "data": {key: str(value) for key, value in config.data.items() if not isinstance(value, dict)},
        "picture_targets": list(range(min(8, t))),
        "title": f"trakjax attribute: {config.model}, {len(config.checkpoints)} checkpoints, "
                 f"k={traker.config.result.requested_dim}, kernel {traker.config.result.kernel}",
        "inputs": ("tokens" if config.task in TOKEN_TASKS else
                   "image" if config.task == "image_classification" else "auto"),
    }
    if config.decoder is not None:
        record["decoder"] = str(config.decoder)
    config.output.mkdir(parents=True, exist_ok=True)
    previous = report.read_run_record(config.output, missing_ok=True, check=False)
    if overwrite or not (previous or {}).get("complete"):
        report.write_run_record(config.output, record)
    loaders = [functools.partial(model.load, path) for path in config.checkpoints]
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        seconds[stage] = time.perf_counter() - clock[0]
        clock[0] = time.perf_counter()

    traker.run(loaders, train, targets, config.experiment, progress=not quiet, overwrite=overwrite,
               on_stage=lap)
    top = traker.top_k(config.experiment, record["top_k"])
    record["summary"] = run_summary(config, n, t, seconds)
    outputs = report.render(config.output, record, top)
    report.write_run_record(config.output, dict(record, complete=True))
    outputs["scores"] = traker.store.root / "experiments" / config.experiment / "scores.npy"
    return outputs
