// The library's entry points. TensorRT (registry->loadLibrary, trtexec --dynamicPlugins, plugins_to_serialize)
// looks these up by name. Registration happens only here: REGISTER_TENSORRT_PLUGIN / registerCreator would call
// into TensorRT's IPluginRegistry, whose vtable differs between TensorRT 10.x headers and TensorRT-RTX (segfault).
#include "diversity_select.h"
#include "token_compact.h"

extern "C" {

__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static tokensieve::PluginCreator<tokensieve::TokenCompact> tokenCompact;
    static tokensieve::PluginCreator<tokensieve::DiversitySelect> diversitySelect;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&tokenCompact, &diversitySelect};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}

__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
    tokensieve::setLoggerFinder(finder);
}

}  // extern "C"
