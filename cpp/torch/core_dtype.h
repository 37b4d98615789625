// at::ScalarType -> the DType of the torch-free kernels (cpp/core, cuda/).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cpp/core/types.h"
#include "cpp/torch/dtype_name.h"

namespace epmoe {

// For a dtype the caller has checked: anything but float32 and bfloat16 maps to float16.
inline DType core_dtype(c10::ScalarType t) {
    return t == c10::kFloat ? DType::kFloat32 : t == c10::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
}

// The DType of `t`, checked: float32, bfloat16 or float16, else a TypeError naming `name`.
inline DType to_dtype(const at::Tensor& t, const char* name) {
    const c10::ScalarType s = t.scalar_type();
    TORCH_CHECK_TYPE(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, name,
                     " must be float32, bfloat16 or float16, got ", dtype_name(s));
    return core_dtype(s);
}

}  // namespace epmoe
