"""How a store's recorded settings are read: one rule for stores written before a key existed.

A store records the settings that decide its scores (:meth:`trakjax.config.ResultSettings.record`,
plus the task name, N and, from the command line, the model). Versions of trakjax add keys and
change defaults; the rule for reading an older store is:

* A key the store lacks reads as the behaviour of the version that wrote it: the value
  :data:`STORE_KEYS` gives for that key (``NOT_RECORDED`` where the old version did not know or
  record it: then it is not compared, e.g. the command line's model settings, which the task
  fingerprint covers).
* A setting the caller left unset (not given to :meth:`trakjax.Config.create` or the TOML file)
  adopts the store's recorded value, so a rerun with defaults never refuses a store over a
  changed default (:func:`adopt_stored_settings`). A setting the caller gave is compared, and a
  difference is refused.

To add a key (a new result setting, a new default): add one :class:`StoreKey` line to
:data:`STORE_KEYS`, naming the :class:`~trakjax.config.ResultSettings` field it records (if
any), the value a store without it implies, and how to turn a recorded value back into the
setting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from trakjax.config import GRAD_WRT_SELECTION, Config
from trakjax.errors import TrakjaxError


class _NotRecorded:
    """Marks a key an older store did not record: it is not compared."""

    def __repr__(self) -> str:
        return "<not recorded>"


NOT_RECORDED = _NotRecorded()
"""The implied value of a key whose absence means "this store did not record it"."""
ALWAYS_RECORDED = None
"""``StoreKey.absent`` of keys every store version has written (absence reads as absence)."""


def _same(value):
    return value


def _lambda_setting(value):
    return "auto" if value is None else value


def _tuple_or_none(value):
    return None if value is None else tuple(value)


def _grad_wrt_setting(value):
    """Prefix lists come back as tuples; a callable or a mask pytree cannot be rebuilt."""
    if value is None or isinstance(value, list):
        return _tuple_or_none(value)
    raise ValueError("a callable or mask grad_wrt cannot be adopted from a record")


class StoreKey(NamedTuple):
    """One key of a store's configuration record.

    Attributes:
      setting: the :class:`~trakjax.config.ResultSettings` field it records (``None``: derived,
        e.g. ``contract_version``, or not a setting, e.g. ``task``).
      absent: what a store lacking the key implies (:data:`ALWAYS_RECORDED` if every version
        wrote it, :data:`NOT_RECORDED` if its absence means "not compared").
      to_setting: the recorded value as the setting's value (for adopting it).
      normalize: a recorded value as the current version would record it (e.g. an older
        spelling), applied to the store's values before comparing.
      applies: whether ``absent`` applies to a given store record (e.g. only factorized stores
        have a second stage).
      auto_adopts: the setting's ``"auto"`` asks trakjax to choose, and the store records what
        was chosen: a given ``"auto"`` adopts the store's value like an unset setting
        (``projection``, ``kernel``).
    """

    setting: str | None = None
    absent: Any = ALWAYS_RECORDED
    to_setting: Callable[[Any], Any] = _same
    normalize: Callable[[Any], Any] = _same
    applies: Callable[[dict], bool] = lambda stored: True
    auto_adopts: bool = False


def _factorized(stored: dict) -> bool:
    return stored.get("projection") == "factorized"


def _normalize_grad_wrt(value):
    """trakjax <= 0.2 recorded a callable as ``"callable module.qualname"`` and a mask as
    ``"mask pytree"``; both now read as their resolved selection."""
    if isinstance(value, str) and (value.startswith("callable") or value == "mask pytree"):
        return GRAD_WRT_SELECTION
    return value


STORE_KEYS: dict[str, StoreKey] = {
    "task": StoreKey(),
    "train_set_size": StoreKey(),
    "projection": StoreKey("projection", auto_adopts=True),
    "proj_dim": StoreKey("proj_dim"),
    "seed": StoreKey("seed"),
    "contract_version": StoreKey(),
    "grad_wrt": StoreKey("grad_wrt", to_setting=_grad_wrt_setting, normalize=_normalize_grad_wrt),
    "lambda_reg": StoreKey("lambda_reg", to_setting=_lambda_setting),
    "reference_compat": StoreKey("reference_compat"),
    "dtype": StoreKey("dtype"),
    "precision": StoreKey("precision"),
    "factor_dims": StoreKey("factor_dims", to_setting=_tuple_or_none),
    "factor_kind": StoreKey("factor_kind"),
    # stores from before the Gauss–Newton kernel (trakjax <= 0.2) ran TRAK's kernel
    "kernel": StoreKey("kernel", absent="trak", auto_adopts=True),
    # factorized stores from before the sparse second stage (trakjax <= 0.2) used the dense one;
    # a store records `sparsity` only with the sparse stage
    "second_stage": StoreKey("second_stage", absent="dense", applies=_factorized),
    "sparsity": StoreKey("sparsity"),
    # the command line's model settings (trakjax attribute), recorded since trakjax 0.3
    "model": StoreKey(absent=NOT_RECORDED),
    "model_kwargs": StoreKey(absent=NOT_RECORDED),
    "apply_kwargs": StoreKey(absent=NOT_RECORDED),
}
"""Every key of a store's configuration record and how an older store's record reads."""


def implied_by_absence(key: str, otherwise: Any) -> Any:
    """What a store lacking ``key`` implies, where :data:`STORE_KEYS` gives a value; else
    ``otherwise``."""
    entry = STORE_KEYS.get(key)
    if entry is None or entry.absent is ALWAYS_RECORDED or entry.absent is NOT_RECORDED:
        return otherwise
    return entry.absent


def stored_as_current(stored: dict, requested: dict, every_key: bool = False) -> dict:
    """The store's record as this version reads it: older spellings normalized, and each key
    the store lacks but this version records (with ``every_key``, any key of
    :data:`STORE_KEYS`) filled with what its absence implies (a key marked
    :data:`NOT_RECORDED` takes the requested value: it is not compared)."""
    read = {}
    for key, value in stored.items():
        entry = STORE_KEYS.get(key)
        read[key] = entry.normalize(value) if entry else value
    for key in STORE_KEYS if every_key else requested:
        entry = STORE_KEYS.get(key)
        if key in read or entry is None or entry.absent is ALWAYS_RECORDED or not entry.applies(stored):
            continue
        if entry.absent is NOT_RECORDED:
            if key in requested:
                read[key] = requested[key]
            continue
        read[key] = entry.absent
    return read


def adopt_stored_settings(config: Config, stored: dict) -> Config:
    """``config`` with every result setting the caller left unset taken from the store's record.

    Args:
      config: the caller's :class:`~trakjax.config.Config` (its :meth:`~Config.given_settings`
        say which result settings were given).
      stored: the store's configuration record.

    Returns:
      The config to run with. A recorded value that cannot become a setting (a callable
      ``grad_wrt``) or a combination that is not valid leaves the caller's value, so the store
      comparison reports the difference.
    """
    given = config.given_settings()
    read = stored_as_current(stored, config.result.record(), every_key=True)
    adopted = {}
    for key, entry in STORE_KEYS.items():
        if entry.setting is None or key not in read:
            continue
        if entry.setting in given and not (entry.auto_adopts and getattr(config.result, entry.setting) == "auto"):
            continue
        if read[key] is NOT_RECORDED:
            continue
        try:
            value = entry.to_setting(read[key])
        except ValueError:
            continue
        if value != getattr(config.result, entry.setting):
            adopted[entry.setting] = value
    if not adopted:
        return config
    try:
        candidate = config.replace(**adopted)
    except TrakjaxError:
        return config
    return candidate.with_given(given)
