"""One frozen configuration of a TRAK run, validated once, before any work.

A :class:`Config` has two halves:

* :class:`ResultSettings` determine the scores: the projection, k, its seed, λ, which parameters
  are differentiated, the feature storage dtype, the matmul precision and the reference
  library's rescaling. Stores record them (:meth:`ResultSettings.record`) and refuse to mix
  results made with others.
* :class:`RunSettings` change only how the work runs: batch size, projection backend, memory
  budgets, the device mesh and progress bars. They are never recorded.

Every public entry point (:func:`trakjax.attribute`, :func:`trakjax.self_influence`,
:func:`trakjax.train_features`, :class:`trakjax.TRAKer`, the TOML run configuration) takes a
``config`` and, for convenience, the same settings as keyword arguments, which build or
override one (:meth:`Config.create`)::

    config = trakjax.Config.create(proj_dim=512, lambda_reg=0.1, batch_size=128)
    scores = trakjax.attribute(task, checkpoints, train, targets, config)
    scores = trakjax.attribute(task, checkpoints, train, targets, proj_dim=512, lambda_reg=0.1)

Every setting is checked when the config is built, and a bad one raises
:class:`~trakjax.errors.InvalidArgumentError` or :class:`~trakjax.errors.ArgumentTypeError`
naming the setting, its value and what is valid. Numpy integers and floats count as Python
ones. Layers below trust a built config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trakjax import projection, randomness, sharding
from trakjax.errors import ArgumentTypeError, InvalidArgumentError
from trakjax.factorized.plan import check_factor_dims

DEFAULT_PROJ_DIM = 2048
"""k for random projections when ``proj_dim`` is ``None``."""
AUTO = "auto"
"""``lambda_reg="auto"``: λ chosen per checkpoint without retraining (:mod:`trakjax.solve`)."""
AUTO_PROJECTION = "auto"
"""``projection="auto"`` (the default): the factorized family when the factorizable leaves hold
most differentiated parameters, dense Rademacher otherwise; resolved once, from a trace of one
example, by :func:`trakjax.featurize.choose_projection`, and recorded resolved."""
PROJECTIONS = (*randomness.PROJECTION_KINDS, "factorized", AUTO_PROJECTION)
FACTOR_KINDS = ("rademacher", "normal")
SECOND_STAGES = ("dense", "sparse")
DEFAULT_SECOND_STAGE = "sparse"
"""The factorized family's second stage when ``second_stage`` is ``None`` (paired LDS against the
dense stage on digits within 0.005 at k = 128, 512, 2048: benchmarks/README.md)."""
DEFAULT_SPARSITY = 2
"""s, the sparse second stage's nonzeros per input, when ``sparsity`` is ``None``."""
FEATURE_DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("highest", "high", "default")
BACKENDS = ("xla", "pallas", "auto")
TRAK_KERNEL = "trak"
"""``kernel="trak"``: TRAK's (ΦᵀΦ + λI)⁻¹ (Park et al., 2023)."""
GAUSS_NEWTON_KERNEL = "gauss-newton"
"""``kernel="gauss-newton"``: the curvature-weighted (ΦᵀHΦ + λI)⁻¹, H = diag(h_i) (:mod:`trakjax.curvature`)."""
KERNELS = (AUTO, TRAK_KERNEL, GAUSS_NEWTON_KERNEL)
DEFAULT_GRAD_MEMORY_BYTES = 4 * 2**30
"""Default budget for one micro-batch of per-example gradients (per device)."""
DEFAULT_MATRIX_CACHE_BYTES = 4 * 2**30
"""Default budget for holding R materialized for a checkpoint (0 disables it)."""

GradWrt = None | Sequence[str] | Callable[[str, Any], bool] | Any


# --------------------------------------------------------------------------- value checks


