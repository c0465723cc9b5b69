"""Fluctuation gradients of κ_T, α and C_p against finite differences of plain-OpenMM NPT runs.

System: 64 Lennard-Jones argon atoms (σ 0.3405 nm, ε 0.996 kJ/mol, 39.948 amu) from a tagged
ForceField XML (``parameterize="epsilon"``), cutoff 0.6 nm switched from 0.5 nm, dispersion
correction, at 120 K and 200 bar (a dense liquid, about 19 atoms/nm³): OpenMM's CPU platform,
LangevinMiddleIntegrator (10 fs, 5/ps) and MonteCarloBarostat (every 5 steps).

Two runs of 1 ns (100 000 steps after 50 ps of equilibration, a frame every 2 ps, longer
than the correlation time of the volume fluctuations) at ε·exp(±h), h = 0.1, with the same
seeds (common random numbers; the trajectories decorrelate within picoseconds, so the two
runs' errors are combined as independent). On each run's
frames the torch twin of the System (``TorchPotential`` bound to the ParameterSet) gives the
energies, H = U + PV and through them, by autograd, the fluctuation gradient; the derivative
is taken in log space, d ln f / d ln ε, where the finite difference of these power-law-like
responses is most accurate.

- Finite difference: (ln f₊ - ln f₋) / 2h, error bar from each run's standard error
  (:func:`uncertainty`, influence series and statistical inefficiency).
- Fluctuation gradient: the mean of the two runs' gradients (the centre to O(h²)), error bar
  from block averaging of the gradient over 10 blocks of 100 ps per run. The twin
  runs its fused kernels (same values as the autograd path to round-off).

Each pair must agree within three combined standard errors; κ_T's response must be resolved
(more than four error bars from zero). Measured once (2-core machine under load, OpenMM 8.6.1;
4 min 42 s, of which the twin's 1000 frame energies took 3 min 15 s):

    d ln f / d ln ε   finite difference   fluctuation (mean of the runs)
    κ_T               -2.62 ± 0.60        -2.06 ± 0.84
    α                 -1.01 ± 0.64        -0.01 ± 0.91
    C_p               +0.24 ± 0.59        +1.62 ± 0.82

Only κ_T's dependence on ε is resolved at this length; α's and C_p's are within two error
bars of zero, so for them the test checks agreement at the ±1 level of d ln f / d ln ε and no
more. Tightening it takes runs several times longer (the error bars fall as 1/√length).
"""

import time

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_reversible.observables import (
    enthalpy,
    frame_energies,
    heat_capacity,
    isothermal_compressibility,
    thermal_expansion,
    uncertainty,
)
from openmm_reversible.observables.blocking import block_average, block_slices
from openmm_reversible.parameters import ParameterSet
from openmm_reversible.potential import TorchPotential

N_ATOMS, DENSITY = 64, 19.0            # atoms, atoms/nm³ (start)
TEMPERATURE, PRESSURE = 120.0, 200.0   # K, bar
STEPS, EVERY, EQUILIBRATION = 100_000, 200, 5_000
LOG_STEP = 0.1
N_BLOCKS = 10
SEED = 7

ARGON_XML = """<ForceField>
 <AtomTypes><Type name="Ar" class="Ar" element="Ar" mass="39.948"/></AtomTypes>
 <Residues><Residue name="AR"><Atom name="AR" type="Ar"/></Residue></Residues>
 <NonbondedForce coulomb14scale="0.833333" lj14scale="0.5">
  <Atom type="Ar" charge="0" sigma="0.3405" epsilon="0.996" parameterize="epsilon"/>
 </NonbondedForce>
</ForceField>
"""

ESTIMATORS = {
    "kappa_T": (isothermal_compressibility, True, {}),
    "alpha": (thermal_expansion, True, {}),
    "C_p": (heat_capacity, False, {"n_molecules": N_ATOMS}),
}


def _argon(tmp_path):
    edge = (N_ATOMS / DENSITY) ** (1 / 3)
    topology = app.Topology()
    chain = topology.addChain()
    for _ in range(N_ATOMS):
        topology.addAtom("AR", app.element.argon, topology.addResidue("AR", chain))
    topology.setPeriodicBoxVectors(np.eye(3) * edge * unit.nanometer)
    xml = tmp_path / "argon.xml"
    xml.write_text(ARGON_XML)
    ps = ParameterSet.from_forcefield(xml, topology, nonbondedMethod=app.CutoffPeriodic,
                                      nonbondedCutoff=0.6 * unit.nanometer,
                                      switchDistance=0.5 * unit.nanometer)
    side = round(N_ATOMS ** (1 / 3))
    lattice = np.array(np.meshgrid(*[np.arange(side)] * 3, indexing="ij")).reshape(3, -1).T
    return ps, lattice * edge / side


