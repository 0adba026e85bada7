"""Backbones + one head per task (task-incremental: the old head scores the old task on the shared backbone)."""
from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from profit_bench import UserError
from profit_bench.tasks import TaskData

MODELS = ("mlp", "resnet18", "vit_tiny", "vit_small")
VIT_NAMES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224"}
VIT_SIZE = 32
MLP_WIDTH = 500


def mlp_backbone(in_dim: int, width: int = MLP_WIDTH) -> nn.Sequential:
    """The paper's toy MLP minus its last layer: LayerNorm after every layer except the (head) last one."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_dim, width), nn.LayerNorm(width), nn.ReLU(),
                         nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU())


def resnet18_backbone(in_chans: int) -> nn.Module:
    """timm resnet18 with the CIFAR stem: 3×3 stride-1 conv1 and no max-pool, so 32×32 inputs keep resolution."""
    net = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=in_chans)
    net.conv1 = nn.Conv2d(in_chans, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # timm's init for convs
    net.maxpool = nn.Identity()
    return net


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


def _build_backbone(name: str, task: TaskData) -> tuple[nn.Module, int]:
    if name == "mlp":
        return mlp_backbone(math.prod(task.in_shape)), MLP_WIDTH
    if len(task.in_shape) != 3:
        raise UserError(f"model {name!r} needs an image task (C, H, W input); task {task.name!r} has input shape "
                        f"{task.in_shape}; use model 'mlp' for it")
    in_chans, h, w = task.in_shape
    if name == "resnet18":
        net = resnet18_backbone(in_chans)
    else:
        if h > VIT_SIZE or w > VIT_SIZE:
            raise UserError(f"model {name!r} takes at most {VIT_SIZE}×{VIT_SIZE} inputs; {task.name!r} has {h}×{w}")
        net = vit_backbone(name, in_chans)
    return net, (net.net if isinstance(net, PadTo) else net).num_features


def build_model(name: str, task: TaskData, seed: int) -> TaskModel:
    """Freshly initialised model for `task`, seeded by `seed` without touching the global RNG; on the task's device."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):  # init runs on CPU, so only the CPU RNG needs restoring
        torch.manual_seed(seed)
        backbone, feat_dim = _build_backbone(name, task)
        model = TaskModel(backbone, feat_dim, task.n_old, task.n_new, shared_head=task.kind == "regression",
                          model_name=name)
    return model.to(task.device)
