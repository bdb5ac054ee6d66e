"""Run directories, atomic writes, safetensors checkpoints and ``load``.

No pickle anywhere: tensors go to safetensors files, everything else to JSON or YAML.
Every file is written to a temporary name in the same directory, flushed to disk and
renamed over the target, so a crash leaves either the old file or the new one.

A run directory has one owner, :class:`Run`: it knows the layout, holds the lock that
makes it single-writer, reads and writes config, meta, metrics and checkpoints, and names
the outputs of ``eval`` and ``certify``. A run directory holds::

    config.yaml             the resolved configuration
    meta.json               how to rebuild the model (zoo name + constructor arguments),
                            the data set, the recipe, versions, git commit, status
    model.safetensors       the exported inference model (written when training ends)
    checkpoint.safetensors  the latest training state (model, optimiser, trainer state)
    metrics.jsonl           one JSON object per epoch
    eval.json, eval_state.json, compare_state.json, certify.json, certified.png
                            evaluation outputs (``robustlab eval / compare / certify``)
    .lock                   present while a process writes the directory (its pid inside)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from robustlab.errors import CheckpointError, ConfigError, RobustlabError

log = logging.getLogger(__name__)

META_FILE, CONFIG_FILE, MODEL_FILE = "meta.json", "config.yaml", "model.safetensors"
CHECKPOINT_FILE, METRICS_FILE = "checkpoint.safetensors", "metrics.jsonl"
EVAL_FILE, EVAL_STATE_FILE, COMPARE_STATE_FILE = (
    "eval.json",
    "eval_state.json",
    "compare_state.json",
)
#: `eval --teacher`: the distillation teacher's evaluation state, kept in the student's run
TEACHER_STATE_FILE = "eval_teacher_state.json"
CERTIFY_FILE, CERTIFIED_PLOT = "certify.json", "certified.png"
DETECT_FILE = "detect.json"
#: corruption reports, one per source (generated ImageNet-C, MNIST-C, files read), and
#: a heatmap and a severity curve per kind of source
CORRUPTIONS_FILE = "corruptions.json"
CORRUPTION_KINDS = ("imagenet-c", "mnist-c", "files")
CORRUPTIONS_PLOTS = tuple(
    f"corruptions-{kind}{tail}.png" for kind in CORRUPTION_KINDS for tail in ("", "-severity")
)
LOCK_FILE = ".lock"
#: TensorBoard event files (``train --tensorboard``), written into the run directory itself
TENSORBOARD_PREFIX = "events.out.tfevents."
FORMAT_VERSION = 1
#: every file a run directory may hold that robustlab wrote (recipe extras are listed in meta)
OWNED_FILES = (
    CONFIG_FILE, META_FILE, MODEL_FILE, CHECKPOINT_FILE, METRICS_FILE, EVAL_FILE,
    EVAL_STATE_FILE, COMPARE_STATE_FILE, TEACHER_STATE_FILE, CERTIFY_FILE, CERTIFIED_PLOT,
    DETECT_FILE, CORRUPTIONS_FILE, *CORRUPTIONS_PLOTS,
)  # fmt: skip


#: the evaluation states' relatives: an adaptive evaluation's per-mode states
#: (``eval_state.naive.json``), a sharded evaluation's per-rank batches (``.rank1``)
#: and the states' locks
_STATE_FAMILY = re.compile(
    r"(eval_state|compare_state|eval_teacher_state)"
    r"(\.(none|naive|bpda|transfer|eot-\d+|bpda_eot-\d+))?\.json(\.rank\d+)?(\.lock)?"
)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` over ``path`` after flushing it to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        umask = os.umask(0)  # some writers (safetensors) create 0600 files: use ordinary modes
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    with contextlib.suppress(OSError):  # make the rename itself durable where supported
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: Any = None) -> None:
    """Write tensors (and optional JSON-able ``meta``) to a safetensors file, atomically."""
    flat = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    header = {"robustlab": json.dumps(meta)} if meta is not None else None
    atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=header))


def load_tensors(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], Any]:
    """Read a safetensors file written by :func:`save_tensors`; returns (tensors, meta)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
        meta = json.loads(header["robustlab"]) if "robustlab" in header else None
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path} is truncated or not a valid safetensors file ({err})"
        ) from None
    return tensors, meta


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``model.load_state_dict(state)`` with a message that names what does not match."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if wrong:
            k = wrong[0]
            parts.append(
                f"shape of {k!r}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
            )
        raise CheckpointError(f"{where} does not match the model: {'; '.join(parts)}")
    model.load_state_dict(state)


