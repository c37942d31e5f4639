"""The one training loop. Methods plug in through the hooks of `onthefly.modulation.base.Modulation`."""
from __future__ import annotations

import copy
import logging
import os
import random
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from onthefly.config import Split
from onthefly.engine.evaluate import evaluate, iterate
from onthefly.logging import RunLogger
from onthefly.models import build_model
from onthefly.modulation.base import Modulation, StepContext
from onthefly.modulation.discrepancy import discrepancy

log = logging.getLogger("onthefly")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says what to change."""


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int, device: torch.device):
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


class Trainer:
    def __init__(self, cfg: DictConfig, model, modulation: Modulation, splits, optimizer, scheduler, logger: RunLogger, device):
        self.cfg, self.tc = cfg, cfg.trainer
        self.model, self.modulation, self.splits = model, modulation, splits
        self.optimizer, self.scheduler, self.logger, self.device = optimizer, scheduler, logger, device
        self.modalities = model.modalities
        self.estimator = cfg.discrepancy.estimator
        self.global_step = 0
        self.nonfinite_steps = 0
        mk = lambda split, bs, shuffle: make_loader(splits[split], bs, shuffle, cfg.seed, self.tc.num_workers, device)  # noqa: E731
        self.loaders = {
            "train": mk("train", self.tc.batch_size, True),
            "val": mk("val", self.tc.eval_batch_size, False),
            "test": mk("test", self.tc.eval_batch_size, False),
        }
        self.use_rho = len(self.modalities) > 1
        self._check_estimator()

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

    def _batches(self, split: str, limit: Optional[int] = None):
        limit = limit if limit is not None else (self.tc.limit_train_batches if split == "train" else self.tc.limit_eval_batches)
        return iterate(self.loaders[split], self.modalities, self.device, limit)

    def _ctx(self, epoch: int, step: int) -> StepContext:
        return StepContext(epoch=epoch, step=step, global_step=self.global_step, model=self.model,
                           modalities=self.modalities, device=self.device, batches=self._batches)

    # --- one step ---------------------------------------------------------------------------------------------
    def train_step(self, ctx: StepContext, inputs, labels) -> dict:
        model, hooks = self.model, self.modulation
        ctx.inputs, ctx.labels = inputs, labels
        hooks.before_forward(ctx)
        ctx.features = model.encode(ctx.inputs)
        if self.use_rho:
            with torch.no_grad():
                detached = {m: f.detach() for m, f in ctx.features.items()}
                ctx.unimodal = model.head.unimodal_logits(detached, self.estimator)
                ctx.scores, ctx.rho = discrepancy(ctx.unimodal, labels, self.cfg.discrepancy.reduce)
            ctx.log_per_modality("rho", ctx.rho)
            ctx.log_per_modality("acc", torch.stack([(z.argmax(1) == labels).float().mean() for z in ctx.unimodal.values()]))
        hooks.on_features(ctx)
        ctx.logits = model.head(ctx.features)
        hooks.after_forward(ctx)
        per_sample = F.cross_entropy(ctx.logits, labels, reduction="none")
        if ctx.sample_weight is None:
            fused_loss = per_sample.mean()
        else:
            fused_loss = (per_sample * ctx.sample_weight).sum() / ctx.sample_weight.sum().clamp_min(1)
        loss = ctx.loss_weight * fused_loss + sum(ctx.extra_losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.tc.grad_clip)
        hooks.after_backward(ctx)
        ctx.metrics["loss"] = loss.detach()
        ctx.metrics["acc"] = (ctx.logits.argmax(1) == labels).float().mean()
        # the step's one host sync: every scalar at once (also tells whether the loss is finite)
        names = list(ctx.metrics)
        values = dict(zip(names, torch.stack([ctx.metrics[n].float() for n in names]).tolist()))
        if not np.isfinite(values["loss"]):
            self.nonfinite_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
            if self.nonfinite_steps > self.tc.max_nonfinite_steps:
                raise TrainingError(
                    f"loss was NaN/Inf in {self.nonfinite_steps} steps (last at epoch {ctx.epoch}, step {ctx.step}); "
                    "lower optim.lr, set trainer.grad_clip, or check the inputs. metrics.csv holds every finished epoch."
                )
            return values
        self.optimizer.step()
        return values

    # --- epochs ---------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        self.model.train()
        sums, count, step_rows = {}, 0, []
        limit = self.tc.limit_train_batches
        total = len(self.loaders["train"]) if limit is None else min(limit, len(self.loaders["train"]))
        bar = tqdm(self._batches("train"), total=total, desc=f"epoch {epoch}", leave=False,
                   disable=not self.tc.progress, dynamic_ncols=True)
        for step, (inputs, labels) in enumerate(bar):
            values = self.train_step(self._ctx(epoch, step), inputs, labels)
            self.global_step += 1
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            if self.global_step % self.tc.log_every_n_steps == 0:
                row = {f"train/{k}": v for k, v in values.items()}
                self.logger.log_step(row, self.global_step)
                step_rows.append({"step": self.global_step, "epoch": epoch, **row})
            bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['acc']:.2f}")
        self.logger.write_steps(step_rows)
        return {f"train/{k}": v / max(count, 1) for k, v in sums.items()}

    def evaluate(self, split: str) -> dict:
        m = evaluate(self.model, self.loaders[split], self.device, self.estimator, self.tc.limit_eval_batches)
        return {f"{split}/{k}": v for k, v in m.items()}

    def fit(self) -> dict:
        select = self.tc.select_on.value
        if select == Split.test.value:
            warnings.warn("trainer.select_on=test: the checkpoint is chosen on the TEST split (as the official "
                          "code does); its test numbers are optimistic.", stacklevel=2)
        self.modulation.train_start(self._ctx(0, 0))
        best, best_state, history = None, None, []
        t0 = time.time()
        for epoch in range(self.tc.epochs):
            te = time.time()
            row = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
            row.update(self.train_epoch(epoch))
            row.update(self.evaluate("val"))
            if select == "test":
                row.update(self.evaluate("test"))
            self.scheduler.step()
            self.modulation.epoch_end(self._ctx(epoch, 0))
            row["time/epoch_s"] = time.time() - te
            score = row[f"{select}/acc"]
            if best is None or score > best["score"]:
                best = {"epoch": epoch, "score": score, "split": select}
                best_state = copy.deepcopy(self.model.state_dict())
            self.logger.log_epoch(row, self.global_step)
            history.append(row)
            log.info("epoch %d  loss %.4f  train/acc %.3f  val/acc %.3f", epoch, row.get("train/loss", float("nan")),
                     row.get("train/acc", float("nan")), row["val/acc"])
        if best_state is not None:
            self.model.load_state_dict(best_state)
        results = {"best": best, "train_time_s": time.time() - t0, "nonfinite_steps": self.nonfinite_steps,
                   "last": history[-1] if history else {}}
        if self.tc.eval_test:
            test = self.evaluate("test")
            results["test"] = {k.split("/", 1)[1]: v for k, v in test.items()}
            self.logger.log_epoch({"epoch": self.tc.epochs, **test}, self.global_step)
        return results


def _config_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def train(cfg: DictConfig, out_dir: Path | str):
    """Train and evaluate one configuration; everything the run makes goes under ``out_dir``.

    Writes config.yaml, metrics.csv (per epoch), steps.csv (per step), results.json, best.pt and, unless
    logger.mode=disabled, a W&B run under out_dir/wandb. Returns (results, model at its best epoch, splits).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    tc = cfg.trainer
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(cfg.seed, tc.deterministic)
    device = select_device(tc.device)

    splits = instantiate(cfg.dataset).splits()
    modalities = list(tc.modalities) if tc.modalities else list(splits.modalities)
    unknown = [m for m in modalities if m not in splits.modalities]
    if unknown:
        raise TrainingError(f"trainer.modalities names {unknown}, but the dataset has {splits.modalities}")
    model = build_model(cfg, modalities, splits.num_classes).to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    modulation: Modulation = instantiate(cfg.modulation)
    if modulation.needs_rho and len(modalities) < 2:
        raise TrainingError(
            f"modulation {type(modulation).__name__} balances modalities, but this model has only {modalities}; "
            "use modulation=none for uni-modal runs."
        )
    modulation.setup(model, splits.num_classes)
    params = list(model.parameters())
    extra = modulation.extra_module()
    if extra is not None:
        params += list(extra.to(device).parameters())
    optimizer = instantiate(cfg.optim)(params)
    scheduler = instantiate(cfg.scheduler)(optimizer)

    config = _config_dict(cfg)
    lc = cfg.logger
    wandb_options = {
        "mode": lc.mode.value, "project": lc.project, "entity": lc.entity, "group": lc.group,
        "job_type": lc.job_type or cfg.modulation._target_.rsplit(".", 1)[-1], "name": lc.name or cfg.name,
        "tags": list(lc.tags),
    }
    logger = RunLogger(out_dir, config, wandb_options, log_steps=lc.log_steps)
    failed = True
    try:
        trainer = Trainer(cfg, model, modulation, splits, optimizer, scheduler, logger, device)
        results = trainer.fit()
        results.update(status="ok", modalities=modalities, num_classes=splits.num_classes,
                       device=str(device), config=config)
        if tc.save_checkpoint:
            torch.save({"model": model.state_dict(), "epoch": results["best"]["epoch"] if results["best"] else None},
                       out_dir / "best.pt")
        if tc.plots:
            from onthefly.plots import run_plots

            for path in run_plots(out_dir):
                logger.log_image(f"plots/{path.stem}", path)
        logger.finish(results)
        failed = False
        return results, model, splits
    except BaseException as err:  # record what happened, keep what was computed, re-raise
        logger.finish({"status": "failed", "error": f"{type(err).__name__}: {err}", "config": config,
                       "epochs_done": len(logger.epoch_rows)})
        raise
    finally:
        logger.close(failed=failed)


def run(cfg: DictConfig, out_dir: Path | str) -> dict:
    """:func:`train`, returning only the results dict (what results.json holds)."""
    return train(cfg, out_dir)[0]
