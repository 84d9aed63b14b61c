"""Placeholder until the full pipeline lands: insert X-volution into resnet18's stage-3 convs and fuse."""

import time

import torch
import torchvision

from xvol_compiler import XVolution


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    for block in model.layer3:
        block.conv1 = XVolution.from_conv(block.conv1)
        block.conv2 = XVolution.from_conv(block.conv2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        x = torch.randn(8, 3, 64, 64)
        loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 1000, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        for block in model.layer3:
            block.conv1, block.conv2 = block.conv1.fuse(), block.conv2.fuse()
        out = model(x)
        t0 = time.perf_counter()
        model(x)
        t1 = time.perf_counter()
    print(f"max |fused - unfused| = {float((out - ref).abs().max()):.3g}, fused latency {1e3 * (t1 - t0):.1f} ms")


if __name__ == "__main__":
    main()
