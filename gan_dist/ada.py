"""The `bgc` augmentations of StyleGAN2-ADA (Karras et al. 2020), written from the paper, on
the device and differentiable with respect to the images.

Each image runs through the chosen operations in the paper's order; each operation applies
to each image with probability p (the rotations with 1 - sqrt(1 - p), as they come twice):
- geometric, composed into one affine map per image and sampled once, bilinear, with
  reflection at the borders: x-flip, rotation by a multiple of 90 degrees, integer
  translation (up to 1/8 of the size), isotropic scaling (lognormal, sd 0.2 octaves), a
  rotation by any angle, anisotropic scaling (sd 0.2), the rotation again, fractional
  translation (sd 1/8 of the size). Distances are in pixels, so non-square images rotate
  without shearing.
- colour, composed into one affine map of the channels: brightness (added, sd 0.2),
  contrast (sd 0.5 octaves), luma flip, hue rotation about the luma axis (RGB only) and
  saturation (sd 1 octave). Grey images get brightness, contrast and luma flip.
- cutout (only when named): a rectangle of half the size set to 0.

The paper also upsamples 2x with a wavelet filter around the geometric warp to limit
aliasing; we sample once (documented in docs/training.md). Images are in [-1, 1] as
everywhere in gan_dist, so contrast and the luma flip act about mid-grey.

Every parameter is drawn for every image in a fixed order (selection first, then value)
whether or not the operation applies, so the draws depend on the batch size alone (not on p
or on which images were chosen), and an image no operation chose is passed through bit for
bit. Nothing here copies a host value to the device or reads one back: on a GPU the
augmentation queues kernels and never waits.

R1 and R2 differentiate D through the warp twice. Not every torch version has the double
backward of grid_sample: `sampler_for` probes it once per device and dtype and otherwise
uses `gather_sample`, our own bilinear sampler built from gather (whose double backward
every version has), equal to the native op in value and in gradients of gradients.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F

from gan_dist.augment_names import COLOR, GEOMETRIC


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    cos, sin, zero, one = angle.cos(), angle.sin(), torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([cos, -sin, zero, sin, cos, zero, zero, zero, one], 1).view(-1, 3, 3)


def _scale(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    zero, one = torch.zeros_like(sx), torch.ones_like(sx)
    return torch.stack([sx, zero, zero, zero, sy, zero, zero, zero, one], 1).view(-1, 3, 3)


def _translation(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    zero, one = torch.zeros_like(tx), torch.ones_like(tx)
    return torch.stack([one, zero, tx, zero, one, ty, zero, zero, one], 1).view(-1, 3, 3)


class Draws:
    """Per-image random draws from one generator, in call order."""

    def __init__(self, n: int, device, dtype, generator: torch.Generator, p):
        self.n, self.device, self.dtype, self.gen, self.p = n, device, dtype, generator, p

    def chosen(self, p=None) -> torch.Tensor:
        return torch.rand(self.n, device=self.device, generator=self.gen) < (self.p if p is None else p)

    def uniform(self, low: float, high: float) -> torch.Tensor:
        return torch.rand(self.n, device=self.device, dtype=self.dtype, generator=self.gen) * (high - low) + low

    def normal(self, sd: float) -> torch.Tensor:
        return torch.randn(self.n, device=self.device, dtype=self.dtype, generator=self.gen) * sd

    def integer(self, high: int) -> torch.Tensor:
        return torch.randint(high, (self.n,), device=self.device, generator=self.gen).to(self.dtype)


def geometric_matrices(ops: tuple[str, ...], draws: Draws, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the 3x3 map from output to input pixel coordinates (centred), and whether
    any operation chose it."""
    n, dtype = draws.n, draws.dtype
    matrix = torch.eye(3, device=draws.device, dtype=dtype).expand(n, 3, 3)
    any_chosen = torch.zeros(n, dtype=torch.bool, device=draws.device)
    p = draws.p  # two chances to rotate, each 1 - sqrt(1 - p): the same total as one of p
    p_rotate = 1 - math.sqrt(1 - p) if isinstance(p, float) else 1 - torch.sqrt(1 - p)
    one = torch.ones(n, device=draws.device, dtype=dtype)

    def then(chosen: torch.Tensor, step: torch.Tensor) -> None:
        nonlocal matrix, any_chosen
        matrix = matrix @ torch.where(chosen[:, None, None], step, torch.eye(3, device=step.device, dtype=dtype))
        any_chosen = any_chosen | chosen

    # The arbitrary rotation comes twice, around the anisotropic scaling.
    sequence = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "rotate", "xfrac")
    for op in (op for op in sequence if op in ops):
        if op == "xflip":
            then(draws.chosen(), _scale(1 - 2 * draws.integer(2), one))
        elif op == "rotate90":
            then(draws.chosen(), _rotation(draws.integer(4) * (math.pi / 2)))
        elif op == "xint":
            chosen, tx, ty = draws.chosen(), draws.uniform(-0.125, 0.125), draws.uniform(-0.125, 0.125)
            then(chosen, _translation((tx * width).round(), (ty * height).round()))
        elif op == "scale":
            chosen, s = draws.chosen(), torch.exp2(draws.normal(0.2))
            then(chosen, _scale(s, s))
        elif op == "rotate":
            then(draws.chosen(p_rotate), _rotation(draws.uniform(-math.pi, math.pi)))
        elif op == "aniso":
            chosen, s = draws.chosen(), torch.exp2(draws.normal(0.2))
            then(chosen, _scale(s, 1 / s))
        else:  # xfrac
            chosen, tx, ty = draws.chosen(), draws.normal(0.125), draws.normal(0.125)
            then(chosen, _translation(tx * width, ty * height))
    return matrix, any_chosen


