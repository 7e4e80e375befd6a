"""Evaluation over every image of a split, summed over all ranks: the batches every rank walks together, and the
classifier's loss, top-1 and top-5."""

from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.train.inputs import InputPipeline


def collective_batches(stream, *, batch_size: int, world_size: int, device: torch.device) -> Iterator[dict | None]:
    """Every batch of this rank's stream, then None while other ranks still have batches, until all are done (a
    collective at each batch).

    The ranks' streams may differ in length by a batch (an eval split is not trimmed to equal sizes, so no image
    is dropped). A rank given None must still run the forward the others run, on a dummy batch, because under
    ZeRO-3 every forward gathers parameters from all ranks.
    """
    batches = iter(stream.iter_torch_batches(batch_size=batch_size, drop_last=False))
    while True:
        batch = next(batches, None)
        if world_size > 1:
            more = torch.tensor([batch is not None], dtype=torch.int32, device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not more.item():
                return
        elif batch is None:
            return
        yield batch


@torch.no_grad()
def evaluate_collective(model, stream, inputs: InputPipeline, *, batch_size: int, world_size: int,
                        image_shape: tuple[int, int, int]) -> dict[str, float]:
    """Loss, top-1 and top-5 over every image of the val split, summed over ranks (a collective)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=inputs.device)  # loss sum, top-1, top-5, images
    for batch in collective_batches(stream, batch_size=batch_size, world_size=world_size, device=inputs.device):
        if batch is None:
            model(torch.zeros((1, *image_shape), dtype=inputs.dtype, device=inputs.device))
            continue
        images = inputs.images(batch["image"])
        labels = batch["label"].to(inputs.device)
        logits = model(images).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                               top[:, 0].sum().double(), top.any(dim=1).sum().double(),
                               torch.tensor(len(labels), dtype=torch.float64, device=inputs.device)])
    if world_size > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    loss_sum, top1, top5, count = totals.tolist()
    if count == 0:
        raise RuntimeError("the val split yielded no images: check data.val and the bad-sample counts")
    return {"val/loss": loss_sum / count, "val/top1": top1 / count, "val/top5": top5 / count, "val/images": count}
