"""The training input path on the device: uint8 batches from the data streams become normalised float
images and targets (class indices, or class probabilities under mixup/cutmix)."""

import torch


class InputPipeline:
    """uint8 (B, 3, H, W) batches arrive from Ray Data; the float cast and normalisation happen here, on the
    training device, so a quarter of the bytes cross the object store."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, dtype: torch.dtype,
                 *, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
        self.device = device
        self.dtype = dtype
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
        mixers = []
        if mixup_alpha > 0 or cutmix_alpha > 0:
            # imported here: torchvision costs every process about 3 s of CPU (it pulls in torch._dynamo), and
            # neither the driver nor a worker without mixup/cutmix needs it
            from torchvision.transforms import v2
        if mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(mixers) if mixers else None

    def images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).float()
        return ((images - self.mean) / self.std).to(self.dtype)

    def train_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images and targets: class indices, or class probabilities under mixup/cutmix."""
        images = self.images(batch["image"])
        labels = batch["label"].to(self.device, non_blocking=True)
        if self.mix is not None:
            images, labels = self.mix(images.float(), labels)
            images = images.to(self.dtype)
        return images, labels
