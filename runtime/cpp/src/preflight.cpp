// Check 8 (CUDA device) and the ordered sequence of checks 1-8.
#include <cuda_runtime_api.h>

#include "tokensieve/runtime.h"

namespace tokensieve {

CudaDevice check_cuda_device(const EngineMetadata& meta, int index) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        std::string why = err != cudaSuccess ? std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err)
                                             : "the driver reports 0 devices";
        cudaGetLastError();  // clear the sticky error for callers that go on
        throw UsageError("No CUDA device (" + why + "); tokensieve-run needs an NVIDIA GPU and driver");
    }
    if (index < 0 || index >= count)
        throw UsageError("--device " + std::to_string(index) + " does not exist (" + std::to_string(count) +
                         " CUDA device(s))");
    cudaDeviceProp prop{};
    err = cudaGetDeviceProperties(&prop, index);
    if (err != cudaSuccess)
        throw UsageError(std::string("cudaGetDeviceProperties failed: ") + cudaGetErrorString(err));
    CudaDevice dev;
    dev.index = index;
    dev.name = prop.name;
    dev.cc_major = prop.major;
    dev.cc_minor = prop.minor;
    dev.total_memory = prop.totalGlobalMem;
    if (!meta.compute_capability.empty() && meta.compute_capability != dev.compute_capability())
        throw UsageError("Engine was built for compute capability " + meta.compute_capability + " but " + dev.name +
                         " is " + dev.compute_capability() + "; rebuild it on this GPU with `tokensieve build "
                         "--target local`");
    return dev;
}

Preflight preflight(const RunOptions& options) {
    if (options.iters < 1) throw UsageError("--iters must be >= 1, got " + std::to_string(options.iters));
    if (options.warmup < 0) throw UsageError("--warmup must be >= 0, got " + std::to_string(options.warmup));
    Preflight pf;
    pf.options = options;
    pf.engine_size = check_engine_file(options.engine_path);                        // 1
    pf.metadata = read_engine_metadata(options.engine_path, pf.engine_size);        // 2
    if (!options.plugin_path.empty()) pf.plugins = open_plugin_library(options.plugin_path);  // 3
    check_flavor(pf.metadata);                                                      // 4
    check_batch(pf.metadata, options.batch, options.shapes);                        // 5a
    pf.input_shapes = resolve_input_shapes(pf.metadata, options.batch, options.dims, options.shapes);  // 5b
    pf.batch = resolve_batch(pf.metadata, options.batch, options.shapes, pf.input_shapes);            // 5c
    pf.tensorrt = open_tensorrt_library();                                          // 6
    check_tensorrt_version(pf.metadata, pf.tensorrt);                               // 7
    pf.device = check_cuda_device(pf.metadata, options.device);                     // 8
    return pf;
}

}  // namespace tokensieve
