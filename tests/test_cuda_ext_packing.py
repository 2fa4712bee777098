"""cuda_ext.pack / unpack: round trips, the layout's byte budget, and the inputs that must raise."""
import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (see cuda_ext/README.md)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cuda_ext import PackedWeight, layout_dims, pack, unpack  # noqa: E402
from cuda_ext.testing import random_codes  # noqa: E402

# K: a tail of 2 rows (576 = 512 + 64), whole blocks (1536, 1024), a 1-row tail with a partial
# group (520), less than one block (96); N: multiples of 16 and not (100, 7)
SHAPES = [(64, 576), (100, 1536), (48, 520), (7, 96), (192, 1024)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n,k", SHAPES)
def test_pack_unpack_round_trip(bits, group, n, k):
    codes, scales, zeros = random_codes(n, k, bits, group, seed=n + k + bits)
    packed = pack(codes, scales, zeros, bits, group)
    c2, s2, z2 = unpack(packed)
    assert torch.equal(c2, codes) and torch.equal(s2, scales) and torch.equal(z2, zeros)
    assert c2.dtype == torch.uint8 and s2.dtype == torch.float16


def test_state_dict_round_trip_and_names():
    packed = pack(*random_codes(64, 576, 3, 128), 3, 128)
    sd = packed.state_dict("layers.0.wq.")
    assert set(sd) == {"layers.0.wq.qweight", "layers.0.wq.scales", "layers.0.wq.zeros", "layers.0.wq.qmeta"}
    assert sd["layers.0.wq.qweight"].dtype == torch.int32 and sd["layers.0.wq.qmeta"].dtype == torch.int32
    back = PackedWeight.from_state_dict(sd, "layers.0.wq.")
    assert (back.bits, back.group_size, back.in_features, back.out_features) == (3, 128, 576, 64)
    assert torch.equal(back.qweight, packed.qweight)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_storage_is_bits_per_weight(bits):
    """3-bit is real 3-bit storage; whole 512-blocks and N % 16 == 0 carry no padding at all."""
    n, k = 128, 1024
    packed = pack(*random_codes(n, k, bits, 64), bits, 64)
    assert packed.qweight.numel() * 4 == n * k * bits // 8
    # K = 576 needs no padding either: the tail block has 2 rows per plane (32 chunks of 2 values)
    d = layout_dims(576, n, bits)
    assert d["k_pad"] == 576 and d["tail_rows"] == 2


def test_padding_dequantizes_to_zero():
    """Codes past K hold the zero point of their (partial) group."""
    codes, scales, zeros = random_codes(16, 520, 4, 128)
    packed = pack(codes, scales, zeros, 4, 128)
    # the tail block is 32 chunks of 1 row: plane words hold k = 512 + chunk; chunks 8.. are padding
    tail = packed.qweight[4 * 16 * 1:].to(torch.int64) & 0xFFFFFFFF  # (4 planes, 16 cols)
    pad_codes = [(tail[c // 8] >> (4 * (c % 8))) & 0xF for c in range(8, 32)]
    for q in pad_codes:
        assert torch.equal(q, zeros[:, 4].to(torch.int64))


def test_unsupported_inputs_raise_with_names():
    codes, scales, zeros = random_codes(32, 256, 4, 64)
    with pytest.raises(ValueError, match="bits=5"):
        pack(codes, scales, zeros, 5, 64)
    with pytest.raises(ValueError, match="group_size=16"):
        pack(codes, scales, zeros, 4, 16)
    with pytest.raises(ValueError, match="codes: values"):
        pack(codes, scales, zeros, 2, 64)  # 4-bit codes do not fit 2 bits
    with pytest.raises(ValueError, match="scales: expected"):
        pack(codes, scales[:, :2], zeros, 4, 64)
    with pytest.raises(ValueError, match="zeros: must be integer"):
        pack(codes, scales, zeros + 0.5, 4, 64)
    with pytest.raises(ValueError, match="codes: expected an integer"):
        pack(codes.float(), scales, zeros, 4, 64)
    packed = pack(codes, scales, zeros, 4, 64)
    bad = PackedWeight(packed.qweight[:-1], packed.scales, packed.zeros, 4, 64, 256, 32)
    with pytest.raises(ValueError, match="packed qweight"):
        bad.validate()
    sd = packed.state_dict()
    sd["qmeta"] = sd["qmeta"].clone()
    sd["qmeta"][0] = 99
    with pytest.raises(ValueError, match="version 99"):
        PackedWeight.from_state_dict(sd)
