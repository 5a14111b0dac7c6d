"""Model registry, shapes, logits (no Sigmoid), conditioning, plugins."""

import pytest
import torch

from gan_dist.config import ModelConfig
from gan_dist.errors import UserError
from gan_dist.models import MODELS, build_models, count_parameters, register_model

CASES = [("mlp", (1, 8, 8)), ("mlp", (1, 28, 28)), ("mlp2d", (2,)),
         ("dcgan", (1, 16, 16)), ("dcgan", (3, 32, 32)), ("dcgan", (3, 64, 64)),
         ("resnet", (3, 32, 32)), ("resnet", (1, 64, 64))]


@pytest.mark.parametrize("name, shape", CASES)
@pytest.mark.parametrize("conditional", [False, True])
def test_shapes_and_logits(name, shape, conditional):
    cfg = ModelConfig(name=name, latent_dim=16, width_mult=0.25, conditional=conditional)
    G, D = build_models(cfg, shape, num_classes=10)
    z, labels = torch.randn(5, 16), torch.randint(0, 10, (5,))
    x = G(z, labels)
    assert x.shape == (5, *shape)
    logits = D(torch.randn_like(x) * 1000, labels)  # large inputs: logits must be free to leave [0, 1]
    assert logits.shape == (5,)
    assert not ((logits >= 0) & (logits <= 1)).all(), "D looks like it ends in a Sigmoid"


def test_conditional_generator_uses_labels():
    G, _ = build_models(ModelConfig(name="dcgan", latent_dim=8, conditional=True, width_mult=0.25), (1, 16, 16), 10)
    z = torch.randn(2, 8)
    G.eval()
    assert not torch.allclose(G(z, torch.tensor([0, 0])), G(z, torch.tensor([1, 1])))


def test_projection_discriminator_uses_labels():
    _, D = build_models(ModelConfig(name="dcgan", conditional=True, width_mult=0.25), (1, 16, 16), 10)
    torch.nn.init.normal_(D.projection.embed.weight)
    x = torch.randn(2, 1, 16, 16)
    assert not torch.allclose(D(x, torch.tensor([0, 0])), D(x, torch.tensor([3, 3])))


def test_tutorial_mlp_sizes():
    G, D = build_models(ModelConfig(name="mlp", g_norm="none"), (1, 28, 28), 0)
    linear_g = [m for m in G.modules() if isinstance(m, torch.nn.Linear)]
    linear_d = [m for m in D.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linear_g] == [256, 512, 1024, 784]
    assert [m.out_features for m in linear_d] == [512, 256, 1]
    assert not any(isinstance(m, torch.nn.Sigmoid) for m in D.modules())


@pytest.mark.parametrize("d_norm, kind", [("batch", torch.nn.BatchNorm2d), ("spectral", None)])
def test_dcgan_d_norms(d_norm, kind):
    _, D = build_models(ModelConfig(name="dcgan", d_norm=d_norm, width_mult=0.25), (3, 32, 32), 0)
    if kind:
        assert any(isinstance(m, kind) for m in D.modules())
    else:
        assert any(hasattr(m, "parametrizations") for m in D.modules())


def test_g_norm_none_removes_batchnorm():
    G, _ = build_models(ModelConfig(name="dcgan", g_norm="none", width_mult=0.25), (3, 32, 32), 0)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in G.modules())


@pytest.mark.parametrize("name, shape, match", [
    ("dcgan", (1, 8, 8), "model.name=dcgan needs images of C x H x W whose shorter side is 16, 32, 64 px"),
    ("mlp2d", (1, 8, 8), "model.name=mlp2d generates 2-D points"),
    ("mlpp", (1, 8, 8), "unknown model 'mlpp'; did you mean 'mlp'"),
    ("resnet", (1, 16, 16), "model.name=resnet needs square images of 32 or 64 px"),
])
def test_unfit_data_or_name_is_a_user_error(name, shape, match):
    with pytest.raises(UserError, match=match):
        build_models(ModelConfig(name=name), shape, 0)


def test_conditional_needs_labels():
    with pytest.raises(UserError, match="model.conditional=true needs a labelled dataset"):
        build_models(ModelConfig(name="mlp", conditional=True), (1, 8, 8), 0)


def test_width_mult_scales_parameters():
    small = count_parameters(build_models(ModelConfig(name="dcgan", width_mult=0.25), (3, 32, 32), 0)[0])
    large = count_parameters(build_models(ModelConfig(name="dcgan", width_mult=0.5), (3, 32, 32), 0)[0])
    assert large > 2 * small  # conv weights grow with the square of the width


def test_plugin_registration_without_editing_the_package():
    @register_model("test_tiny_linear")
    def build(cfg, shape, num_classes):
        return torch.nn.Linear(cfg.latent_dim, 4), torch.nn.Linear(4, 1)

    try:
        G, _ = build_models(ModelConfig(name="test_tiny_linear", latent_dim=3), (4,), 0)
        assert G.in_features == 3
    finally:
        MODELS.pop("test_tiny_linear")


