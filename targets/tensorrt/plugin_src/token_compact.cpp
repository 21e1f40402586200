#include "token_compact.h"

#include "kernels.h"

#include <algorithm>

namespace tokensieve {

using nvinfer1::DataType;
using nvinfer1::DimensionOperation;

TokenCompact::TokenCompact(nvinfer1::PluginFieldCollection const* fc) : PluginBase(kName) {
    readFields(fc, fieldSpecs());
    if (mCapacity < 1) throw std::invalid_argument("attribute 'capacity' must be >= 1, got " + std::to_string(mCapacity));
    if (mDynamic != 0 && mDynamic != 1) {
        throw std::invalid_argument("attribute 'dynamic' must be 0 (capped) or 1 (data-dependent), got " +
                                    std::to_string(mDynamic));
    }
    if (mOptCount < 0 || mOptCount > mCapacity) {
        throw std::invalid_argument("attribute 'opt_count' must be in [0, capacity=" + std::to_string(mCapacity) +
                                    "] (0 = capacity), got " + std::to_string(mOptCount));
    }
    if (mMinCount < 0 || mMinCount > mCapacity) {
        throw std::invalid_argument("attribute 'min_count' must be in [0, capacity=" + std::to_string(mCapacity) +
                                    "], got " + std::to_string(mMinCount));
    }
}

nvinfer1::IPluginV3* TokenCompact::clone() noexcept {
    try {
        return new TokenCompact(*this);
    } catch (std::exception const&) {
        return nullptr;
    }
}

int32_t TokenCompact::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                         int32_t nbInputs) const noexcept {
    if (nbInputs != 2 || nbOutputs != getNbOutputs()) return -1;
    outputTypes[0] = inputTypes[0];
    outputTypes[1] = DataType::kINT32;
    if (mDynamic) outputTypes[2] = DataType::kINT32;  // TensorRT requires size tensors to be int32
    return 0;
}

int32_t TokenCompact::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const*,
                                      int32_t, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                                      nvinfer1::IExprBuilder& exprBuilder) noexcept {
    if (nbInputs != 2 || nbOutputs != getNbOutputs() || inputs[0].nbDims != 3 || inputs[1].nbDims != 2) {
        logError("TokenCompact expects tokens [B,N,C] and mask [B,N]" +
                 std::string(mDynamic ? " and 3 outputs (dynamic=1)" : " and 2 outputs"));
        return -1;
    }
    outputs[0].nbDims = 3;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = exprBuilder.constant(mCapacity);
    outputs[0].d[2] = inputs[0].d[2];
    outputs[1].nbDims = 1;
    outputs[1].d[0] = inputs[0].d[0];
    if (mDynamic) {
        if (inputs[0].d[1]->isConstant() && inputs[0].d[1]->getConstantValue() < mMinCount) {
            logError("TokenCompact: min_count=" + std::to_string(mMinCount) + " exceeds the " +
                     std::to_string(inputs[0].d[1]->getConstantValue()) + " input tokens");
            return -1;
        }
        // S <= min(K, N); tune for opt_count (default K) tokens, never below min_count.
        auto const* upper = exprBuilder.operation(DimensionOperation::kMIN, *exprBuilder.constant(mCapacity),
                                                  *inputs[0].d[1]);
        auto const* want = exprBuilder.constant(std::max(mOptCount > 0 ? mOptCount : mCapacity, mMinCount));
        auto const* opt = exprBuilder.operation(DimensionOperation::kMIN, *want, *upper);
        outputs[0].d[1] = exprBuilder.declareSizeTensor(2, *opt, *upper);
        if (outputs[0].d[1] == nullptr) {
            logError("TokenCompact: TensorRT refused the size tensor declaration");
            return -1;
        }
        outputs[2].nbDims = 0;  // size tensors are 0-D
    }
    return 0;
}

bool TokenCompact::supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
                                             int32_t nbInputs, int32_t nbOutputs) noexcept {
    if (nbInputs != 2 || nbOutputs != getNbOutputs()) return false;
    nvinfer1::PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
    switch (pos) {
        case 0: return isFloatOrHalf(d.type);                                   // tokens
        case 1: return d.type == DataType::kINT32 || d.type == DataType::kBOOL;  // mask
        case 2: return d.type == inOut[0].desc.type;                            // compacted
        case 3: return d.type == DataType::kINT32;                              // count
        case 4: return d.type == DataType::kINT32;                              // size (dynamic=1 only)
        default: return false;
    }
}

size_t TokenCompact::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t,
                                      nvinfer1::DynamicPluginTensorDesc const*, int32_t) const noexcept {
    return tokenCompactWorkspaceSize(inputs[0].max.d[0], mCapacity);
}

int32_t TokenCompact::enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const*,
                              void const* const* inputs, void* const* outputs, void* workspace,
                              cudaStream_t stream) noexcept {
    nvinfer1::Dims const& t = inputDesc[0].dims;
    int const elemBytes = inputDesc[0].type == DataType::kHALF ? 2 : 4;
    int const maskBytes = inputDesc[1].type == DataType::kBOOL ? 1 : 4;
    if (mDynamic && mMinCount > t.d[1]) {
        logError("TokenCompact: min_count=" + std::to_string(mMinCount) + " exceeds the " + std::to_string(t.d[1]) +
                 " input tokens");
        return -1;
    }
    // Data-dependent form: the kernels write S to the size output and lay `compacted` out with row stride S.
    int32_t* size = mDynamic ? static_cast<int32_t*>(outputs[2]) : nullptr;
    cudaError_t const err = launchTokenCompact(inputs[0], elemBytes, inputs[1], maskBytes, t.d[0], t.d[1], t.d[2],
                                               mCapacity, mMinCount, workspace, outputs[0],
                                               static_cast<int32_t*>(outputs[1]), size, stream);
    if (err != cudaSuccess) {
        logError(std::string("TokenCompact enqueue failed: ") + cudaGetErrorString(err));
        return -1;
    }
    return 0;
}

}  // namespace tokensieve
