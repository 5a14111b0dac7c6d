"""A small CNN trained on a labelled dataset, for classifier-based scores (the "Inception
Score" of MNIST papers, with this network in Inception's place).

Trained once per dataset on 90% of its samples (every tenth sample, in dataset order, is
held out; at most MAX_TRAINING_SAMPLES are read) and cached under the evaluation cache directory; the held-out tenth gives the
ceiling a perfect generator would reach.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from gan_dist.progress import ProgressFactory, TaskProgress, task_progress
from gan_dist.resume import save_safetensors

ARCHITECTURE = "cnn2-v2"
HOLDOUT_EVERY = 10
EPOCHS = 8
MIN_STEPS = 1500  # small datasets (the 8x8 digits) need more passes than 8
BATCH = 128
FEATURES = 128


MAX_TRAINING_SAMPLES = 100_000  # a larger dataset trains it on a random (or, shuffled, the first) 100k


def held_out(index):
    """Whether dataset index (an int or an array of them) is in the held-out tenth."""
    return index % HOLDOUT_EVERY == 0


class DigitClassifier(nn.Module):
    """Two conv blocks (the first pools by 2, the second to 4x4), then 128 features and the
    class logits. ARCHITECTURE names this layout in cache file names."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Dropout(0.3), nn.Linear(64 * 16, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, num_classes)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 images -> features and logits (eval mode for scoring)."""
        features = self.body(images.float() / 127.5 - 1)
        return {"features": features, "logits": self.head(features)}


def train_classifier(samples: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0,
                     progress: ProgressFactory | None = None) -> DigitClassifier:
    """Adam, a few epochs, seeded: the same data gives the same network. `progress(total,
    unit)` shows the steps, with the last epoch's loss and accuracy (default: this process's stdout)."""
    progress = progress or functools.partial(task_progress, "cls: training the classifier")
    torch.manual_seed(seed)
    model = DigitClassifier(samples.shape[1], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    steps_per_epoch = -(-len(samples) // BATCH)
    num_epochs = max(EPOCHS, -(-MIN_STEPS // steps_per_epoch))
    with progress(num_epochs * steps_per_epoch, "steps") as shown:
        for epoch in range(num_epochs):
            shown.update(epoch=f"{epoch + 1}/{num_epochs}")
            loss_sum, correct = _train_epoch(model, opt, samples, labels, gen, shown)
            # One read per epoch: the sums stay on the device during it.
            shown.update(loss=float(loss_sum) / len(samples), train_accuracy=f"{float(correct) / len(samples):.1%}")
    return model.eval().requires_grad_(False)


def _train_epoch(model: DigitClassifier, opt, samples: torch.Tensor, labels: torch.Tensor, gen,
                 shown: TaskProgress) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass in a seeded order; (summed loss, correct predictions) as tensors (dropout on)."""
    loss_sum = correct = torch.zeros((), device=samples.device)
    order = torch.randperm(len(samples), generator=gen)
    for start in range(0, len(samples), BATCH):
        take = order[start:start + BATCH]
        logits = model(samples[take])["logits"]
        loss = nn.functional.cross_entropy(logits, labels[take])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum = loss_sum + loss.detach() * len(take)
        correct = correct + (logits.detach().argmax(1) == labels[take]).sum()
        shown.advance()
    return loss_sum, correct


def accuracy(model: DigitClassifier, samples: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = torch.cat([model(samples[s:s + 1024])["logits"].argmax(1) for s in range(0, len(samples), 1024)])
    return float((predicted == labels).float().mean())


def save(model: DigitClassifier, path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_safetensors(model.state_dict(), tmp)  # the umask mode, not save_file's 0600
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    tmp.replace(path)


def load(path: Path) -> DigitClassifier:
    meta = json.loads(path.with_suffix(".json").read_text())
    model = DigitClassifier(meta["channels"], meta["num_classes"])
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)