def save_model(model: nn.Module, path: str | Path) -> None:
    """Save a model's state dict to safetensors, atomically."""
    save_tensors(path, model.state_dict())


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def git_commit() -> str | None:
    """The git commit of the robustlab source tree, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str]:
    import numpy

    from robustlab import __version__

    return {
        "robustlab": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def load(
    run_dir: str | Path,
    device: str | torch.device | None = None,
    *,
    allow_incomplete: bool = False,
) -> nn.Module:
    """Rebuild a trained model from its run directory, in eval mode.

    The architecture comes from ``meta.json`` (zoo name and constructor arguments) and
    the weights from ``model.safetensors``; nothing is unpickled.

    Args:
        run_dir: a directory written by ``robustlab train``.
        device: where to put the model (default: CPU).

    A run whose training was resumed or extended and has not finished is refused: its
    ``model.safetensors`` holds the earlier weights (``allow_incomplete=True`` takes them).

    A run trained behind inference defenses (``defenses:`` in its config) comes back as a
    :class:`~robustlab.defenses.DefendedModel` with the same defenses.

    Example:
        >>> model = robustlab.load("runs/demo-mnist")
    """
    from robustlab.models import create_model

    run = Run(run_dir).require()
    spec = run.meta_section("model", "name", "kwargs")
    if not isinstance(spec["kwargs"], dict):
        raise CheckpointError(f"{run.path / META_FILE}: model.kwargs must be a JSON object")
    try:
        model = create_model(spec["name"], **spec["kwargs"])
        if spec.get("denoise"):
            from robustlab.models.registry import add_denoising

            kw = spec["kwargs"]
            size = kw.get("input_size")
            h, w = (size, size) if isinstance(size, int) else size
            model = add_denoising(model, spec["denoise"], (kw.get("in_channels", 3), h, w))
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{run.path / META_FILE} describes a model that cannot be built ({err})"
        ) from None
    weights = run.model_path
    holder = run.holder()
    busy = f" (pid {holder.get('pid')} is writing it: {holder.get('purpose')})" if holder else ""
    if not weights.is_file():
        hint = (
            f"; training did not finish{busy}: resume it with `robustlab train CONFIG --resume`"
            if run.has_checkpoint()
            else busy
        )
        raise CheckpointError(f"{weights} does not exist{hint}")
    if run.meta().get("status") != "complete" and not allow_incomplete:
        raise CheckpointError(
            f"{weights} predates an unfinished training of {run.path}{busy} (it was resumed or "
            "extended and has not finished): finish it with `robustlab train CONFIG --resume`, "
            "or load(..., allow_incomplete=True) for the earlier weights"
        )
    state, _ = load_tensors(weights)
    load_state_dict_strict(model, state, str(weights))
    specs = run.meta().get("defenses") or []
    if specs:  # trained behind inference defenses: loaded behind them
        from robustlab.defenses import defend

        if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
            raise CheckpointError(f"{run.path / META_FILE}: defenses must be a list of specs")
        model = defend(model, specs)
    return model.to(device or "cpu").eval()


# ----------------------------------------------------------------------------- locks


class LockedError(RobustlabError):
    """Another live process holds the lock of a run directory or output file."""


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The holder description in an open lock file (None if empty or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        info = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) and info else None


class FileLock:
    """An exclusive, non-blocking lock held through ``path`` (a small JSON file).

    The lock is an ``flock`` on the file, so the kernel releases it when its holder dies;
    the file's content (pid, host, purpose, command, start time) names the holder. A
    lock file left behind by a process that died is *stale*: it is detected (no process
    holds the flock), named in a warning and taken over. Use as a context manager.

    Args:
        path: the lock file.
        purpose: what the holder does, shown to a refused second writer ("training").
    """

    def __init__(self, path: str | Path, purpose: str) -> None:
        self.path = Path(path)
        self.purpose = purpose
        self._fd: int | None = None
        self.stale: dict[str, Any] | None = None  #: the dead holder taken over, if any

    def acquire(self) -> FileLock:
        import fcntl
        import socket
        import sys

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd) or {}
                os.close(fd)
                what = holder.get("purpose", "another process")
                since = f" since {holder['since']}" if "since" in holder else ""
                raise LockedError(
                    f"{self.path.parent} is in use: {what} by pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}{since} ({holder.get('command', '')!s}); wait for "
                    "it to finish or stop it (a directory has one writer at a time)"
                ) from None
            try:  # the file may have been unlinked by its last holder after we opened it
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_holder(fd)
            if previous:
                self.stale = previous
                log.warning(
                    "%s: taking over the stale lock of pid %s on %s (%s, since %s), a process "
                    "that ended without releasing it", self.path, previous.get("pid"),
                    previous.get("host"), previous.get("purpose"), previous.get("since"),
                )  # fmt: skip
            info = {
                "pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                "command": " ".join(sys.argv), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }  # fmt: skip
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise LockedError(f"could not take the lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # unlink while holding: a waiter re-checks the inode
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ----------------------------------------------------------------------------- run directory


class Run:
    """The one owner of a run directory: its layout, lock, metadata, metrics, checkpoints
    and the names of its evaluation outputs.

    Nothing here deletes a file unless asked (:meth:`clear`), and :meth:`clear` removes
    only files robustlab writes, in a directory that is recognisably a run directory.

    Example:
        >>> run = Run("runs/demo-mnist")
        >>> with run.lock("evaluation"):
        ...     run.write_output(EVAL_FILE, {"clean_accuracy": 0.98})
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # -- layout ------------------------------------------------------------------------

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    def exists(self) -> bool:
        return self.path.is_dir()

    def is_run(self) -> bool:
        """True when the directory holds a robustlab ``meta.json``."""
        return (self.path / META_FILE).is_file()

    def is_empty(self) -> bool:
        return not self.path.exists() or not any(p.name != LOCK_FILE for p in self.path.iterdir())

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def require(self) -> Run:
        """``self`` if the directory is a run directory, else a clear error."""
        if not self.path.exists():
            raise CheckpointError(f"run directory {self.path} does not exist")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is a file, not a run directory")
        if not self.is_run():
            raise CheckpointError(
                f"{self.path} is not a robustlab run directory (it has no {META_FILE})"
            )
        return self

    # -- lock --------------------------------------------------------------------------

    def lock(self, purpose: str) -> FileLock:
        """The directory's writer lock (a context manager); refused while another lives."""
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"{self.path} is a file, not a run directory")
        return FileLock(self.path / LOCK_FILE, purpose)

    def holder(self) -> dict[str, Any] | None:
        """Who holds the directory's lock now (pid, purpose ...), or None if nobody does."""
        import fcntl

        path = self.path / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_holder(fd) or {"pid": "?", "purpose": "?"}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    # -- metadata ----------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        meta = read_json(self.path / META_FILE)
        if not isinstance(meta, dict):
            raise CheckpointError(f"{self.path / META_FILE} is not a JSON object")
        return meta

    def meta_section(self, key: str, *fields: str) -> Any:
        """``meta[key]``, checked to exist (and to hold ``fields``), with a clear error."""
        meta = self.meta()
        section = meta.get(key)
        missing = [f for f in fields if not isinstance(section, dict) or f not in section]
        if section is None or missing:
            what = f"its {key!r} section" + (f" (fields {missing})" if section else "")
            raise CheckpointError(
                f"{self.path / META_FILE} lacks {what}: the run was not written by this "
                "robustlab, or the file was edited"
            )
        return section

    def status(self) -> str | None:
        """``"running"`` (or interrupted), ``"complete"``, or None (no meta)."""
        if not self.is_run():
            return None
        with contextlib.suppress(CheckpointError):
            return self.meta().get("status")
        return None

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_json(self.path / META_FILE, meta)

    def write_config(self, text: str) -> None:
        atomic_write_text(self.path / CONFIG_FILE, text)

    # -- metrics -----------------------------------------------------------------------

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise CheckpointError(f"{path}: line {i + 1} is not valid JSON") from None
        return rows

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def truncate_metrics(self, epochs: int) -> None:
        """Keep the rows of the first ``epochs`` epochs (those a checkpoint has seen)."""
        path = self.path / METRICS_FILE
        if path.is_file():
            keep = [r for r in self.metrics() if r.get("epoch", 0) <= epochs]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

    # -- tensors -----------------------------------------------------------------------

    def save_checkpoint(self, tensors: dict[str, torch.Tensor], state: Any) -> None:
        save_tensors(self.checkpoint_path, tensors, state)

    def load_checkpoint(self) -> tuple[dict[str, torch.Tensor], Any]:
        return load_tensors(self.checkpoint_path)

    def save_model(self, model: nn.Module) -> None:
        save_model(model, self.model_path)

    def save_extra(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if Path(name).name != name or name in OWNED_FILES or name.startswith("."):
            raise CheckpointError(f"a recipe's extra file needs a plain new name, got {name!r}")
        save_tensors(self.path / name, tensors)

    # -- outputs -----------------------------------------------------------------------

    def write_output(self, name: str, data: Any) -> Path:
        """Write an evaluation output (JSON) into the run directory, atomically."""
        path = self.path / name
        write_json(path, data)
        return path

    # -- deletion (only on request) ----------------------------------------------------

    def owned_files(self) -> list[Path]:
        """Files in the directory that robustlab wrote (fixed names, recipe extras listed
        in meta.json, and temporary files its atomic writes left behind)."""
        if not self.path.is_dir():
            return []
        names = set(OWNED_FILES) | {
            f"{f}.lock" for f in (EVAL_STATE_FILE, COMPARE_STATE_FILE, TEACHER_STATE_FILE)
        }
        with contextlib.suppress(CheckpointError):
            extras = self.meta().get("extras", []) if self.is_run() else []
            names.update(e for e in extras if isinstance(e, str) and Path(e).name == e)
        return sorted(
            p
            for p in self.path.iterdir()
            if p.is_file()
            and (
                p.name in names
                or (p.name.startswith(".") and p.name.endswith(".tmp"))
                or p.name.startswith(TENSORBOARD_PREFIX)
                or _STATE_FAMILY.fullmatch(p.name) is not None
            )
        )

    def clear(self) -> list[str]:
        """Delete the files robustlab wrote here (asked for by ``--overwrite``).

        Returns the names of other entries, which are left untouched. A non-empty
        directory that is not a run directory is refused: nothing is deleted.
        """
        if not self.path.exists():
            return []
        if not self.is_run() and not self.is_empty():
            raise CheckpointError(
                f"refusing to overwrite {self.path}: it is not a robustlab run directory "
                f"(no {META_FILE}) and it is not empty; choose another run name or out_dir"
            )
        owned = self.owned_files()
        for p in owned:
            p.unlink()
        kept = sorted(p.name for p in self.path.iterdir() if p.name != LOCK_FILE and p not in owned)
        return kept


def load_run_data(run: str | Path, split: str = "test", n: int = 0) -> tuple[Any, str]:
    """The data set a run was trained on (its ``split``, the first ``n`` images; 0: all)
    and its name, checked to have the classes the run was trained with."""
    from robustlab.data import load_dataset

    meta = Run(run).require().meta_section("data", "name")
    data = load_dataset(meta["name"], split, meta.get("root"), **(meta.get("options") or {}))
    trained = meta.get("classes")
    if trained is not None and data.classes is not None and list(data.classes) != trained:
        raise ConfigError(
            f"the {split} split's classes {list(data.classes)} differ from those the run was "
            f"trained on {trained}: the data set changed since training"
        )
    if n < 0:
        raise ConfigError(f"--n must be >= 0 (0: all images), got {n}")
    if n > len(data):
        raise ConfigError(
            f"--n {n} asks for more images than {meta['name']} {split} has ({len(data)})"
        )
    return (data.subset(n) if n else data), meta["name"]
