// TokenCompact: tokens [B,N,C] float|half + keep mask [B,N] int32|bool (nonzero = keep), two forms.
// Capped (dynamic=0):
//   -> compacted [B,K,C] (tokens' type): the first K kept tokens in their original order, zero rows after them
//   -> count [B] int32: rows of `compacted` that hold tokens, min(kept, K).
// Data-dependent (dynamic=1): the token axis is cut to S = max(max_b count_b, min_count), known only on the device:
//   -> compacted [B,S,C], count [B] int32 (as above; rows count_b..S-1 of sample b are zero)
//   -> size: 0-D int32 size tensor holding S, declared with IExprBuilder::declareSizeTensor(2, opt, upper),
//      opt = max(opt_count or K, min_count), upper = min(K, N), so the builder tunes the layers after it for opt
//      tokens and allocates for the upper bound.
// Attributes: capacity (int, K >= 1; kept tokens beyond it are dropped), dynamic (0|1, default 0),
//   opt_count (int in [0, K], default 0 = K; dynamic only), min_count (int in [0, K], default 0; dynamic only).
#pragma once

#include "plugin_common.h"

namespace tokensieve {

class TokenCompact final : public PluginBase {
public:
    static constexpr char const* kName = "TokenCompact";
    // The attributes; value pointers into `p`, or null for the creator's field names.
    static std::vector<FieldSpec> attributeSpecs(TokenCompact* p = nullptr) {
        using nvinfer1::PluginFieldType;
        return {{"capacity", PluginFieldType::kINT32, p ? &p->mCapacity : nullptr},
                {"dynamic", PluginFieldType::kINT32, p ? &p->mDynamic : nullptr},
                {"opt_count", PluginFieldType::kINT32, p ? &p->mOptCount : nullptr},
                {"min_count", PluginFieldType::kINT32, p ? &p->mMinCount : nullptr}};
    }

    explicit TokenCompact(nvinfer1::PluginFieldCollection const* fc);

    nvinfer1::IPluginV3* clone() noexcept override;
    int32_t getNbOutputs() const noexcept override { return mDynamic ? 3 : 2; }
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
                               int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                            int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

protected:
    std::vector<FieldSpec> fieldSpecs() override { return attributeSpecs(this); }

private:
    int32_t mCapacity{0};
    int32_t mDynamic{0};
    int32_t mOptCount{0};
    int32_t mMinCount{0};
};

}  // namespace tokensieve
