"""Every test starts from the same random state, so whether it passes cannot depend on which tests ran before it
(an unseeded draw once pushed a tolerance check over its bound when a new test was added in front of it)."""

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _same_random_state_for_every_test():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
