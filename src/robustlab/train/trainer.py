"""The training loop: method-agnostic, resumable, data-parallel, mixed precision.

The trainer knows nothing of any training method. It builds the data, the model and
the optimiser from a :class:`~robustlab.config.TrainConfig`, asks the recipe for the
loss of each batch, and owns everything else: devices, ``torchrun`` data parallelism,
AMP on CUDA, gradient clipping, learning-rate schedules, checkpoints and metrics.

Reproducibility and resume. Shuffling and augmentation are functions of
``(seed, epoch, batch)``; the global RNG (dropout, random attack starts) is re-seeded
from ``(seed, rank, epoch, batch)`` at every checkpoint boundary; learning rates are
functions of the global step. A checkpoint therefore needs only the model, the
optimiser, the gradient scaler, the recipe state and the position, and a run killed
at any point and resumed reaches the same weights as one never interrupted.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robustlab import io
from robustlab.config import TrainConfig, dump_config, to_dict
from robustlab.data import BatchLoader, load_dataset
from robustlab.data.loader import batch_seed
from robustlab.errors import CheckpointError, ConfigError, RobustlabError
from robustlab.evaluate.clean import count_correct
from robustlab.models import create_model
from robustlab.train.distributed import DistContext, init_distributed, local_rank, resolve_device
from robustlab.train.optim import build_optimizer, lr_at
from robustlab.train.recipes import Recipe, create_recipe

log = logging.getLogger(__name__)

#: Testing hook: SIGKILL this process right after this global step (and its checkpoint).
KILL_ENV = "ROBUSTLAB_KILL_AT_STEP"
# Config keys that may differ when resuming; ``epochs`` too when extending a run. out_dir
# and name locate the run (the same directory may be spelled differently).
_RESUMABLE_CHANGES = {"eval_every", "out_dir", "name", "tensorboard"}


# ----------------------------------------------------------------------------- state codec


def encode_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Split a nested state (dicts, lists, tensors, scalars) into JSON plus named tensors."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {k: encode_state(v, tensors, f"{prefix}/{k}") for k, v in obj.items()}
        return {
            "__items__": [[k, encode_state(v, tensors, f"{prefix}/{k}")] for k, v in obj.items()]
        }
    if isinstance(obj, (list, tuple)):
        return [encode_state(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix!r}")


def decode_state(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: decode_state(v, tensors) for k, v in obj["__items__"]}
        return {k: decode_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    return obj


# ----------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _tqdm_disable(flag: bool | None, dist_ctx: DistContext) -> bool | None:
    """tqdm's ``disable``: bars on rank 0 only; ``flag`` or ROBUSTLAB_PROGRESS override."""
    if not dist_ctx.is_main:
        return True  # tqdm's `disable=True`
    if flag is None:
        env = os.environ.get("ROBUSTLAB_PROGRESS")
        return None if env is None else env == "0"  # None: tqdm decides (off when not a TTY)
    return not flag


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k != "options":
            keys += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def _with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with every key it lacks taken from ``defaults`` (recursively)."""
    out = dict(saved)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict) and k != "options":
            out[k] = _with_defaults(out[k], v)
    return out


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Train a model as a config describes, writing a run directory.

    Args:
        cfg: the validated configuration.
        resume: continue an interrupted run from its ``checkpoint.safetensors``; a run
            with no checkpoint, or one already finished, is an error (nothing is deleted).
        overwrite: replace an existing run directory: the files robustlab wrote there are
            deleted (other files are kept and named); refused for a non-empty directory
            that is not a run directory.
        extend: train a run (finished or not) further, to ``cfg.epochs`` epochs, which
            must exceed the checkpoint's. Schedules are functions of the global step and
            the total number of steps, so the learning rate continues along the schedule
            of the longer run from the step reached (for cosine, it rises again from near
            zero at the boundary): the result equals neither a fresh run of the longer
            length nor a new warm restart; ramps (``eps_ramp_epochs``) are unaffected.
        progress: show progress bars (default: only when writing to a terminal).

    A run directory has one writer: :meth:`fit` holds its lock (``.lock``, with the pid)
    from the first look at the directory to the last write, and a second trainer (or an
    evaluation) of the same directory is refused with the holder's pid.

    Example:
        >>> cfg = load_config("configs/demo-mnist.yaml", ["epochs=2"])
        >>> run_dir = Trainer(cfg).fit()
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        extend: bool = False,
        progress: bool | None = None,
    ) -> None:
        self.cfg = cfg.validate()
        if sum((resume, overwrite, extend)) > 1:
            raise ConfigError("choose at most one of resume, overwrite and extend")
        self.resume, self.overwrite, self.extend = resume, overwrite, extend
        self.run_dir = Path(cfg.out_dir) / cfg.name
        self.run = io.Run(self.run_dir)
        self._lock: io.FileLock | None = None
        self.device = resolve_device(cfg.device, local_rank())
        self.dist = init_distributed(self.device)
        self.tqdm_disable = _tqdm_disable(progress, self.dist)
        if cfg.tensorboard:  # checked on every rank (none may wait for a failed one)
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "tensorboard: true needs the tensorboard package (pip install tensorboard); "
                    "the metrics are in metrics.jsonl either way"
                ) from None
        self._writer: Any = None
        if cfg.data.batch_size % self.dist.world_size:
            raise ConfigError(
                f"data.batch_size ({cfg.data.batch_size}) is the global batch and must be "
                "divisible "
                f"by the number of processes ({self.dist.world_size})"
            )
        self._build()

    # -- construction --------------------------------------------------------------------

    def _build(self) -> None:
        cfg, dc = self.cfg, self.cfg.data
        seed_everything(cfg.seed + self.dist.rank)
        train = load_dataset(dc.name, "train", dc.root, **dc.options)
        test = load_dataset(dc.name, "test", dc.root, **dc.options)
        if dc.train_limit:
            train = train.subset(dc.train_limit)
        if dc.test_limit:
            test = test.subset(dc.test_limit)
        if test.num_classes != train.num_classes or test.shape != train.shape:
            raise RobustlabError(
                f"train and test splits disagree: {train.num_classes} vs {test.num_classes} "
                "classes, "
                f"images {train.shape} vs {test.shape}"
            )
        self.recipe: Recipe = create_recipe(
            cfg.recipe.name, label_smoothing=cfg.label_smoothing, **cfg.recipe.options
        )
        val = None
        if dc.val_size:
            if dc.val_size >= len(train):
                raise ConfigError(
                    f"data.val_size ({dc.val_size}) must be smaller than the training set "
                    f"({len(train)} images)"
                )
            # a random draw (seeded by the run's seed), before any recipe holdout: files in
            # class order (image folders, user arrays) must not lose a whole class to it
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
            val, train = (
                train.subset(order[: dc.val_size].sort().values),
                train.subset(order[dc.val_size :].sort().values),
            )
        self.select_eps, self.select_norm = self._select_budget()
        held = self.recipe.holdout_size
        if held:
            if held >= len(train):
                raise ConfigError(
                    f"recipe {cfg.recipe.name!r} holds out {held} training images but the "
                    f"training set has only {len(train)}"
                )
            # the last images of the (shuffled) training split, never trained on
            holdout, train = (
                train.subset(slice(len(train) - held, None)),
                train.subset(slice(0, len(train) - held)),
            )
            self.recipe.set_holdout(
                holdout.float_images().to(self.device), holdout.y.to(self.device)
            )
        self.train_data, self.test_data = train, test
        c, h, w = train.shape
        if "act" in cfg.model.options:
            raise ConfigError("set the activation with model.act, not model.options.act")
        spec_kwargs: dict[str, Any] = dict(
            num_classes=train.num_classes, in_channels=c, input_size=[h, w], act=cfg.model.act,
            **cfg.model.options,
        )  # fmt: skip
        if dc.normalize:
            spec_kwargs.update(mean=list(train.mean), std=list(train.std))
        self.model_spec = {"name": cfg.model.name, "kwargs": spec_kwargs}
        model = create_model(cfg.model.name, **spec_kwargs)
        if cfg.model.denoise:
            from robustlab.models.registry import add_denoising

            model = add_denoising(model, cfg.model.denoise, (c, h, w))
            self.model_spec["denoise"] = dict(cfg.model.denoise)
        model = self.recipe.prepare(model, example=train.float_images(slice(0, 2)))
        teacher = getattr(self.recipe, "teacher", None)
        if teacher is not None:  # on the training device from the start (a resumed run
            teacher.to(self.device)  # may reach the teacher's evaluation without a step)
        if cfg.defenses:  # trained with the defenses in front, saved with them (meta.json)
            from robustlab.defenses import defend

            model = defend(model, cfg.defenses)
        model = model.to(self.device)
        if self.dist.enabled and cfg.sync_bn:
            if self.device.type != "cuda":
                raise ConfigError(
                    "sync_bn needs CUDA devices (PyTorch's SyncBatchNorm is GPU-only); on "
                    f"{self.device.type}, each process normalises over its own share of the batch"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model  # the unwrapped training model; checkpoints hold its state
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model: nn.Module = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            self.ddp_model = model
        self.optimizer = build_optimizer(cfg.optim, model.parameters())
        per_rank = dc.batch_size // self.dist.world_size
        self.loader = BatchLoader(
            train, per_rank, shuffle=True, drop_last=len(train) >= dc.batch_size,
            crop_padding=dc.crop_padding, flip=dc.flip, seed=cfg.seed, device=self.device,
            rank=self.dist.rank, world_size=self.dist.world_size,
        )  # fmt: skip
        self.test_loader = BatchLoader(
            test,
            dc.eval_batch_size,
            device=self.device,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.val_data = val
        self.val_loader = None if val is None else BatchLoader(
            val, dc.eval_batch_size, device=self.device, rank=self.dist.rank,
            world_size=self.dist.world_size,
        )  # fmt: skip
        #: checkpoint selection: {"score", "epoch", "model" (state dict)} of the best so far
        self.best: dict[str, Any] | None = None
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        if amp_dtype is not None and self.device.type != "cuda":
            log.warning("amp=%s is for CUDA only; training in float32 on %s", cfg.amp, self.device)
            amp_dtype = None
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"no training batches: {len(train)} images, batch_size {dc.batch_size}"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        # position and running sums of the current epoch
        self.epoch, self.batch, self.global_step = 0, 0, 0
        self.sums: dict[str, float] = {}

    # -- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write the full training state (rank 0), atomically."""
        if self.dist.is_main:
            tensors: dict[str, torch.Tensor] = {}
            state = {
                "epoch": self.epoch,
                "batch": self.batch,
                "global_step": self.global_step,
                "sums": self.sums,
                "config": to_dict(self.cfg),
                "model": encode_state(self.model.state_dict(), tensors, "model"),
                "optimizer": encode_state(self.optimizer.state_dict(), tensors, "optimizer"),
                "scaler": encode_state(self.scaler.state_dict(), tensors, "scaler"),
                "recipe": encode_state(self.recipe.state_dict(), tensors, "recipe"),
                "best": None if self.best is None else encode_state(self.best, tensors, "best"),
            }
            self.run.save_checkpoint(tensors, state)
        self.dist.barrier()

    def _load_checkpoint(self) -> None:
        path = self.run.checkpoint_path
        tensors, state = self.run.load_checkpoint()
        if not isinstance(state, dict) or "model" not in state or "config" not in state:
            raise CheckpointError(f"{path} is not a robustlab training checkpoint")
        allowed = _RESUMABLE_CHANGES | ({"epochs"} if self.extend else set())
        # keys added to robustlab after the checkpoint was written count as their defaults
        saved = _with_defaults(state["config"], to_dict(TrainConfig()))
        changed = [k for k in _config_diff(saved, to_dict(self.cfg)) if k not in allowed]
        if changed:
            raise CheckpointError(
                f"cannot {'extend' if self.extend else 'resume'} {self.run_dir}: the config "
                f"differs from the checkpoint's at {', '.join(changed)} (only "
                f"{', '.join(sorted(allowed))} may change"
                + ("; to train to more epochs, use --extend" if changed == ["epochs"] else "")
                + ")"
            )
        trained = int(state["config"].get("epochs", 0))
        if self.extend and self.cfg.epochs <= trained:
            raise CheckpointError(
                f"cannot extend {self.run_dir}: it was set up for {trained} epochs and the "
                f"config asks for {self.cfg.epochs}; give more (--set epochs={trained + 1} or more)"
            )
        io.load_state_dict_strict(self.model, decode_state(state["model"], tensors), str(path))
        self.optimizer.load_state_dict(decode_state(state["optimizer"], tensors))
        self.scaler.load_state_dict(decode_state(state["scaler"], tensors))
        self.recipe.load_state_dict(decode_state(state["recipe"], tensors))
        best = state.get("best")
        self.best = None if best is None else decode_state(best, tensors)
        self.epoch, self.batch = state["epoch"], state["batch"]
        self.global_step, self.sums = state["global_step"], dict(state["sums"])
        if self.extend:
            self.recipe.stop_training = False
        log.info("resumed %s at epoch %d, batch %d", self.run_dir, self.epoch + 1, self.batch)

    def _check_run_dir(self) -> None:
        """Refuse what would lose or mix data; runs on every rank before anything is written."""
        run, name = self.run, self.run_dir
        if run.path.exists() and not run.path.is_dir():
            raise ConfigError(f"{name} is a file; the run directory must be a directory")
        holder = run.holder() if self._lock is None else None
        if holder:
            raise io.LockedError(
                f"{name} is in use: {holder.get('purpose')} by pid {holder.get('pid')} on "
                f"{holder.get('host', '?')}; wait for it to finish or stop it"
            )
        if self.resume or self.extend:
            action = "extend" if self.extend else "resume"
            if not run.exists():
                raise CheckpointError(f"cannot {action} {name}: the directory does not exist")
            if not run.has_checkpoint():
                advice = (
                    "train it anew with another name, or replace it with --overwrite"
                    if run.is_run()
                    else "it is not a robustlab run directory; choose another run name"
                )
                raise CheckpointError(
                    f"cannot {action} {name}: it holds no {io.CHECKPOINT_FILE} (nothing was "
                    f"changed); {advice}"
                )
            if self.resume and run.status() == "complete":
                trained = len(run.metrics())
                raise CheckpointError(
                    f"{name} is finished ({trained} epochs trained): nothing to resume; to "
                    "train it longer, use --extend with a larger epochs (--set epochs=N)"
                )
        elif self.overwrite:
            if run.exists() and not run.is_run() and not run.is_empty():
                raise CheckpointError(
                    f"refusing to overwrite {name}: it is not a robustlab run directory (no "
                    f"{io.META_FILE}) and it is not empty; choose another name or out_dir"
                )
        elif not run.is_empty() and not run.is_run():
            raise RobustlabError(
                f"{name} exists and is not a robustlab run directory: choose another run name "
                "(--set name=...) or out_dir"
            )
        elif not run.is_empty():
            raise RobustlabError(
                f"run directory {name} already exists: resume it (--resume), replace it "
                f"(--overwrite) or choose another name (--set name=...)"
            )

    def _acquire_lock(self) -> None:
        """Rank 0 takes the directory's lock and looks again under it (another writer may
        have finished meanwhile); every rank learns whether that succeeded."""
        error: Exception | None = None
        if self.dist.is_main:
            try:
                self._lock = self.run.lock(f"training ({self.cfg.name})").acquire()
                self._check_run_dir()
            except (RobustlabError, OSError) as err:
                self._release_lock()
                error = err
        failed = self.dist.all_reduce_sum(torch.tensor([1.0 if error else 0.0]))
        if error is not None:
            raise error
        if float(failed[0]):
            raise io.LockedError(f"{self.run_dir} is in use (rank 0 could not lock it)")

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _prepare_run_dir(self) -> None:
        self._check_run_dir()
        self.dist.barrier()  # every rank has looked before rank 0 takes the lock
        if self.dist.is_main:
            self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        continuing = self.resume or self.extend
        if continuing:
            self._load_checkpoint()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if continuing:
                self.run.truncate_metrics(self.epoch)
                stale = [f for f in (io.EVAL_FILE, io.CERTIFY_FILE) if self.run.file(f).exists()]
                if self.extend and stale:
                    log.warning(
                        "%s in %s describe the weights before this extension: run eval / "
                        "certify again when it ends", " and ".join(stale), self.run_dir,
                    )  # fmt: skip
            elif self.overwrite:
                kept = self.run.clear()
                if kept:
                    log.warning(
                        "--overwrite kept files robustlab did not write in %s: %s",
                        self.run_dir, ", ".join(kept),
                    )  # fmt: skip
            self.run.write_config(dump_config(self.cfg))
            self._write_meta(status="running")
        self.dist.barrier()

    def _defense_specs(self) -> list[str]:
        from robustlab.defenses import DefendedModel

        return self.model.specs() if isinstance(self.model, DefendedModel) else []

    def _write_meta(
        self, status: str, final: dict[str, Any] | None = None, extras: list[str] | None = None
    ) -> None:
        meta = {
            "format": io.FORMAT_VERSION,
            "status": status,
            "model": self.recipe.export_spec(self.model_spec),
            "data": {
                "name": self.cfg.data.name,
                "root": self.cfg.data.root,
                "options": self.cfg.data.options,
                "classes": list(self.train_data.classes) if self.train_data.classes else None,
            },
            "recipe": {"name": self.cfg.recipe.name, "options": self.cfg.recipe.options},
            "teacher": teacher.describe()
            if (teacher := getattr(self.recipe, "teacher", None))
            else None,
            "val_size": self.cfg.data.val_size,
            "defenses": self._defense_specs(),
            "world_size": self.dist.world_size,
            "versions": io.versions(),
            "git_commit": io.git_commit(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "extras": sorted(extras or []),  # the recipe's extra files (owned by the run)
            "final": final or {},
        }
        self.run.write_meta(meta)

    # -- the loop ------------------------------------------------------------------------

    def _reseed(self) -> None:
        seed_everything(batch_seed(self.cfg.seed, self.dist.rank, self.epoch, self.batch))

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        lr = lr_at(self.cfg.optim, self.global_step, self.steps_per_epoch, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.recipe.progress = self.epoch + self.batch / self.steps_per_epoch
        with torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        ):
            out = self.recipe.loss(self.ddp_model, x, y)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise RobustlabError(
                f"the loss is {loss.item()} at epoch {self.epoch + 1}, batch {self.batch}: "
                "lower optim.lr, or set optim.grad_clip"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        n = float(y.numel())
        sums = self.sums
        sums["n"] = sums.get("n", 0.0) + n
        sums["correct"] = sums.get("correct", 0.0) + float((out["logits"].argmax(1) == y).sum())
        for key, value in out.items():
            if key != "logits" and isinstance(value, torch.Tensor) and value.ndim == 0:
                sums[key] = sums.get(key, 0.0) + float(value.detach()) * n
        sums["lr"] = lr

    def _epoch_metrics(self, seconds: float) -> dict[str, Any]:
        keys = sorted(k for k in self.sums if k not in ("lr",))
        totals = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64)
        totals = dict(zip(keys, self.dist.all_reduce_sum(totals).tolist()))
        n = totals.pop("n")
        row: dict[str, Any] = {"epoch": self.epoch + 1, "lr": self.sums.get("lr", 0.0)}
        row["train_acc"] = totals.pop("correct") / n
        for key, value in totals.items():
            row[f"train_{key}"] = value / n
        last = self.epoch + 1 == self.cfg.epochs
        due = (
            (self.cfg.eval_every and (self.epoch + 1) % self.cfg.eval_every == 0)
            or last
            or self.recipe.stop_training
        )
        if due:
            row["test_acc"] = self.evaluate()
        if self.val_loader is not None and (due or self.cfg.select.metric != "last"):
            row.update(self.validate())
            self._select(row)
        row["seconds"] = round(seconds, 3)
        return row

    # -- validation and checkpoint selection ----------------------------------------------

    def _select_budget(self) -> tuple[float | None, str]:
        """``val_robust``'s eps and norm: the config's, else the recipe's (None: no attack)."""
        sc = self.cfg.select
        norm = sc.norm or getattr(self.recipe, "norm", "linf")
        if sc.metric != "val_robust":
            return None, norm
        eps = sc.eps if sc.eps is not None else getattr(self.recipe, "eps", None)
        if not eps:
            raise ConfigError(
                f"select.metric=val_robust needs a budget: set select.eps (recipe "
                f"{self.cfg.recipe.name!r} has no eps of its own)"
            )
        return float(eps), norm

    def validate(self) -> dict[str, float]:
        """Accuracy on the validation split: clean (``val_acc``) and, when checkpoints are
        selected by it, under PGD at ``select.eps`` (``val_robust_acc``)."""
        assert self.val_loader is not None
        correct, total = count_correct(self.model, self.val_loader)
        out = {"val_acc": (correct, total)}
        if self.select_eps is not None:
            from robustlab.attacks import PGD
            from robustlab.train.recipes.base import TRAINING_PRECISION

            sc = self.cfg.select
            attack = PGD(
                self.model, eps=self.select_eps, steps=sc.steps, norm=self.select_norm,
                step_size=2.5 * self.select_eps / sc.steps, seed=self.cfg.seed,
                precision=TRAINING_PRECISION,
            )  # fmt: skip
            robust = total = 0
            for x, y in self.val_loader:
                robust += int((~attack.run(x, y).success).sum())
                total += int(y.numel())
            out["val_robust_acc"] = (robust, total)
        keys = sorted(out)
        counts = torch.tensor([v for k in keys for v in out[k]], dtype=torch.float64)
        counts = self.dist.all_reduce_sum(counts).tolist()
        return {k: counts[2 * i] / counts[2 * i + 1] for i, k in enumerate(keys)}

    def _select(self, row: dict[str, Any]) -> None:
        """Keep the weights of the best epoch so far on the validation metric (ties: the
        earlier epoch). Every rank holds the same copy (the scores are all-reduced)."""
        key = {"val_acc": "val_acc", "val_robust": "val_robust_acc"}.get(self.cfg.select.metric)
        if key is None:
            return
        if self.best is None or row[key] > self.best["score"]:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best = {"score": row[key], "epoch": row["epoch"], "model": state}

    def evaluate(self) -> float:
        """Clean test accuracy of the current model (sharded over processes)."""
        return self._accuracy(self.model, self.test_loader)

    def _accuracy(self, model: nn.Module, loader: BatchLoader) -> float:
        correct, total = count_correct(model, loader)
        counts = self.dist.all_reduce_sum(torch.tensor([correct, total], dtype=torch.float64))
        return float(counts[0] / counts[1])

    def _log_tensorboard(self, row: dict[str, Any]) -> None:
        """The epoch's numbers as TensorBoard scalars (``tensorboard --logdir runs``)."""
        if not self.cfg.tensorboard:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir))
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, row["epoch"])
        self._writer.flush()

    def fit(self) -> Path:
        """Train to the end (or resume to the end); returns the run directory."""
        try:
            return self._fit()
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._release_lock()
            self.dist.close()

    def _fit(self) -> Path:
        cfg = self.cfg
        self._prepare_run_dir()
        kill_at = int(os.environ.get(KILL_ENV, "0"))
        self.ddp_model.train()
        last_row: dict[str, Any] = {}
        epochs = tqdm(
            range(self.epoch, cfg.epochs),
            desc="epochs",
            disable=self.tqdm_disable,
            initial=self.epoch,
            total=cfg.epochs,
        )
        for epoch in epochs:
            self.epoch = epoch
            self.loader.set_epoch(epoch)
            start, t0 = self.batch, time.perf_counter()
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=start,
                desc=f"epoch {epoch + 1}",
                leave=False,
                disable=self.tqdm_disable,
            )
            for x, y in self.loader.batches(start):
                if self.batch == start or (
                    cfg.checkpoint_every and self.batch % cfg.checkpoint_every == 0
                ):
                    self._reseed()
                self._train_step(x, y)
                self.batch += 1
                self.global_step += 1
                bar.update(1)
                bar.set_postfix(
                    loss=f"{self.sums['loss'] / self.sums['n']:.3f}",
                    acc=f"{self.sums['correct'] / self.sums['n']:.3f}",
                )
                if (
                    cfg.checkpoint_every
                    and self.batch % cfg.checkpoint_every == 0
                    and self.batch < self.steps_per_epoch
                ):
                    self.save_checkpoint()
                if kill_at and self.global_step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            bar.close()
            extra = self.recipe.on_epoch_end(self.model, epoch)
            row = {**self._epoch_metrics(time.perf_counter() - t0), **extra}
            last_row = row
            if self.dist.is_main:
                self.run.append_metrics(row)
                self._log_tensorboard(row)
            log.info(
                "epoch %d/%d  loss %.4f  train acc %.4f%s  (%.1f s)", epoch + 1, cfg.epochs,
                row.get("train_loss", math.nan), row["train_acc"],
                f"  test acc {row['test_acc']:.4f}" if "test_acc" in row else "", row["seconds"],
            )  # fmt: skip
            self.epoch, self.batch, self.sums = epoch + 1, 0, {}
            self.save_checkpoint()
            epochs.set_postfix(test_acc=row.get("test_acc"))
            if self.recipe.stop_training:
                log.info("recipe %s stopped training after epoch %d", cfg.recipe.name, epoch + 1)
                break
        epochs.close()
        return self._finish(last_row)

    def _finish(self, last_row: dict[str, Any]) -> Path:
        if not last_row:  # resumed a run stopped between its last epoch and its export
            rows = self.run.metrics()
            last_row = rows[-1] if rows else {"test_acc": self.evaluate()}
        final = {k: last_row[k] for k in ("epoch", "train_acc", "test_acc") if k in last_row}
        if self.best is not None:  # the selected epoch's weights are what is saved
            self.model.load_state_dict(self.best["model"])
            metric = self.cfg.select.metric
            rows = [r for r in self.run.metrics() if r.get("epoch") == self.best["epoch"]]
            final["train_acc"] = rows[0]["train_acc"] if rows else None  # of the saved epoch
            final.update(
                selected_by=metric, selected_epoch=self.best["epoch"],
                selected_score=self.best["score"], test_acc=self.evaluate(),
            )  # fmt: skip
            log.info(
                "saving epoch %d's weights (best %s %.4f on %d validation images)",
                self.best["epoch"], metric, self.best["score"], len(self.val_data or []),
            )  # fmt: skip
        teacher = getattr(self.recipe, "teacher", None)
        if teacher is not None:  # the teacher's accuracy on the same splits, for comparison
            final["teacher_test_acc"] = self._accuracy(teacher.module, self.test_loader)
            if self.val_loader is not None:
                final["teacher_val_acc"] = self._accuracy(teacher.module, self.val_loader)
        exported = self.recipe.export(self.model)
        from robustlab.defenses import DefendedModel

        if isinstance(exported, DefendedModel):  # weights of the model; defenses in meta
            exported = exported.model
        if self.dist.is_main:
            self.run.save_model(exported)
            extras = self.recipe.export_extras(self.model)
            for filename, tensors in extras.items():
                self.run.save_extra(filename, tensors)
            self._write_meta(status="complete", final=final, extras=list(extras))
        self.dist.barrier()
        return self.run_dir


def train(cfg: TrainConfig, **kwargs: Any) -> Path:
    """Train as ``cfg`` describes; see :class:`Trainer` for the keyword arguments."""
    return Trainer(cfg, **kwargs).fit()
