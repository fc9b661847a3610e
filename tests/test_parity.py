"""Parity with a plain loop: the engine adds nothing to what a training step computes.

The same seeded LeNet on the embedded digits, trained for two epochs (one process, fp32, no
augmentation, momentum SGD with weight decay, a step schedule, a partial last batch) by
`toolkit.engine.fit` and by the loop users write by hand in raw PyTorch, ends with
`torch.equal` weights. The plain side takes only the data and the seeded order from the
toolkit; model, optimizer, schedule and loss are built with torch directly.
"""

from __future__ import annotations

import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from toolkit.config import load_config
from toolkit.data import DATASETS
from toolkit.data.samplers import EpochSampler
from toolkit.engine import fit
from toolkit.models.lenet import LeNet

EPOCHS, BATCH, LIMIT, SEED, LR = 2, 32, 200, 3, 0.05


def plain_loop() -> dict:
    """What a report's training script does: for each epoch, for each batch, step."""
    set_seed(SEED)
    splits = DATASETS.build("digits", root=None, split_seed=0, limit=LIMIT, download=False, image_size=None,
                            train_splits=["train"])
    train = splits.train
    assert train.norm is None  # float32 images, already normalised
    model = LeNet(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)  # x0.1 after epoch 1
    order = EpochSampler(len(train), SEED)
    steps = 0
    for epoch in range(EPOCHS):
        order.set_epoch(epoch)
        idx = torch.tensor(list(order))
        for start in range(0, len(idx), BATCH):  # the last, partial batch too
            b = idx[start:start + BATCH]
            x, y = train.images[b], train.labels[b]  # digits are stored normalised (float32)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        sched.step()
    return {k: v.detach() for k, v in model.state_dict().items()}, steps


def test_engine_equals_a_plain_pytorch_loop(tmp_path):
    cfg = load_config(None, [
        "data.name=digits", f"data.limit={LIMIT}", f"data.batch_size={BATCH}", "data.drop_last=false",
        "data.augment=none", "model.name=lenet", f"optim.lr={LR}", "optim.momentum=0.9",
        "optim.weight_decay=5e-4", "sched.name=multistep", "sched.milestones=[1]", "sched.gamma=0.1",
        f"train.epochs={EPOCHS}", f"run.seed={SEED}", "train.precision=no", "log.plots=false",
        "log.tensorboard=false", "log.progress=none", f"run.dir={tmp_path / 'run'}"])
    summary = fit(cfg)
    expected, steps = plain_loop()
    assert summary["steps"] == steps
    got = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert got.keys() == expected.keys()
    different = [k for k in got if not torch.equal(got[k], expected[k])]
    assert not different, f"engine and plain loop differ in {different}"
