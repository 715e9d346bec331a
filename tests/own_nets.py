"""A user's own networks for tests/test_user_training.py ([model] network = "...:TinyNet").

TinyNet fits the custom-network contract (models/custom.py); the others do not.
"""
from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """Per modality: normalise (training statistics), one strided Conv1d, mean pool;
    then one Linear over the pooled features and the mask."""

    def __init__(self, contract, input_stats, hidden: int = 8):
        super().__init__()
        self.convs = nn.ModuleList()
        for i, m in enumerate(contract.modalities):
            mean, std = input_stats[m.name]
            self.register_buffer(f"mean{i}", torch.tensor(mean).reshape(1, -1, 1))
            self.register_buffer(f"std{i}", torch.tensor(std).reshape(1, -1, 1))
            stride = max(1, m.samples(contract.window_ns) // 64)
            self.convs.append(nn.Conv1d(m.channels, hidden, 5, stride=stride))
        n = len(contract.modalities)
        self.head = nn.Linear(n * hidden + n, len(contract.labels))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *xs, mask = inputs
        pooled = []
        for i, (x, conv) in enumerate(zip(xs, self.convs)):
            z = (x - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")
            pooled.append(torch.relu(conv(z)).mean(dim=2) * mask[:, i:i + 1])
        return self.head(torch.cat(pooled + [mask], dim=1))


class WrongArity(nn.Module):
    """forward takes one signal and the mask: does not fit a 3-modality contract."""

    def __init__(self, contract):
        super().__init__()
        self.head = nn.Linear(1, len(contract.labels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(mask[:, :1])


class WrongOutput(nn.Module):
    """The right inputs, but two scores instead of one per label."""

    def __init__(self, contract):
        super().__init__()
        self.head = nn.Linear(len(contract.modalities), 2)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.head(inputs[-1])
