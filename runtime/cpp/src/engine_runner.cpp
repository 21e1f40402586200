// mmap the plan, deserialize it with the dlopen()ed libnvinfer, bind one device buffer per I/O tensor and time
// enqueueV3. Only standard TensorRT objects are called here (preflight refuses RTX engines and libraries): the 10.x
// headers' vtables do not match TensorRT-RTX's (see /work/shared/FACTS.md, PLUGINS).
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "NvInferRuntime.h"
#include "tokensieve/runtime.h"

namespace tokensieve {

namespace {

using CreateRuntimeFn = void* (*)(void* logger, int32_t version);
using GetRegistryFn = nvinfer1::IPluginRegistry* (*)();

// Keeps TensorRT's errors for the one-line message; prints warnings only with --verbose.
class Logger : public nvinfer1::ILogger {
public:
    explicit Logger(bool verbose) : verbose_(verbose) {}
    void log(Severity severity, const char* msg) noexcept override {
        if (severity <= Severity::kERROR) {
            last_error_ = msg;
        } else if (verbose_ && severity <= Severity::kWARNING) {
            std::fprintf(stderr, "[TensorRT] %s\n", msg);
        }
    }
    std::string last_error() const { return last_error_.empty() ? "no TensorRT error message" : last_error_; }

private:
    bool verbose_;
    std::string last_error_;
};

void cuda_check(cudaError_t err, const char* what) {
    if (err != cudaSuccess)
        throw RuntimeFailure(std::string(what) + " failed: " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

// Read-only mapping of the plan; TensorRT copies what it needs during deserialization.
class MappedFile {
public:
    explicit MappedFile(const std::string& path) {
        int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) throw UsageError("Engine file '" + path + "' cannot be opened: " + std::strerror(errno));
        struct stat st {};
        if (::fstat(fd, &st) != 0 || st.st_size == 0) {
            ::close(fd);
            throw UsageError("Engine file '" + path + "' is empty or unreadable");
        }
        size_ = static_cast<size_t>(st.st_size);
        data_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
        ::close(fd);
        if (data_ == MAP_FAILED) {
            data_ = nullptr;
            throw UsageError("Engine file '" + path + "' cannot be mapped: " + std::strerror(errno));
        }
    }
    ~MappedFile() {
        if (data_) ::munmap(data_, size_);
    }
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    const void* data() const { return data_; }
    size_t size() const { return size_; }

private:
    void* data_ = nullptr;
    size_t size_ = 0;
};

struct DeviceBuffer {
    void* ptr = nullptr;
    ~DeviceBuffer() {
        if (ptr) cudaFree(ptr);
    }
};

// Element size in bytes, 0 for types the runtime does not bind (sub-byte, unknown).
size_t element_size(nvinfer1::DataType t) {
    using nvinfer1::DataType;
    switch (t) {
        case DataType::kFLOAT: case DataType::kINT32: return 4;
        case DataType::kHALF: case DataType::kBF16: return 2;
        case DataType::kINT8: case DataType::kUINT8: case DataType::kBOOL: case DataType::kFP8: return 1;
        case DataType::kINT64: return 8;
        default: return 0;  // kINT4, kFP4, kE8M0 (named only in newer 10.x headers)
    }
}

std::string dtype_name(nvinfer1::DataType t) {
    using nvinfer1::DataType;
    switch (t) {  // ONNX/numpy spelling, as in engine_metadata.py
        case DataType::kFLOAT: return "float32";
        case DataType::kHALF: return "float16";
        case DataType::kBF16: return "bfloat16";
        case DataType::kINT8: return "int8";
        case DataType::kUINT8: return "uint8";
        case DataType::kINT32: return "int32";
        case DataType::kINT64: return "int64";
        case DataType::kBOOL: return "bool";
        case DataType::kFP8: return "float8e4m3fn";
        default: return "datatype" + std::to_string(static_cast<int>(t));
    }
}

uint16_t float_to_half(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    int32_t exp = static_cast<int32_t>((x >> 23) & 0xFF) - 127 + 15;
    uint32_t mant = x & 0x7FFFFFu;
    if (exp <= 0) return static_cast<uint16_t>(sign);  // inputs here are in [-1, 1): flush tiny values
    if (exp >= 31) return static_cast<uint16_t>(sign | 0x7C00u);
    uint32_t h = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
    if (mant & 0x1000u) ++h;  // round half up
    return static_cast<uint16_t>(h);
}

float half_to_float(uint16_t h) {
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FFu, x;
    if (exp == 0) {
        float f = std::ldexp(static_cast<float>(mant), -24);
        return sign ? -f : f;
    }
    if (exp == 31) x = sign | 0x7F800000u | (mant << 13);
    else x = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

float bf16_to_float(uint16_t b) {
    uint32_t x = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

// Deterministic input: uniform [-1, 1) for floating types, zeros for integers/bools (ids, masks, indices).
std::vector<uint8_t> make_input(nvinfer1::DataType t, uint64_t count, uint64_t seed) {
    using nvinfer1::DataType;
    size_t es = element_size(t);
    std::vector<uint8_t> host(count * es, 0);
    uint64_t s = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    auto next = [&s]() {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        return static_cast<float>((s >> 40) & 0xFFFFFF) / 8388608.0f - 1.0f;
    };
    for (uint64_t i = 0; i < count; ++i) {
        if (t == DataType::kFLOAT) {
            float v = next();
            std::memcpy(&host[i * 4], &v, 4);
        } else if (t == DataType::kHALF) {
            uint16_t v = float_to_half(next());
            std::memcpy(&host[i * 2], &v, 2);
        } else if (t == DataType::kBF16) {
            float f = next();
            uint32_t x;
            std::memcpy(&x, &f, 4);
            uint16_t v = static_cast<uint16_t>(x >> 16);
            std::memcpy(&host[i * 2], &v, 2);
        }
    }
    return host;
}

bool to_doubles(nvinfer1::DataType t, const std::vector<uint8_t>& raw, uint64_t count, std::vector<double>& out) {
    using nvinfer1::DataType;
    out.resize(count);
    for (uint64_t i = 0; i < count; ++i) {
        switch (t) {
            case DataType::kFLOAT: { float v; std::memcpy(&v, &raw[i * 4], 4); out[i] = v; break; }
            case DataType::kHALF: { uint16_t v; std::memcpy(&v, &raw[i * 2], 2); out[i] = half_to_float(v); break; }
            case DataType::kBF16: { uint16_t v; std::memcpy(&v, &raw[i * 2], 2); out[i] = bf16_to_float(v); break; }
            case DataType::kINT32: { int32_t v; std::memcpy(&v, &raw[i * 4], 4); out[i] = v; break; }
            case DataType::kINT64: { int64_t v; std::memcpy(&v, &raw[i * 8], 8); out[i] = static_cast<double>(v); break; }
            case DataType::kINT8: out[i] = static_cast<int8_t>(raw[i]); break;
            case DataType::kUINT8: case DataType::kBOOL: out[i] = raw[i]; break;
            default: return false;
        }
    }
    return true;
}

std::vector<int64_t> to_vec(const nvinfer1::Dims& d) { return std::vector<int64_t>(d.d, d.d + d.nbDims); }

std::string dims_str(const std::vector<int64_t>& d) {
    std::string s = "[";
    for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
    return s + "]";
}

template <typename T>
struct TrtDelete {
    void operator()(T* p) const { delete p; }
};
template <typename T>
using TrtPtr = std::unique_ptr<T, TrtDelete<T>>;

}  // namespace

BenchmarkResult run_benchmark(Preflight& pf, const LogFn& log) {
    const RunOptions& opt = pf.options;
    BenchmarkResult result;
    result.device = pf.device;
    result.tensorrt_version = pf.tensorrt.version_string();

    cuda_check(cudaSetDevice(opt.device), "cudaSetDevice");
    size_t free_before = 0, total = 0;
    cuda_check(cudaMemGetInfo(&free_before, &total), "cudaMemGetInfo");

    MappedFile plan(opt.engine_path);
    Logger logger(opt.verbose);
    auto create_runtime = reinterpret_cast<CreateRuntimeFn>(pf.tensorrt.lib.symbol("createInferRuntime_INTERNAL"));
    TrtPtr<nvinfer1::IRuntime> runtime(
        static_cast<nvinfer1::IRuntime*>(create_runtime(static_cast<nvinfer1::ILogger*>(&logger), NV_TENSORRT_VERSION)));
    if (!runtime) throw RuntimeFailure("TensorRT could not create a runtime: " + logger.last_error());

    // Plugins go through the registry so TensorRT calls the library's getCreators/setLoggerFinder itself, the way
    // trtexec --dynamicPlugins does. The registry is libnvinfer's (standard TensorRT: vtable matches the headers).
    nvinfer1::IPluginRegistry* registry = nullptr;
    nvinfer1::IPluginRegistry::PluginLibraryHandle plugin_handle = nullptr;
    if (pf.plugins) {
        registry = reinterpret_cast<GetRegistryFn>(pf.tensorrt.lib.symbol("getPluginRegistry"))();
        if (!registry) throw RuntimeFailure("TensorRT returned no plugin registry");
        plugin_handle = registry->loadLibrary(pf.plugins.path().c_str());
        if (!plugin_handle)
            throw UsageError("--plugins '" + opt.plugin_path + "' was rejected by TensorRT's plugin registry (" +
                             logger.last_error() + "); a plugin library exports extern \"C\" getCreators and "
                             "setLoggerFinder, and its plugins must not be registered already");
        log("plugins: registered " + opt.plugin_path);
    }
    struct PluginGuard {
        nvinfer1::IPluginRegistry* reg;
        nvinfer1::IPluginRegistry::PluginLibraryHandle h;
        ~PluginGuard() {
            if (reg && h) reg->deregisterLibrary(h);
        }
    } plugin_guard{registry, plugin_handle};  // declared before the engine: destroyed after it

    TrtPtr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(plan.data(), plan.size()));
    if (!engine)
        throw UsageError("TensorRT " + pf.tensorrt.version_string() + " could not deserialize '" + opt.engine_path +
                         "' (" + logger.last_error() + "); rebuild it here with `tokensieve build --target local`" +
                         (pf.plugins ? "" : ", or pass --plugins if it uses tokensieve plugins"));
    TrtPtr<nvinfer1::IExecutionContext> context(engine->createExecutionContext());
    if (!context) throw RuntimeFailure("TensorRT could not create an execution context: " + logger.last_error());

    // Input shapes: preflight resolved them from the metadata (check 5b: --shape, --batch, --dim, else the profile's
    // opt value). An input the metadata does not list: dim 0 is the run's batch (check 5c), other dynamic dims the
    // profile's opt value.
    int32_t n = engine->getNbIOTensors();
    std::vector<nvinfer1::DataType> types(n);
    for (int32_t i = 0; i < n; ++i) {
        const char* name = engine->getIOTensorName(i);
        TensorBinding b;
        b.name = name;
        b.is_input = engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT;
        types[i] = engine->getTensorDataType(name);
        b.dtype = dtype_name(types[i]);
        if (element_size(types[i]) == 0)
            throw UsageError("Tensor '" + b.name + "' has type " + b.dtype + ", which tokensieve-run cannot bind");
        if (b.is_input) {
            if (engine->isShapeInferenceIO(name))
                throw UsageError("Input '" + b.name + "' is a shape tensor, which tokensieve-run does not feed");
            nvinfer1::Dims d = engine->getTensorShape(name);
            if (auto r = pf.input_shapes.find(b.name); r != pf.input_shapes.end()) {
                if (static_cast<int64_t>(r->second.size()) != d.nbDims)
                    throw UsageError("Input '" + b.name + "' has rank " + std::to_string(d.nbDims) + " in the engine but " +
                                     std::to_string(r->second.size()) + " in its metadata '" + pf.metadata.path +
                                     "'; rebuild the engine with `tokensieve build`");
                for (int32_t k = 0; k < d.nbDims; ++k) d.d[k] = r->second[k];
            }
            for (int32_t k = 0; k < d.nbDims; ++k) {
                if (d.d[k] >= 0) continue;
                if (k == 0) {
                    d.d[k] = pf.batch;
                    continue;
                }
                // Only dynamic inputs have profile shapes; asking for a static one logs a TensorRT error.
                nvinfer1::Dims o = engine->getProfileShape(name, 0, nvinfer1::OptProfileSelector::kOPT);
                d.d[k] = k < o.nbDims && o.d[k] > 0 ? o.d[k] : 1;
            }
            if (!context->setInputShape(name, d))
                throw UsageError("TensorRT rejected shape " + dims_str(to_vec(d)) + " for input '" + b.name + "' (" +
                                 logger.last_error() + ")");
        }
        result.bindings.push_back(std::move(b));
    }
    // Output shapes follow from the input shapes; tokensieve engines are static-shape (fixed token budgets).
    std::vector<DeviceBuffer> buffers(n);
    std::vector<std::vector<uint8_t>> host_inputs(n);
    for (int32_t i = 0; i < n; ++i) {
        TensorBinding& b = result.bindings[i];
        nvinfer1::Dims d = context->getTensorShape(b.name.c_str());
        b.shape = to_vec(d);
        uint64_t count = 1;
        for (int64_t v : b.shape) {
            if (v < 0)
                throw UsageError("Output '" + b.name + "' has a data-dependent shape " + dims_str(b.shape) +
                                 "; tokensieve-run binds static shapes only (use a fixed keep budget)");
            count *= static_cast<uint64_t>(v);
        }
        b.bytes = count * element_size(types[i]);
        cuda_check(cudaMalloc(&buffers[i].ptr, b.bytes ? b.bytes : 1), ("cudaMalloc for '" + b.name + "'").c_str());
        if (b.is_input) {
            host_inputs[i] = make_input(types[i], count, static_cast<uint64_t>(i) + 1);
            cuda_check(cudaMemcpy(buffers[i].ptr, host_inputs[i].data(), b.bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
        }
        if (!context->setTensorAddress(b.name.c_str(), buffers[i].ptr))
            throw RuntimeFailure("setTensorAddress('" + b.name + "') failed: " + logger.last_error());
        if (!b.is_input && result.first_output.empty()) result.first_output = b.name;
        log(std::string(b.is_input ? "input  " : "output ") + b.name + " " + b.dtype + dims_str(b.shape));
    }
    if (!context->allInputDimensionsSpecified()) throw RuntimeFailure("TensorRT reports unspecified input dimensions");

    size_t free_after = 0;
    cuda_check(cudaMemGetInfo(&free_after, &total), "cudaMemGetInfo");
    result.device_memory_bytes = free_before > free_after ? free_before - free_after : 0;

    cudaStream_t stream = nullptr;
    cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    cudaEvent_t start = nullptr, stop = nullptr;
    struct StreamGuard {
        cudaStream_t& s;
        cudaEvent_t& a;
        cudaEvent_t& b;
        ~StreamGuard() {
            if (a) cudaEventDestroy(a);
            if (b) cudaEventDestroy(b);
            if (s) cudaStreamDestroy(s);
        }
    } stream_guard{stream, start, stop};
    cuda_check(cudaEventCreate(&start), "cudaEventCreate");
    cuda_check(cudaEventCreate(&stop), "cudaEventCreate");

    for (int i = 0; i < opt.warmup; ++i) {
        if (!context->enqueueV3(stream)) throw RuntimeFailure("enqueueV3 failed during warm-up: " + logger.last_error());
    }
    cuda_check(cudaStreamSynchronize(stream), "warm-up");

    // One inference at a time: each latency is enqueue-to-completion on the GPU, as trtexec's "GPU Compute Time".
    std::vector<double> ms;
    ms.reserve(opt.iters);
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < opt.iters; ++i) {
        cuda_check(cudaEventRecord(start, stream), "cudaEventRecord");
        if (!context->enqueueV3(stream)) throw RuntimeFailure("enqueueV3 failed: " + logger.last_error());
        cuda_check(cudaEventRecord(stop, stream), "cudaEventRecord");
        cuda_check(cudaEventSynchronize(stop), "inference");
        float e = 0;
        cuda_check(cudaEventElapsedTime(&e, start, stop), "cudaEventElapsedTime");
        ms.push_back(e);
    }
    result.wall_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    result.throughput = samples_per_second(pf.batch, opt.iters, result.wall_seconds);  // the batch the run used
    result.latency = summarize_latencies(std::move(ms));

    for (int32_t i = 0; i < n; ++i) {
        const TensorBinding& b = result.bindings[i];
        if (b.name != result.first_output) continue;
        std::vector<uint8_t> raw(b.bytes);
        cuda_check(cudaMemcpy(raw.data(), buffers[i].ptr, b.bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
        uint64_t per_item = b.shape.empty() || b.shape[0] == 0 ? 0 : b.bytes / element_size(types[i]) / b.shape[0];
        std::vector<double> values;
        if (to_doubles(types[i], raw, per_item, values)) result.top5 = top_k(values, 5);
    }
    return result;
}

}  // namespace tokensieve
