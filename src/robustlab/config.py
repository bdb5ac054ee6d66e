"""Experiment configuration: dataclasses loaded from YAML, with ``--set`` overrides.

One YAML file describes one experiment. Every key is checked: an unknown key is an
error that names it and suggests the nearest valid one, and a value of the wrong
type names the key and the expected type. ``options`` mappings are passed to the
model, data set or recipe builder and checked against its signature.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from robustlab.errors import ConfigError, did_you_mean

# ----------------------------------------------------------------------------- numbers

_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_FRACTION = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*/\s*((?:\d+\.?\d*|\.\d+))\s*$")


def parse_number(text: Any, what: str = "value") -> float:
    """A number as people write it: ``0.1``, ``1e-4``, ``8/255``; else a clear error."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: expected a number, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip()
        frac = _FRACTION.match(s)
        if frac:
            den = float(frac.group(2))
            if den == 0:
                raise ConfigError(f"{what}: {s!r} divides by zero")
            value = float(frac.group(1)) / den
        elif _NUMBER.match(s):
            value = float(s)
        else:
            raise ConfigError(
                f"{what}: expected a number (like 0.1, 1e-4 or 8/255), got {str(text)!r}"
            )
    if not math.isfinite(value):
        raise ConfigError(f"{what}: expected a finite number, got {text!r}")
    return value


class _Loader(yaml.SafeLoader):
    """YAML's safe loader that also reads ``1e-4`` (YAML 1.1 needs ``1.0e-4``) and simple
    fractions such as ``8/255`` as floats."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise ConfigError(
                f"key {key!r} is given twice (line {mark.line + 1}); the second would silently "
                "replace the first"
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)
_Loader.add_implicit_resolver(
    "!fraction",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)/(\d+\.?\d*|\.\d+)$"),
    list("-+0123456789."),
)
_Loader.add_constructor(
    "!fraction", lambda loader, node: parse_number(loader.construct_scalar(node), "fraction")
)


def _yaml_problem(err: Exception) -> str:
    """A YAML error in one line: what is wrong and where."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def load_yaml(text: str) -> Any:
    """Parse YAML text safely, reading ``1e-4`` and ``8/255`` as numbers."""
    loader = _Loader(text)  # a SafeLoader subclass: builds plain data only
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


@dataclass
class DataConfig:
    """Data set and loading."""

    name: str = "mnist5k"  # a name from `robustlab list datasets`
    root: str | None = None  # file or directory, for data sets read from disk
    options: dict[str, Any] = field(default_factory=dict)  # data-set builder options
    batch_size: int = 128  # global batch: split evenly over data-parallel processes
    eval_batch_size: int = 500
    crop_padding: int = 0  # random-crop augmentation padding in pixels (0: off)
    flip: bool = False  # random horizontal flips
    normalize: bool = True  # put Normalize(mean, std) of the training split into the model
    train_limit: int | None = None  # keep only the first N training images (quick runs)
    test_limit: int | None = None  # keep only the first N test images
    # hold out N training images (a random draw seeded by `seed`) as a validation split:
    # never trained on, logged
    # as val_acc, and the only data a checkpoint is selected on (see SelectConfig)
    val_size: int = 0


