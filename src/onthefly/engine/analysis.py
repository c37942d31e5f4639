"""After training: linear probes, missing-modality robustness, and loading a finished run from its folder."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from onthefly.data.loaders import make_loader
from onthefly.engine.build import build_model, build_splits, check_targets
from onthefly.engine.distributed import select_device
from onthefly.engine.evaluation import extract_features, iterate, linear_probe, robustness_curve
from onthefly.tasks import Classification, Task

RATIOS = tuple(round(0.1 * i, 1) for i in range(11))


def load_run(run_dir: Path | str, device: str = "auto"):
    """(cfg, model with its best weights, splits, device) of a finished run folder.

    The folder is data: its config.yaml may only name the project's registered classes (:func:`check_targets`),
    and best.pt is read with ``weights_only=True``; nothing in the folder runs."""
    run_dir = Path(run_dir)
    cfg_path, ckpt_path = run_dir / "config.yaml", run_dir / "best.pt"
    for path in (cfg_path, ckpt_path):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run_dir must be a finished run folder of `onthefly.train`.")
    cfg = OmegaConf.load(cfg_path)
    check_targets(cfg, str(cfg_path))  # a run folder is data: build only the project's own classes
    dev = select_device(device)
    splits = build_splits(cfg)
    model, _, _ = build_model(cfg, splits, torch.device("cpu"))
    instantiate(cfg.modulation).setup(model, splits.num_classes)  # a method may have wrapped the head it saved
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(
            f"{ckpt_path} is not a checkpoint of this run's model ({err}); retrain or pick another run."
        ) from err
    return cfg, model.to(dev), splits, dev


def _features(model, splits, device, batch_size: int, split: str):
    dataset = splits.probe_train if split == "train" else splits[split]
    return extract_features(model, make_loader(dataset, batch_size, False, 0, 0, device), device)


def probe(model, splits, device, batch_size: int = 256) -> dict[str, dict]:
    """Linear probe of each frozen encoder: trained on train, L2 chosen on val, accuracy on test.

    Returns {modality: {"acc", "val_acc", "l2"}}."""
    (ftr, ytr), (fva, yva), (fte, yte) = (
        _features(model, splits, device, batch_size, s) for s in ("train", "val", "test")
    )

    def vec(f):  # token features [N, T, d] (attention fusion) are probed through their mean token
        return f.flatten(1, -2).mean(1) if f.dim() > 2 else f

    return {
        m: linear_probe((vec(ftr[m]), ytr), (vec(fva[m]), yva), (vec(fte[m]), yte), splits.num_classes)
        for m in model.modalities
    }


def robustness(
    model,
    splits,
    device,
    ratios: Iterable[float] = RATIOS,
    batch_size: int = 256,
    seed: int = 0,
    task: Optional[Task] = None,
):
    """{modality: [fused test accuracy with that modality removed for a fraction r of samples]}."""
    feats, labels = _features(model, splits, device, batch_size, "test")
    if len(model.modalities) < 2:
        return {}
    with torch.no_grad():
        return {m: robustness_curve(model.head, feats, labels, m, ratios, seed, task) for m in model.modalities}


def plot_robustness(
    curves: dict[str, list[float]], path: Path, ratios: Iterable[float] = RATIOS, title: Optional[str] = None
) -> Path:
    from onthefly.plots import line_plot

    return line_plot(
        {f"{m} removed": (list(ratios), accs) for m, accs in curves.items()},
        path,
        xlabel="fraction of test samples without the modality",
        ylabel="fused accuracy",
        title=title or "missing-modality robustness",
    )


@torch.no_grad()
def estimator_agreement(
    model, splits, device, batch_size: int = 64, reduce: str = "pairwise", task: Optional[Task] = None
) -> dict:
    """How often the head's natural estimator and zero-out name the same dominant modality (argmax ρ), per
    test batch of ``batch_size``; with the mean ρ of each. Empty when the head has no natural estimator."""
    from onthefly.modulation.discrepancy import discrepancy

    head, task = model.head, task or Classification()
    if head.natural_estimator is None or len(model.modalities) < 2:
        return {}
    model.eval()
    agree, n = 0, 0
    rho_sum = {"natural": 0.0, "zero_out": 0.0}
    loader = make_loader(splits.test, batch_size, False, 0, 0, device)
    for inputs, labels in iterate(loader, model.input_keys, device):
        feats = model.encode(inputs)
        rhos = {
            e: discrepancy(
                {m: task.class_logits(z) for m, z in head.unimodal_logits(feats, e).items()}, labels, reduce
            )[1]
            for e in rho_sum
        }
        agree += int(rhos["natural"].argmax() == rhos["zero_out"].argmax())
        n += 1
        for e in rho_sum:
            rho_sum[e] = rho_sum[e] + rhos[e]
    out = {"agree": agree / max(n, 1), "batches": n}
    for e, total in rho_sum.items():
        for m, v in zip(model.modalities, (total / max(n, 1)).tolist()):
            out[f"rho_{m}_{e}"] = v
    return out
