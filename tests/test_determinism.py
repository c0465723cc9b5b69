"""What repeats: ``simulation.deterministic = true`` fits bit for bit, and what the default keeps.

A 30-molecule flexible water box (reaction field, 0.45 nm cutoff, NPT with a Monte Carlo
barostat every 10 steps) on OpenMM's CPU platform, 2 epochs of 150 OpenMM steps and one
10-step reversible window each: a few seconds per fit.
"""

from __future__ import annotations

import copy
from pathlib import Path

import mdtraj
import numpy as np
import pytest
import torch

from openmm_reversible import train
from openmm_reversible.config import config_from_dict
from openmm_reversible.errors import InputError
from openmm_reversible.sampler import Sampler, platform_properties
from openmm_reversible.train import CHECKPOINT, LOG, Trainer, fit, read_log

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "water"

BASE = {
    "forcefield": {"files": [str(EXAMPLE / "water_flexible.xml")]},
    "structure": {"water_box": 30},
    "system": {"cutoff": 0.45},
    "simulation": {"temperature": 295.15, "platform": "CPU", "seed": 5, "deterministic": True,
                   "pressure": 1.0, "barostat_interval": 10},
    "schedule": {"epochs": 2, "equilibration_steps": 100, "bulk_steps": 50, "window_steps": 10,
                 "snapshot_every": 5, "lr_decay": 0.5},
    "targets": [{"observable": "rdf", "atoms": ["O", "O"],
                 "file": str(EXAMPLE / "targets" / "rdf_OO.dat"), "r_max": 0.45},
                {"observable": "enthalpy_of_vaporization", "value": 44.0}],
}


def _config(epochs: int = 2, **simulation):
    data = copy.deepcopy(BASE)
    data["schedule"]["epochs"] = epochs
    data["simulation"].update(simulation)
    return config_from_dict(data, EXAMPLE)


def _untimed(path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "timings"} for r in read_log(path)]


def _frames(path):
    traj = mdtraj.load(str(path), top=str(path.parent / "topology.pdb"))
    return traj.xyz, traj.unitcell_vectors


