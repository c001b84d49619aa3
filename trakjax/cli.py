"""The ``trakjax`` command line (also ``python -m trakjax``).

* ``trakjax demo [--task digits|lm]``: TRAK on sklearn's digits (:mod:`trakjax.demo`) or on a
  small byte-level LM (:mod:`trakjax.demo_lm`), end to end.
* ``trakjax attribute --config FILE [--overwrite]``: your own Flax model, ``.npy`` data and
  orbax checkpoints, described by a TOML file (:mod:`trakjax.run_config`, loaded and run by
  :mod:`trakjax.inputs`); resumable; a rerun whose inputs changed is refused unless
  ``--overwrite``.
* ``trakjax show DIR``: redraw the picture, the top-k table and the explorer (``DIR/index.html``)
  of a finished run (:func:`trakjax.report.show`).

Long stages show tqdm progress bars on stderr; ``--quiet`` silences them. Errors end the command
with one line on stderr, ``trakjax: error: …``, and a non-zero exit code: 2 for bad input
(arguments, a configuration or what it names, a store or output that does not match: every
:class:`~trakjax.errors.TrakjaxError`, and ``ValueError``/``TypeError``), 1 for anything else
(I/O failures, bugs). ``TRAKJAX_DEBUG=1`` shows the traceback instead.
``TRAKJAX_JAX_CACHE=DIR`` enables JAX's persistent compilation cache in ``DIR``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trakjax.errors import TrakjaxError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``trakjax demo: error: …``) and exit code 2."""

    def error(self, message):  # noqa: D102
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_DEMO_SIZES = (
    ("out", "DIR", "output directory"), ("checkpoints", "N", "models in the ensemble"),
    ("proj_dim", "K", "projection dimension k"),
    ("train_size", "N", "training examples (digits, or windows of text)"),
    ("num_targets", "T", "targets attributed: test digits (>= 8) or held-out windows"),
    ("hidden", "H", "hidden units of the MLP"), ("width", "D", "width of the transformer"),
    ("sequence_length", "L", "bytes per window"),
    ("steps", "S", "Adam steps per model (full batch for digits)"),
    ("minibatch", "B", "windows per Adam step"),
    ("learning_rate", "LR", "Adam's learning rate"),
    ("lds_subsets", "S", "half-subset retrains for the LDS; 0 skips it"),
    ("batch_size", "B", "examples per featurize step"), ("seed", "SEED", "seed of everything"),
    ("top_k", "K", "depth of the top-k table (>= 5 for digits)"),
)
"""The demo's size flags: (settings field, metavar, help)."""
_DEMO_TYPES = {"out": Path, "learning_rate": float}


def _demo_defaults() -> dict:
    """``{task: its default settings}`` of ``trakjax demo --task``."""
    from trakjax.demo import DemoSettings
    from trakjax.demo_lm import LMDemoSettings

    return {"digits": DemoSettings(), "lm": LMDemoSettings()}


def sizes_group(parser: argparse.ArgumentParser):
    """The demo parser's "sizes" argument group (created on first use)."""
    for group in parser._action_groups:
        if group.title and group.title.startswith("sizes"):
            return group
    return parser.add_argument_group("sizes (smaller for a quicker run)")


