"""The Hydra plugin class; the work is done in ``_impl.py``, imported only when a sweep starts."""

from __future__ import annotations

import sys
from typing import Any, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class OptunaSweeper(Sweeper):
    """Optuna sweeper: samples trials from ``hydra.sweeper.params`` and launches them in batches."""

    def __init__(self, **settings: Any) -> None:
        from ._impl import OptunaSweeperImpl

        self.sweeper = OptunaSweeperImpl(**settings)
        self.app_name = "hydra"

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.app_name = str(OmegaConf.select(config, "hydra.help.app_name", default=None) or "hydra")
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Optional[Any]:
        from ._errors import SweepConfigError

        try:
            return self.sweeper.sweep(arguments)
        except SweepConfigError as e:
            # Like the app's own config errors: one line and exit status 2, not Hydra's traceback.
            sys.stderr.write(f"{self.app_name}: error: {e}\n")
            sys.exit(2)
