"""The trainer: one step, one epoch, and the fit over epochs, with the method's hooks at their named points.

The same trainer runs in one process and under torchrun (DDP, see `onthefly.engine.distributed`), in float32 or
mixed precision, and resumes from its checkpoints (`onthefly.engine.checkpoint`). One step, in order:

    before_forward -> encoders -> uni-modal logits, scores (summed over ranks), ρ -> on_features -> head
    -> after_forward -> loss -> backward (DDP all-reduces the gradients) -> GradScaler unscale (fp16)
    -> gradient clipping -> after_backward (OGM edits the unscaled global gradient) -> optimizer step

The run around it (its folder, logger, resume, results) is `onthefly.engine.run`; what it trains is built by
`onthefly.engine.build`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from onthefly.config import Precision, Split
from onthefly.data.loaders import LoaderOptions, loader, run_loaders, train_loader
from onthefly.engine import checkpoint as ckpt
from onthefly.engine import distributed as ddp
from onthefly.engine.distributed import DistInfo
from onthefly.engine.errors import TrainingError
from onthefly.engine.evaluation import extract_features, iterate, metrics_from_features
from onthefly.engine.imbalance import ImbalanceMetrics
from onthefly.logging import RunLogger
from onthefly.modulation.base import EpochSchedule, JointStep, Modulation, StepContext
from onthefly.modulation.discrepancy import discrepancy, ratios
from onthefly.progress import bar as progress_bar
from onthefly.tasks import Task, build_task

log = logging.getLogger("onthefly")

_AMP_DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def config_dict(cfg: DictConfig) -> dict:
    """A resolved config as plain containers (what checkpoints and results.json hold)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


class TrainForward(nn.Module):
    """The differentiable part of a step as one module call. DDP synchronises gradients through the module it
    wraps and prepares that in ``forward``, so the encoders, the hooks that act in the forward pass and the
    head all run inside this one call. Holds the model and the method's extra module (if any) as submodules so
    that DDP averages all their gradients."""

    def __init__(self, trainer: Trainer, model: nn.Module, extra: Optional[nn.Module]):
        super().__init__()
        self.model, self.extra = model, extra
        object.__setattr__(self, "_trainer", trainer)  # a plain reference, not a submodule

    def forward(self, ctx: StepContext, fn) -> torch.Tensor:
        return fn(ctx)


class _Unimodal(nn.Module):
    """A head's uni-modal logits as a module call (so torch.func.functional_call can hold its weights fixed)."""

    def __init__(self, head: nn.Module, estimator):
        super().__init__()
        self.head, self.estimator = head, estimator

    def forward(self, feats: dict) -> dict:
        return self.head.unimodal_logits(feats, self.estimator)


