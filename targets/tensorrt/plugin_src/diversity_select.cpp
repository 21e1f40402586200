#include "diversity_select.h"

#include "kernels.h"

namespace tokensieve {

using nvinfer1::DataType;

DiversitySelect::DiversitySelect(nvinfer1::PluginFieldCollection const* fc) : PluginBase(kName) {
    readFields(fc, fieldSpecs());
    if (mK < 1) throw std::invalid_argument("attribute 'k' must be >= 1, got " + std::to_string(mK));
    if (mMode != 0 && mMode != 1) {
        throw std::invalid_argument("attribute 'mode' must be 0 (DivPrune) or 1 (MMR), got " + std::to_string(mMode));
    }
    if (!(mLambda >= 0.f && mLambda <= 1.f)) {
        throw std::invalid_argument("attribute 'lambda' must be in [0, 1], got " + std::to_string(mLambda));
    }
    if (mNumPrefix < 0) throw std::invalid_argument("attribute 'num_prefix_tokens' must be >= 0");
}

nvinfer1::IPluginV3* DiversitySelect::clone() noexcept {
    try {
        return new DiversitySelect(*this);
    } catch (std::exception const&) {
        return nullptr;
    }
}

int32_t DiversitySelect::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                         nvinfer1::DynamicPluginTensorDesc const*, int32_t) noexcept {
    if (mMode == 1 && nbInputs != 2) {
        logError("DiversitySelect mode 1 (MMR) needs a second input, importance [B,N]");
        return -1;
    }
    int64_t const maxN = in[0].max.d[1];
    if (maxN >= 0 && maxN - mNumPrefix < mK) {
        logError("DiversitySelect: k=" + std::to_string(mK) + " exceeds the " + std::to_string(maxN - mNumPrefix) +
                 " candidate tokens (N=" + std::to_string(maxN) + " minus num_prefix_tokens=" +
                 std::to_string(mNumPrefix) + ")");
        return -1;
    }
    return 0;
}

int32_t DiversitySelect::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const*,
                                            int32_t nbInputs) const noexcept {
    if (nbInputs < 1 || nbInputs > 2 || nbOutputs != 1) return -1;
    outputTypes[0] = DataType::kINT32;
    return 0;
}

int32_t DiversitySelect::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                                         nvinfer1::DimsExprs const*, int32_t, nvinfer1::DimsExprs* outputs,
                                         int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept {
    if (nbInputs < 1 || nbInputs > 2 || nbOutputs != 1 || inputs[0].nbDims != 3 ||
        (nbInputs == 2 && inputs[1].nbDims != 2)) {
        logError("DiversitySelect expects features [B,N,C] and optionally importance [B,N]");
        return -1;
    }
    outputs[0].nbDims = 2;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = exprBuilder.constant(mK);
    return 0;
}

bool DiversitySelect::supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
                                                int32_t nbInputs, int32_t nbOutputs) noexcept {
    if (nbInputs < 1 || nbInputs > 2 || nbOutputs != 1) return false;
    nvinfer1::PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
    if (pos == 0) return isFloatOrHalf(d.type);                      // features
    if (pos < nbInputs) return d.type == DataType::kFLOAT;           // importance: scores stay fp32
    return d.type == DataType::kINT32;                               // indices
}

int32_t DiversitySelect::enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const*,
                                 void const* const* inputs, void* const* outputs, void*, cudaStream_t stream) noexcept {
    nvinfer1::Dims const& f = inputDesc[0].dims;
    float const* importance = mMode == 1 ? static_cast<float const*>(inputs[1]) : nullptr;
    cudaError_t const err = launchDiversitySelect(inputs[0], inputDesc[0].type == DataType::kHALF, importance, f.d[0],
                                                  f.d[1], f.d[2], mK, mNumPrefix, mMode, mLambda,
                                                  static_cast<int32_t*>(outputs[0]), stream);
    if (err != cudaSuccess) {
        logError(std::string("DiversitySelect enqueue failed (N=") + std::to_string(f.d[1]) + ", C=" +
                 std::to_string(f.d[2]) + "): " + cudaGetErrorString(err));
        return -1;
    }
    return 0;
}

}  // namespace tokensieve
