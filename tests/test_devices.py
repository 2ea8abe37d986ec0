"""Every device= a user gives goes through one check: a clear ValueError, never a torch error or a
silent fallback."""
import pytest
import torch

import jv5fast
from jv5fast.devices import check_device


def test_check_device_accepts_cpu_and_refuses_the_rest():
    assert check_device("cpu") == torch.device("cpu") == check_device(torch.device("cpu"))
    for bad, msg in [("gpu", "is not a device; choose 'cpu', 'cuda' or 'cuda:N'"), (3.5, "is not a device"),
                     ("mps", "'mps' is not supported; choose"), ("meta", "is not supported")]:
        with pytest.raises(ValueError, match=msg):
            check_device(bad)
    with pytest.raises(ValueError, match="'cuda:99' (needs CUDA|does not exist)"):
        check_device("cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' needs CUDA, which is not available here"):
            check_device("cuda")


@pytest.mark.parametrize("device", ["mps", "cuda:99", "tpu"])
def test_every_entry_point_uses_it(nano_ckpt, tmp_path, device):
    from jv5fast.train.trainer import TrainConfig, Trainer
    with pytest.raises(ValueError, match=f"device '{device}'"):
        jv5fast.Engine(nano_ckpt, device=device)
    with pytest.raises(ValueError, match=f"device '{device}'"):
        jv5fast.HammingIndex(64, device=device)
    with pytest.raises(ValueError, match=f"device '{device}'"):
        jv5fast.EmbeddingIndex(64, device=device)
    with pytest.raises(ValueError, match=f"device '{device}'"):
        Trainer(TrainConfig(stage="retrieval", student=nano_ckpt, output=str(tmp_path), device=device),
                [{"query": "a", "document": "b"}], teacher=lambda t: torch.ones(len(t), 4).numpy())
