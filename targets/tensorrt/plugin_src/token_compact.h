// TokenCompact: tokens [B,N,C] float|half + keep mask [B,N] int32|bool (nonzero = keep)
//   -> compacted [B,K,C] (tokens' type): the first K kept tokens in their original order, zero rows after them
//   -> count [B] int32: rows of `compacted` that hold tokens, min(kept, K).
// Attribute: capacity (int, K >= 1). Kept tokens beyond the capacity are dropped.
#pragma once

#include "plugin_common.h"

namespace tokensieve {

class TokenCompact final : public PluginBase {
public:
    static constexpr char const* kName = "TokenCompact";
    // The attributes; value pointers into `p`, or null for the creator's field names.
    static std::vector<FieldSpec> attributeSpecs(TokenCompact* p = nullptr) {
        return {{"capacity", nvinfer1::PluginFieldType::kINT32, p ? &p->mCapacity : nullptr}};
    }

    explicit TokenCompact(nvinfer1::PluginFieldCollection const* fc);

    nvinfer1::IPluginV3* clone() noexcept override;
    int32_t getNbOutputs() const noexcept override { return 2; }
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
};

}  // namespace tokensieve
