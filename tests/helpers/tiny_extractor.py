"""A fixed random feature extractor in Inception's place (test-only)."""

import torch


class TinyExtractor(torch.nn.Module):
    """A fixed random feature extractor in Inception's place (test-only)."""

    name = "tiny-test"

    def __init__(self, channels: int = 1):
        super().__init__()
        gen = torch.Generator().manual_seed(123)
        self.conv = torch.nn.Conv2d(channels, 8, 3)
        self.fc = torch.nn.Linear(8, 5)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3

    def forward(self, images: torch.Tensor) -> dict:
        features = self.conv(images.float() / 127.5 - 1).relu().mean((2, 3))
        return {"features": features, "logits": self.fc(features)}
