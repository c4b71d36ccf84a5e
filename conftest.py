"""Docstring examples run as tests (``--doctest-modules``): each in its own empty folder, seeded, on one thread.

So an example may write the files it talks about (``save_sparse(model, "model.pksparse")``)
without touching the repository, and reads the same numbers on every run.
"""

import pytest
import torch
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _doctest_in_an_empty_folder(request, tmp_path, monkeypatch):
    if isinstance(request.node, DoctestItem):
        monkeypatch.chdir(tmp_path)
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        torch.manual_seed(0)
        yield
        torch.set_num_threads(previous)
    else:
        yield
