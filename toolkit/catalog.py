"""Every registry, with the modules that fill it: names are known before torch is imported.

    from toolkit.catalog import MODELS
    MODELS.check("resnet5", "model.name")     # ConfigError listing the valid names; imports no torch
    MODELS.build("lenet", num_classes=10)     # imports toolkit.models.lenet, then calls its builder

Why a list here as well as the `@MODELS.register(name)` beside each builder: a config is checked,
and a wrong name refused, before the run imports torch (~1.2 s), so a config error answers in a
fraction of a second (transformers' auto classes keep such a name -> module table for the same
reason). The two cannot drift apart: registering a name that its module is not listed for here
raises at import, and tests/test_list.py builds every listed name.

This module imports nothing but toolkit.registry: keep it so.
"""

from __future__ import annotations

from toolkit.registry import Registry

# The torchvision backbones with a model entry (toolkit.models.torchvision_nets registers one per
# key): arch -> dotted path of its final nn.Linear inside the torchvision model. The entries swap
# that head; toolkit.models.weights uses the keys to know which names take torchvision weights enums.
HEADS: dict[str, str] = {
    "resnet18": "fc",
    "resnet34": "fc",
    "resnet50": "fc",
    "vgg16": "classifier.6",
    "vgg16_bn": "classifier.6",
    "mobilenet_v3_small": "classifier.3",
}

# builders: (num_classes, pretrained=None) -> nn.Module
MODELS = Registry("model", {
    "toolkit.models.lenet": ("lenet", "simple_cnn"),
    "toolkit.models.small_cnns": ("base_cnn", "vgg16_bn_cifar"),
    "toolkit.models.resnet_cifar": ("resnet18_cifar", "res_basic", "res_bottleneck", "resnet9"),
    "toolkit.models.torchvision_nets": tuple(HEADS),
})
# builders: (root, split_seed, limit, download, **data keys) -> Splits
DATASETS = Registry("dataset", {
    "toolkit.data.digits": ("digits",),
    "toolkit.data.cifar": ("cifar10", "cifar100"),
    "toolkit.data.imagefolder": ("imagefolder",),
    "toolkit.data.prepared": ("prepared",),
    "toolkit.data.synthetic": ("synthetic",),
})
AUGMENTS = Registry("augmentation", {
    "toolkit.data.augment": ("none", "crop", "flip_crop", "rotate_flip", "imagenet", "randaugment", "autoaugment"),
})
LOSSES = Registry("loss", {"toolkit.losses": ("cross_entropy", "squared", "mse", "triplet")})
OPTIMIZERS = Registry("optimizer", {"toolkit.optim": ("sgd", "rmsprop", "adam", "adamw", "adagrad")})
SCHEDULERS = Registry("scheduler", {"toolkit.optim": ("multistep", "step", "constant", "cosine", "onecycle")})
