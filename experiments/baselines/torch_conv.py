"""PyTorch eager reference for the conv DAE's training step (not part of tests or CI).

    bash experiments/baselines/setup_torch.sh          # once: creates runs/torch-venv
    runs/torch-venv/bin/python experiments/baselines/torch_conv.py [--skip] [--steps=20]
                                                       [--repeats=5] [--batch_size=128]

The architecture of ``dae_jax.models.ConvDae`` at its defaults (channels (32, 64, 64),
one convolution per level): Conv2d 3x3 padding 1, two Conv2d 3x3 stride 2 padding 1,
two ConvTranspose2d 3x3 stride 2 padding 1 output_padding 1, Conv2d 3x3 to logits;
ReLU after every layer but the last; ``--skip`` adds each encoder map to the decoder
map of its size. Sigmoid, MSE, Adam (lr 1e-3), Gaussian noise sigma 0.5 clipped to
[0, 1]: a full step with backward and update, batches gathered from uint8 images in
memory, as ``dae-jax train`` does. (PyTorch pads its stride-2 convolutions (1, 1) where
JAX's 'SAME' pads (0, 1): the shapes and FLOPs are the same.) Prints one JSON line:
seconds per step of each of ``--repeats`` timed calls of ``--steps`` steps, after a
warm-up call; only standard-library imports besides torch, so it runs in its own venv.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn


class ConvDae(nn.Module):
    def __init__(self, channels: tuple[int, ...] = (32, 64, 64), skip: bool = False):
        super().__init__()
        self.skip = skip
        self.encoder = nn.ModuleList(
            [nn.Conv2d(1, channels[0], 3, padding=1)]
            + [
                nn.Conv2d(a, b, 3, stride=2, padding=1)
                for a, b in zip(channels[:-1], channels[1:], strict=True)
            ]
        )
        self.decoder = nn.ModuleList(
            [
                nn.ConvTranspose2d(b, a, 3, stride=2, padding=1, output_padding=1)
                for a, b in zip(channels[-2::-1], channels[:0:-1], strict=True)
            ]
        )
        self.output = nn.Conv2d(channels[0], 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = []
        for layer in self.encoder:
            x = torch.relu(layer(x))
            maps.append(x)
        for i, layer in enumerate(self.decoder):
            x = torch.relu(layer(x))
            if self.skip:
                x = x + maps[-2 - i]
        return self.output(x)  # logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_images", type=int, default=60000)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = ConvDae(skip=args.skip)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.randint(0, 256, (args.num_images, 1, 28, 28), dtype=torch.uint8)

    def step() -> torch.Tensor:
        indices = torch.randint(0, args.num_images, (args.batch_size,))
        clean = images[indices].float() / 255.0
        noisy = (clean + 0.5 * torch.randn_like(clean)).clamp(0.0, 1.0)
        loss = torch.mean((torch.sigmoid(model(noisy)) - clean) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def call() -> float:
        begin = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        loss.item()
        return (time.perf_counter() - begin) / args.steps

    call()  # warm-up
    seconds = [call() for _ in range(args.repeats)]
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "skip": args.skip,
                "batch_size": args.batch_size,
                "steps_per_call": args.steps,
                "seconds_per_step": seconds,
                "seconds_per_step_median": statistics.median(seconds),
            }
        )
    )


if __name__ == "__main__":
    main()
