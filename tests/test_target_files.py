"""RDF target files as they come: non-uniform r grids, multi-column layouts, units of r."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from openmm_reversible.config import config_from_dict
from openmm_reversible.errors import InputError
from openmm_reversible.target_files import rdf_bins, read_rdf, read_table
from openmm_reversible.train import Trainer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "water"

# Soper-2013-like layout: r in Å on a grid that is finer below 1.2 Å, then g_OO, its error,
# g_OH, its error. g_OO = r/10 and g_OH = 2 - r/10 (r in Å) so interpolation is exact.
R_ANGSTROM = np.concatenate([[0.0, 0.01, 0.03, 0.06, 0.1], np.arange(0.12, 6.0, 0.03)])


def _soper_like(path: Path, header: str = "# r  gOO  dgOO  gOH  dgOH") -> Path:
    r = R_ANGSTROM
    rows = np.column_stack([r, r / 10, np.full_like(r, 0.01), 2 - r / 10, np.full_like(r, 0.02)])
    lines = ["# synthetic multi-column RDF table for the tests", header]
    lines += [" ".join(f"{v:.6f}" for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_table_header_and_separators(tmp_path):
    (tmp_path / "t.csv").write_text("r,g,err\n0.1,1.0,0.1\n0.2,1.5,0.1\n0.3,2.0,0.1\n")
    table = read_table(tmp_path / "t.csv")
    assert table.names == ["r", "g", "err"]
    assert table.data.shape == (3, 3) and table.data[2, 1] == 2.0
    table = read_table(_soper_like(tmp_path / "s.dat"))
    assert table.names == ["r", "gOO", "dgOO", "gOH", "dgOH"]
    # A comment line whose fields do not match the column count names nothing.
    (tmp_path / "plain.dat").write_text("# r (nm)  g(r) of something\n0.1 1\n0.2 1\n0.3 1\n")
    assert read_table(tmp_path / "plain.dat").names is None
    (tmp_path / "ragged.dat").write_text("0.1 1\n0.2 1 3\n")
    with pytest.raises(InputError, match="ragged.dat, line 2: 3 columns, the rows above have 2"):
        read_table(tmp_path / "ragged.dat")
    (tmp_path / "text.dat").write_text("0.1 1\n0.2 x\n")
    with pytest.raises(InputError, match="text.dat, line 2: not a number"):
        read_table(tmp_path / "text.dat")


def test_column_by_number_and_name_and_units(tmp_path):
    path = _soper_like(tmp_path / "s.dat")
    r, g = read_rdf(path, column=4, r_unit="angstrom")
    assert np.allclose(r, R_ANGSTROM / 10, rtol=0, atol=1e-12)
    assert np.allclose(g, 2 - R_ANGSTROM / 10, atol=1e-6)
    r2, g2 = read_rdf(path, column="goo", r_unit="angstrom")
    assert np.array_equal(r2, r) and np.allclose(g2, R_ANGSTROM / 10, atol=1e-6)
    with pytest.raises(InputError, match=r"r reaches 5.97, implausible for an RDF in nm .* set "
                                         r"r_unit = \"angstrom\""):
        read_rdf(path, column=2)
    r_nm, _ = read_rdf(path, column=2, r_unit="nm")  # said explicitly: taken as nm
    assert r_nm[-1] == pytest.approx(5.97)
    with pytest.raises(InputError, match=r"no column named 'gHH' \(columns: r, gOO"):
        read_rdf(path, column="gHH", r_unit="angstrom")
    with pytest.raises(InputError, match="column 6 is not a g column; the file has 5 columns"):
        read_rdf(path, column=6, r_unit="angstrom")
    with pytest.raises(InputError, match="column 1 is not a g column"):
        read_rdf(path, column=1, r_unit="angstrom")


def test_uniform_grid_keeps_its_bins():
    r = np.arange(0.005, 1.0, 0.01)
    grid = rdf_bins(r, np.sin(r), r_max=0.5)
    assert not grid.interpolated
    assert np.array_equal(grid.r, r[:50]) and grid.r_range == pytest.approx((0.0, 0.5))
    grid = rdf_bins(r, np.sin(r), r_min=0.2, r_max=0.5)
    assert grid.r[0] == pytest.approx(0.205) and len(grid.r) == 30
    assert "own bin centres" in grid.note


def test_non_uniform_grid_is_interpolated_onto_uniform_bins():
    r = R_ANGSTROM / 10  # nm; the spacing is 0.003 nm above 0.012 nm, finer below
    g = 3.0 * r + 1.0
    grid = rdf_bins(r, g, r_min=0.26, r_max=0.5)
    assert grid.interpolated
    width = 0.003  # the median spacing
    assert np.allclose(np.diff(grid.r), width)
    assert grid.r_range[0] == pytest.approx(0.26) and grid.r_range[1] <= 0.5 + 1e-12
    assert len(grid.r) == 80
    assert np.allclose(grid.g, 3.0 * grid.r + 1.0, atol=1e-12)  # linear g: exact
    assert "80 bins of 0.003 nm over 0.26-0.5 nm" in grid.note
    assert "non-uniform grid, 201 points" in grid.note
    coarse = rdf_bins(r, g, bin_width=0.05)
    assert coarse.r_range == pytest.approx((0.0, 0.55)) and len(coarse.r) == 11
    with pytest.raises(InputError, match="r_min = 0.05 nm is below the file.s r"):
        rdf_bins(r + 0.1, g, r_min=0.05, bin_width=0.01)
    with pytest.raises(InputError, match="no bin of 0.5 nm fits"):
        rdf_bins(r, g, r_min=0.3, bin_width=0.5)


def test_bad_grids_are_refused(tmp_path):
    (tmp_path / "nan.dat").write_text("0.1 1\n0.2 nan\n0.3 1\n")
    with pytest.raises(InputError, match="non-finite r or g in data row 2"):
        read_rdf(tmp_path / "nan.dat")
    (tmp_path / "short.dat").write_text("0.1 1\n0.2 1\n")
    with pytest.raises(InputError, match="needs >= 3 rows"):
        read_rdf(tmp_path / "short.dat")


BASE = {
    "forcefield": {"files": [str(EXAMPLE / "water_flexible.xml")]},
    "structure": {"water_box": 30},
    "system": {"cutoff": 0.45},
    "simulation": {"temperature": 295.15, "platform": "Reference"},
    "schedule": {"epochs": 1, "equilibration_steps": 20, "bulk_steps": 10, "window_steps": 10,
                 "snapshot_every": 5},
}


def test_config_with_a_multi_column_angstrom_file(tmp_path):
    _soper_like(tmp_path / "soper.dat")
    data = copy.deepcopy(BASE)
    data["targets"] = [
        {"observable": "rdf", "atoms": ["O", "O"], "file": "soper.dat", "column": "gOO",
         "r_unit": "angstrom", "r_min": 0.2, "r_max": 0.44, "bin_width": 0.01},
        {"observable": "rdf", "atoms": ["O", "H"], "file": "soper.dat", "column": 4,
         "r_unit": "angstrom", "r_max": 0.44}]
    config = config_from_dict(data, tmp_path)
    oo, oh = (t.rdf_grid() for t in config.targets)
    assert len(oo.r) == 24 and oo.r[0] == pytest.approx(0.205)
    assert np.allclose(oo.g, oo.r, atol=1e-6)  # g_OO = r/10 with r in Å = r in nm
    assert np.allclose(oh.g, 2 - oh.r, atol=1e-6)
    # The fit uses these bins and says so.
    trainer = Trainer(config, tmp_path / "out", progress=False)
    notes = trainer.objective.rdf_notes
    assert "24 bins of 0.01 nm over 0.2-0.44 nm" in notes["rdf_OO"]
    assert np.array_equal(trainer.objective.rdf_setup["rdf_OH"]["r"], oh.r)
    record = trainer.run_epoch()
    assert record["rdf_bins"] == notes
    assert len(record["observables"]["rdf_OO"]) == 24


def test_config_errors_name_the_key(tmp_path):
    _soper_like(tmp_path / "soper.dat")
    cases = [
        ({"column": 4}, "targets[0].file: " + str(tmp_path / "soper.dat") + ": r reaches 5.97"),
        ({"column": "gXX", "r_unit": "angstrom"}, "no column named 'gXX'"),
        ({"r_unit": "pm"}, "targets[0].r_unit = 'pm': must be one of nm, angstrom"),
        ({"column": 2.5}, "targets[0].column: expected int | str"),
    ]
    for extra, expected in cases:
        data = copy.deepcopy(BASE)
        data["targets"] = [{"observable": "rdf", "atoms": ["O", "O"], "file": "soper.dat",
                            **extra}]
        with pytest.raises(InputError) as info:
            config_from_dict(data, tmp_path)
        assert expected in str(info.value), extra
    data = copy.deepcopy(BASE)
    data["targets"] = [{"observable": "pressure", "value": 1.0, "column": 3}]
    with pytest.raises(InputError, match="only rdf targets take 'column' and 'r_unit'"):
        config_from_dict(data, tmp_path)
