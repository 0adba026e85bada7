"""Registers the adapter baselines of paper Table 7 in profit_bench.methods.METHODS: lora, vpt, convadapter.

Each `prepare(model, cfg)` freezes the pretrained model, adds its adapter to the backbone, and returns
(model, adapter parameters + new-head parameters). The old head stays frozen; at evaluation both heads read the
adapted backbone. `cfg.profit=True` (YAML `profit: true` with `ratio`, `n_ref`) trains exactly these parameters
through PROFIT(main) — run_trial does that for every method, so "LoRA + PROFIT" needs nothing here.

Method arguments come from `cfg.method_args` (defaults in brackets):
    lora:        lora_r [8], lora_alpha [16], lora_dropout [0.0]
    vpt:         vpt_length [10], vpt_deep [False]   (ViT only)
    convadapter: adapter_reduction [4], adapter_scale_init [1.0]   (ResNet only)

The `sgd/adam/adamw/rmsprop/lookahead/adan` optimizers and the `full`/`head`/`profit` methods live in
profit_bench/methods.py. Lookahead (timm) with the paper's α = 0.5, k = 1 is the base optimizer at half its step
size: after every base step the slow weights move halfway to the fast ones and the fast weights are reset to
them. Sweep `lookahead_k` (and `lookahead_alpha`) to get a genuine Lookahead.
"""
from __future__ import annotations

from profit_bench import UserError
from profit_bench.methods import register_method

from baselines.adapters import add_convadapter, add_lora, add_vpt, lora_parameters
from profit_bench.models import freeze_batchnorm_stats

DEFAULTS = {
    "lora": dict(lora_r=8, lora_alpha=16.0, lora_dropout=0.0),
    "vpt": dict(vpt_length=10, vpt_deep=False),
    "convadapter": dict(adapter_reduction=4, adapter_scale_init=1.0),
}
_KNOWN = {k for d in DEFAULTS.values() for k in d}


def method_args(name: str, cfg) -> dict:
    """This method's arguments: its defaults updated by cfg.method_args. Keys of the other baselines are
    ignored (one sweep grid may cover several methods); keys no baseline knows are an error."""
    given = dict(getattr(cfg, "method_args", None) or {})
    unknown = set(given) - _KNOWN
    if unknown:
        raise UserError(f"unknown method_args {sorted(unknown)}; known: {sorted(_KNOWN)}")
    return {k: type(v)(given[k]) if k in given else v for k, v in DEFAULTS[name].items()}


def _with_new_head(model, adapter_params) -> tuple:
    head = list(model.heads["new"].parameters())
    for p in head:
        p.requires_grad_(True)
    freeze_batchnorm_stats(model.backbone)
    return model, list(adapter_params) + head


def prepare_lora(model, cfg):
    a = method_args("lora", cfg)
    add_lora(model, r=a["lora_r"], alpha=a["lora_alpha"], dropout=a["lora_dropout"])
    return _with_new_head(model, lora_parameters(model))


def prepare_vpt(model, cfg):
    a = method_args("vpt", cfg)
    prompted = add_vpt(model, length=a["vpt_length"], deep=a["vpt_deep"])
    return _with_new_head(model, [prompted.prompts])


def prepare_convadapter(model, cfg):
    a = method_args("convadapter", cfg)
    adapters = add_convadapter(model, reduction=a["adapter_reduction"], scale_init=a["adapter_scale_init"])
    params = [p for ad in adapters for p in (*ad.down.parameters(), *ad.up.parameters(), ad.scale)]
    for p in params:
        p.requires_grad_(True)
    return _with_new_head(model, params)


register_method("lora", prepare_lora)  # every backbone: Linear layers (mlp, ViT blocks) and convs (ResNet)
register_method("vpt", prepare_vpt, supports=lambda model_name: model_name.startswith("vit"))
register_method("convadapter", prepare_convadapter, supports=lambda model_name: model_name == "resnet18")
