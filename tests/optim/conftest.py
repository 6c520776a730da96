import pytest
import torch


@pytest.fixture(autouse=True)
def float64_default():
    """torch's references keep ``step`` and NAdam's ``mu_product`` as tensors of the default dtype: compare at float64
    throughout, so that the reference's own scalars are not rounded to float32."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
