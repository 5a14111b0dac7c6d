"""The model registry: short names -> builders of (G, D).

A builder takes the model config and the data's sample shape and number of classes, and
returns `(G, D)` with `G(z, labels=None) -> samples` and `D(x, labels=None) -> logits [N]`.
With model.num_latent_categories > 0, D also has a `code_head` and `D(x, labels, with_code=True)`
returns `(logits, code_logits [N, categories])` (InfoGAN's Q sharing D's body).
Plugins add architectures with `@register_model("name")` without editing this package.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from gan_dist.errors import UserError, did_you_mean

Builder = Callable[..., tuple[nn.Module, nn.Module]]
MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make `builder(cfg, shape, num_classes) -> (G, D)` available as model.name."""

    def add(builder: Builder) -> Builder:
        MODELS[name] = builder
        return builder

    return add


def get_builder(name: str) -> Builder:
    _load_builtins()
    if name not in MODELS:
        raise UserError(f"config key 'model.name': unknown model '{name}'{did_you_mean(name, MODELS)}")
    return MODELS[name]


def build_models(cfg, shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Build G and D for `cfg.name`; unknown names and unfit data raise UserError."""
    builder = get_builder(cfg.name)
    if cfg.conditional and num_classes < 2:
        raise UserError("model.conditional=true needs a labelled dataset (index.json lists no classes); "
                        "set model.conditional=false")
    G, D = builder(cfg, tuple(shape), num_classes if cfg.conditional else 0)
    if cfg.num_latent_categories and not _has_code_head(D):
        raise UserError(f"model.name={cfg.name}: its D has no code head (a `code_head` layer and a "
                        "`with_code` argument to forward), so it cannot train model.num_latent_categories; "
                        "set it to 0")
    return G, D


def _has_code_head(D: nn.Module) -> bool:
    import inspect

    return getattr(D, "code_head", None) is not None and "with_code" in inspect.signature(D.forward).parameters


def _load_builtins() -> None:
    from gan_dist.models import dcgan, mlp, r3gan, resnet, toy2d  # noqa: F401  (they register themselves)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