def warp(x: torch.Tensor, matrix: torch.Tensor, sampler) -> torch.Tensor:
    """Resample x through the per-image pixel-coordinate maps (align_corners=False grid).

    The map in grid_sample's [-1, 1] units is diag(2/w, 2/h, 1) @ matrix @ diag(w/2, h/2, 1),
    written out entry by entry. Coordinates stay in float32 (in bf16 a 256 px image's
    coordinates are 1 px apart) and the image is sampled in float32 too (float64 stays)."""
    n, _, h, w = x.shape
    work = torch.promote_types(x.dtype, torch.float32)
    m = matrix.to(work)
    theta = torch.stack([torch.stack([m[:, 0, 0], m[:, 0, 1] * (h / w), m[:, 0, 2] * (2 / w)], 1),
                         torch.stack([m[:, 1, 0] * (w / h), m[:, 1, 1], m[:, 1, 2] * (2 / h)], 1)], 1)
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    return sampler(x.to(work), grid).to(x.dtype)


def color_matrices(ops: tuple[str, ...], draws: Draws, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the (C+1)x(C+1) affine map of the channels, and whether any operation chose it."""
    n, dtype, size = draws.n, draws.dtype, channels + 1
    eye = torch.eye(size, device=draws.device, dtype=dtype)
    luma = torch.zeros(size, device=draws.device, dtype=dtype)
    luma[:channels] = channels ** -0.5
    luma_outer = torch.outer(luma, luma)
    matrix, any_chosen = eye.expand(n, size, size), torch.zeros(n, dtype=torch.bool, device=draws.device)
    for op in ops:
        chosen = draws.chosen()
        if op == "brightness":
            step = eye.repeat(n, 1, 1)
            step[:, :channels, channels] = draws.normal(0.2)[:, None]
        elif op == "contrast":
            c = torch.exp2(draws.normal(0.5))
            step = torch.diag_embed(torch.cat([c[:, None].expand(n, channels), torch.ones(n, 1, device=c.device, dtype=dtype)], 1))
        elif op == "lumaflip":
            step = eye - 2 * luma_outer * draws.integer(2)[:, None, None]
        elif op == "hue":
            angle = draws.uniform(-math.pi, math.pi)
            if channels != 3:
                continue
            step = _hue_rotation(angle, luma[:3])
        else:  # saturation
            s = torch.exp2(draws.normal(1.0))
            step = luma_outer + (eye - luma_outer) * s[:, None, None]
            step[:, channels, channels] = 1.0
        matrix = torch.where(chosen[:, None, None], step, eye) @ matrix
        any_chosen = any_chosen | chosen
    return matrix, any_chosen


def _hue_rotation(angle: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Rodrigues' rotation about the unit luma axis, as a 4x4 homogeneous map."""
    n = len(angle)
    cross = torch.zeros(3, 3, device=axis.device, dtype=axis.dtype)
    cross[0, 1], cross[0, 2], cross[1, 2] = -axis[2], axis[1], -axis[0]
    cross = cross - cross.T
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    rotation = cos * torch.eye(3, device=axis.device, dtype=axis.dtype) + sin * cross + (1 - cos) * torch.outer(axis, axis)
    step = torch.eye(4, device=axis.device, dtype=axis.dtype).repeat(n, 1, 1)
    step[:, :3, :3] = rotation
    return step


def cutout_mask(draws: Draws, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, 1 outside and 0 inside a half-size rectangle at a uniform centre, and whether chosen."""
    chosen, cy, cx = draws.chosen(), draws.uniform(0, 1), draws.uniform(0, 1)
    rows = (torch.arange(height, device=draws.device, dtype=draws.dtype) + 0.5) / height
    cols = (torch.arange(width, device=draws.device, dtype=draws.dtype) + 0.5) / width
    inside = ((rows[None, :, None] - cy[:, None, None]).abs() < 0.25) & ((cols[None, None, :] - cx[:, None, None]).abs() < 0.25)
    return (~(inside & chosen[:, None, None])).unsqueeze(1), chosen


def augment(x: torch.Tensor, ops: tuple[str, ...], p, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C, H, W) in [-1, 1] augmented with probability p per operation; also the mask
    of the images that any operation changed. p: a float or a 0-dim tensor on x's device."""
    n, channels, height, width = x.shape
    draws = Draws(n, x.device, torch.float32, generator, p)
    changed = torch.zeros(n, dtype=torch.bool, device=x.device)
    geometric = tuple(op for op in ops if op in GEOMETRIC)
    if geometric:
        matrix, chosen = geometric_matrices(geometric, draws, height, width)
        x = torch.where(chosen[:, None, None, None], warp(x, matrix, sampler_for(x.device, torch.promote_types(x.dtype, torch.float32))), x)
        changed |= chosen
    color = tuple(op for op in ops if op in COLOR)
    if color:
        matrix, chosen = color_matrices(color, draws, channels)
        matrix = matrix.to(x.dtype)
        mixed = torch.einsum("nij,njhw->nihw", matrix[:, :channels, :channels], x) + matrix[:, :channels, channels, None, None]
        x = torch.where(chosen[:, None, None, None], mixed, x)
        changed |= chosen
    if "cutout" in ops:
        mask, chosen = cutout_mask(draws, height, width)
        x = x * mask.to(x.dtype)
        changed |= chosen
    return x, changed


def native_sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _reflect(coord: torch.Tensor, size: int) -> torch.Tensor:
    """Reflection about the outer pixel edges (-0.5 and size - 0.5), then clipped to the
    pixel centres, as grid_sample does with align_corners=False."""
    span = float(size)
    shifted = (coord + 0.5).abs()
    flips = torch.floor(shifted / span)
    extra = shifted - flips * span
    reflected = torch.where(flips.remainder(2) == 0, extra, span - extra) - 0.5
    return reflected.clamp(0, size - 1)


def gather_sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling with reflection padding (align_corners=False) from gather alone."""
    n, c, h, w = x.shape
    out_h, out_w = grid.shape[1:3]
    ix = _reflect(((grid[..., 0] + 1) * w - 1) / 2, w)
    iy = _reflect(((grid[..., 1] + 1) * h - 1) / 2, h)
    x0, y0 = ix.detach().floor(), iy.detach().floor()
    fx, fy = ix - x0, iy - y0
    x0i, y0i = x0.long(), y0.long()
    x1i, y1i = (x0i + 1).clamp(max=w - 1), (y0i + 1).clamp(max=h - 1)  # clamped taps have weight 0
    flat = x.reshape(n, c, h * w)

    def tap(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        index = (rows * w + cols).reshape(n, 1, out_h * out_w).expand(n, c, out_h * out_w)
        return flat.gather(2, index).reshape(n, c, out_h, out_w)

    fx, fy = fx.unsqueeze(1).to(x.dtype), fy.unsqueeze(1).to(x.dtype)
    return ((tap(y0i, x0i) * (1 - fx) + tap(y0i, x1i) * fx) * (1 - fy)
            + (tap(y1i, x0i) * (1 - fx) + tap(y1i, x1i) * fx) * fy)


@cache
def native_double_backward_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether grid_sample's gradient can itself be differentiated here (R1/R2 through the warp).
    Fixed inputs, no random draw: the probe must not move any generator a resume restores."""
    try:
        with torch.enable_grad():
            ramp = torch.linspace(-1.5, 1.5, 32, device=device_type, dtype=dtype)
            x = ramp[:16].reshape(1, 1, 4, 4).clone().requires_grad_(True)
            weight = ramp[16:].reshape(1, 1, 4, 4).clone().requires_grad_(True)
            grid = torch.stack([ramp[:16], ramp[16:].flip(0)], -1).reshape(1, 4, 4, 2)
            (grad,) = torch.autograd.grad((native_sample(x, grid) * weight).square().sum(), x, create_graph=True)
            (second,) = torch.autograd.grad(grad.square().sum(), weight)
        return second is not None
    except (RuntimeError, NotImplementedError):
        return False


def sampler_for(device: torch.device, dtype: torch.dtype):
    """Sampling runs in float32 or float64 (`warp`), whatever the training precision."""
    return native_sample if native_double_backward_works(device.type, dtype) else gather_sample
