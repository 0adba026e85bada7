"""Parameter-efficient adapters for the project's backbones: LoRA (peft), VPT and Conv-Adapter (small wrappers).

Every function here modifies a `TaskModel`'s backbone *in place* and freezes it; the caller (the `lora`, `vpt` and
`convadapter` entries of profit_bench/methods.py) decides which parameters train. Their method_args (defaults):
    lora:        lora_r [8], lora_alpha [16], lora_dropout [0.0]   (every backbone: Linear and Conv2d layers)
    vpt:         vpt_length [10], vpt_deep [False]                 (ViT backbones)
    convadapter: adapter_reduction [4], adapter_scale_init [1.0]   (ResNet backbones)
Adapters live inside `model.backbone`, so at evaluation time both heads see the adapted backbone: the old-task
metric is the frozen old head on the adapted backbone (task-incremental protocol).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from profit_bench import UserError


# ------------------------------------------------------------------------------------------------- shared
def unwrap_backbone(backbone: nn.Module) -> nn.Module:
    """The timm network inside models.PadTo (which zero-pads small images for the ViT), or the backbone itself."""
    return backbone.net if hasattr(backbone, "net") and hasattr(backbone, "size") else backbone


# --------------------------------------------------------------------------------------------------- LoRA
def lora_target_names(backbone: nn.Module, prefix: str = "backbone") -> list[str]:
    """Full names (from the TaskModel root) of the layers LoRA adapts: every Linear and Conv2d of the backbone
    except the ViT patch embedding. For a timm ViT that is attn.qkv, attn.proj, mlp.fc1, mlp.fc2 of every block;
    for ResNet every conv (stem, blocks, downsample); for the MLP its Linear layers."""
    names = []
    for name, m in backbone.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and "patch_embed" not in name.split("."):
            names.append(f"{prefix}.{name}")
    return names


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> list[str]:
    """Inject peft LoRA (B zero-initialised, so the output is unchanged until B trains) into the backbone's
    Linear/Conv2d layers; peft freezes every non-LoRA parameter of `model`. Returns the adapted layer names."""
    from peft import LoraConfig, inject_adapter_in_model
    if r < 1:
        raise UserError(f"lora_r must be >= 1 (got {r})")
    targets = lora_target_names(model.backbone)
    # A list of exact names, not a regex: peft matches a list entry against the full module name.
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                       bias="none"), model)
    return targets


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_" in n]


# ---------------------------------------------------------------------------------------------------- VPT
class PromptedViT(nn.Module):
    """Visual Prompt Tuning (Jia et al., ECCV 2022) around a timm VisionTransformer.

    `length` learnable prompt tokens go right after the prefix (CLS) token, with no position embedding.
    shallow: one set of prompts enters before the first block and flows through all blocks.
    deep: block i sees its own fresh prompts (the previous block's outputs at the prompt positions are replaced).
    Prompts are dropped again before pooling, so the pooled feature is the CLS token as in the plain ViT.
    Init follows the VPT code: uniform(-v, v) with v = sqrt(6 / (3·patch² + dim)) (Xavier on the patch projection).
    """

    def __init__(self, vit: nn.Module, length: int = 10, deep: bool = False):
        super().__init__()
        if length < 1:
            raise UserError(f"vpt_length must be >= 1 (got {length})")
        self.vit, self.length, self.deep = vit, length, deep
        dim, depth = vit.embed_dim, len(vit.blocks)
        ph, pw = vit.patch_embed.patch_size
        v = math.sqrt(6.0 / float(3 * ph * pw + dim))
        self.prompts = nn.Parameter(torch.empty(depth if deep else 1, length, dim).uniform_(-v, v))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token sequence after the blocks and final norm, prompts included: [B, prefix + length + patches, dim]."""
        vit, p, L = self.vit, self.vit.num_prefix_tokens, self.length
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))  # CLS + pos, as forward_features
        B = x.shape[0]
        for i, blk in enumerate(vit.blocks):
            if i == 0 or self.deep:
                prompt = self.prompts[i if self.deep else 0].to(x.dtype).expand(B, -1, -1)
                rest = x[:, p:] if i == 0 else x[:, p + L:]
                x = torch.cat([x[:, :p], prompt, rest], dim=1)
            x = blk(x)
        return vit.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens(x)
        p = self.vit.num_prefix_tokens
        x = torch.cat([x[:, :p], x[:, p + self.length:]], dim=1)  # pooling sees the original token layout
        return self.vit.forward_head(x)  # num_classes=0: head is Identity → pooled features


def add_vpt(model: nn.Module, length: int = 10, deep: bool = False) -> PromptedViT:
    """Freeze the whole model and wrap the backbone's VisionTransformer in PromptedViT (inside PadTo if any)."""
    from timm.models.vision_transformer import VisionTransformer
    vit = unwrap_backbone(model.backbone)
    if not isinstance(vit, VisionTransformer):
        raise UserError(f"VPT needs a ViT backbone (vit_micro, vit_tiny, vit_small); got {type(vit).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    prompted = PromptedViT(vit, length, deep).to(next(vit.parameters()).device)
    if vit is model.backbone:
        model.backbone = prompted
    else:
        model.backbone.net = prompted
    return prompted


# -------------------------------------------------------------------------------------------- ConvAdapter
class ConvAdapter(nn.Module):
    """Conv-Adapter (Chen et al. 2022, "Conv-Adapter: Exploring Parameter Efficient Transfer Learning for
    ConvNets"), the parallel variant on a block's first conv:

        out = conv(x) + scale ⊙ up(relu(down(x)))

    down: grouped k×k conv C_in → C_in/reduction with groups = C_in/reduction (each group reads `reduction`
    input channels: the paper's depth-wise down-projection), same kernel/stride/padding as `conv` so the shapes
    match; up: 1×1 conv → C_out; scale: learnable per-channel vector. `up` starts at zero (like LoRA's B), so
    the adapted block equals the pretrained one before training while scale and up still get gradients.
    """

    def __init__(self, conv: nn.Conv2d, reduction: int = 4, scale_init: float = 1.0):
        super().__init__()
        c_in, c_out = conv.in_channels, conv.out_channels
        if reduction < 1 or c_in % reduction:
            raise UserError(f"adapter_reduction must divide the conv's {c_in} input channels (got {reduction})")
        mid = c_in // reduction
        self.conv = conv
        self.down = nn.Conv2d(c_in, mid, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                              dilation=conv.dilation, groups=mid, bias=False)
        self.act = nn.ReLU()
        self.up = nn.Conv2d(mid, c_out, 1, bias=False)
        nn.init.zeros_(self.up.weight)
        self.scale = nn.Parameter(torch.full((c_out,), float(scale_init)))

    def forward(self, x):
        return self.conv(x) + self.scale.view(1, -1, 1, 1) * self.up(self.act(self.down(x)))


def add_convadapter(model: nn.Module, reduction: int = 4, scale_init: float = 1.0) -> list[ConvAdapter]:
    """Freeze the model and put a ConvAdapter parallel to conv1 of every ResNet block (BasicBlock/Bottleneck)."""
    from timm.models.resnet import BasicBlock, Bottleneck
    net = unwrap_backbone(model.backbone)
    blocks = [m for m in net.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    if not blocks:
        raise UserError(f"ConvAdapter needs a ResNet backbone (resnet_small, resnet18); got {type(net).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = []
    for blk in blocks:
        ad = ConvAdapter(blk.conv1, reduction, scale_init).to(blk.conv1.weight.device)
        blk.conv1 = ad
        adapters.append(ad)
    return adapters
