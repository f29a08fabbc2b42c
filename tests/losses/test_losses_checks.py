"""check_finite: message names the term, the value and the step."""
import math

import pytest
import torch

from ssl_vit.losses import check_finite


@pytest.mark.parametrize("value", [1.5, 0.0, torch.tensor(2.0), torch.tensor([1.0, -3.0])])
def test_finite_values_pass(value):
    assert check_finite("dino", value, step=3) is None


@pytest.mark.parametrize(
    "value,shown",
    [(float("nan"), "nan"), (torch.tensor(float("inf")), "inf"), (torch.tensor(-math.inf), "-inf")],
)
def test_non_finite_raises_naming_term_and_step(value, shown):
    with pytest.raises(FloatingPointError) as err:
        check_finite("ibot", value, step=1234)
    assert str(err.value) == f"non-finite ibot loss ({shown}) at step 1234"


def test_non_finite_element_in_a_vector():
    with pytest.raises(FloatingPointError, match=r"non-finite koleo loss \(\[1\.0, nan\]\) at step 7"):
        check_finite("koleo", torch.tensor([1.0, float("nan")]), step=7)
