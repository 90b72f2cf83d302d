"""herd's int8/int4 kernels against llama.cpp's own: the same GGUF blocks (Q8_0, Q4_0, Q4_1) times
the same activations, quantized and multiplied by ggml's CPU backend (libggml-cpu, beside the
llama.cpp binaries on PATH), give bit for bit the numbers herd's kernels give, on every instruction
set this CPU runs. Skipped where llama.cpp is not installed."""

import ctypes
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize as gguf_quantize

from herd.quant import PackedLinear, native
from herd.quant.gguf import repack


def _ggml_cpu() -> ctypes.CDLL | None:
    """libggml-cpu from the llama.cpp build whose binaries are on PATH, initialized."""
    tool = shutil.which("llama-cli") or shutil.which("llama-bench")
    path = Path(tool).resolve().parent / "libggml-cpu.so" if tool else None
    if path is None or not path.exists() or native._compiler() is None:
        return None
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    lib.ggml_cpu_init()
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_Traits)
    return lib


_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class _Traits(ctypes.Structure):
    """ggml-cpu.h's struct ggml_type_traits_cpu."""

    _fields_ = [("from_float", _FROM_FLOAT), ("vec_dot", _VEC_DOT), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


GGML = _ggml_cpu()
pytestmark = pytest.mark.skipif(GGML is None, reason="llama.cpp (llama-cli or llama-bench with libggml-cpu.so "
                                                     "beside it) is not on PATH")
BLOCK_BYTES = {T.Q8_0: 34, T.Q4_0: 18, T.Q4_1: 20, T.Q8_1: 36}


def ggml_matvec(qtype: T, blocks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y [M, N] = x [M, K] W^T by ggml: x quantized by the vec_dot type's from_float, each (row, token)
    by vec_dot, as ggml_compute_forward_mul_mat does."""
    traits = GGML.ggml_get_type_traits_cpu(int(qtype)).contents
    act = GGML.ggml_get_type_traits_cpu(traits.vec_dot_type).contents
    M, K = x.shape
    xq = np.zeros((M, K // 32 * BLOCK_BYTES[T(traits.vec_dot_type)]), np.uint8)
    for m in range(M):
        act.from_float(x[m].ctypes.data, xq[m].ctypes.data, K)
    y = np.zeros((M, blocks.shape[0]), np.float32)
    out = ctypes.c_float()
    for m in range(M):
        for n in range(blocks.shape[0]):
            traits.vec_dot(K, ctypes.addressof(out), 0, blocks[n].ctypes.data, 0, xq[m].ctypes.data, 0, 1)
            y[m, n] = out.value
    return y


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1])
@pytest.mark.parametrize("n, k", [(37, 576), (9, 1536)])  # SmolLM2-135M's widths, odd rows
def test_kernels_equal_ggml(qtype, n, k):
    rng = np.random.default_rng(int(qtype) + k)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    blocks = gguf_quantize(w, qtype).reshape(n, -1).view(np.uint8)
    fmt, group, tensors = repack(qtype, (n, k), blocks.reshape(-1))
    layer = PackedLinear(fmt, k, n, group, tensors)
    x = (rng.standard_normal((6, k)) * 2).astype(np.float32)
    x[0, :32] = 0  # a block of zeros
    x[1, 3] = 40.0  # an outlier
    x[2] = np.round(x[2] * 8) / 8  # values whose scaled quotients tie more often
    expected = ggml_matvec(qtype, np.ascontiguousarray(blocks), x)
    for isa in native.cpu_isas():
        y = torch.empty(6, n)
        native.library(isa).herd_linear(ctypes.byref(layer.describe()), torch.from_numpy(x).data_ptr(), 6,
                                        y.data_ptr(), 1)
        assert np.array_equal(y.numpy(), expected), (isa, np.abs(y.numpy() - expected).max())
