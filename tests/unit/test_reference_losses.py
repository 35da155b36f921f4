"""The per-step losses of each workload's tiny quickstart run equal the stored curves bit for bit."""
from __future__ import annotations

import pytest

from tests import reference_losses


@pytest.mark.parametrize("workload", sorted(reference_losses.RUNS))
def test_losses_equal_the_reference_curve(workload):
    expected = reference_losses.read(workload)
    assert len(expected) >= 20
    assert reference_losses.losses(workload) == expected, (
        f"{workload}'s losses changed; if that is intended: python -m tests.reference_losses --write {workload}")
