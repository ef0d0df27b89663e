"""Your own model and DataLoader -> the top-k Hessian eigenvalues and the spectral density.

    python examples/python/hessian_own_model.py

Nothing here is specific to the model zoo: any ``nn.Module`` that returns logits works, and any
DataLoader whose batches are ``(inputs, labels)``. The loss is the mean cross-entropy in eval mode
(what ``lt hessian`` computes); ``scope="batch"`` gives one Hessian per batch (the paper's figure),
``scope="dataset"`` one Hessian of the mean loss over all the batches.
"""
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from landscape_tools.hessian import top_eigenvalues


def make_model_and_loader(seed: int = 0):
    """A small MLP and a DataLoader of random data (stand-ins for yours), in float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(96, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (96,))
    # shuffle=False: the Hessian of a batch is only defined once the batch is fixed
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    return model, loader


def main(k: int = 4, seed: int = 0):
    model, loader = make_model_and_loader(seed)
    batches = list(loader)                   # the library takes a fixed list of (x, y) batches

    # one Hessian per batch: the k eigenvalues of largest magnitude (signed), each with a certificate
    per_batch = top_eigenvalues(model, batches, k=k, which="LM", scope="batch", tol=1e-8, seed=seed)
    for i, row in enumerate(per_batch.eigenvalues):
        print(f"batch {i}: " + ", ".join(f"{v:+.5f}" for v in row))

    # the Hessian of the mean loss over every batch, with its spectral density (stochastic Lanczos quadrature)
    whole = top_eigenvalues(model, batches, k=k, which="LM", scope="dataset", tol=1e-8, seed=seed,
                            density=True, density_runs=4, density_steps=30)
    print("all data: " + ", ".join(f"{v:+.5f}" for v in whole.eigenvalues[0]))
    print(f"all converged: {bool(per_batch.converged.all() and whole.converged.all())}")
    grid, density = whole.density["grid"][0], whole.density["density"][0]
    print(f"density on [{grid[0]:.3g}, {grid[-1]:.3g}], peak at {grid[density.argmax()]:.3g}")
    return model, batches, per_batch, whole


if __name__ == "__main__":
    main()