class Trainer:
    """Fits a built run (:meth:`from_parts`). A method shapes the step through its hooks, or replaces it with a
    step strategy that composes :meth:`forward`, :meth:`backward`, :meth:`after_backward` and :meth:`update`;
    it shapes the epochs through its schedule (phases with their own optimizer) and ``train_indices``."""

    def __init__(
        self,
        cfg: DictConfig,
        model,
        modulation: Modulation,
        splits,
        optimizer,
        scheduler,
        logger: RunLogger,
        device,
        *,
        dist: Optional[DistInfo] = None,
        out_dir: Optional[Path] = None,
        resume_state: Optional[dict] = None,
        task: Optional[Task] = None,
    ):
        self.cfg, self.tc = cfg, cfg.trainer
        self.model, self.modulation, self.splits = model, modulation, splits
        self.task = task if task is not None else build_task(cfg, splits)
        self.input_keys = model.input_keys
        self.optimizer, self.scheduler, self.logger, self.device = optimizer, scheduler, logger, device
        self.dist = dist or DistInfo()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.modalities = model.modalities
        self.estimator = cfg.discrepancy.estimator
        self.global_step = 0
        self.nonfinite_steps = 0
        self.overflow_steps = 0  # fp16 steps the GradScaler skipped (gradient overflow; the loss was finite)
        self.use_rho = len(self.modalities) > 1
        self._check_estimator()

        # loaders: training is sharded over ranks (global batch = trainer.batch_size) and resumable mid-epoch
        self.loader_options = LoaderOptions(
            self.tc.num_workers, self.tc.prefetch_factor, self.tc.pin_memory and device.type == "cuda"
        )
        try:
            self.loaders = run_loaders(
                splits,
                cfg.seed,
                self.tc.batch_size,
                self.tc.eval_batch_size,
                self.loader_options,
                self.dist.world_size,
                self.dist.rank,
            )
        except ValueError as err:
            raise TrainingError(str(err)) from err
        self.local_batch, self.train_sampler = self.loaders.local_batch, self.loaders.train_sampler
        self._hook_loaders = None if self.dist.enabled else self.loaders

        # precision: autocast dtype and a GradScaler that is a no-op unless fp16
        self.amp_dtype = _AMP_DTYPES[Precision(self.tc.precision).name]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
        self.extra = modulation.extra_module()
        self.step_strategy = modulation.step_strategy() or JointStep()
        self.schedule = modulation.schedule() or EpochSchedule()
        self.phase, self.phase_epoch = self.schedule.phase(0), 0  # the optimizer's groups were made for this epoch
        self._train_indices = None  # the sample list of the current training loader (None: the whole split)
        self._steps_in_epoch: Optional[int] = None
        self.imbalance = ImbalanceMetrics(self, self.tc.imbalance)  # Shapley, utilisation, cost (trainer.imbalance)
        self.forward_module: nn.Module = TrainForward(self, model, self.extra)
        if self.dist.enabled:
            self.forward_module = nn.parallel.DistributedDataParallel(
                self.forward_module, device_ids=None, find_unused_parameters=self.tc.find_unused_parameters
            )
        self._all_reduce = ddp.all_reduce_sum if self.dist.enabled else None

        # resume state
        self.start_epoch, self._pending, self.best, self.best_state, self.history = 0, None, None, None, []
        self.elapsed_before = 0.0
        if resume_state is not None:
            self._load_state(resume_state)

    @classmethod
    def from_parts(cls, cfg: DictConfig, parts, logger: RunLogger, device, **options) -> Trainer:
        """A trainer for what :func:`onthefly.engine.build.build` made (``options``: dist, out_dir, resume_state)."""
        return cls(
            cfg,
            parts.model,
            parts.modulation,
            parts.splits,
            parts.optimizer,
            parts.scheduler,
            logger,
            device,
            task=parts.task,
            **options,
        )

    # --- set-up checks, and the data the hooks read ---------------------------------------------------------------
    def _check_estimator(self) -> None:
        head = self.model.head
        if self.use_rho and head.natural_estimator is None and self.estimator.value == "natural":
            if self.modulation.needs_rho:
                raise TrainingError(
                    f"{type(self.modulation).__name__} needs uni-modal logits, but fusion head {type(head).__name__} "
                    "has no natural estimator: add discrepancy.estimator=zero_out to the command line."
                )
            warnings.warn(
                f"fusion head {type(head).__name__} has no natural uni-modal estimator; per-modality diagnostics "
                "(ρ, uni-modal accuracy) are off. Set discrepancy.estimator=zero_out to get them.",
                stacklevel=2,
            )
            self.use_rho = False

    def _hook_loader(self, split: str, limit: Optional[int]):
        """(loader, batch limit) of a split for the hooks outside the step."""
        if self._hook_loaders is None:  # one process's loaders over the whole splits
            self._hook_loaders = run_loaders(
                self.splits, self.cfg.seed, self.local_batch, self.tc.eval_batch_size, self.loader_options
            )
        if split == "train_eval":
            found = loader(self.splits.probe_train, self.tc.eval_batch_size, self.loader_options, self.cfg.seed)
        else:
            found = self._hook_loaders[split]
        limit = (
            limit
            if limit is not None
            else (self.tc.limit_train_batches if split.startswith("train") else self.tc.limit_eval_batches)
        )
        return found, limit

    def _batches(self, split: str, limit: Optional[int] = None, with_index: bool = False):
        """(inputs, labels[, indices]) of a split for the hooks outside the step (G-Blending's loss estimates, a
        prototype pass): ``train`` (augmented), ``train_eval`` (train with evaluation transforms, in order), ``val``
        or ``test``. Under DDP every rank reads the whole split (not its shard), so every rank's method state
        stays identical."""
        found, limit = self._hook_loader(split, limit)
        return iterate(found, self.input_keys, self.device, limit, with_index)

    def _num_batches(self, split: str) -> int:
        """How many batches ``_batches(split)`` yields (the trainer's batch limit applied)."""
        found, limit = self._hook_loader(split, None)
        return len(found) if limit is None else min(limit, len(found))

    def _ctx(self, epoch: int, step: int) -> StepContext:
        ctx = StepContext(
            epoch=epoch,
            step=step,
            global_step=self.global_step,
            model=self.model,
            modalities=self.modalities,
            device=self.device,
            batches=self._batches,
            num_batches=self._num_batches,
            phase=self.phase,
            shared_rng=lambda: self._rng(3),
            steps_in_epoch=self._steps_in_epoch,
            train_size=len(self.splits["train"]),
        )
        ctx.discrepancy_of = lambda feats: self.discrepancy_with_grad(feats, ctx.labels, ctx.keep)
        return ctx

    def discrepancy_with_grad(
        self, feats: dict, labels: torch.Tensor, keep: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_m, ρ_m) of ``feats`` as :meth:`joint_loss` computes them, but differentiable w.r.t. the features, the
        head's weights held fixed (a hook that needs the gradient of ρ, docs/method.md §9). Under DDP the value is
        the global one and the gradient this rank's share times the world size, so that DDP's mean over ranks
        gives a single process's gradient on the whole batch."""
        head = self.model.head
        fixed = {f"head.{n}": p.detach() for n, p in head.named_parameters()}
        logits = torch.func.functional_call(_Unimodal(head, self.estimator), fixed, (feats,))
        idx = labels.view(-1, 1)
        weight = None if keep is None else keep.all(dim=1).float()  # as joint_loss: altered samples leave the scores
        probs = [
            torch.softmax(self.task.class_logits(z).float(), dim=1).gather(1, idx).squeeze(1) for z in logits.values()
        ]
        local = torch.stack([(p if weight is None else p * weight).sum() for p in probs])
        if self._all_reduce is not None:
            world = self.dist.world_size
            local = world * local - (world - 1) * local.detach() + (self._all_reduce(local) - local).detach()
        return local, ratios(local, self.cfg.discrepancy.reduce)

    def _rng(self, phase: int):
        """Under DDP: the forward hooks draw from a stream of this rank's own (phase 1: OPM's masks differ between
        ranks, as their samples do), after_backward from one shared by all ranks (phase 2: the GE noise is the
        same everywhere, so the replicas stay identical). In one process: the global streams, unchanged."""
        if not self.dist.enabled:
            return contextlib.nullcontext()
        rank = self.dist.rank if phase == 1 else -1
        return ddp.seeded_rng(self.device, self.cfg.seed, phase, self.global_step, rank + 1)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    # --- one step: the default forward, and the primitives a step strategy composes -------------------------------
    def joint_loss(self, ctx: StepContext) -> torch.Tensor:
        """The paper's forward: forward hooks, encoders, ρ, head and loss (runs inside :meth:`forward`)."""
        model, hooks, labels, task = self.model, self.modulation, ctx.labels, self.task
        hooks.before_forward(ctx)
        ctx.features = model.encode(ctx.inputs, ctx)
        if self.use_rho:
            with torch.no_grad():
                detached = {m: f.detach() for m, f in ctx.features.items()}
                ctx.unimodal = {
                    m: task.class_logits(z) for m, z in model.head.unimodal_logits(detached, self.estimator).items()
                }
                # samples whose forward a method altered (a modality dropped inside the model) leave the scores
                weight = None if ctx.keep is None else ctx.keep.all(dim=1)
                ctx.scores, ctx.rho = discrepancy(
                    ctx.unimodal, labels, self.cfg.discrepancy.reduce, all_reduce=self._all_reduce, weight=weight
                )
            ctx.log_per_modality("rho", ctx.rho)
            ctx.log_per_modality(
                "acc", torch.stack([(z.argmax(1) == labels).float().mean() for z in ctx.unimodal.values()])
            )
        hooks.on_features(ctx)
        ctx.logits = model.head(ctx.features)
        terms = getattr(model.head, "training_terms", None)
        if terms is not None:  # a head's own loss terms (CentralNet's branch classifiers)
            terms(ctx, task)
        hooks.after_forward(ctx)
        per_sample = task.loss(ctx.logits, labels, ctx.features)
        if ctx.sample_weight is None:
            fused_loss = per_sample.mean()
        else:
            fused_loss = (per_sample * ctx.sample_weight).sum() / ctx.sample_weight.sum().clamp_min(1)
        return ctx.loss_weight * fused_loss + sum(ctx.extra_losses.values())

    def forward(self, ctx: StepContext, fn=None) -> torch.Tensor:
        """Run ``fn(ctx)`` (default :meth:`joint_loss`) as the differentiable part of a step: inside the (DDP)
        module call, so DDP prepares the gradient all-reduce; under autocast; on this rank's RNG stream."""
        with self._rng(1), self._autocast():
            return self.forward_module(ctx, fn or self.joint_loss)

    def backward(self, loss: torch.Tensor) -> None:
        """Zero the gradients, back-propagate (DDP: the gradients are the mean over ranks when this returns),
        unscale them under fp16 (so after_backward sees the true gradient, docs/method.md §3), clip."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if self.tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)

    def after_backward(self, ctx: StepContext) -> None:
        with self._rng(2):
            self.modulation.after_backward(ctx)

    def update(self, ctx: StepContext, loss: torch.Tensor) -> dict:
        """Record the step's loss and accuracy, make the step's one host sync (every scalar at once; under DDP the
        mean over ranks, so every rank takes the same decision), skip a non-finite step, else step the optimizer.
        Returns the step's scalars as floats."""
        scaler = self.scaler
        ctx.metrics["loss"] = loss.detach()
        if ctx.logits is not None:
            ctx.metrics["acc"] = (self.task.class_logits(ctx.logits.detach()).argmax(1) == ctx.labels).float().mean()
        names = list(ctx.metrics)
        stacked = [ctx.metrics[n].float() for n in names]
        if scaler.is_enabled():
            names.append("_overflow")
            stacked.append(sum(scaler._found_inf_per_device(self.optimizer).values()).float().clamp(max=1))
        values = dict(zip(names, ddp.mean_over_ranks(torch.stack(stacked), self.dist).tolist()))
        overflow = values.pop("_overflow", 0.0) > 0
        if not np.isfinite(values["loss"]):
            self.nonfinite_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            if scaler.is_enabled():
                scaler.update()  # close this step's scaler bookkeeping (the non-finite gradients lower the scale)
            if self.nonfinite_steps > self.tc.max_nonfinite_steps:
                raise TrainingError(
                    f"loss was NaN/Inf in {self.nonfinite_steps} steps (last at epoch {ctx.epoch}, step {ctx.step}); "
                    "lower optim.lr, set trainer.grad_clip, or check the inputs. metrics.csv holds every finished epoch."
                )
            return values
        if scaler.is_enabled():
            scaler.step(self.optimizer)  # skips the update itself if a gradient overflowed
            scaler.update()
            self.overflow_steps += int(overflow)
        else:
            self.optimizer.step()
        return values

    def train_step(self, ctx: StepContext, inputs, labels, indices=None) -> dict:
        """One training step on a batch, as the method's step strategy runs it."""
        ctx.inputs, ctx.labels, ctx.indices = inputs, labels, indices
        return self.step_strategy.run(self, ctx)

    # --- epochs ---------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        self.model.train()
        start, sums, count = 0, {}, 0
        if self._pending is not None and self._pending["epoch"] == epoch:  # resuming inside this epoch
            start, acc = self._pending["step_in_epoch"], self._pending["acc"]
            sums, count = dict(acc["sums"]), acc["count"]
            self.logger.write_missing_steps(acc.get("step_rows", []))  # checkpoints that kept the rows themselves
        self._pending = None
        sampler = self.train_sampler
        sampler.set_epoch(epoch)
        batches_in_epoch = math.ceil(sampler.num_samples / self.local_batch)
        limit = self.tc.limit_train_batches
        total = batches_in_epoch if limit is None else min(limit, batches_in_epoch)
        self._steps_in_epoch = total
        sampler.start = min(start * self.local_batch, sampler.num_samples)
        every = self.tc.checkpoint_every_n_steps
        try:
            bar = progress_bar(
                iterate(self.loaders["train"], self.input_keys, self.device, max(total - start, 0), True),
                total=max(total - start, 0),
                desc=f"epoch {epoch}",
                leave=False,
                enabled=self.tc.progress and self.dist.is_main,
            )
            for step, (inputs, labels, indices) in enumerate(bar, start=start):
                with self.imbalance.counting() if step == start else contextlib.nullcontext():  # its FLOPs
                    values = self.train_step(self._ctx(epoch, step), inputs, labels, indices)
                self.global_step += 1
                if np.isfinite(values["loss"]):  # a skipped (non-finite) step stays out of the epoch's means
                    for k, v in values.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                if self.global_step % self.tc.log_every_n_steps == 0:  # steps.csv is written as the rows come
                    self.logger.log_step({f"train/{k}": v for k, v in values.items()}, self.global_step, epoch)
                bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['acc']:.2f}")
                if every and self.global_step % every == 0 and step + 1 < total:
                    self.save_checkpoint(epoch, step + 1, {"sums": sums, "count": count})
        finally:
            sampler.start = 0
        return {f"train/{k}": v / max(count, 1) for k, v in sums.items()}

    def _begin_epoch(self, epoch: int) -> None:
        """The method's say on the coming epoch: its phase (a new phase gets its own optimizer and scheduler), its
        training samples, and its epoch_start hook (not when the run resumes in the middle of this epoch)."""
        phase = self.schedule.phase(epoch)
        if phase != self.phase:
            self._rebuild_optimizer(epoch)
        indices = self.modulation.train_indices(epoch)
        indices = None if indices is None else [int(i) for i in indices]
        if indices != self._train_indices:
            self.loaders.train, self.train_sampler = train_loader(
                self.splits["train"],
                self.cfg.seed,
                self.local_batch,
                self.loader_options,
                self.dist.world_size,
                self.dist.rank,
                indices,
            )
            self.loaders.train_sampler, self._train_indices = self.train_sampler, indices
        if not (self._pending is not None and self._pending["epoch"] == epoch):
            self.modulation.epoch_start(self._ctx(epoch, 0))

    def _rebuild_optimizer(self, epoch: int) -> None:
        """A fresh optimizer and scheduler over the method's parameter groups for ``epoch`` (a new phase)."""
        from onthefly.engine.build import make_optimizer

        self.optimizer, self.scheduler = make_optimizer(self.cfg, self.model, self.modulation, self.extra, epoch)
        self.phase, self.phase_epoch = self.schedule.phase(epoch), epoch

    def metrics_on(self, split: str) -> dict:
        """The task's metrics of the current model on a split, keys prefixed `<split>/`."""
        if self.dist.enabled:  # each rank encodes its shard; features gathered, padding dropped
            # one set of BatchNorm statistics on every rank (rank 0's, which best.pt saves): on CPU (no
            # SyncBatchNorm) each rank's running statistics differ by its own last batches
            ddp.broadcast_buffers(self.model, self.dist)
            feats, labels = ddp.gathered_features(
                self.model, self.loaders[split], self.device, self.tc.limit_eval_batches, self.dist
            )
        else:
            feats, labels = extract_features(
                self.model,
                self.loaders[split],
                self.device,
                self.tc.limit_eval_batches,
                progress=self.tc.progress,
                desc=split,
            )
        m = metrics_from_features(self.model.head, feats, labels, self.estimator, self.task)
        m.update(self.imbalance.on_split(split, feats, labels))
        return {f"{split}/{k}": v for k, v in m.items()}

    def fit(self) -> dict:
        select = self.tc.select_on.value
        if select == Split.test.value:
            warnings.warn(
                "trainer.select_on=test: the checkpoint is chosen on the TEST split (as the official "
                "code does); its test numbers are optimistic.",
                stacklevel=2,
            )
        if self._resumed_rng is not None:
            ckpt.set_rng_state(self._resumed_rng, self.device)
        else:
            self.modulation.train_start(self._ctx(0, 0))
        t0 = time.time() - self.elapsed_before
        self._t0 = t0
        for epoch in range(self.start_epoch, self.tc.epochs):
            te = time.time()
            self._begin_epoch(epoch)
            row = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
            if type(self.schedule) is not EpochSchedule:
                row["phase"] = self.phase
            row.update(self.train_epoch(epoch))
            row.update(self.metrics_on("val"))
            if select == "test":
                row.update(self.metrics_on("test"))
            self.scheduler.step()
            end = self._ctx(epoch, 0)
            self.modulation.epoch_end(end)
            if end.metrics:  # the method's epoch-level quantities (one host sync)
                values = torch.stack(
                    [torch.as_tensor(v, device=self.device).detach().float() for v in end.metrics.values()]
                ).tolist()
                row.update({f"train/{k}": v for k, v in zip(end.metrics, values)})
            row["time/epoch_s"] = time.time() - te
            score = row[f"{select}/acc"]
            if self.best is None or score > self.best["score"]:
                self.best = {"epoch": epoch, "score": score, "split": select}
                self.best_state = copy.deepcopy(self.model.state_dict())
            self.logger.log_epoch(row, self.global_step)
            self.history.append(row)
            if self.dist.is_main:
                log.info(
                    "epoch %d  loss %.4f  train/acc %.3f  val/acc %.3f",
                    epoch,
                    row.get("train/loss", float("nan")),
                    row.get("train/acc", float("nan")),
                    row["val/acc"],
                )
            self.save_checkpoint(epoch + 1, 0, None)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        results = {
            "best": self.best,
            "train_time_s": time.time() - t0,
            "nonfinite_steps": self.nonfinite_steps,
            "last": self.history[-1] if self.history else {},
        }
        if self.scaler.is_enabled():
            results["overflow_steps"] = self.overflow_steps
        if self.tc.eval_test:
            test = self.metrics_on("test")
            results["test"] = {k.split("/", 1)[1]: v for k, v in test.items()}
            self.logger.log_test(test, self.tc.epochs)
        results.update(self.imbalance.results(results))
        return results

    # --- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int, step_in_epoch: int, acc: Optional[dict]) -> Optional[Path]:
        """Write a checkpoint at this position (every rank must call it: the RNG states are gathered to rank 0)."""
        if self.out_dir is None or self.tc.keep_checkpoints <= 0:
            return None
        rngs = ddp.gather_objects(ckpt.rng_state(self.device), self.dist)
        if not self.dist.is_main:
            return None
        state = {
            "config": config_dict(self.cfg),
            "world_size": self.dist.world_size,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": self.global_step,
            "nonfinite_steps": self.nonfinite_steps,
            "overflow_steps": self.overflow_steps,
            "elapsed_s": time.time() - self._t0,
            "epoch_acc": acc,
            "model": self.model.state_dict(),
            "extra": self.extra.state_dict() if self.extra is not None else None,
            "phase_epoch": self.phase_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "modulation": self.modulation.state_dict(),
            "imbalance": self.imbalance.state_dict(),
            "best": self.best,
            "best_state": self.best_state,
            "history": self.history,
            "logger": self.logger.state_dict(),
            "rng": rngs,
        }
        path = ckpt.save(state, ckpt.path_for(self.out_dir, self.global_step))
        ckpt.prune(self.out_dir, self.tc.keep_checkpoints)
        return path

    _resumed_rng: Optional[dict] = None
    _t0: float = 0.0

    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.extra is not None and state.get("extra") is not None:
            self.extra.load_state_dict(state["extra"])
        if state.get("phase_epoch", 0) != self.phase_epoch:  # the optimizer of the phase the run was in
            self._rebuild_optimizer(state["phase_epoch"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.modulation.load_state_dict(state["modulation"])
        self.imbalance.load_state_dict(state.get("imbalance", {}))
        self.global_step, self.nonfinite_steps = state["global_step"], state["nonfinite_steps"]
        self.overflow_steps = state.get("overflow_steps", 0)
        self.best, self.best_state, self.history = state["best"], state["best_state"], list(state["history"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.start_epoch = state["epoch"]
        if state["step_in_epoch"]:
            self._pending = {
                "epoch": state["epoch"],
                "step_in_epoch": state["step_in_epoch"],
                "acc": state["epoch_acc"],
            }
        rngs = state["rng"]
        self._resumed_rng = rngs[self.dist.rank % len(rngs)]