def build_parser() -> argparse.ArgumentParser:
    from trakjax.demo import flag

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    parser = _Parser(prog="trakjax", description="TRAK data attribution for JAX and Flax.")
    parser.add_argument("--version", action="version", version=f"trakjax {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,attribute,show}",
                                parser_class=_Parser)

    demo = sub.add_parser(
        "demo", parents=[common], help="attribute digits (or a small LM's) predictions to training data",
        description="--task digits (the default): train an ensemble of small MLPs on sklearn's "
        "digits, attribute test predictions to the training images through a store, draw "
        "DIR/attributions.png, write the explorer DIR/index.html, and report accuracy, LDS and "
        "time per stage; defaults take under 3 minutes on a 2-core CPU. --task lm: train small "
        "byte-level causal transformers on windows of Python's standard-library source, attribute "
        "held-out windows to the training windows (factorized projection), and report held-out "
        "loss, LDS and time per stage, with the explorer showing decoded text; defaults take "
        "about 400 CPU seconds (4-7 minutes on an idle 2-core CPU). A size left out takes its task's default.",
    )
    demo.add_argument("--task", choices=("digits", "lm"), default="digits",
                      help="digits: MLPs on sklearn's digits; lm: a byte-level LM (default: digits)")
    for name, meta, text in _DEMO_SIZES:
        tasks = [task for task, settings in _demo_defaults().items() if name in settings._fields]
        defaults = ", ".join(f"{getattr(settings, name)} ({task})" for task, settings in
                             _demo_defaults().items() if task in tasks)
        only = "" if len(tasks) > 1 else f"; --task {tasks[0]} only"
        group = demo if name in ("out", "checkpoints", "proj_dim") else sizes_group(demo)
        group.add_argument(flag(name), dest=name, type=_DEMO_TYPES.get(name, int), default=None,
                           metavar=meta, help=f"{text} (default: {defaults}{only})")

    attribute = sub.add_parser(
        "attribute", parents=[common], help="attribute with your own model, data and checkpoints",
        description="Featurize and score over the orbax checkpoints named in a TOML config (see "
        "trakjax.run_config or README.md); resumable; writes the scores to a store, a "
        "top-k CSV/JSON and the explorer OUT/index.html.",
    )
    attribute.add_argument("--config", type=Path, required=True, metavar="FILE", help="TOML run configuration")
    attribute.add_argument(
        "--overwrite", action="store_true",
        help="recompute when the output holds a result of other inputs or settings (by default "
             "such a rerun is refused and the earlier result is left as it was)",
    )

    show = sub.add_parser(
        "show", parents=[common], help="redraw the picture, the top-k table and the explorer of a finished run",
        description="Re-render DIR/attributions.png, DIR/topk.{csv,json} and the explorer "
        "DIR/index.html from the store of a finished `trakjax demo` or `trakjax attribute` run.",
    )
    show.add_argument("dir", type=Path, metavar="DIR", help="the run's output directory")
    show.add_argument("--out", type=Path, default=None, metavar="OUT",
                      help="write the picture and tables here instead of DIR (e.g. when DIR is read-only)")
    return parser


def _version() -> str:
    from trakjax.version import __version__

    return __version__


def _configure_jax() -> None:
    cache = os.environ.get("TRAKJAX_JAX_CACHE")
    if cache:
        import jax

        Path(cache).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import logging

    # orbax and absl log every save at INFO; the CLI reports its own progress.
    for name in ("absl", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _demo(args) -> int:
    from trakjax import demo, demo_lm
    from trakjax.errors import InvalidArgumentError

    settings_type, runner = {"digits": (demo.DemoSettings, demo.run),
                             "lm": (demo_lm.LMDemoSettings, demo_lm.run)}[args.task]
    given = {name: getattr(args, name) for name, _, _ in _DEMO_SIZES if getattr(args, name) is not None}
    foreign = [demo.flag(name) for name in given if name not in settings_type._fields]
    if foreign:
        raise InvalidArgumentError(f"{', '.join(foreign)} do(es) not apply to --task {args.task}")
    runner(settings_type(**given), quiet=args.quiet)
    return EXIT_OK


def _attribute(args) -> int:
    from trakjax import inputs, report

    prepared = inputs.load(args.config)
    outputs = inputs.run(prepared, quiet=args.quiet, overwrite=args.overwrite)
    print(report.format_top_k(outputs["records"]))
    print(f"scores   {outputs['scores']}")
    print(f"top-k    {outputs['csv']}, {outputs['json']}")
    if outputs["picture"] is not None:
        print(f"picture  {outputs['picture']}")
    print(f"explorer {outputs['explorer']}  (open it in a browser)")
    return EXIT_OK


def _show(args) -> int:
    from trakjax import report

    outputs = report.show(args.dir, args.out)
    print(report.format_top_k(outputs["records"]))
    print(f"top-k    {outputs['csv']}, {outputs['json']}")
    if outputs["picture"] is not None:
        print(f"picture  {outputs['picture']}")
    print(f"explorer {outputs['explorer']}  (open it in a browser)")
    return EXIT_OK


def one_line(err: BaseException) -> str:
    """An exception as one line: its lines joined with '; '."""
    text = str(err).strip() or type(err).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    commands = {"demo": _demo, "attribute": _attribute, "show": _show}
    try:
        _configure_jax()
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("trakjax: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (every error ends as one line and an exit code)
        if os.environ.get("TRAKJAX_DEBUG"):
            raise
        bad_input = isinstance(err, TrakjaxError | ValueError | TypeError)
        kind = "error" if bad_input else f"error ({type(err).__name__})"
        print(f"trakjax {args.command}: {kind}: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT if bad_input else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
