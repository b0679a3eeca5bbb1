"""diffbook.notebook.glue: numbers reach the prose as numbers, with or without myst-nb."""
import numpy as np
import torch

import diffbook.notebook as notebook


def test_glue_stores_numpy_and_torch_scalars_as_python_numbers(monkeypatch):
    stored = {}
    monkeypatch.setattr(notebook, "_myst_glue", lambda name, value, display=True: stored.__setitem__(name, value))
    notebook.glue("a", np.float64(0.25), display=False)
    notebook.glue("b", torch.tensor(3), display=False)
    notebook.glue("c", np.arange(3), display=False)
    assert type(stored["a"]) is float and f"{stored['a']:.2f}" == "0.25"
    assert type(stored["b"]) is int and stored["b"] == 3
    assert isinstance(stored["c"], np.ndarray)  # arrays are left alone


def test_glue_prints_without_myst_nb(monkeypatch, capsys):
    monkeypatch.setattr(notebook, "_myst_glue", None)
    notebook.glue("ratio", np.float64(1.5), display=False)
    assert capsys.readouterr().out == "ratio = 1.5\n"
