"""Run directories, atomic writes, safetensors checkpoints and ``load``.

No pickle anywhere: tensors go to safetensors files, everything else to JSON or YAML.
Every file is written to a temporary name in the same directory, flushed to disk and
renamed over the target, so a crash leaves either the old file or the new one.

A run directory holds::

    config.yaml             the resolved configuration
    meta.json               how to rebuild the model (zoo name + constructor arguments),
                            the data set, the recipe, versions and git commit
    model.safetensors       the exported inference model (written when training ends)
    checkpoint.safetensors  the latest training state (model, optimiser, trainer state)
    metrics.jsonl           one JSON object per epoch
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from robustlab.errors import CheckpointError

META_FILE, CONFIG_FILE, MODEL_FILE = "meta.json", "config.yaml", "model.safetensors"
CHECKPOINT_FILE, METRICS_FILE = "checkpoint.safetensors", "metrics.jsonl"
FORMAT_VERSION = 1


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


def load(run_dir: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a trained model from its run directory, in eval mode.

    The architecture comes from ``meta.json`` (zoo name and constructor arguments) and
    the weights from ``model.safetensors``; nothing is unpickled.

    Args:
        run_dir: a directory written by ``robustlab train``.
        device: where to put the model (default: CPU).

    Example:
        >>> model = robustlab.load("runs/demo-mnist")
    """
    from robustlab.models import create_model

    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"run directory {run} does not exist")
    meta = read_json(run / META_FILE)
    try:
        spec = meta["model"]
        model = create_model(spec["name"], **spec["kwargs"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(
            f"{run / META_FILE} lacks a valid model description ({err})"
        ) from None
    weights = run / MODEL_FILE
    if not weights.is_file():
        hint = (
            "; training did not finish: resume it with `robustlab train CONFIG --resume`"
            if (run / CHECKPOINT_FILE).is_file()
            else ""
        )
        raise CheckpointError(f"{weights} does not exist{hint}")
    state, _ = load_tensors(weights)
    load_state_dict_strict(model, state, str(weights))
    return model.to(device or "cpu").eval()
