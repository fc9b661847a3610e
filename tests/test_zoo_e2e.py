"""End-to-end runs of the optimizers, schedules, losses and label noise through the real CLI."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import DEMO, launch, metrics, ok, summary, train, weights

pytestmark = pytest.mark.slow  # every test here trains through the CLI


def test_adam_cosine_warmup_squared_loss_trains(tmp_path):
    run = tmp_path / "run"
    ok(train(["--config", DEMO, f"run.dir={run}", "train.epochs=4", "optim.name=adam", "optim.lr=0.003",
              "optim.weight_decay=0", "optim.no_decay_norm_bias=true", "sched.name=cosine",
              "sched.milestones=[]", "sched.warmup_epochs=1", "loss.name=squared", "log.every_n_steps=5",
              "log.tensorboard=false"]))
    s = summary(run)
    assert s["test_acc"] > 0.6, s["test_acc"]
    lrs = [r["lr"] for r in metrics(run) if r["kind"] == "train"]
    assert lrs[0] < lrs[7] and lrs[-1] < 0.0005  # warmup over the first epoch (39 steps), then decay


def test_rmsprop_step_schedule_with_label_noise(tmp_path):
    run = tmp_path / "run"
    ok(train(["--config", DEMO, f"run.dir={run}", "train.epochs=3", "optim.name=rmsprop", "optim.lr=0.001",
              "optim.momentum=0", "sched.name=step", "sched.step_size=2", "sched.milestones=[]",
              "data.label_noise=0.3", "log.tensorboard=false"]))
    noise = json.loads((run / "label_noise.json").read_text())
    assert noise["num_changed"] == round(0.3 * 1257) == len(noise["index"]) and noise["num_train"] == 1257
    assert all(a != b for a, b in zip(noise["original"], noise["noisy"]))
    assert summary(run)["test_acc"] > 0.3  # learns through 30% wrong labels; test labels are clean


def test_pretrained_frozen_backbone_under_ddp_trains_only_the_classifier(tmp_path):
    """E4's recipe: load weights, freeze the features, train the head. BatchNorm statistics of
    the frozen backbone must not move, and DDP must not complain about parameters without grads."""
    base = ["--config", DEMO, "model.name=base_cnn", "data.limit=256", "train.epochs=1",
            "sched.milestones=[]", "log.tensorboard=false"]
    ok(train([*base, f"run.dir={tmp_path / 'a'}"]))
    source = tmp_path / "a" / "model.safetensors"
    ok(launch([*base, f"run.dir={tmp_path / 'b'}", f"model.pretrained={source}", "model.freeze=backbone"]))
    a, b = weights(source), weights(tmp_path / "b" / "model.safetensors")
    s = summary(tmp_path / "b")
    assert s["world_size"] == 2 and 0 < s["num_trainable_params"] < s["num_params"]
    backbone = [k for k in a if not k.startswith("classifier.")]
    assert any("running_mean" in k for k in backbone)
    assert all(torch.equal(a[k], b[k]) for k in backbone), "the frozen backbone changed"
    assert not torch.equal(a["classifier.weight"], b["classifier.weight"]), "the head did not train"


def test_missing_pretrained_weights_fail_before_training(tmp_path):
    proc = train(["--config", DEMO, f"run.dir={tmp_path / 'run'}", "model.name=resnet18",
                  "model.pretrained=IMAGENET1K_V1"], env={"TORCH_HOME": str(tmp_path / "empty")}, timeout=120)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and "not in the local cache" in line[0] and "https://" in line[0]
    assert not (tmp_path / "run").exists()


def test_randaugment_and_rotate_flip_run_through_the_cli(tmp_path):
    for preset in ("randaugment", "rotate_flip"):
        run = tmp_path / preset
        ok(train(["--config", DEMO, f"run.dir={run}", f"data.augment={preset}", "data.limit=128",
                  "train.epochs=1", "sched.milestones=[]", "log.tensorboard=false"]))
        assert summary(run)["steps"] == 4  # 128 // 32


def test_torchvision_state_dict_loads_with_a_new_head_and_the_frozen_part_stays_bit_identical(tmp_path):
    """E4's frozen-ImageNet recipe with a file saved from torchvision's own ResNet-18 (1000-way
    head): the 10-way head is new, the backbone loads, and after training it is unchanged to the
    bit, BatchNorm running statistics included."""
    import torchvision
    from torch import nn

    torch.manual_seed(5)
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():  # running statistics unlike a fresh model's, so a reset would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    source = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / "resnet18_imagenet_layout.pth"
    torch.save(source, path)
    run = tmp_path / "run"
    ok(train(["--config", DEMO, f"run.dir={run}", "model.name=resnet18", f"model.pretrained={path}",
              "model.freeze=backbone", "train.epochs=1", "data.limit=128", "sched.milestones=[]",
              "log.tensorboard=false", "log.plots=false"]))
    final = weights(run / "model.safetensors")
    body = {k: v for k, v in source.items() if not k.startswith("fc.")}
    assert {f"backbone.{k}" for k in body} == {k for k in final if k.startswith("backbone.")}
    changed = [k for k, v in body.items() if not torch.equal(final[f"backbone.{k}"], v)]
    assert not changed, f"frozen backbone changed: {changed[:5]}"
    assert final["classifier.weight"].shape == (10, 512)  # the 1000-way head was replaced
    assert summary(run)["num_trainable_params"] == 10 * 512 + 10
