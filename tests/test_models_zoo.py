"""Model zoo: every registered model (shapes, classifier/forward_features contract), pretrained
weights from local files only (torch hub cache or a state-dict path), freezing and BatchNorm
handling of frozen backbones, and the checkpoint-compatible key names of lenet/resnet18_cifar.

All torchvision nets run at 32x32 here (their adaptive pooling accepts it); only resnet18 is
also run at 224x224 to keep the file fast."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from toolkit.catalog import HEADS
from toolkit.errors import ConfigError
from toolkit.models import MODELS
from toolkit.models.freeze import FREEZE_MODES, apply_freeze, set_train_mode, unwrap
from toolkit.models.weights import check_pretrained
from toolkit.optim import param_groups

TORCHVISION = ["mobilenet_v3_small", "resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn"]
OWN = ["base_cnn", "lenet", "res_basic", "res_bottleneck", "resnet18_cifar", "resnet9", "simple_cnn",
       "vgg16_bn_cifar"]
R18_URL = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
R18_FILE = os.path.basename(R18_URL)  # resnet18-f37072fd.pth


def _last_linear(head: nn.Module) -> nn.Linear:
    if isinstance(head, nn.Sequential):
        head = head[-1]
    assert isinstance(head, nn.Linear), type(head)
    return head


def _check_contract(model: nn.Module, size: int, num_classes: int = 7) -> None:
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        again = model.classifier(feats)
    assert out.shape == (2, num_classes) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert feats.ndim == 2 and feats.shape[0] == 2
    head = _last_linear(model.classifier)
    assert head.out_features == num_classes
    first = model.classifier[0] if isinstance(model.classifier, nn.Sequential) else model.classifier
    assert first.in_features == feats.shape[1]
    torch.testing.assert_close(out, again, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# registry contents and shapes


def test_zoo_names():
    assert MODELS.names() == sorted(OWN + TORCHVISION)


@pytest.mark.parametrize("name", MODELS.names())
def test_zoo_contract_32px(name):
    torch.manual_seed(0)
    model = MODELS.build(name, num_classes=7, pretrained=None)
    _check_contract(model, 32)
    if name in HEADS:  # torchvision: the old final Linear is gone, the new one is `classifier`
        assert isinstance(model.backbone.get_submodule(HEADS[name]), nn.Identity)
        assert isinstance(model.classifier, nn.Linear)
        assert model.classifier.in_features == {"fc": 512 if name in ("resnet18", "resnet34") else 2048,
                                                "classifier.6": 4096,
                                                "classifier.3": 1024}[HEADS[name]]


@pytest.mark.parametrize("name", ["base_cnn", "res_basic", "res_bottleneck", "simple_cnn"])
def test_zoo_112px(name):
    torch.manual_seed(0)
    _check_contract(MODELS.build(name, num_classes=7), 112)


def test_base_cnn_224px_and_resnet18_224px():
    torch.manual_seed(0)
    _check_contract(MODELS.build("base_cnn", num_classes=7), 224)
    _check_contract(MODELS.build("resnet18", num_classes=7), 224)


def test_lenet_is_32px_only_simple_cnn_is_not():
    lenet = MODELS.build("lenet", num_classes=7).eval()
    with pytest.raises(RuntimeError):
        lenet(torch.randn(1, 3, 112, 112))
    simple = MODELS.build("simple_cnn", num_classes=7).eval()
    simple.load_state_dict(lenet.state_dict())  # same keys and shapes
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(simple(x), lenet(x))  # identical function at 32 px


def test_vgg16_bn_cifar_shape():
    m = MODELS.build("vgg16_bn_cifar", num_classes=7)
    convs = [c for c in m.features if isinstance(c, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256] + [512] * 6
    assert sum(isinstance(c, nn.BatchNorm2d) for c in m.features) == 13
    assert sum(isinstance(c, nn.MaxPool2d) for c in m.features) == 5
    assert isinstance(m.classifier, nn.Linear) and m.classifier.in_features == 512


# ---------------------------------------------------------------------------------------------
# state-dict keys of the existing models (checkpoints exist)


def test_lenet_keys_unchanged():
    keys = list(MODELS.build("lenet", num_classes=10).state_dict())
    assert keys == ["features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
                    "features.7.weight", "features.7.bias", "features.9.weight", "features.9.bias",
                    "classifier.weight", "classifier.bias"]
    assert list(MODELS.build("simple_cnn", num_classes=10).state_dict()) == keys


def test_resnet18_cifar_keys_unchanged():
    keys = list(MODELS.build("resnet18_cifar", num_classes=10).state_dict())
    for k in ["stem.0.weight", "stem.1.running_mean", "layers.0.0.conv1.weight",
              "layers.0.0.bn2.num_batches_tracked", "layers.1.0.shortcut.0.weight",
              "layers.3.1.conv2.weight", "classifier.weight", "classifier.bias"]:
        assert k in keys, k
    assert keys[0] == "stem.0.weight" and keys[-2:] == ["classifier.weight", "classifier.bias"]
    assert len(keys) == 122


# ---------------------------------------------------------------------------------------------
# pretrained: torch hub cache


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub dir (TORCH_HOME/hub) for this test only."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    assert Path(torch.hub.get_dir()) == ckpt.parent
    return ckpt


def _tv_resnet18_state(seed: int = 123) -> dict:
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None)
    # make BN running stats distinguishable from a fresh model's
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _assert_backbone_equals(model, sd):
    got = model.backbone.state_dict()
    body = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    assert set(got) == set(body)
    for k, v in body.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("spec", ["IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"])
def test_pretrained_from_hub_cache(hub, spec):
    sd = _tv_resnet18_state()
    hub.mkdir(parents=True)
    torch.save(sd, hub / R18_FILE)
    check_pretrained("resnet18", spec)  # no error
    torch.manual_seed(0)
    model = MODELS.build("resnet18", num_classes=7, pretrained=spec)
    _assert_backbone_equals(model, sd)
    assert model.classifier.weight.shape == (7, 512)
    # fresh head: what nn.Linear(512, 7) gives right after building the backbone with seed 0
    torch.manual_seed(0)
    ref = MODELS.build("resnet18", num_classes=7)
    torch.testing.assert_close(model.classifier.weight, ref.classifier.weight)
    assert not torch.equal(model.backbone.conv1.weight, ref.backbone.conv1.weight)


def test_pretrained_missing_cache_file(hub):
    with pytest.raises(ConfigError) as ei:
        MODELS.build("resnet18", num_classes=7, pretrained="IMAGENET1K_V1")
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("model.pretrained: resnet18 weights ResNet18_Weights.IMAGENET1K_V1 are not "
                          "in the local cache ")
    assert str(hub / R18_FILE) in msg and R18_URL in msg
    assert "(or pass a state-dict path)" in msg
    assert not (hub / R18_FILE).exists()  # nothing was downloaded
    with pytest.raises(ConfigError, match="not in the local cache"):
        check_pretrained("resnet18", "IMAGENET1K_V1")


def test_pretrained_bad_enum_names(hub):
    with pytest.raises(ConfigError, match=r"unknown resnet18 weights 'IMAGENET1K_V9'; choose one of"):
        MODELS.build("resnet18", num_classes=7, pretrained="IMAGENET1K_V9")
    with pytest.raises(ConfigError, match="are not weights for resnet18"):
        MODELS.build("resnet18", num_classes=7, pretrained="ResNet50_Weights.IMAGENET1K_V2")
    for check in (lambda: MODELS.build("lenet", num_classes=7, pretrained="IMAGENET1K_V1"),
                  lambda: check_pretrained("lenet", "IMAGENET1K_V1")):
        with pytest.raises(ConfigError, match="only the torchvision backbones take weights names"):
            check()
    check_pretrained("lenet", None)  # nothing to check


# ---------------------------------------------------------------------------------------------
# pretrained: state-dict paths


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_path_torchvision_layout(tmp_path, suffix):
    sd = _tv_resnet18_state(7)
    path = tmp_path / f"r18{suffix}"
    (save_file if suffix == ".safetensors" else lambda s, p: torch.save(s, p))(sd, str(path))
    model = MODELS.build("resnet18", num_classes=7, pretrained=str(path))
    _assert_backbone_equals(model, sd)
    assert model.classifier.weight.shape == (7, 512)  # 1000-class head dropped


def test_pretrained_path_keeps_matching_head(tmp_path):
    sd = _tv_resnet18_state(7)
    path = tmp_path / "r18.pth"
    torch.save(sd, path)
    model = MODELS.build("resnet18", num_classes=1000, pretrained=str(path))
    assert torch.equal(model.classifier.weight, sd["fc.weight"])


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_pretrained_path_own_wrapper_layout(tmp_path, prefix):
    torch.manual_seed(1)
    src = MODELS.build("mobilenet_v3_small", num_classes=7)
    sd = {prefix + k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / "model.safetensors"  # like RUN/model.safetensors
    save_file(sd, str(path))
    torch.manual_seed(2)
    model = MODELS.build("mobilenet_v3_small", num_classes=7, pretrained=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k  # head included: same shape
    # into a 5-class model: backbone loaded, head fresh
    model5 = MODELS.build("mobilenet_v3_small", num_classes=5, pretrained=str(path))
    assert torch.equal(model5.backbone.features[0][0].weight, src.backbone.features[0][0].weight)
    assert model5.classifier.weight.shape == (5, 1024)


class Payload:
    """An arbitrary picklable object: loading it must never run its __setstate__."""

    loaded = False

    def __init__(self):
        self.x = 1

    def __setstate__(self, state):
        Payload.loaded = True
        self.__dict__.update(state)


def test_pretrained_unsafe_pickle_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Payload()}, path)
    Payload.loaded = False
    for name in ("resnet18", "lenet"):
        with pytest.raises(ConfigError) as ei:
            MODELS.build(name, num_classes=7, pretrained=str(path))
        msg = str(ei.value)
        assert "\n" not in msg and "weights_only=True: Unsupported global" in msg and str(path) in msg
    assert Payload.loaded is False


def test_pretrained_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ConfigError, match="does not hold a state dict"):
        MODELS.build("lenet", num_classes=7, pretrained=str(path))
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ConfigError, match="cannot read safetensors file"):
        MODELS.build("lenet", num_classes=7, pretrained=str(bad))


@pytest.mark.parametrize("name", ["resnet18", "lenet"])
def test_pretrained_missing_path(tmp_path, name):
    missing = str(tmp_path / "nope" / "w.pth")
    with pytest.raises(ConfigError) as ei:
        MODELS.build(name, num_classes=7, pretrained=missing)
    assert str(ei.value) == f"model.pretrained: state-dict file {missing!r} does not exist"
    with pytest.raises(ConfigError, match="does not exist"):
        check_pretrained(name, missing)


def test_pretrained_wrong_shape_names_key(tmp_path):
    sd = _tv_resnet18_state()
    sd["layer2.0.conv1.weight"] = torch.zeros(128, 32, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ConfigError) as ei:
        MODELS.build("resnet18", num_classes=7, pretrained=str(path))
    msg = str(ei.value)
    assert "\n" not in msg and "'layer2.0.conv1.weight'" in msg
    assert "(128, 32, 3, 3) in the file but (128, 64, 3, 3) in the model" in msg


def test_pretrained_missing_and_unexpected_keys(tmp_path):
    sd = _tv_resnet18_state()
    del sd["layer4.1.bn2.weight"]
    torch.save(sd, tmp_path / "a.pth")
    with pytest.raises(ConfigError, match=r"missing key 'layer4.1.bn2.weight'"):
        MODELS.build("resnet18", num_classes=7, pretrained=str(tmp_path / "a.pth"))
    sd = _tv_resnet18_state()
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "b.pth")
    with pytest.raises(ConfigError, match=r"unexpected key 'extra.weight'"):
        MODELS.build("resnet18", num_classes=7, pretrained=str(tmp_path / "b.pth"))
    # old torchvision files lack num_batches_tracked: accepted
    sd = {k: v for k, v in _tv_resnet18_state().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "c.pth")
    MODELS.build("resnet18", num_classes=7, pretrained=str(tmp_path / "c.pth"))


def test_pretrained_own_models(tmp_path):
    torch.manual_seed(3)
    src = MODELS.build("resnet18_cifar", num_classes=10)
    path = tmp_path / "r.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    same = MODELS.build("resnet18_cifar", num_classes=10, pretrained=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k
    other = MODELS.build("resnet18_cifar", num_classes=7, pretrained=str(path))  # head dropped
    assert torch.equal(other.stem[0].weight, src.stem[0].weight)
    assert other.classifier.weight.shape == (7, 512)

    lenet = MODELS.build("lenet", num_classes=10)
    torch.save(lenet.state_dict(), tmp_path / "lenet.pth")
    simple = MODELS.build("simple_cnn", num_classes=10, pretrained=str(tmp_path / "lenet.pth"))
    assert torch.equal(simple.features[7].weight, lenet.features[7].weight)
    bad = dict(lenet.state_dict())
    bad["features.0.weight"] = torch.zeros(6, 1, 5, 5)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match=r"key 'features.0.weight' has shape \(6, 1, 5, 5\)"):
        MODELS.build("lenet", num_classes=10, pretrained=str(tmp_path / "bad.pth"))


# ---------------------------------------------------------------------------------------------
# freezing


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["res_basic", "vgg16_bn_cifar", "mobilenet_v3_small", "lenet"])
def test_apply_freeze_modes(name):
    model = MODELS.build(name, num_classes=7)
    names = {n for n, _ in model.named_parameters()}
    head = {n for n in names if n.startswith("classifier.")}
    assert head and head != names
    assert FREEZE_MODES == ("none", "backbone", "classifier")

    assert apply_freeze(model, "backbone") is model
    assert _trainable(model) == head
    ids = [id(p) for g in param_groups(model, 0.0) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.classifier.parameters())

    apply_freeze(model, "classifier")  # absolute state, not cumulative
    assert _trainable(model) == names - head
    ids = {id(p) for g in param_groups(model, 0.0) for p in g["params"]}
    assert ids.isdisjoint(id(p) for p in model.classifier.parameters())
    assert len(ids) == len(names - head)

    apply_freeze(model, "none")
    assert _trainable(model) == names


def test_apply_freeze_bad_mode_and_wrapped():
    model = MODELS.build("res_basic", num_classes=7)
    with pytest.raises(ConfigError, match=r"unknown freeze mode 'features'; choose one of: none, "
                                          r"backbone, classifier"):
        apply_freeze(model, "features")
    wrapped = nn.DataParallel(model)  # stands in for DDP: `.module`
    assert unwrap(wrapped) is model
    apply_freeze(wrapped, "backbone")
    assert _trainable(model) == {"classifier.weight", "classifier.bias"}
    set_train_mode(wrapped)
    assert wrapped.training and model.training and not model.stem[1].training


def _bn_stats(model):
    return {n: m.running_mean.clone() for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("name", ["res_basic", "resnet18"])
def test_set_train_mode_frozen_backbone_keeps_bn_stats(name):
    torch.manual_seed(0)
    model = MODELS.build(name, num_classes=7)
    x = torch.randn(4, 3, 32, 32) * 3 + 1
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns

    apply_freeze(model, "backbone")
    model.eval()
    set_train_mode(model)
    assert model.training and model.classifier.training
    assert all(not m.training for m in bns)
    before = _bn_stats(model)
    out = model(x)
    out.sum().backward()
    after = _bn_stats(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.classifier.weight.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("classifier."))

    apply_freeze(model, "classifier")
    set_train_mode(model)
    assert all(m.training for m in bns)

    apply_freeze(model, "none")
    set_train_mode(model)
    assert all(m.training for m in bns)
    before = _bn_stats(model)
    model(x)
    after = _bn_stats(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)
