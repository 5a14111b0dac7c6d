"""The names of the augmentations before D and their parsing: below config (which validates
them) and the augmentation modules (which run them), so config imports no augmentation code."""

from __future__ import annotations

from gan_dist.errors import UserError

POLICIES = ("color", "translation", "cutout")  # DiffAugment (data.diffaugment)
GEOMETRIC = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac")  # ADA (data.augment)
COLOR = ("brightness", "contrast", "lumaflip", "hue", "saturation")
OPS = (*GEOMETRIC, *COLOR, "cutout")
BGC = (*GEOMETRIC, *COLOR)


def parse_policy(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise UserError(f"data.diffaugment: unknown augmentation {unknown[0]!r}; use a comma list of "
                        f"{', '.join(POLICIES)} (or '' for none)")
    return names


def parse_pipeline(text: str) -> tuple[str, ...]:
    """'bgc', a comma list of OPS, or both ('bgc,cutout'); '' for none."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    expanded = [op for n in names for op in (BGC if n == "bgc" else (n,))]
    unknown = [n for n in expanded if n not in OPS]
    if unknown:
        raise UserError(f"data.augment: unknown augmentation {unknown[0]!r}; use 'bgc' (the 12 of StyleGAN2-ADA), "
                        f"optionally with ',cutout', or a comma list of {', '.join(OPS)} (or '' for none)")
    return tuple(op for op in OPS if op in expanded)  # the paper's order, whatever order was typed
