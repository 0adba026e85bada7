"""Backbones + one head per task (task-incremental: the old head scores the old task on the shared backbone)."""
from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from profit_bench import UserError
from profit_bench.tasks import TaskData

MODELS = ("mlp", "resnet_small", "resnet18", "vit_micro", "vit_tiny", "vit_small")  # the only model list
CONV_MODELS = ("resnet_small", "resnet18")
VIT_MODELS = ("vit_micro", "vit_tiny", "vit_small")
VIT_NAMES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224"}
VIT_MICRO = dict(embed_dim=128, depth=4, num_heads=4)  # ≈0.8M parameters: a ViT that trains on a CPU
RESNET_SMALL = dict(widths=(16, 32, 64), blocks=3)     # ResNet-20 of He et al. (2016) §4.2, ≈0.27M parameters
VIT_SIZE = 32
MLP_WIDTH = 500


# The MLP's readings of C.1, which names neither the activation nor whether "LayerNorm after every layer except the
# last" sits before or after it. The first value of each is the project's original choice (Linear → LN → ReLU).
MLP_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
MLP_LAYERNORMS = ("before_act", "after_act", "none")  # Linear → LN → act | Linear → act → LN | Linear → act
MLP_DEFAULTS = dict(activation="relu", layernorm="before_act")


def mlp_backbone(in_dim: int, width: int = MLP_WIDTH, activation: str = "relu",
                 layernorm: str = "before_act") -> nn.Sequential:
    """The paper's toy MLP minus its last layer (the head): two Linear layers, each followed by the activation
    and, per `layernorm`, a LayerNorm before or after it (or none). PyTorch's default init (C.1 names PyTorch's
    RMSProp defaults, so the default init is the natural reading)."""
    if activation not in MLP_ACTIVATIONS:
        raise UserError(f"unknown activation {activation!r}; choose one of {', '.join(MLP_ACTIVATIONS)}")
    if layernorm not in MLP_LAYERNORMS:
        raise UserError(f"unknown layernorm {layernorm!r}; choose one of {', '.join(MLP_LAYERNORMS)}")
    layers: list[nn.Module] = [nn.Flatten()]
    for d_in in (in_dim, width):
        block = [nn.Linear(d_in, width), MLP_ACTIVATIONS[activation]()]
        if layernorm != "none":
            block.insert(1 if layernorm == "before_act" else 2, nn.LayerNorm(width))
        layers += block
    return nn.Sequential(*layers)


