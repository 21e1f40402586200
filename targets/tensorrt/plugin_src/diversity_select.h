// DiversitySelect: features [B,N,C] float|half (+ importance [B,N] float, required by MMR)
//   -> indices [B,K] int32: K chosen token indices into N, ascending, never a prefix token (i >= num_prefix_tokens).
// Attributes: k (int >= 1), mode (int: 0 = DivPrune greedy max-min cosine distance, 1 = MMR),
//   lambda (float in [0,1], MMR only: lambda * importance - (1 - lambda) * max similarity), num_prefix_tokens (int).
// One CUDA block per batch element runs the K greedy steps (see diversity_select.cu).
#pragma once

#include "plugin_common.h"

namespace tokensieve {

class DiversitySelect final : public PluginBase {
public:
    static constexpr char const* kName = "DiversitySelect";
    // The attributes; value pointers into `p`, or null for the creator's field names.
    static std::vector<FieldSpec> attributeSpecs(DiversitySelect* p = nullptr) {
        using nvinfer1::PluginFieldType;
        return {{"k", PluginFieldType::kINT32, p ? &p->mK : nullptr},
                {"mode", PluginFieldType::kINT32, p ? &p->mMode : nullptr},
                {"lambda", PluginFieldType::kFLOAT32, p ? &p->mLambda : nullptr},
                {"num_prefix_tokens", PluginFieldType::kINT32, p ? &p->mNumPrefix : nullptr}};
    }

    explicit DiversitySelect(nvinfer1::PluginFieldCollection const* fc);

    nvinfer1::IPluginV3* clone() noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override { return 1; }
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
                               int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                            int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

protected:
    std::vector<FieldSpec> fieldSpecs() override { return attributeSpecs(this); }

private:
    int32_t mK{0};
    int32_t mMode{0};
    float mLambda{0.5f};
    int32_t mNumPrefix{0};
};

}  // namespace tokensieve
