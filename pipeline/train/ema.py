"""An exponential moving average of the weights, evaluated and checkpointed beside the raw weights.

Kept in fp32 on every rank from the module's own parameters, which under ZeRO 0-2 every rank holds whole
(ZeRO-3 is refused by the config: a rank holds only a partition there). Updating it needs no communication.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class WeightEMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.names = [name for name, _ in module.named_parameters()]
        self.params = [param for _, param in module.named_parameters()]
        self.shadow = [param.detach().float().clone() for param in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [param.detach().float() for param in self.params], 1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The module runs with the averaged weights inside the block and gets its own back after it."""
        backup = [param.detach().clone() for param in self.params]
        for param, average in zip(self.params, self.shadow, strict=True):
            param.copy_(average)
        try:
            yield
        finally:
            for param, saved in zip(self.params, backup, strict=True):
                param.copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: average.cpu().contiguous() for name, average in zip(self.names, self.shadow, strict=True)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, average in zip(self.names, self.shadow, strict=True):
            average.copy_(state[name])
