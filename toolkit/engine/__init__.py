"""The one training loop, on Accelerate: CPU, one GPU, DDP, multi-node and DeepSpeed alike.

    accelerate launch toolkit/train.py --config configs/digits_lenet.yaml
    summary = fit(load_config("configs/digits_lenet.yaml"))

Rooms: fit.py (set-up -> resume -> epochs -> finish), stage.py (what a stage trains with),
loop.py (train_epoch), nonfinite.py (the non-finite loss policies), evaluate.py, resume.py,
state.py (TrainState, saved in every checkpoint).
"""

from toolkit.engine.evaluate import FeatureTap, evaluate
from toolkit.engine.fit import fit, make_accelerator
from toolkit.engine.loop import BatchPrep, TrainStep, train_epoch
from toolkit.engine.nonfinite import SkipNonFinite, StopOnNonFinite, make_policy
from toolkit.engine.resume import apply_optim_hparams
from toolkit.engine.stage import StageRun, choose_loader, make_loaders
from toolkit.engine.state import TrainState

__all__ = ["BatchPrep", "FeatureTap", "SkipNonFinite", "StageRun", "StopOnNonFinite", "TrainState", "TrainStep",
           "apply_optim_hparams", "choose_loader", "evaluate", "fit", "make_accelerator", "make_loaders",
           "make_policy", "train_epoch"]
