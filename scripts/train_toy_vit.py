"""Train the toy ViT (tokensieve.toy) on generated images and write it as a Hugging Face folder.

    python -m tokensieve.scripts.train_toy_vit -o core/toy_vit   # the committed weights (11 min on 1 busy core)

Deterministic: the model's init, every training batch and the held-out split are pure functions of fixed seeds,
torch runs single-threaded with deterministic algorithms, so the same torch build writes the same weights. Writes
OUT/config.json, OUT/model.safetensors, OUT/preprocessor_config.json and OUT/training.json (steps, seconds, held-out
top-1). No download: the data is generated (tokensieve.toy.make_images).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from tokensieve import toy
from tokensieve.fileio import write_json_atomic


def accuracy(model, images, labels, batch: int = 256) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            logits = model(pixel_values=toy.to_pixels(images[i:i + batch])).logits
            correct += int((logits.argmax(-1).numpy() == labels[i:i + batch]).sum())
    model.train()
    return correct / len(images)


class RandomTokenDrop:
    """Method-neutral robustness to pruning (PatchDropout-style augmentation): on a drawn share of the training steps,
    after one drawn block among the first half, keep a drawn ratio in [0.25, 1] of the patch tokens, chosen uniformly
    at random per image ([CLS] always kept). It teaches the model to work on fewer tokens without preferring any
    selection rule (random subsets, not attention-ranked ones), so the methods compared on it differ only by which
    tokens they keep. Every draw comes from a generator seeded by the step: the same weights on every run."""

    def __init__(self, model, share: float):
        self.layers = model.vit.layers
        self.share, self.drop = share, None
        for i, layer in enumerate(self.layers):
            layer.register_forward_hook(lambda mod, args, out, i=i: self._hook(i, out))

    def draw(self, step: int) -> None:
        g = torch.Generator().manual_seed(1_000_000 + step)
        self.drop = None
        if torch.rand((), generator=g) < self.share:
            block = int(torch.randint(0, max(1, len(self.layers) // 2), (), generator=g))
            self.drop = (block, float(torch.empty(()).uniform_(0.25, 1.0, generator=g)), g)

    def _hook(self, i, out):
        if self.drop is None or i != self.drop[0]:
            return out
        _, ratio, g = self.drop
        b, n, c = out.shape
        k = max(1, round(ratio * (n - 1)))
        keep = torch.rand(b, n - 1, generator=g).argsort(-1)[:, :k].sort(-1).values + 1
        keep = torch.cat([torch.zeros(b, 1, dtype=keep.dtype), keep], 1)
        return out.gather(1, keep[..., None].expand(-1, -1, c))

    def off(self) -> None:
        self.drop = None


def train(steps: int, batch: int, lr: float, eval_n: int, token_drop: float = 0.0,
          log=print) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    model = toy.build_model(seed=0).train()
    dropper = RandomTokenDrop(model, token_drop) if token_drop > 0 else None
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    held_x, held_y = toy.make_images(eval_n, toy.HELDOUT_SEED)
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = toy.make_images(batch, toy.TRAIN_SEED + step)
        if dropper is not None:
            dropper.draw(step)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=toy.to_pixels(x)).logits, torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if dropper is not None:
            dropper.off()  # the held-out accuracy below is the dense model's
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - t0:.0f} s"
                + (f"  held-out top-1 {accuracy(model, held_x, held_y):.4f}" if (step + 1) % 200 == 0 else ""))
    seconds = time.perf_counter() - t0
    model.eval()
    top1 = accuracy(model, held_x, held_y)
    return model, {"steps": steps, "batch": batch, "lr": lr, "train_seconds": round(seconds, 1),
                   "token_drop": token_drop, "heldout_images": eval_n, "heldout_seed": toy.HELDOUT_SEED, "heldout_top1": top1,
                   "torch": torch.__version__, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", default=str(toy.MODEL_DIR), help=f"output folder (default {toy.MODEL_DIR})")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--token-drop", type=float, default=0.5,
                   help="share of steps trained with random token dropping after an early block (default 0.5)")
    p.add_argument("--eval-images", type=int, default=1000, help="held-out images for the stated top-1")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: bit-reproducible)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, info = train(args.steps, args.batch, args.lr, args.eval_images, args.token_drop,
                        log=lambda m: print(m, file=sys.stderr, flush=True))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    toy.image_processor().save_pretrained(out)
    write_json_atomic(out / "training.json", info)
    print(f"wrote {out}: held-out top-1 {info['heldout_top1']:.4f} on {info['heldout_images']} images, "
          f"{info['steps']} steps in {info['train_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