@dataclass
class ModelConfig:
    """Which zoo model to build."""

    name: str = "small_cnn"  # a name from `robustlab list models`
    act: str = "relu"  # activation for every layer
    options: dict[str, Any] = field(default_factory=dict)  # model options (depth, width ...)
    # feature-denoising blocks (Xie et al. 2019) after named submodules:
    # {after: [names], kind: nonlocal_gaussian|nonlocal_dot|mean|median, embed: true}
    denoise: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (schedules are per step, from the global step)."""

    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    schedule: str = "cosine"  # constant | cosine | step | onecycle
    warmup_epochs: float = 0.0  # linear warm-up from 0 (constant, cosine, step)
    milestones: list[float] = field(default_factory=list)  # step: epochs where lr *= gamma
    gamma: float = 0.1  # step: decay factor
    pct_start: float = 0.3  # onecycle: fraction of training spent rising to lr
    grad_clip: float | None = None  # clip the global gradient norm to this value


@dataclass
class RecipeConfig:
    """The training method."""

    name: str = "standard"  # a name from `robustlab list recipes`
    options: dict[str, Any] = field(default_factory=dict)  # recipe options (eps, steps ...)


@dataclass
class SelectConfig:
    """Which epoch's weights the run saves: the last, or the best on the validation split.

    The test split is never used to choose (that would report a number tuned on it).
    """

    metric: str = "last"  # last | val_acc | val_robust (PGD accuracy on data.val_size images)
    eps: float | None = None  # val_robust: budget (default: the recipe's eps)
    norm: str | None = None  # val_robust: linf | l2 (default: the recipe's norm, else linf)
    steps: int = 10  # val_robust: PGD steps (step size 2.5 * eps / steps, random start)


@dataclass
class TrainConfig:
    """A whole training run."""

    name: str = ""  # run name; default: the config file's stem
    out_dir: str = "runs"  # the run directory is out_dir/name
    seed: int = 0
    epochs: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "off"  # off | bf16 | fp16: mixed precision, CUDA only
    label_smoothing: float = 0.0
    sync_bn: bool = False  # SyncBatchNorm when data-parallel
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch (0: epoch ends)
    eval_every: int = 1  # clean test accuracy every N epochs (0: only at the end)
    tensorboard: bool = False  # also log each epoch's metrics as TensorBoard events in the run
    defenses: list[str] = field(default_factory=list)  # inference defenses in front of the
    # model, trained through and saved with it: specs such as "jpeg:quality=75"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    select: SelectConfig = field(default_factory=SelectConfig)

    def validate(self) -> TrainConfig:
        """Check value ranges and choices; returns self."""
        _choice("select.metric", self.select.metric, ("last", "val_acc", "val_robust"))
        if self.select.norm is not None:
            _choice("select.norm", self.select.norm, ("linf", "l2"))
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.data.batch_size >= 1, "data.batch_size must be >= 1"),
            (self.data.eval_batch_size >= 1, "data.eval_batch_size must be >= 1"),
            (self.data.crop_padding >= 0, "data.crop_padding must be >= 0"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (self.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing must lie in [0, 1)"),
            (0 < self.optim.pct_start < 1, "optim.pct_start must lie in (0, 1)"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (0 <= self.optim.momentum < 1, "optim.momentum must lie in [0, 1)"),
            (
                len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas),
                "optim.betas must be two numbers in [0, 1)",
            ),
            (
                self.name not in ("", ".", "..") and "/" not in self.name and "\\" not in self.name,
                f"name must be a plain directory name (no '/', not '.' or '..'), got {self.name!r}",
            ),
            (self.eval_every >= 0, "eval_every must be >= 0"),
            (self.data.val_size >= 0, "data.val_size must be >= 0"),
            (self.select.steps >= 1, "select.steps must be >= 1"),
            (self.select.eps is None or self.select.eps > 0, "select.eps must be > 0"),
            (
                self.select.metric == "last" or self.data.val_size > 0,
                f"select.metric={self.select.metric} chooses on a validation split: set "
                "data.val_size (training images held out for it); the test split is never "
                "used to choose a checkpoint",
            ),
            (
                self.optim.grad_clip is None or self.optim.grad_clip > 0,
                "optim.grad_clip must be > 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        _choice("optim.name", self.optim.name, ("sgd", "adam", "adamw"))
        _choice("optim.schedule", self.optim.schedule, ("constant", "cosine", "step", "onecycle"))
        _choice("amp", self.amp, ("off", "bf16", "fp16"))
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return self


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{key}: {value!r} is not one of {', '.join(choices)}{did_you_mean(value, choices)}"
        )


# ----------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is collections.abc.Callable or tp is collections.abc.Callable:
        if not callable(value):
            raise ConfigError(f"{key}: expected a function, got {value!r}")
        return value
    if origin in (list, tuple, collections.abc.Sequence):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return (
            [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
            if args and (origin is not tuple or (len(args) == 2 and args[1] is Ellipsis))
            else list(value)
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 1e3 is a whole number
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        return parse_number(value, key)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value  # an object of the annotated class, given from Python (a teacher module)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, checking every key and type."""
    if not isinstance(data, dict):
        where = f"{prefix!r}" if prefix else "the config"
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            full_names = [f"{prefix}{n}" for n in names]
            raise ConfigError(
                f"unknown config key {full!r}{did_you_mean(full, full_names)} "
                f"(valid keys{' under ' + prefix[:-1] if prefix else ''}: {', '.join(names)})"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value if value is not None else {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.01"`` -> (["optim", "lr"], 0.01); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. epochs=5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except ConfigError as err:  # e.g. a fraction dividing by zero
        raise ConfigError(f"override {text!r}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse value ({_yaml_problem(err)})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``key.sub=value`` entries into a nested dict (a copy is returned)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a mapping")
            node = child
        node[path[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from defaults), apply overrides, validate.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: ``key=value`` strings, dotted keys for sections (``optim.lr=0.01``).
    """
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = load_yaml(p.read_text()) or {}
        except ConfigError as err:
            raise ConfigError(f"{p}: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: invalid YAML ({_yaml_problem(err)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys to values")
    data = apply_overrides(data, overrides or [])
    cfg: TrainConfig = from_dict(TrainConfig, data)
    if not cfg.name:
        cfg.name = Path(path).stem if path is not None else "run"
    return cfg.validate()


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML and JSON)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    """YAML text of a config, keys in declaration order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