def test_minibatch_std_sees_a_lack_of_variety():
    from gan_dist.models.layers import MinibatchStd

    layer = MinibatchStd(group_size=4)
    same = layer(torch.ones(8, 5))
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    varied = layer(x)
    assert same.shape == (8, 6) and torch.allclose(same[:, :5], torch.ones(8, 5))
    assert same[:, 5].max() < 1e-3 and varied[:, 5].min() > 0.3
    assert torch.equal(varied[0::2, 5], varied[0, 5].expand(4))  # samples 0, 2, 4, 6 form one group
    by_hand = x[0::2].std(dim=0, unbiased=False).mean()  # the group's population std, averaged over features
    assert torch.allclose(varied[0, 5], by_hand, atol=1e-6)
    maps = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
    extra = layer(maps)[:, 3]  # conv features: one constant map per sample
    assert extra.shape == (8, 2, 2) and torch.allclose(extra[1], maps[1::2].std(dim=0, unbiased=False).mean())
    extra.sum().backward()
    assert torch.isfinite(maps.grad).all() and maps.grad.abs().sum() > 0
    _, D = build_models(ModelConfig(name="mlp", d_minibatch_std=4), (1, 8, 8), 0)
    assert D(torch.randn(6, 1, 8, 8)).shape == (6,)  # 6 is not a multiple of 4: groups of 3


def test_resnet_is_the_sngan_cifar_model():
    """Residual blocks with shortcuts, spectral norm on every D weight, SNGAN's CIFAR widths."""
    G, D = build_models(ModelConfig(name="resnet", d_norm="spectral", latent_dim=128), (3, 32, 32), 0)
    from gan_dist.models.resnet import DownBlock, UpBlock

    assert sum(isinstance(m, UpBlock) for m in G.modules()) == 3
    assert sum(isinstance(m, DownBlock) for m in D.modules()) == 4
    weighted = [m for m in D.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert all(hasattr(m, "parametrizations") for m in weighted), "every D layer needs spectral norm"
    # SNGAN's CIFAR ResNet: about 4.3M parameters in G and 1.0M in D.
    assert 4.0e6 < count_parameters(G) < 4.6e6
    assert 0.9e6 < count_parameters(D) < 1.1e6
    with pytest.raises(UserError, match="d_norm=spectral"):
        build_models(ModelConfig(name="resnet", d_norm="batch"), (3, 32, 32), 0)


def test_latent_code_is_uniform_and_reaches_g_one_hot():
    from gan_dist.models.layers import LatentInput, latent_code

    z = torch.randn(20_000, 16, generator=torch.Generator().manual_seed(0))
    shares = torch.bincount(latent_code(z, 10), minlength=10) / len(z)
    assert (shares - 0.1).abs().max() < 0.01  # sampling error at 20k draws is about 0.002
    head = LatentInput(16, categories=10)(z[:5], None)
    assert head.shape == (5, 26) and torch.equal(head[:, :16], z[:5])
    assert torch.equal(head[:, 16:].argmax(1), z[:5, :10].argmax(1)) and torch.equal(head[:, 16:].sum(1), torch.ones(5))


@pytest.mark.parametrize("name, shape", CASES)
@pytest.mark.parametrize("conditional", [False, True])
def test_code_head_returns_code_logits_beside_unchanged_logits(name, shape, conditional):
    cfg = ModelConfig(name=name, latent_dim=16, width_mult=0.25, num_latent_categories=10, conditional=conditional)
    G, D = build_models(cfg, shape, num_classes=10)
    labels = torch.randint(0, 10, (5,)) if conditional else None
    x = G(torch.randn(5, 16), labels)
    logits, code_logits = D(x, labels, with_code=True)
    assert logits.shape == (5,) and code_logits.shape == (5, 10)
    assert torch.equal(D(x, labels), logits)  # the adversarial logits do not depend on asking for the code


@pytest.mark.parametrize("categories", [-1, 1, 17])
def test_num_latent_categories_outside_z_is_a_user_error(categories):
    from gan_dist.config import load_config

    with pytest.raises(UserError, match="'model.num_latent_categories' must be 0 \\(off\\) or 2 to model.latent_dim \\(16\\)"):
        load_config(None, ["model.latent_dim=16", f"model.num_latent_categories={categories}"])


def test_num_latent_categories_need_a_d_with_a_code_head():
    @register_model("test_no_code_head")
    def build(cfg, shape, num_classes):
        return torch.nn.Linear(cfg.latent_dim, 4), torch.nn.Linear(4, 1)

    class HeadWithoutArgument(torch.nn.Linear):  # a code head, but forward cannot be asked for it
        code_head = torch.nn.Linear(4, 4)

    @register_model("test_head_without_argument")
    def build_half(cfg, shape, num_classes):
        return torch.nn.Linear(cfg.latent_dim, 4), HeadWithoutArgument(4, 1)

    try:
        for name in ("test_no_code_head", "test_head_without_argument"):
            with pytest.raises(UserError, match="its D has no code head"):
                build_models(ModelConfig(name=name, latent_dim=16, num_latent_categories=4), (4,), 0)
    finally:
        MODELS.pop("test_no_code_head")
        MODELS.pop("test_head_without_argument")
