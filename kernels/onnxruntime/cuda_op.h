// Registration of the CUDA kernels of the ai.vmamba ops (cuda_op.cpp), for
// custom_op.cpp's add_cuda_ops hook when built with -DVMAMBA_WITH_CUDA (libvmamba_ort_cuda.so).
#pragma once

namespace Ort {
struct CustomOpDomain;
}

namespace vmamba_cuda {

// Adds the CUDAExecutionProvider kernels (float32 and float16) of SelectiveScan2D (and its merged and packed forms),
// LastAxisLayerNorm, ResidualLayerNorm, TransposeLayerNorm, DepthwiseConvSiLU, ScanProjections,
// NarrowPointwiseConv and DepthwiseConvProjections to `domain`.
void add_ops(Ort::CustomOpDomain& domain);

}  // namespace vmamba_cuda