def _same_fit(a, b, epochs: int = 2) -> None:
    """Two output directories hold the same fit, bit for bit (timings and the creation time in
    the DCD header aside)."""
    assert _untimed(a / LOG) == _untimed(b / LOG)
    for name in ("water_flexible.xml", "state_data.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for epoch in range(1, epochs + 1):
        name = f"trajectory/epoch_{epoch:04d}.dcd"
        for x, y in zip(_frames(a / name), _frames(b / name), strict=True):
            assert np.array_equal(x, y), name


def test_two_deterministic_fits_are_identical(tmp_path):
    first = fit(_config(), tmp_path / "a", progress=False)
    second = fit(_config(), tmp_path / "b", progress=False)
    assert [r["loss"] for r in first.records] == [r["loss"] for r in second.records]
    assert [r["gradient"] for r in first.records] == [r["gradient"] for r in second.records]
    assert first.parameters == second.parameters
    _same_fit(tmp_path / "a", tmp_path / "b")
    # The fit did something: the parameters moved, the two epochs differ, the box changed.
    assert first.records[0]["loss"] != first.records[1]["loss"]
    assert first.records[0]["parameters"] != first.parameters
    assert first.records[0]["state"]["Box Volume (nm^3)"] != \
        first.records[1]["state"]["Box Volume (nm^3)"]


def test_killed_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    straight = fit(_config(epochs=3), tmp_path / "straight", progress=False)
    trainer = Trainer(_config(epochs=3), tmp_path / "split", progress=False)
    trainer.run_epoch()
    # A kill in the middle of epoch 2: its sampling has begun, nothing of it is saved.
    calls = []

    def killed(n_steps, frames_at=()):
        calls.append(n_steps)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return Sampler.step(trainer.sampler, n_steps, frames_at)

    monkeypatch.setattr(trainer.sampler, "step", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert len(read_log(tmp_path / "split" / LOG)) == 1
    resumed = fit(_config(epochs=3), tmp_path / "split", resume=True, progress=False)
    assert [r["loss"] for r in resumed.records] == [r["loss"] for r in straight.records]
    assert resumed.parameters == straight.parameters
    _same_fit(tmp_path / "straight", tmp_path / "split", epochs=3)


def test_trajectory_frames_do_not_change_the_dynamics(tmp_path):
    data = copy.deepcopy(BASE)
    data["output"] = {"trajectory": "none"}
    without = fit(config_from_dict(data, EXAMPLE), tmp_path / "none", progress=False)
    with_frames = fit(_config(), tmp_path / "dcd", progress=False)
    assert [r["loss"] for r in without.records] == [r["loss"] for r in with_frames.records]
    assert not (tmp_path / "none" / "trajectory").exists()


def test_default_keeps_the_checkpoint_and_the_torch_windows(tmp_path):
    """Default sampling (CPU, all threads) varies run to run; what does hold: a resume starts
    from exactly the checkpoint (records, parameters, learning rate), and the reversible
    window repeats bit for bit from the same sampled state and seed."""
    config = _config(epochs=1, deterministic=False)
    first = fit(config, tmp_path / "out", progress=False)
    saved = torch.load(tmp_path / "out" / CHECKPOINT, weights_only=True)
    resumed = fit(_config(epochs=2, deterministic=False), tmp_path / "out", resume=True,
                  progress=False)
    assert resumed.records[0] == first.records[0]
    assert resumed.records[1]["parameters"] == first.records[0]["parameters_after"]
    assert resumed.records[1]["learning_rate"] == first.records[0]["learning_rate"] * 0.5
    # Epoch 2 starts at the step where the checkpoint's state ended.
    assert resumed.records[1]["state"]["Step"] == int(saved["state"]["step"]) + 150

    trainer = Trainer(_config(epochs=1, deterministic=False), tmp_path / "windows",
                      progress=False)
    piece = train.WindowPiece(1, 0, 1, trainer.parameters.scaled.detach().clone(),
                              trainer.state, 123, str(tmp_path / "windows"))
    results = [train.compute_window(trainer.model, piece) for _ in range(2)]
    assert results[0].loss == results[1].loss
    assert torch.equal(results[0].gradient, results[1].gradient)


def test_deterministic_platform_settings():
    assert platform_properties("CPU", deterministic=True) == {"Threads": "1",
                                                              "DeterministicForces": "true"}
    assert platform_properties("Reference", deterministic=True) == {}
    assert "Threads" not in platform_properties("CPU")
    with pytest.raises(InputError, match="deterministic = true is available on the CPU and "
                                         "Reference platforms, not CUDA"):
        platform_properties("CUDA", deterministic=True)
    data = copy.deepcopy(BASE)
    data["simulation"]["platform"] = "CUDA"
    with pytest.raises(InputError, match=r"simulation.deterministic = true: .* not CUDA; set "
                                         r"simulation.platform = \"CPU\""):
        config_from_dict(data, EXAMPLE)
    # "auto" resolves to CPU when deterministic, whatever GPUs are present.
    config = _config(platform="auto")
    trainer = Trainer(config, "/nonexistent-output-never-written", progress=False)
    assert trainer.sampler.platform_name == "CPU"
    assert trainer.sampler.context.getPlatform().getPropertyValue(
        trainer.sampler.context, "Threads") == "1"
    assert np.isfinite(trainer.sampler.kinetic_temperature())


def test_checkpoint_from_before_the_new_keys_resumes(tmp_path):
    """A checkpoint whose saved config lacks keys added later (deterministic, [output], the
    rdf file keys) resumes with those keys at their defaults; a real change is still named."""
    config = _config(epochs=1, deterministic=False)
    fit(config, tmp_path / "out", progress=False)
    path = tmp_path / "out" / CHECKPOINT
    saved = torch.load(path, weights_only=True)
    del saved["config"]["output"]
    del saved["config"]["simulation"]["deterministic"]
    for target in saved["config"]["targets"]:
        for key in ("column", "r_unit", "r_min", "bin_width"):
            del target[key]
    torch.save(saved, path)
    resumed = fit(_config(epochs=2, deterministic=False), tmp_path / "out", resume=True,
                  progress=False)
    assert [r["epoch"] for r in resumed.records] == [1, 2]
    with pytest.raises(InputError, match=r"differs from the checkpoint's in "
                                         r"simulation.deterministic;"):
        Trainer(_config(epochs=3), tmp_path / "out", resume=True, progress=False)
