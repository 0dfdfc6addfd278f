"""Float64 parity with the official code: the spec's golden numbers (ARCHITECTURE.md section 10)."""

import pytest
import torch
from _utils import SMALL96, TINY, deterministic_fill, spec_input

from rgt import RGT

# config, (H, W), tensor: sum, std (unbiased), [0,0,0,0], [0,2,-1,-1], [0,1,5,7]; measured with the official code.
GOLDEN = [
    ("tiny", (40, 52), "out", (10481.2663518665, 0.044775314059, 0.480344214563, 0.381104032028, 0.391388049452)),
    ("tiny", (40, 52), "ff", (1571.4332172049, 1.016402070067, 1.517105622997, -0.603553112861, -0.476830105494)),
    ("tiny", (20, 70), "out", (7053.0155045015, 0.044896876564, 0.485354106094, 0.384310408385, 0.396770523190)),
    ("tiny", (20, 70), "ff", (817.5220656264, 1.014404536019, 1.765936277033, -0.690647189055, -1.510801666739)),
    ("small96", (40, 52), "out", (10482.8140688226, 0.044804574886, 0.479401103324, 0.382869237229, 0.396382434398)),
    ("small96", (40, 52), "ff", (4462.4492908595, 1.018435692342, 2.179979107141, -0.243352563176, -0.579077501894)),
]
CONFIGS = {"tiny": TINY, "small96": SMALL96}


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, cfg in CONFIGS.items():
        model = RGT(**cfg, kernels="reference").double().eval()
        deterministic_fill(model)
        out[name] = model
    return out


def _stats(t: torch.Tensor) -> tuple[float, ...]:
    return (t.sum().item(), t.std().item(), t[0, 0, 0, 0].item(), t[0, 2, -1, -1].item(), t[0, 1, 5, 7].item())


@pytest.mark.parametrize("config,size,tensor,expected", GOLDEN, ids=[f"{c}-{s[0]}x{s[1]}-{t}" for c, s, t, _ in GOLDEN])
@torch.no_grad()
def test_golden_numbers(models, config, size, tensor, expected):
    model = models[config]
    x = spec_input(*size)
    if tensor == "out":
        result = model(x)
        assert result.shape == (1, 3, 2 * size[0], 2 * size[1])
    else:
        result = model.forward_features(model.conv_first((x - model.mean) * model.img_range))
    assert _stats(result) == pytest.approx(expected, rel=1e-9, abs=1e-11)
