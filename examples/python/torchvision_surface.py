"""A torchvision model -> the loss along the line between two checkpoints, and a 2-D surface.

    python examples/python/torchvision_surface.py [OUT_DIR]

Two checkpoints of the same torchvision ResNet-18 (here: its initial weights and the weights after a
few SGD steps, saved as plain state_dicts) are loaded safely (``weights_only=True``); the loss is then
evaluated on the line w(a) = (1 - a) w_A + a w_B, a in [-0.25, 1.25] (``lt surface A.pt --to B.pt``),
and on a plane through w_B along two seeded, filter-normalised random directions (``lt surface``).
Each point is the mean cross-entropy over the data in eval mode, BatchNorm on the centre's running
statistics.
"""
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from landscape_tools._directions import line_to, random_directions
from landscape_tools.data import DataSet
from landscape_tools.surface import surface


def make_data(n: int = 16, classes: int = 4, seed: int = 0) -> DataSet:
    """Your images and labels as a DataSet (inputs N x C x H x W, int64 labels, fixed order)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return DataSet(x=x, y=y, spec="in-memory", split="train", num_classes=classes, batch_size=n)


def save_two_checkpoints(out: Path, data: DataSet, classes: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """A.pt: the initial weights; B.pt: after 5 SGD steps (stand-ins for two checkpoints of yours)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=classes)
    torch.save(model.state_dict(), out / "A.pt")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(data.x), data.y).backward()
        opt.step()
    torch.save(model.state_dict(), out / "B.pt")
    return out / "A.pt", out / "B.pt"


def load(path: Path, classes: int = 4) -> torch.nn.Module:
    model = torchvision.models.resnet18(num_classes=classes)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def main(out_dir: str = "torchvision-surface", line_points: int = 7, grid_points: int = 5, seed: int = 0):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(seed=seed)
    path_a, path_b = save_two_checkpoints(out, data, seed=seed)
    model_a, model_b = load(path_a), load(path_b)

    # 1-D: from A (a = 0) to B (a = 1); parameters and BatchNorm statistics are interpolated alike
    line = line_to(model_a, model_b, label="B")
    a = np.linspace(-0.25, 1.25, line_points)
    one_d = surface(model_a, data, line, a)
    print("a    :", " ".join(f"{v:7.2f}" for v in a))
    print("loss :", " ".join(f"{v:7.4f}" for v in one_d["loss"]))

    # 2-D: around B along two seeded filter-normalised random directions (biases and BN untouched)
    plane = random_directions(model_b, dims=2, norm="filter", ignore="biasbn", seed=seed)
    grid = np.linspace(-1.0, 1.0, grid_points)
    two_d = surface(model_b, data, plane, grid, grid)
    print(f"2-D loss at the centre {two_d['loss'][grid_points // 2, grid_points // 2]:.4f}, "
          f"range {two_d['loss'].min():.4f} .. {two_d['loss'].max():.4f}")

    # draw both with matplotlib (loss[i, j] is the point (x[i], y[j]))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    ax1.plot(a, one_d["loss"], marker="o")
    ax1.set(xlabel="a (0: A, 1: B)", ylabel="loss", title="A -> B")
    cs = ax2.contourf(grid, grid, two_d["loss"].T, levels=12)
    fig.colorbar(cs, ax=ax2, label="loss")
    ax2.set(xlabel="direction 1", ylabel="direction 2", title="around B")
    fig.savefig(out / "surface.png", dpi=100)
    plt.close(fig)
    return data, model_a, model_b, line, one_d, plane, two_d


if __name__ == "__main__":
    main(*sys.argv[1:2])
