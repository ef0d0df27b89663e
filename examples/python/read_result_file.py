"""Read any result file with h5py alone, then draw it with landscape_tools.plotting.

    python examples/python/read_result_file.py RESULT.h5 [FIGURE.png]

The HDF5 layout is the contract (README, "Result files"): root attributes say what the file is
(``format``, ``format_version``, ``kind``, ``command``, ``config`` as JSON, ``seed`` ...), and each
model is one group (named by its label) of datasets plus attributes (``checkpoint``, ``arch`` ...).
Nothing of landscape-tools is needed to read it; the plotting at the end is the code behind ``lt plot``.
"""
import json
import sys

import h5py
import numpy as np


def read(path: str) -> dict:
    """``{"kind", "config", "models": {label: {dataset name: array}}}`` of any result file."""
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != "landscape-tools":
            raise SystemExit(f"{path} is not a landscape-tools result file")
        out = {"kind": str(f.attrs["kind"]), "format_version": int(f.attrs["format_version"]),
               "config": json.loads(f.attrs["config"]), "models": {}}
        for label, group in f.items():
            arrays = {}
            # every dataset of the model group, nested ones (e.g. corruptions/<name>/nll) by path
            group.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                             if isinstance(item, h5py.Dataset) else None)
            out["models"][label] = arrays
    return out


def describe(result: dict) -> None:
    print(f"kind {result['kind']} (format version {result['format_version']}), command options: "
          + ", ".join(f"{k}={v}" for k, v in list(result["config"].items())[:6]) + " ...")
    for label, arrays in result["models"].items():
        print(f"model {label}:")
        for name, value in arrays.items():
            value = np.asarray(value)
            if value.dtype.kind in "fiu" and value.size:
                print(f"  {name:<28} {str(value.shape):<12} min {value.min():.4g}  max {value.max():.4g}")
            else:
                print(f"  {name:<28} {str(value.shape):<12} {value.dtype}")


def main(path: str, figure: str | None = None):
    result = read(path)
    describe(result)
    fig = None
    if figure:
        # the same drawing as `lt plot RESULT.h5 -o FIGURE.png` (the default figure of the file's kind);
        # plotting.render(paths, FIGURE) draws and saves in one call, plotting.figure returns the Figure
        from landscape_tools.plotting import figure as draw
        fig = draw([path])
        fig.savefig(figure, dpi=100, bbox_inches="tight")
        print(f"figure: {figure}")
    return result, fig


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(*sys.argv[1:3])