def is_int(value) -> bool:
    """An int or numpy integer, not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_real(value) -> bool:
    """An int, float or numpy number, not a bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def check_int(name: str, value, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int in [low, high), else a trakjax error naming ``name``."""
    valid = f"an int >= {low}" if high is None else f"an int in [{low}, {high})"
    if not is_int(value):
        raise ArgumentTypeError(f"{name} must be {valid}, got {value!r} ({type(value).__name__})")
    if int(value) < low or (high is not None and int(value) >= high):
        raise InvalidArgumentError(f"{name} must be {valid}, got {int(value)}")
    return int(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a trakjax error naming ``name``."""
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_lambda(value) -> float | str:
    """``lambda_reg``: ``"auto"`` (also for ``None``) or a finite float >= 0."""
    if value is None or (isinstance(value, str) and value == AUTO):
        return AUTO
    if isinstance(value, str):
        raise InvalidArgumentError(f"lambda_reg must be 'auto', None or a float >= 0, got {value!r}")
    if not is_real(value):
        raise ArgumentTypeError(
            f"lambda_reg must be 'auto', None or a float >= 0, got {value!r} ({type(value).__name__})"
        )
    if not (math.isfinite(float(value)) and float(value) >= 0):
        raise InvalidArgumentError(f"lambda_reg must be None or a finite float >= 0 (or 'auto'), got {value!r}")
    return float(value)


def check_dtype(value) -> str:
    """The name of a feature storage dtype (float32, bfloat16 or float16)."""
    try:
        name = jnp.dtype(value).name
    except TypeError as err:
        raise InvalidArgumentError(f"dtype must be one of {FEATURE_DTYPES}, got {value!r}") from err
    if name not in FEATURE_DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {FEATURE_DTYPES}, got {value!r}")
    return name


def check_grad_wrt(value) -> GradWrt:
    """``grad_wrt``: None, a sequence of path prefixes (kept as a tuple), a callable, or a mask
    pytree; the paths are matched against parameters later (:func:`trakjax.featurize.select_parameters`)."""
    if isinstance(value, str):
        raise ArgumentTypeError(
            f"grad_wrt must be a sequence of path prefixes, not a single string; use [{value!r}]"
        )
    if isinstance(value, list | tuple) and value and all(isinstance(s, str) for s in value):
        return tuple(value)
    if isinstance(value, list | tuple) and not value:
        raise InvalidArgumentError("grad_wrt is an empty list: it would select no parameter")
    return value


GRAD_WRT_SELECTION = "resolved selection (parameters.differentiated.paths)"
"""How stores record a callable or mask ``grad_wrt``: by the leaves it selects (the store's
``parameters.differentiated.paths``, compared on its own), never by the callable's name."""


def describe_grad_wrt(grad_wrt) -> Any:
    """A JSON-able description of ``grad_wrt`` for stores: null, the prefixes, or, for a
    callable or a mask, :data:`GRAD_WRT_SELECTION` (the selection itself is recorded apart)."""
    if grad_wrt is None:
        return None
    if isinstance(grad_wrt, list | tuple) and all(isinstance(s, str) for s in grad_wrt):
        return list(grad_wrt)
    return GRAD_WRT_SELECTION


# --------------------------------------------------------------------------- the two halves


@dataclasses.dataclass(frozen=True)
class ResultSettings:
    """Settings that determine the scores; recorded in stores and compared on reopening.

    Attributes:
      projection: ``"rademacher"`` or ``"normal"`` (random R, the contract of
        :mod:`trakjax.randomness`), ``"identity"`` (R = I, k = P), ``"factorized"`` (per-layer
        Kronecker projections of gradients never built, :mod:`trakjax.factorized`), or ``"auto"``
        (the default: ``"factorized"`` when the factorizable leaves hold most differentiated
        parameters, ``"rademacher"`` otherwise, resolved once per run from a trace of one example
        and recorded resolved; ``reference_compat=True`` resolves it to ``"rademacher"``).
      proj_dim: k; ``None`` means :data:`DEFAULT_PROJ_DIM` for random projections and P for
        ``"identity"`` (which also accepts P itself). For ``"factorized"``, the final dimension
        (no second projection when it is at least K_fac, the factorized features' count), or
        ``"all"`` to keep all K_fac features.
      factor_dims: ``"factorized"`` only: factor sizes, an int for both sides or a pair
        ``(k_in, k_out)``; ``None`` (the default) sizes them from ``proj_dim`` so that K_fac
        follows it (:func:`trakjax.factorized.plan.auto_factor_size`), resolved once per run
        from a trace of one example (:func:`trakjax.featurize.resolve_auto_projection`) and
        recorded resolved.
      factor_kind: ``"factorized"`` only: the factors' entries, ``"rademacher"`` or ``"normal"``.
      second_stage: ``"factorized"`` only: how K_fac features are compressed to ``proj_dim``,
        ``"dense"`` (a K_fac × k random matrix, O(K_fac·k) per example) or ``"sparse"`` (a
        count-sketch map, O(s·K_fac), :mod:`trakjax.sparse_projection`); ``None``:
        :data:`DEFAULT_SECOND_STAGE`.
      sparsity: ``second_stage="sparse"`` only: s, the output coordinates each input feature
        goes to (``None``: :data:`DEFAULT_SPARSITY`).
      seed: the projection seed, in [0, 2⁶⁴) (also seeds tasks' PRNG keys).
      lambda_reg: ``"auto"`` (also written ``None``) for λ chosen per checkpoint without
        retraining (:func:`trakjax.solve.auto_lambda`), or an absolute float ≥ 0 (the reference
        library's meaning; ``0.0`` is exactly zero and raises if ΦᵀΦ is singular).
      grad_wrt: which parameters to differentiate (:func:`trakjax.featurize.select_parameters`).
      dtype: storage dtype of features, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (Gram
        and solve stay float32 or better).
      precision: matmul precision of the projection, ``"highest"`` (full float32), ``"high"``
        or ``"default"`` (faster passes on accelerators).
      reference_compat: rescale each A_m⁻¹ by 1/mean|A_m⁻¹| as the reference library does
        (with TRAK's kernel only: an explicit ``kernel="gauss-newton"`` raises).
      kernel: the train-side kernel A_m: ``"gauss-newton"`` (ΦᵀHΦ + λI, H = diag(h_i) the loss
        curvature in the output, from the task's ``ridge_terms``), ``"trak"`` (ΦᵀΦ + λI) or
        ``"auto"`` (also written ``None``; the default): Gauss–Newton where the task gives a
        curvature and ``reference_compat`` is off, else TRAK's (:func:`trakjax.curvature.resolve_kernel`;
        a session reopening a store adopts the store's kernel).
    """

    projection: str = AUTO_PROJECTION
    proj_dim: int | None = None
    seed: int = 0
    lambda_reg: float | str = AUTO
    grad_wrt: GradWrt = None
    dtype: str = "float32"
    precision: str = "highest"
    reference_compat: bool = False
    factor_dims: int | tuple[int, int] | None = None
    factor_kind: str = "rademacher"
    kernel: str | None = AUTO
    second_stage: str | None = None
    sparsity: int | None = None

    def __post_init__(self):
        fix = object.__setattr__
        fix(self, "projection", check_choice("projection", self.projection, PROJECTIONS))
        if self.projection == AUTO_PROJECTION and self.reference_compat is True:
            fix(self, "projection", "rademacher")  # the reference library's family
        if self.projection == AUTO_PROJECTION:
            dataclasses.replace(self, projection="factorized")  # check the factorized settings now
        factorized = self.projection == "factorized"
        if self.proj_dim == "all" and isinstance(self.proj_dim, str):
            if not factorized:
                raise InvalidArgumentError(
                    f"proj_dim='all' keeps every factorized feature: it needs projection='factorized', "
                    f"got projection={self.projection!r}"
                )
        elif self.proj_dim is not None:
            if is_int(self.proj_dim) and self.proj_dim < 1:
                raise InvalidArgumentError(f"proj_dim must be >= 1, got {self.proj_dim}")
            fix(self, "proj_dim", check_int("proj_dim", self.proj_dim))
        self._check_factor_settings(factorized)
        fix(self, "seed", check_int("seed", self.seed, 0, 2**64))
        fix(self, "lambda_reg", check_lambda(self.lambda_reg))
        fix(self, "grad_wrt", check_grad_wrt(self.grad_wrt))
        fix(self, "dtype", check_dtype(self.dtype))
        fix(self, "precision", check_choice("precision", self.precision, PRECISIONS))
        if not isinstance(self.reference_compat, bool | np.bool_):
            raise ArgumentTypeError(f"reference_compat must be a bool, got {self.reference_compat!r}")
        fix(self, "reference_compat", bool(self.reference_compat))
        fix(self, "kernel", check_choice("kernel", AUTO if self.kernel is None else self.kernel, KERNELS))
        if self.reference_compat and self.kernel == GAUSS_NEWTON_KERNEL:
            raise InvalidArgumentError(
                "kernel='gauss-newton' with reference_compat=True: reference_compat reproduces the "
                "reference library (trak 0.3.2), which has only TRAK's kernel; use kernel='trak' "
                "(or leave kernel unset) with reference_compat=True, or reference_compat=False"
            )

    def _check_factor_settings(self, factorized: bool) -> None:
        fix = object.__setattr__
        if self.projection == AUTO_PROJECTION:  # checked above; kept as given until resolved
            return
        if not factorized:
            for name in ("factor_dims", "second_stage", "sparsity"):
                if getattr(self, name) is not None:
                    raise InvalidArgumentError(
                        f"{name}={getattr(self, name)!r} applies to projection='factorized' only, "
                        f"got projection={self.projection!r}"
                    )
            return
        if self.factor_dims is not None:  # None: sized from proj_dim when the plan is resolved
            fix(self, "factor_dims", check_factor_dims(self.factor_dims))
        fix(self, "factor_kind", check_choice("factor_kind", self.factor_kind, FACTOR_KINDS))
        self._check_second_stage()

    def _check_second_stage(self) -> None:
        """Check ``second_stage``/``sparsity``; ``None`` stays (unset: the default, or a store's value)."""
        if self.second_stage is not None:
            check_choice("second_stage", self.second_stage, SECOND_STAGES)
        if self.sparsity is None:
            return
        if self.resolved_second_stage != "sparse":
            raise InvalidArgumentError(
                f"sparsity={self.sparsity!r} applies to second_stage='sparse' only, got "
                f"second_stage={self.resolved_second_stage!r}"
            )
        if isinstance(self.sparsity, bool) or not is_int(self.sparsity) or self.sparsity < 1:
            raise InvalidArgumentError(f"sparsity must be a positive int, got {self.sparsity!r}")
        if is_int(self.proj_dim) and self.sparsity > self.proj_dim:
            raise InvalidArgumentError(f"sparsity must be at most proj_dim={self.proj_dim}, got {self.sparsity}")
        object.__setattr__(self, "sparsity", int(self.sparsity))

    @property
    def resolved_second_stage(self) -> str:
        """``second_stage`` with ``None`` read as :data:`DEFAULT_SECOND_STAGE`."""
        return DEFAULT_SECOND_STAGE if self.second_stage is None else self.second_stage

    @property
    def resolved_sparsity(self) -> int:
        """``sparsity`` with ``None`` read as :data:`DEFAULT_SPARSITY`."""
        return DEFAULT_SPARSITY if self.sparsity is None else self.sparsity

    @property
    def storage_dtype(self) -> np.dtype:
        """The feature storage dtype as a numpy dtype (bfloat16 from ml_dtypes)."""
        return np.dtype(jnp.dtype(self.dtype))

    def resolve_projection(self, family: str) -> ResultSettings:
        """These settings with ``projection="auto"`` replaced by ``family`` (``"factorized"`` or
        ``"rademacher"``; the factor settings dropped for the latter); unchanged otherwise."""
        if self.projection != AUTO_PROJECTION:
            return self
        if family == "factorized":
            return dataclasses.replace(self, projection=family)
        return dataclasses.replace(self, projection=family, factor_dims=None, second_stage=None, sparsity=None)

    def projection_dim(self, num_params: int) -> int:
        """The effective k for ``num_params`` differentiated parameters (P for ``"identity"``).

        Raises:
          InvalidArgumentError: for ``"identity"`` with a ``proj_dim`` other than P.
        """
        if self.projection in ("factorized", AUTO_PROJECTION):
            raise InvalidArgumentError(
                f"projection={self.projection!r} has no fixed k: its final dimension comes from the "
                "factorization plan (trakjax.featurize.prepare_checkpoint)"
            )
        return projection.check_kind_and_dim(self.projection, self.requested_dim, num_params)

    @property
    def requested_dim(self) -> int | str | None:
        """``proj_dim`` with ``None`` resolved for random projections (None stays for identity)."""
        if self.proj_dim is None and self.projection != "identity":
            return DEFAULT_PROJ_DIM
        return self.proj_dim

    def record(self) -> dict:
        """The JSON record stores keep (the reference's absolute λ, or null for ``"auto"``)."""
        record = {
            "projection": self.projection,
            "proj_dim": self.requested_dim,
            "seed": self.seed,
            "contract_version": randomness.CONTRACT_VERSION,
            "grad_wrt": describe_grad_wrt(self.grad_wrt),
            "lambda_reg": None if self.lambda_reg == AUTO else self.lambda_reg,
            "reference_compat": self.reference_compat,
            "dtype": self.dtype,
            "precision": self.precision,
            "kernel": self.kernel,
        }
        if self.projection == "factorized":  # dense records stay those of trakjax 0.1
            record.update(contract_version=randomness.FACTOR_CONTRACT_VERSION, factor_kind=self.factor_kind,
                          factor_dims=None if self.factor_dims is None else list(self.factor_dims))
            if self.resolved_second_stage == "sparse":  # a record without the key: the dense second stage
                record.update(contract_version=randomness.SPARSE_CONTRACT_VERSION,
                              second_stage="sparse", sparsity=self.resolved_sparsity)
        return record


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Settings that change only how the work runs; never recorded.

    Attributes:
      batch_size: examples per featurize step (capped by ``grad_memory_bytes``).
      backend: projection backend, ``"xla"``, ``"pallas"`` or ``"auto"`` (Pallas on GPU).
      chunk_rows: rows of R per generated chunk, a multiple of 2048 (``None``: about 64 MiB).
      matrix_cache_bytes: hold R materialized per checkpoint when P·k·4 bytes fit (0: never).
      grad_memory_bytes: budget for one micro-batch of per-example gradients, per device.
      mesh: a 1-D ``jax.sharding.Mesh`` with axis ``"data"`` over this process's devices (see
        :mod:`trakjax.sharding`); ``None`` uses all local devices.
      progress: show progress bars.
    """

    batch_size: int = 64
    backend: str = "auto"
    chunk_rows: int | None = None
    matrix_cache_bytes: int = DEFAULT_MATRIX_CACHE_BYTES
    grad_memory_bytes: int = DEFAULT_GRAD_MEMORY_BYTES
    mesh: jax.sharding.Mesh | None = None
    progress: bool = False

    def __post_init__(self):
        fix = object.__setattr__
        fix(self, "batch_size", check_int("batch_size", self.batch_size))
        fix(self, "backend", check_choice("backend", self.backend, BACKENDS))
        if self.chunk_rows is not None:
            rows = check_int("chunk_rows", self.chunk_rows)
            if rows % randomness.ROWS_PER_BLOCK:
                raise InvalidArgumentError(
                    f"chunk_rows must be a positive multiple of {randomness.ROWS_PER_BLOCK}, got {rows}"
                )
            fix(self, "chunk_rows", rows)
        fix(self, "matrix_cache_bytes", check_int("matrix_cache_bytes", self.matrix_cache_bytes, 0))
        fix(self, "grad_memory_bytes", check_int("grad_memory_bytes", self.grad_memory_bytes, 1))
        if self.mesh is not None:
            fix(self, "mesh", sharding.check_mesh(self.mesh))
        if not isinstance(self.progress, bool | np.bool_):
            raise ArgumentTypeError(f"progress must be a bool, got {self.progress!r}")
        fix(self, "progress", bool(self.progress))


RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(ResultSettings))
RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunSettings))


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run's settings: :class:`ResultSettings` and :class:`RunSettings`.

    Build one with :meth:`create` (keyword settings of either half) or from the halves.
    """

    result: ResultSettings = ResultSettings()
    run: RunSettings = RunSettings()
    given: frozenset[str] | None = dataclasses.field(default=None, compare=False, repr=False)
    """The result settings the caller gave (:meth:`given_settings`); ``None`` when unknown."""

    def __post_init__(self):
        if not isinstance(self.result, ResultSettings):
            raise ArgumentTypeError(f"result must be a ResultSettings, got {type(self.result).__name__}")
        if not isinstance(self.run, RunSettings):
            raise ArgumentTypeError(f"run must be a RunSettings, got {type(self.run).__name__}")

    def given_settings(self) -> frozenset[str]:
        """The result settings the caller set: those given to :meth:`create` (or the TOML file);
        for a Config built from a :class:`ResultSettings` directly, those that differ from the
        defaults. The others are unset: a store's recorded value is adopted for them
        (:func:`trakjax.store_settings.adopt_stored_settings`)."""
        if self.given is not None:
            return self.given
        default = ResultSettings()
        return frozenset(name for name in RESULT_FIELDS
                         if getattr(self.result, name) != getattr(default, name))

    def with_given(self, given) -> Config:
        """This config with its given result settings set to ``given``."""
        return dataclasses.replace(self, given=frozenset(given))

    @classmethod
    def create(cls, config: Config | None = None, **settings) -> Config:
        """``config`` (default: all defaults) with ``settings`` overriding its fields.

        Args:
          config: a :class:`Config` to start from, or ``None``.
          **settings: fields of :class:`ResultSettings` or :class:`RunSettings`.

        Raises:
          ArgumentTypeError: ``config`` is not a Config.
          InvalidArgumentError: an unknown setting (listing the valid ones) or an invalid value.
        """
        if config is None:
            config = cls()
        elif not isinstance(config, Config):
            raise ArgumentTypeError(f"config must be a trakjax.Config or None, got {type(config).__name__}")
        unknown = sorted(set(settings) - set(RESULT_FIELDS) - set(RUN_FIELDS))
        if unknown:
            raise InvalidArgumentError(
                f"unknown settings {unknown}; valid settings are {sorted(RESULT_FIELDS + RUN_FIELDS)}"
            )
        if not settings:
            return config
        result = {k: v for k, v in settings.items() if k in RESULT_FIELDS}
        run = {k: v for k, v in settings.items() if k in RUN_FIELDS}
        return cls(
            dataclasses.replace(config.result, **result) if result else config.result,
            dataclasses.replace(config.run, **run) if run else config.run,
            config.given_settings() | frozenset(result),
        )

    def replace(self, **settings) -> Config:
        """A copy with ``settings`` changed (validated like :meth:`create`)."""
        return Config.create(self, **settings)
