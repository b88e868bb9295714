"""`make demo`: Random Mask end to end on the embedded handwritten digits (scikit-learn).

Trains a small CNN and its Random-Mask version (rk.convert_model, shallow layers, ratio 0.9)
on the digits, reports clean test accuracy and the accuracy of each model on FGSM examples
crafted on an independently trained source model (a first look at the transfer setting the
paper studies), then times one masked layer on each backend.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import rmask_kernels as rk


def load_digits(size: int = 16):
    """sklearn's 1797 8x8 digits, upsampled to size x size, pixels in [0, 1]; fixed 75/25 split."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    split = int(0.75 * len(labels))
    return (images[order[:split]], labels[order[:split]]), (images[order[split:]], labels[order[split:]])


class SmallCNN(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width)
        self.conv4, self.bn4 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.bn4(self.conv4(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def train(model, data, epochs: int, seed: int):
    images, labels = data
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=epochs * ((len(labels) + 63) // 64))
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(64):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    return (model(images).argmax(1) == labels).float().mean().item()


def fgsm(model, images, labels, eps: float):
    images = images.clone().requires_grad_(True)
    F.cross_entropy(model(images), labels).backward()
    return (images + eps * images.grad.sign()).clamp(0, 1).detach()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--ratio", type=float, default=0.9)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train_set, (test_images, test_labels) = load_digits()
    example = test_images[:1]
    print(f"digits: {len(train_set[1])} train / {len(test_labels)} test images, 16x16; backends {rk.available_backends()}")

    start = time.perf_counter()
    source = train(SmallCNN(), train_set, args.epochs, seed=1)
    normal = train(SmallCNN(), train_set, args.epochs, seed=2)
    masked = rk.convert_model(SmallCNN(), args.ratio, layers="shallow", seed=0, example_input=example)
    masked = train(masked, train_set, args.epochs, seed=2)
    print(f"trained source, normal and Random-Mask ({args.ratio}, shallow) models in {time.perf_counter() - start:.1f} s")
    units = [name for name, m in masked.named_modules() if isinstance(m, rk.MaskedConvBN2d)]
    print(f"Random-Mask units (mask after BN, before ReLU): {units}")

    print("\n| eps (FGSM, transfer from source) | normal | random mask |")
    print("|---|---|---|")
    print(f"| clean | {accuracy(normal, test_images, test_labels):.3f} | {accuracy(masked, test_images, test_labels):.3f} |")
    for eps in (0.1, 0.2, 0.3):
        adversarial = fgsm(source, test_images, test_labels, eps)
        print(
            f"| {eps} | {accuracy(normal, adversarial, test_labels):.3f} | "
            f"{accuracy(masked, adversarial, test_labels):.3f} |"
        )

    print("\nOne masked 3x3 conv, 32x64->64 @32x32, spatial mask 0.9, forward (median of 5):")
    x, weight = torch.randn(32, 64, 32, 32), torch.randn(64, 64, 3, 3)
    mask = rk.random_mask((64, 32, 32), 0.9, "spatial", seed=0)
    baseline = lambda: F.conv2d(x, weight, None, 1, 1) * mask
    with torch.no_grad():
        for name, run in [("conv2d * mask", baseline)] + [
            (backend, lambda b=backend: rk.masked_conv2d(x, weight, None, mask, padding=1, backend=b))
            for backend in rk.available_backends()
        ]:
            run()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            print(f"  {name:>14}: {sorted(times)[2] * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
