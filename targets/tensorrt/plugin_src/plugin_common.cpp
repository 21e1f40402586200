#include "plugin_common.h"

#include <atomic>
#include <cstdio>
#include <cstring>

namespace tokensieve {
namespace {

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

template <typename T>
double first(void const* data) {
    return static_cast<double>(*static_cast<T const*>(data));
}

double scalarValue(nvinfer1::PluginField const& f) {
    using T = nvinfer1::PluginFieldType;
    if (f.data == nullptr || f.length < 1) throw std::invalid_argument(std::string("attribute '") + f.name + "' is empty");
    switch (f.type) {
        case T::kINT8: return first<int8_t>(f.data);
        case T::kINT16: return first<int16_t>(f.data);
        case T::kINT32: return first<int32_t>(f.data);
        case T::kINT64: return first<int64_t>(f.data);
        case T::kFLOAT32: return first<float>(f.data);
        case T::kFLOAT64: return first<double>(f.data);
        default: throw std::invalid_argument(std::string("attribute '") + f.name + "' must be an int or a float");
    }
}

}  // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept { gLoggerFinder.store(finder); }

void logError(std::string const& msg) noexcept {
    std::string const line = std::string("[tokensieve plugins] ") + msg;
    nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
    nvinfer1::ILogger* logger = finder ? finder->findLogger() : nullptr;
    if (logger) {
        logger->log(nvinfer1::ILogger::Severity::kERROR, line.c_str());
    } else {
        std::fprintf(stderr, "%s\n", line.c_str());
    }
}

void readFields(nvinfer1::PluginFieldCollection const* fc, std::vector<FieldSpec> const& specs) {
    if (fc == nullptr) return;
    for (int32_t i = 0; i < fc->nbFields; ++i) {
        nvinfer1::PluginField const& f = fc->fields[i];
        if (f.name == nullptr) continue;
        for (FieldSpec const& spec : specs) {
            if (std::strcmp(f.name, spec.name) != 0) continue;
            double const v = scalarValue(f);
            if (spec.type == nvinfer1::PluginFieldType::kFLOAT32) {
                *static_cast<float*>(spec.value) = static_cast<float>(v);
            } else {
                *static_cast<int32_t*>(spec.value) = static_cast<int32_t>(v);
            }
        }
    }
}

void FieldCollection::assign(std::vector<FieldSpec> const& specs, bool withValues) {
    mFields.clear();
    for (FieldSpec const& s : specs) mFields.emplace_back(s.name, withValues ? s.value : nullptr, s.type, 1);
    mCollection.nbFields = static_cast<int32_t>(mFields.size());
    mCollection.fields = mFields.data();
}

bool isFloatOrHalf(nvinfer1::DataType t) noexcept {
    return t == nvinfer1::DataType::kFLOAT || t == nvinfer1::DataType::kHALF;
}

nvinfer1::IPluginCapability* PluginBase::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
    switch (type) {
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

nvinfer1::PluginFieldCollection const* PluginBase::getFieldsToSerialize() noexcept {
    try {
        mSerialized.assign(fieldSpecs(), true);
        return mSerialized.get();
    } catch (std::exception const& e) {
        logError(std::string(mPluginName) + ": cannot serialize attributes: " + e.what());
        return nullptr;
    }
}

}  // namespace tokensieve
