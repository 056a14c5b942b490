"""The silo's SLM, behind one small surface whatever the architecture.

`[silo] arch` names a model family: `minilm` or `mpnet4` (the shared SLM helpers in
crosslm_shared.slm, imported lazily: they need the offline model packages), or an import path
``module:attribute`` of an object with the same four methods (tests use a tiny random BERT,
`tests/fakes/tiny_slm.py`). Whatever the family, a model has predict_proba, evaluate, save and
a `temperature`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from crosslm_client.config import BUILTIN_ARCHS, SiloConfig
from crosslm_shared.errors import AssetMissingError
from crosslm_shared.plugins import import_object

Examples = tuple[list[str], list[int]]  # (texts, label indices): what a model family trains on


class Family(Protocol):
    name: str  # what reports and the manifest call the architecture

    def train_new(self, config: SiloConfig, train: Examples, held: Examples, *, work_dir: Path) -> Any: ...

    def continue_and_choose(self, config: SiloConfig, current: Any, returned: Any, train: Examples, held: Examples,
                            synthetic: tuple[list[str], np.ndarray] | None = None) -> tuple[Any, dict]: ...

    def load(self, config: SiloConfig, folder: Path) -> Any: ...

    def calibrate(self, config: SiloConfig, model: Any, held: Examples) -> float: ...


def _slm_module():
    try:
        from crosslm_shared import slm
    except ImportError as e:
        raise AssetMissingError(f"SLM helpers (crosslm_shared.slm) are unavailable: {e}; install CrossLM with "
                                "its model packages (scripts/bootstrap)") from e
    return slm


class SharedFamily:
    """MiniLM or MPNet from the offline packages, trained as `crosslm simulate` trains them.

    ``privacy`` (a crosslm_shared.dp.PrivacyBudget, given when `[privacy] enabled`): every
    training is DP-SGD and its ε is recorded in the budget."""

    supports_dp = True

    def __init__(self, name: str):
        self.name = name

    def _base(self, config: SiloConfig, work_dir: Path) -> Any:
        """What the first SLM starts from: the arch name (a pretrained encoder, new head)."""
        return self.name

    def train_new(self, config: SiloConfig, train: Examples, held: Examples, *, work_dir: Path,
                  privacy=None) -> Any:
        slm = _slm_module()
        model, _info = slm.train_selected(self._base(config, work_dir), list(config.silo.labels), train, held,
                                          config.train.slm_config(seed=config.silo.seed), desc=f"{config.silo.name} SLM",
                                          privacy=privacy)
        return model

    def continue_and_choose(self, config: SiloConfig, current: Any, returned: Any, train: Examples, held: Examples,
                            synthetic: tuple[list[str], np.ndarray] | None = None, *,
                            privacy=None) -> tuple[Any, dict]:
        """DESIGN.md §2 step 5, the silo's side: continue the returned SLM on the private data
        (plus the synthetic set that came back with it), then keep whichever of it and
        ``current`` is better on the held-out split. The same selection as ``crosslm simulate``
        (crosslm_shared.slm.adopt_if_better): balanced accuracy, labels the held-out split lacks
        topped up from the synthetic set, ties to the newer model."""
        t, slm = config.train, _slm_module()
        if t.continue_epochs == 0:
            return keep_better(current, returned, held)
        return slm.adopt_if_better(current, returned, train, held,
                                   t.slm_config(seed=config.silo.seed, epochs=t.continue_epochs),
                                   synthetic=synthetic, desc=f"{config.silo.name} SLM continued", privacy=privacy)

    def load(self, config: SiloConfig, folder: Path) -> Any:
        return _slm_module().load_slm(folder)

    def calibrate(self, config: SiloConfig, model: Any, held: Examples) -> float:
        """Temperature scaling on the held-out split; sets and returns model.temperature."""
        model.temperature = float(_slm_module().calibrate_temperature(model, *held))
        return model.temperature


def keep_better(current: Any, returned: Any, held: Examples) -> tuple[Any, dict]:
    """The returned model if it is at least as good on the held-out split, else the current one."""
    before, after = current.evaluate(*held), returned.evaluate(*held)
    return (returned if after >= before else current), {"adopted": after >= before, "val_acc_current": before,
                                                        "val_acc_returned": after}


def family(config: SiloConfig) -> Family:
    """The model family `[silo] arch` names (checked when the config loads)."""
    arch = config.silo.arch
    if arch in BUILTIN_ARCHS:
        return SharedFamily(arch)
    return import_object(arch, what=f"[silo] arch={arch!r}",
                         hint=f"; use one of {list(BUILTIN_ARCHS)} or module:attribute on the Python path")


def grid_temperature(model: Any, texts: Sequence[str], ys: Sequence[int]) -> float:
    """The temperature on a geometric grid that minimises the held-out NLL (for families without
    a calibration of their own)."""
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