def resnet18_backbone(in_chans: int) -> nn.Module:
    """timm resnet18 with the CIFAR stem: 3×3 stride-1 conv1 and no max-pool, so 32×32 inputs keep resolution."""
    net = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=in_chans)
    net.conv1 = nn.Conv2d(in_chans, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # timm's init for convs
    net.maxpool = nn.Identity()
    return net


def resnet_small_backbone(in_chans: int) -> nn.Sequential:
    """CIFAR-style ResNet-20: 3×3 stem, three stages of BasicBlocks at widths 16/32/64 (stride 2 between
    stages), BatchNorm, global average pooling. timm's BasicBlock, so ConvAdapter finds its blocks."""
    from timm.models.resnet import BasicBlock
    widths, n = RESNET_SMALL["widths"], RESNET_SMALL["blocks"]
    layers = [nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    c_in = widths[0]
    for i, w in enumerate(widths):
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            down = (nn.Sequential(nn.Conv2d(c_in, w, 1, stride=stride, bias=False), nn.BatchNorm2d(w))
                    if stride != 1 or c_in != w else None)
            layers.append(BasicBlock(c_in, w, stride=stride, downsample=down))
            c_in = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    net.num_features = widths[-1]
    return net


def uses_channels_last(model_name: str, device) -> bool:
    """NHWC convolutions run on tensor cores: conv nets on CUDA train channels_last (the one place this is decided)."""
    return torch.device(device).type == "cuda" and model_name in CONV_MODELS


class PadTo(nn.Module):
    """Zero-pads (centered) images smaller than `size` so a ViT built for size×size accepts them."""

    def __init__(self, net: nn.Module, size: int):
        super().__init__()
        self.net, self.size = net, size

    def forward(self, x):
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size):
            top, left = (self.size - h) // 2, (self.size - w) // 2
            x = F.pad(x, (left, self.size - w - left, top, self.size - h - top))
        return self.net(x)


def vit_backbone(name: str, in_chans: int) -> nn.Module:
    """A timm VisionTransformer on 32×32 inputs with 4×4 patches (64 tokens + CLS), zero-padding smaller images."""
    if name == "vit_micro":
        from timm.models.vision_transformer import VisionTransformer
        net = VisionTransformer(img_size=VIT_SIZE, patch_size=4, in_chans=in_chans, num_classes=0, **VIT_MICRO)
    else:
        net = timm.create_model(VIT_NAMES[name], pretrained=False, img_size=VIT_SIZE, patch_size=4,
                                in_chans=in_chans, num_classes=0)
    return PadTo(net, VIT_SIZE)


class TaskModel(nn.Module):
    """backbone: x -> [B, feat_dim]; heads["old"], heads["new"]: features -> outputs of that task.

    Regression keeps a single output: heads["new"] is the same module as heads["old"] (parameters() dedups it).
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, n_old: int, n_new: int, shared_head: bool,
                 model_name: str = ""):
        super().__init__()
        self.backbone, self.feat_dim, self.model_name = backbone, feat_dim, model_name
        old = nn.Linear(feat_dim, n_old)
        self.heads = nn.ModuleDict({"old": old, "new": old if shared_head else nn.Linear(feat_dim, n_new)})

    def forward(self, x, task="old"):
        return self.heads[task](self.backbone(x))


def _keep_in_eval(module: nn.Module, args):
    module.training = False  # the loop calls model.train() every epoch; a frozen BN must not follow


def freeze_batchnorm_stats(backbone: nn.Module) -> int:
    """Make every BatchNorm whose affine parameters are frozen use and keep its running statistics, also in
    train mode. Without this, train-mode BN would re-estimate the statistics on the new task and change the
    "frozen" pretrained features (and the old-task metric) even though no weight trains. Returns the count."""
    n = 0
    for m in backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.register_forward_pre_hook(_keep_in_eval)
            n += 1
    return n


def _build_backbone(name: str, task: TaskData, mlp: dict) -> tuple[nn.Module, int]:
    if name == "mlp":
        return mlp_backbone(math.prod(task.in_shape), MLP_WIDTH, **mlp), MLP_WIDTH
    if len(task.in_shape) != 3:
        raise UserError(f"model {name!r} needs an image task (C, H, W input); task {task.name!r} has input shape "
                        f"{task.in_shape}; use model 'mlp' for it")
    in_chans, h, w = task.in_shape
    if name == "resnet18":
        net = resnet18_backbone(in_chans)
    elif name == "resnet_small":
        net = resnet_small_backbone(in_chans)
    else:
        if h > VIT_SIZE or w > VIT_SIZE:
            raise UserError(f"model {name!r} takes at most {VIT_SIZE}×{VIT_SIZE} inputs; {task.name!r} has {h}×{w}")
        net = vit_backbone(name, in_chans)
    return net, (net.net if isinstance(net, PadTo) else net).num_features


def build_model(name: str, task: TaskData, seed: int, mlp: dict | None = None) -> TaskModel:
    """Freshly initialised model for `task`, seeded by `seed` without touching the global RNG; on the task's device.
    `mlp`: the MLP's activation / layernorm (MLP_DEFAULTS where missing); other models take none."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    mlp = {**MLP_DEFAULTS, **(mlp or {})}
    if name != "mlp" and mlp != MLP_DEFAULTS:
        changed = {k: v for k, v in mlp.items() if MLP_DEFAULTS[k] != v}
        raise UserError(f"{', '.join(f'{k} {v!r}' for k, v in changed.items())}: only the mlp model has these "
                        f"knobs, not {name!r}")
    with torch.random.fork_rng(devices=[]):  # init runs on CPU, so only the CPU RNG needs restoring
        torch.manual_seed(seed)
        backbone, feat_dim = _build_backbone(name, task, mlp)
        model = TaskModel(backbone, feat_dim, task.n_old, task.n_new, shared_head=task.kind == "regression",
                          model_name=name)
    return model.to(task.device)
