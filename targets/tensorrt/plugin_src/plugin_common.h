// Shared plumbing for the tokensieve IPluginV3 plugins: attribute parsing, logging, the creator template and a
// base class that answers the IPluginV3 boilerplate (capabilities, name/version/namespace, clone, serialization).
// Each plugin only implements shapes, types, formats, workspace and enqueue.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace tokensieve {

constexpr char const* kPluginNamespace = "tokensieve";
constexpr char const* kPluginVersion = "1";

// Logs through the logger TensorRT handed to setLoggerFinder (stderr when there is none).
void logError(std::string const& msg) noexcept;
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;

// One scalar attribute: name, TensorRT field type, and where its value lives in the plugin's parameters.
struct FieldSpec {
    char const* name;
    nvinfer1::PluginFieldType type;  // kINT32 or kFLOAT32
    void* value;
};

// Copies the attributes in `fc` into `specs`; accepts any integer or float field type (the ONNX parser may
// hand INT64 / FLOAT64), throws std::invalid_argument for a field of another type.
void readFields(nvinfer1::PluginFieldCollection const* fc, std::vector<FieldSpec> const& specs);

// A PluginFieldCollection that points into `specs` (for getFieldNames / getFieldsToSerialize).
class FieldCollection {
public:
    void assign(std::vector<FieldSpec> const& specs, bool withValues);
    nvinfer1::PluginFieldCollection const* get() const noexcept { return &mCollection; }

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{0, nullptr};
};

bool isFloatOrHalf(nvinfer1::DataType t) noexcept;

// The IPluginV3 boilerplate. A plugin derives from this, lists its attributes in fieldSpecs() and implements the
// pure virtual build/runtime methods of IPluginV3OneBuild / IPluginV3OneRuntime plus clone().
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime {
public:
    explicit PluginBase(char const* pluginName) : mPluginName(pluginName) {}

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override { return mPluginName; }
    char const* getPluginVersion() const noexcept override { return kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

    // IPluginV3OneBuild: nothing to do once the formats are fixed (shapes are read again in enqueue).
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const*, int32_t, nvinfer1::DynamicPluginTensorDesc const*,
                            int32_t) noexcept override { return 0; }

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const*, int32_t, nvinfer1::PluginTensorDesc const*,
                          int32_t) noexcept override { return 0; }
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override { return clone(); }
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

protected:
    // The attributes, pointing at this object's parameter members; rebuilt on every call, so copies stay valid.
    virtual std::vector<FieldSpec> fieldSpecs() = 0;

private:
    char const* mPluginName;
    FieldCollection mSerialized;
};

// IPluginCreatorV3One for a plugin class P with `static constexpr char const* kName`, a constructor
// P(nvinfer1::PluginFieldCollection const*) that throws std::invalid_argument on bad attributes, and
// `static std::vector<FieldSpec> attributeSpecs()` listing its attributes (null value pointers).
template <typename P>
class PluginCreator final : public nvinfer1::IPluginCreatorV3One {
public:
    PluginCreator() { mFieldNames.assign(P::attributeSpecs(), false); }

    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase) noexcept override {
        try {
            return new P(fc);
        } catch (std::exception const& e) {
            logError(std::string(P::kName) + " node '" + (name ? name : "?") + "': " + e.what());
            return nullptr;
        }
    }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return mFieldNames.get(); }
    char const* getPluginName() const noexcept override { return P::kName; }
    char const* getPluginVersion() const noexcept override { return kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

private:
    FieldCollection mFieldNames;
};

}  // namespace tokensieve
