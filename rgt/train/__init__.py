"""Training: `python -m rgt.train` (bundled quickstart) or `python -m rgt.train -opt FILE.yml` (BasicSR-style).

    from rgt.train import load_options, train
    result = train(load_options("configs/train_RGT_S_x2.yml", ["train.total_iter=1000"]))
"""

from rgt.train.config import OptionError, load_options
from rgt.train.dataset import DataError
from rgt.train.experiment import ExperimentBusy
from rgt.train.loop import TrainingDiverged, TrainResult, train
from rgt.train.state import StateError

__all__ = ["DataError", "ExperimentBusy", "OptionError", "StateError", "TrainResult", "TrainingDiverged",
           "load_options", "train"]
