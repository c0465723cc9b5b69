"""Performance measurements, each a function that returns one JSON-ready record.

- :func:`.gradient.measure`: time of a reversible gradient over the forward run alone;
- :func:`.memory.compare`: peak memory of reversible gradients through 1,000 and 20,000 steps
  and of backprop through time;
- :func:`.forces.measure`: torch force and VJP cost against an OpenMM step;
- :func:`.constraints.measure`: a constrained (rigid water) reverse step against an
  unconstrained one on the same box;
- :func:`.parallel.measure`: an epoch's windows on 1 and on N local Dask workers:
  speed-up, overhead per piece, identical results;
- :func:`.gradient_noise.measure`: reversible against reweighting gradients of an RDF loss on
  the same windows, their spread over independent runs (JSON and figure);
- :func:`.o2_diffusion.measure`: σ and ε of O₂ in water fitted to a diffusion coefficient by
  reversible and by reweighting gradients, from the same start and schedule (JSON and figure);
- :func:`.exact.measure`: bitwise round trip of the water box in fixed point:
  information-buffer size, bits per degree of freedom and step, and cost relative to the float
  mode.

The command line is ``openmm-reversible benchmark NAME``
(:mod:`openmm_reversible.commands.benchmark`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..files import atomic_write_all, text_writer


def save_record(record: dict, output: str | Path, name: str,
                plot: Callable[[dict, str], None]) -> tuple[Path, Path]:
    """Write a benchmark's record as ``output/name.json`` and its figure as ``output/name.png``,
    both or neither (atomic); ``plot(record, path)`` draws the figure. Returns the two paths."""
    directory = Path(output)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / f"{name}.json", directory / f"{name}.png"
    atomic_write_all([(paths[0], text_writer(json.dumps(record, indent=1) + "\n")),
                      (paths[1], lambda temporary: plot(record, temporary))])
    return paths
