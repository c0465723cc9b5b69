"""A fit's outputs in the ecosystem's formats: DCD/XTC trajectories and StateDataReporter CSV."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import mdtraj
import numpy as np
import pytest
import torch

from openmm_reversible.config import config_from_dict
from openmm_reversible.outputs import (
    state_data_columns,
    trajectory_path,
    write_topology,
    write_trajectory,
)
from openmm_reversible.train import CHECKPOINT, LOG, Trainer, fit, read_log

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "water"

BASE = {
    "forcefield": {"files": [str(EXAMPLE / "water_flexible.xml")]},
    "structure": {"water_box": 30},
    "system": {"cutoff": 0.45},
    "simulation": {"temperature": 295.15, "platform": "Reference", "pressure": 1.0,
                   "barostat_interval": 5},
    "schedule": {"epochs": 2, "equilibration_steps": 20, "bulk_steps": 20, "window_steps": 10,
                 "snapshot_every": 5},
    "output": {"frames_per_epoch": 4},
    "targets": [{"observable": "rdf", "atoms": ["O", "O"],
                 "file": str(EXAMPLE / "targets" / "rdf_OO.dat"), "r_max": 0.45},
                {"observable": "enthalpy_of_vaporization", "value": 44.0},
                {"observable": "density", "value": 0.997, "weight": 0.0}],
}


def _config(**output):
    data = copy.deepcopy(BASE)
    data["output"].update(output)
    return config_from_dict(data, EXAMPLE)


@pytest.mark.parametrize("fmt, atol", [("dcd", 1e-5), ("xtc", 6e-4)])
def test_trajectory_reads_back_with_mdtraj(tmp_path, fmt, atol):
    """Frames recorded by the sampler, written and read back: same frames, atoms, positions
    and (NPT: changing) boxes, to the format's precision."""
    trainer = Trainer(_config(), tmp_path / "unused", progress=False)
    sampler = trainer.sampler
    start = sampler.current_step()
    frames = sampler.step(40, frames_at={start + 10, start + 25, start + 40, start + 99})
    assert [f.step for f in frames] == [start + 10, start + 25, start + 40]
    top = write_topology(tmp_path, trainer.topology, frames[0].positions)
    path = tmp_path / f"t.{fmt}"
    write_trajectory(path, frames, trainer.topology, fmt, timestep=0.001)
    traj = mdtraj.load(str(path), top=str(top))
    assert traj.n_frames == 3 and traj.n_atoms == 90
    expected = np.stack([f.positions for f in frames])
    assert np.allclose(traj.xyz, expected, rtol=0, atol=atol)
    assert np.allclose(traj.unitcell_vectors, np.stack([f.box for f in frames]), rtol=0,
                       atol=atol)
    if fmt == "xtc":
        assert np.allclose(traj.time, [0.010, 0.025, 0.040])


def test_recording_frames_keeps_the_explosion_checks(tmp_path):
    """Frames between checks do not move the checks: the first check is still at step 100."""
    trainer = Trainer(_config(), tmp_path / "unused", progress=False)
    sampler = trainer.sampler
    sampler.max_temperature = 1.0
    start = sampler.current_step()
    with pytest.raises(Exception, match=f"OpenMM step {start + 100}: kinetic temperature"):
        sampler.step(300, frames_at={start + 30, start + 70})


def test_fit_writes_trajectories_and_state_data(tmp_path):
    out = tmp_path / "out"
    result = fit(_config(), out, progress=False)
    records = read_log(out / LOG)
    saved = torch.load(out / CHECKPOINT, weights_only=True)
    # Trajectories: 4 frames an epoch, evenly spaced over its 40 OpenMM steps, the last one
    # the state the epoch ended in (the checkpoint's).
    last = mdtraj.load(str(trajectory_path(out, 2, "dcd")),
                       top=str(out / "trajectory" / "topology.pdb"))
    assert last.n_frames == 4 and last.n_atoms == 90
    assert np.allclose(last.xyz[-1], saved["state"]["positions"].numpy(), rtol=0, atol=1e-5)
    assert np.allclose(last.unitcell_vectors[-1], saved["state"]["box"].numpy(), atol=1e-5)
    assert trajectory_path(out, 1, "dcd").is_file()
    # StateDataReporter-style CSV: its header convention, one row per epoch, the log's numbers.
    text = (out / "state_data.csv").read_text()
    assert text.startswith('#"Epoch","Step","Time (ps)","Potential Energy (kJ/mole)",'
                           '"Kinetic Energy (kJ/mole)","Total Energy (kJ/mole)",'
                           '"Temperature (K)","Box Volume (nm^3)","Density (g/mL)","Loss",')
    header, *rows = list(csv.reader(text[1:].splitlines()))
    assert header == state_data_columns(_config().targets)
    assert "Loss rdf_OO" in header and "density (g/cm^3)" in header
    assert "Loss density" not in header  # weight 0: no loss term
    assert len(rows) == 2
    for row, record in zip(rows, records, strict=True):
        values = dict(zip(header, row, strict=True))
        assert int(values["Epoch"]) == record["epoch"]
        assert int(values["Step"]) == record["state"]["Step"] == 40 * record["epoch"]
        assert float(values["Loss"]) == record["loss"]
        assert float(values["Loss rdf_OO"]) == record["terms"]["rdf_OO"]
        assert float(values["enthalpy_of_vaporization (kJ/mol)"]) == \
            record["observables"]["enthalpy_of_vaporization"]
        assert float(values["Density (g/mL)"]) == pytest.approx(
            float(values["density (g/cm^3)"]), rel=0.05)  # end state vs the window's average
        assert float(values["Time (ps)"]) == pytest.approx(0.001 * int(values["Step"]))
    assert result.files["state_data"] == out / "state_data.csv"


def test_xtc_and_no_trajectory_options(tmp_path):
    fit(_config(trajectory="xtc", frames_per_epoch=2), tmp_path / "xtc", progress=False)
    traj = mdtraj.load(str(trajectory_path(tmp_path / "xtc", 1, "xtc")),
                       top=str(tmp_path / "xtc" / "trajectory" / "topology.pdb"))
    assert traj.n_frames == 2
    fit(_config(trajectory="none"), tmp_path / "none", progress=False)
    assert not (tmp_path / "none" / "trajectory").exists()
    assert (tmp_path / "none" / "state_data.csv").is_file()
    # [output] may change on resume: the fit goes on, now with XTC frames from epoch 2 on.
    data = copy.deepcopy(BASE)
    data["schedule"]["epochs"] = 3
    data["output"] = {"trajectory": "xtc", "frames_per_epoch": 2}
    result = fit(config_from_dict(data, EXAMPLE), tmp_path / "none", resume=True,
                 progress=False)
    assert [r["epoch"] for r in result.records] == [1, 2, 3]
    assert not trajectory_path(tmp_path / "none", 2, "xtc").exists()
    assert trajectory_path(tmp_path / "none", 3, "xtc").is_file()
