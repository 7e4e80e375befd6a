"""Model smoke check: build demo ViTs, train a few steps on real digits in plain torch, print shapes and loss.

    python jobs/model_smoke.py
    python jobs/model_smoke.py --presets vit_demo_patch4_32 --steps 50

Runs in seconds on a laptop CPU and checks an install end to end: patch embedding, [class] token, position
embeddings, blocks, head, backward and an optimizer step, plain and hybrid.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from pipeline.model import build_model, flops_per_image


def load_digit_images(img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as normalised (N, 3, img_size, img_size) float images and int64 labels."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    return images.expand(-1, 3, -1, -1).contiguous(), torch.tensor(digits.target, dtype=torch.int64)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["vit_demo_patch4_32", "vit_demo_hybrid_patch1_32"],
                        help="model presets to check")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per preset")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--seed", type=int, default=0, help="torch seed")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)

    for preset in args.presets:
        torch.manual_seed(args.seed)
        model = build_model(preset)
        img_size = model.patch_embed.img_size[0]
        images, labels = load_digit_images(img_size)
        num_params = sum(p.numel() for p in model.parameters())
        print(f"{preset}: {num_params / 1e6:.2f} M params, grid {model.patch_embed.grid_size}, "
              f"{flops_per_image(model) / 1e6:.1f} MFLOPs/image forward")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        generator = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            index = torch.randint(0, len(images), (args.batch_size,), generator=generator)
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step == 1 or step % 10 == 0 or step == args.steps:
                print(f"  step {step}/{args.steps} | loss {loss.item():.3f} | "
                      f"{step * args.batch_size / (time.perf_counter() - start):.0f} img/s")
        model.eval()
        with torch.no_grad():
            batch = images[:4]
            tokens = model.forward_features(batch)
            logits = model(batch)
        print(f"  shapes: images {tuple(batch.shape)} -> tokens {tuple(tokens.shape)} -> logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
