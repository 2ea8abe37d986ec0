"""Triton pool → truncate → normalize → pack vs pool_ref / pack_bits_ref under the interpreter."""
import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from jv5fast.kernels.pooling import pack_bits, pack_bits_ref, pool, pool_last, pool_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
from jv5fast.testing import TOL_FLOOR as FLOOR, assert_close_dtype  # noqa: E402,F401



def _cu(lens):
    return torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("lens", [[1], [7, 33, 1], [65, 130, 3]])
@pytest.mark.parametrize("mode", ["last", "cls", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("E,truncate_dim", [(96, None), (1024, 37), (768, 256)])
def test_pool(lens, mode, dtype, E, truncate_dim):
    torch.manual_seed(sum(lens) + E)
    hidden = torch.randn(sum(lens), E, device=DEVICE).to(dtype)
    cu = _cu(lens)
    for normalize in (True, False):
        v, bits = pool(hidden, cu, mode=mode, truncate_dim=truncate_dim, normalize=normalize, pack_bits=True)
        ref = pool_ref(hidden, cu, mode=mode, truncate_dim=truncate_dim, normalize=normalize)
        assert v.dtype == torch.float32 and v.shape == ref.shape
        # Inputs are exact in either dtype; only the fp32 sums' order differs.
        torch.testing.assert_close(v, ref, atol=FLOOR[torch.float32], rtol=1e-5)
        assert torch.equal(bits, pack_bits_ref(ref))
        assert torch.equal(bits.cpu(), torch.from_numpy(np.packbits(ref.cpu().numpy() > 0, axis=-1)))


def test_pool_last_and_pack_bits_odd_widths():
    torch.manual_seed(0)
    hidden = torch.randn(50, 200, device=DEVICE)
    cu = _cu([20, 1, 29])
    torch.testing.assert_close(pool_last(hidden, cu, truncate_dim=33), pool_ref(hidden, cu, truncate_dim=33))
    for K in (1, 7, 8, 9, 63, 65, 200):
        v = torch.randn(5, K, device=DEVICE)
        v[0, : K // 2] = 0.0  # zeros map to bit 0, as np.packbits(v > 0)
        assert torch.equal(pack_bits(v), pack_bits_ref(v)), K
