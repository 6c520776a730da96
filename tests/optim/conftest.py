import pytest


@pytest.fixture(autouse=True)
def _float64(float64_default):
    """torch's references keep ``step`` and NAdam's ``mu_product`` as tensors of the default dtype: compare at float64
    throughout, so that the reference's own scalars are not rounded to float32."""
