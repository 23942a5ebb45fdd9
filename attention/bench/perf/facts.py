"""What a ``--gpus`` run must know of its GPUs, read in a child process so the launcher never holds a CUDA context.

``python -m attention.bench.perf.facts [--grid NAME] [--impl SPEC]... GPU...`` prints, as one
line of JSON, :func:`gpu_facts` of those GPU indices.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import torch

from ... import registry
from . import machine
from .grid import grid
from .runner import describe


def gpu_facts(gpus: Sequence[int], grid_name: str = "", impls: Sequence[str] = ()) -> dict:
    """``names`` (the models of ``gpus``), ``machine`` (the first one's machine info) and, given a
    grid, ``cases`` (its cases for the implementations ``impls``, names or ``module:attr``,
    default every registered one, described)."""
    facts = {
        "names": [torch.cuda.get_device_name(g) for g in gpus],
        "machine": machine.machine_info(f"cuda:{gpus[0]}"),
    }
    if grid_name:
        names = [registry.resolve(spec) for spec in impls] or None
        facts["cases"] = {c.case_id: describe(c) for c in grid(grid_name, "cuda", impls=names)}
    return facts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attention.bench.perf.facts", description=__doc__.split("\n")[0])
    parser.add_argument("--grid", default="", help="describe this grid's cases too")
    parser.add_argument("--impl", action="append", default=[], help="the implementations under test")
    parser.add_argument("gpus", nargs="+", type=int)
    args = parser.parse_args(argv)
    print(json.dumps(gpu_facts(args.gpus, args.grid, args.impl)))


if __name__ == "__main__":
    main()
