import numpy as np, pytest
from ase.build import bulk
from mlip.md.dynamics import run_md
from test_md import trained_model  # noqa: F401

@pytest.mark.parametrize("dt", [1.0, 2.0])
def test_probe(trained_model, dt, tmp_path):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    r = run_md(atoms, trained_model, ensemble="nve", temperature=300.0, steps=1000, timestep=dt, out=None,
               log_every=1, progress=False, device="cpu", dtype="float64", seed=1)
    etot = np.array([x["etot_eV"] for x in r.rows]); epot = np.array([x["epot_eV"] for x in r.rows])
    print("\nDT", dt, "drift", np.abs(etot-etot[0]).max()/8, "final-initial", (etot[-1]-etot[0])/8, "epot range", (epot.max()-epot.min())/8, "Tmean", np.mean([x["temperature_K"] for x in r.rows[500:]]))