def _npt_frames(ps, start, epsilon):
    """Volumes, positions, boxes and OpenMM energies of an NPT run at this ε."""
    system = openmm.XmlSerializer.clone(ps.system)
    nonbonded = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    for i in range(system.getNumParticles()):
        charge, sigma, _ = nonbonded.getParticleParameters(i)
        nonbonded.setParticleParameters(i, charge, sigma, epsilon)
    barostat = openmm.MonteCarloBarostat(PRESSURE * unit.bar, TEMPERATURE * unit.kelvin, 5)
    barostat.setRandomNumberSeed(SEED)
    system.addForce(barostat)
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, 5 / unit.picosecond,
                                                 10 * unit.femtosecond)
    integrator.setRandomNumberSeed(SEED)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"),
                             {"Threads": "1"})
    context.setPositions(start)
    openmm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, SEED)
    integrator.step(EQUILIBRATION)
    positions, boxes, energies = [], [], []
    for _ in range(STEPS // EVERY):
        integrator.step(EVERY)
        state = context.getState(getPositions=True, getEnergy=True)
        positions.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        boxes.append(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))
        energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    boxes = np.array(boxes)
    return (torch.tensor(np.linalg.det(boxes)), torch.tensor(np.array(positions)),
            torch.tensor(boxes), np.array(energies))


def _log_responses(ps, potential, frames, scale):
    """Per estimator: (ln f, SE of ln f, d ln f/d ln ε, its block SE) on one run's frames."""
    volumes, positions, boxes, openmm_energies = frames
    with torch.no_grad():
        ps.scaled.fill_(scale)
    energies = frame_energies(potential, positions, boxes)
    np.testing.assert_allclose(energies.detach().numpy(), openmm_energies, rtol=1e-6)
    h = enthalpy(energies, volumes, PRESSURE)
    results = {}
    for name, (estimator, uses_volumes, constants) in ESTIMATORS.items():
        def evaluate(frames_slice, estimator=estimator, uses_volumes=uses_volumes,
                     constants=constants):
            v = (volumes[frames_slice],) if uses_volumes else ()
            value = estimator(*v, h[frames_slice], TEMPERATURE, **constants)
            grad, = torch.autograd.grad(value, ps.scaled, retain_graph=True)
            return float(value.detach()), float(grad[0]) * scale / float(value.detach())

        value, log_gradient = evaluate(slice(None))
        series = {"volumes": volumes, "enthalpies": h.detach()} if uses_volumes else {
            "enthalpies": h.detach()}
        error = uncertainty(estimator, series, TEMPERATURE, n_blocks=N_BLOCKS, **constants)
        block_gradients = [evaluate(s)[1] for s in block_slices(len(volumes), N_BLOCKS)]
        _, gradient_error = block_average(np.array(block_gradients), N_BLOCKS)
        results[name] = (np.log(value), error.stderr_inefficiency / value, log_gradient,
                         float(gradient_error))
    return results


@pytest.mark.slow
def test_fluctuation_gradients_match_finite_differences_of_openmm_runs(tmp_path):
    ps, start = _argon(tmp_path)
    epsilon0 = float(ps.trainable_values()[0].detach())
    potential = TorchPotential(ps.system, parameters=ps, fused=True)
    runs = {}
    for sign in (-1, 1):
        scale = float(np.exp(sign * LOG_STEP))
        began = time.perf_counter()
        frames = _npt_frames(ps, start, epsilon0 * scale)
        simulated = time.perf_counter()
        runs[sign] = _log_responses(ps, potential, frames, scale)
        print(f"run {sign:+d}: OpenMM {simulated - began:.0f} s, twin and estimators "
              f"{time.perf_counter() - simulated:.0f} s")
    for name in ESTIMATORS:
        (ln_m, se_m, g_m, ge_m), (ln_p, se_p, g_p, ge_p) = runs[-1][name], runs[1][name]
        fd = (ln_p - ln_m) / (2 * LOG_STEP)
        fd_error = np.hypot(se_m, se_p) / (2 * LOG_STEP)
        fluctuation = 0.5 * (g_m + g_p)
        fluctuation_error = 0.5 * np.hypot(ge_m, ge_p)
        combined = np.hypot(fd_error, fluctuation_error)
        print(f"{name}: d ln f/d ln eps  finite difference {fd:.3f} ± {fd_error:.3f}, "
              f"fluctuation {fluctuation:.3f} ± {fluctuation_error:.3f} "
              f"(runs: {g_m:.3f} ± {ge_m:.3f}, {g_p:.3f} ± {ge_p:.3f})")
        assert abs(fd - fluctuation) < 3 * combined, name
        if name == "kappa_T":
            assert abs(fd) > 4 * fd_error
