// tokensieve C++ runtime: run a `tokensieve build` engine (`model.engine` + `model.engine.json`) on standard
// TensorRT 10.x with enqueueV3, and time it.
//
// TensorRT is dlopen()ed at run time (no link-time dependency), so the library builds from headers alone and every
// argument/file check runs without a GPU and without TensorRT installed. The checks run in this order:
//   1. engine file exists and is non-empty
//   2. `<engine>.json` exists, parses, is tokensieve engine metadata, and its engine_size_bytes equals the file size
//   3. --plugins library exists, dlopen()s, and exports getCreators (or the V2 getPluginCreators)
//   4. metadata flavor is standard TensorRT (TensorRT-RTX engines need the RTX runtime)
//   5. --batch, --dim and --shape fit the engine's inputs and optimization profile (from the metadata), and the
//      inputs' batch axes agree on one batch
//   6. libnvinfer is found (TOKENSIEVE_TENSORRT_LIB / TENSORRT_LIB_DIR / loader path) and exports the entry points
//   7. libnvinfer's version equals the metadata's tensorrt_version (plans are tied to the TensorRT build)
//   8. a CUDA device is present and its compute capability matches the metadata
// Each failure is a UsageError with a one-line message that says what failed and how to fix it.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace tokensieve {

// A user-fixable problem: bad argument, missing/inconsistent file, missing library or GPU. Exit code 2.
class UsageError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// A failure after every check passed (CUDA or TensorRT error while running). Exit code 1.
class RuntimeFailure : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// ---- engine metadata (`<engine>.json`, written by targets/tensorrt/builder.py) -----------------------------------

struct TensorMeta {
    std::string name;
    std::vector<int64_t> shape;  // -1 = dynamic
    std::string dtype;           // ONNX/numpy spelling: float32, float16, int64, ...
    bool is_input = false;
    // ONNX dim name (dim_param) of each axis, "" where static or unnamed; from "input_dim_names", which the builder
    // writes only when some input has a dynamic axis other than batch. Empty vector: not recorded.
    std::vector<std::string> dim_names;
};

struct ProfileShapes {
    std::vector<int64_t> min, opt, max;
};

struct DimRange {
    int64_t min = 0, opt = 0, max = 0;
};

struct EngineMetadata {
    std::string path;  // the .json file
    std::string schema, flavor, tensorrt_version, target, compute_capability, precision;
    int64_t engine_size_bytes = -1;  // -1 = not recorded
    std::vector<TensorMeta> io_tensors;
    std::map<std::string, ProfileShapes> optimization_profile;  // input name -> min/opt/max
    std::map<std::string, DimRange> dims;  // "dims": dim name -> the range it was built with (`tokensieve build --dims`)
};

constexpr const char* kMetadataSchemaPrefix = "tokensieve.tensorrt-engine/";  // + version: 1 or 2 (runtime/engine_metadata.py)
constexpr const char* kFlavorStandard = "tensorrt";
constexpr const char* kFlavorRtx = "tensorrt_rtx";

std::string metadata_path_for(const std::string& engine_path);  // model.engine -> model.engine.json
// `'TEXT'` for a message, TEXT cut to at most `limit` bytes ("start...end", the end kept longer: a path's file name;
// on UTF-8 boundaries), so an error line stays short whatever path or value the user gave.
std::string quoted(const std::string& text, size_t limit = 44);
// `text` elided to at most `limit` bytes, a quarter of them from its start and the rest from its end (UTF-8 safe);
// unchanged if it fits.
std::string elide_middle(const std::string& text, size_t limit);
constexpr uint64_t kMaxMetadataBytes = 16ull << 20;  // an engine's .json is kilobytes; more is not one of ours

// Check 1: the engine file exists, is a regular file and is non-empty; returns its size.
uint64_t check_engine_file(const std::string& engine_path);
// Check 2: read and validate `<engine>.json`, then compare engine_size_bytes with `engine_size`.
EngineMetadata read_engine_metadata(const std::string& engine_path, uint64_t engine_size);
// Check 4.
void check_flavor(const EngineMetadata& meta);
// Check 5a: batch >= 1, within min..max of every dynamic-batch input's profile; equal to dim 0 of static inputs.
// Inputs named in `shapes` (--shape) are skipped: their dim 0 comes from there. So are static-dim-0 inputs with recorded
// dim names: their batch axes are the named ones, which resolve_input_shapes checks.
void check_batch(const EngineMetadata& meta, int batch,
                 const std::map<std::string, std::vector<int64_t>>& shapes = {});

// ---- input shapes (--batch, --dim, --shape) -----------------------------------------------------------------------

// `--dim NAME=VALUE` -> dims[NAME] = VALUE (VALUE a non-negative integer). UsageError when malformed or NAME repeats.
void parse_dim_option(const std::string& text, std::map<std::string, int64_t>& dims);
// `--shape INPUT=D0xD1x...` -> shapes[INPUT] = {D0, D1, ...}. UsageError when malformed or INPUT repeats.
void parse_shape_option(const std::string& text, std::map<std::string, std::vector<int64_t>>& shapes);

// Check 5b: the shape each input listed in the metadata's io_tensors runs at.
//   --shape INPUT=...   that input's whole shape (rank and static axes must match, dynamic axes fit the profile)
//   otherwise, per dynamic axis: dim 0, or an axis named like a dynamic dim 0 ("batch") -> `batch`;
//   an axis named NAME with --dim NAME=V -> V; an axis named "NAME + K" -> V + K (as the Python builder names
//   derived dims); any other dynamic axis -> the profile's opt value (1 without a profile).
// UsageError for an unknown dim or input name, a batch-axis name given to --dim, a wrong rank or static axis, or a value
// outside the profile's [min, max] for an axis (the fix: a value in range, or a wider `tokensieve build --dims`).
// Returns {} when the metadata lists no io_tensors (and then refuses any --dim/--shape).
std::map<std::string, std::vector<int64_t>> resolve_input_shapes(
    const EngineMetadata& meta, int batch, const std::map<std::string, int64_t>& dims,
    const std::map<std::string, std::vector<int64_t>>& shapes);

// Check 5c: the batch the run uses (the reported batch, and the throughput's), from `input_shapes` (what
// resolve_input_shapes returned for `batch` and the --shape options `shapes`): the value of the inputs' batch axes
// (dynamic dim 0, or an axis named like one, as resolve_input_shapes defines them). --batch sets them all, and a
// --shape can set one input's: UsageError when two inputs' batch axes differ. An engine with no dynamic batch axis runs
// at its static batch: the dim 0 most of its inputs share, the earliest input's on a tie (1 when all are scalars).
// Metadata without io_tensors: `batch` (run_benchmark then runs every dynamic dim 0 at it).
int64_t resolve_batch(const EngineMetadata& meta, int batch, const std::map<std::string, std::vector<int64_t>>& shapes,
                      const std::map<std::string, std::vector<int64_t>>& input_shapes);

// Samples per second: `iters` inferences of `batch` samples in `seconds` (0 when seconds <= 0).
double samples_per_second(int64_t batch, int iters, double seconds);

// ---- shared libraries ---------------------------------------------------------------------------------------------

class SharedLibrary {
public:
    SharedLibrary() = default;
    SharedLibrary(void* handle, std::string path) : handle_(handle), path_(std::move(path)) {}
    ~SharedLibrary();
    SharedLibrary(SharedLibrary&& o) noexcept;
    SharedLibrary& operator=(SharedLibrary&& o) noexcept;
    SharedLibrary(const SharedLibrary&) = delete;
    SharedLibrary& operator=(const SharedLibrary&) = delete;

    explicit operator bool() const { return handle_ != nullptr; }
    const std::string& path() const { return path_; }
    void* symbol(const char* name) const;  // nullptr when absent

private:
    void* handle_ = nullptr;
    std::string path_;
};

// Check 3: dlopen the plugin library and require `getCreators` (IPluginV3) or `getPluginCreators` (V2).
SharedLibrary open_plugin_library(const std::string& path);

struct TensorRTLibrary {
    SharedLibrary lib;
    int32_t version = 0;  // getInferLibVersion(): major*10000 + minor*100 + patch
    std::string version_string() const;  // "10.3.0"
    std::string how_found;  // "TOKENSIEVE_TENSORRT_LIB", "TENSORRT_LIB_DIR", "build-time TENSORRT_LIB_DIR", "loader path"
};

// Check 6. Search order: $TOKENSIEVE_TENSORRT_LIB (a file, or a folder holding libnvinfer.so*), then
// $TENSORRT_LIB_DIR, then the TENSORRT_LIB_DIR given to CMake, then the dynamic loader's path
// (LD_LIBRARY_PATH, ldconfig). An explicit TOKENSIEVE_TENSORRT_LIB that fails is an error, not a fallback.
TensorRTLibrary open_tensorrt_library();
// Check 7: "10.3.0.30" in the metadata vs the library's 10.3.0 (the build number is not exported).
void check_tensorrt_version(const EngineMetadata& meta, const TensorRTLibrary& trt);

struct CudaDevice {
    int index = 0;
    std::string name;
    int cc_major = 0, cc_minor = 0;
    uint64_t total_memory = 0;
    std::string compute_capability() const { return std::to_string(cc_major) + "." + std::to_string(cc_minor); }
};

// Check 8.
CudaDevice check_cuda_device(const EngineMetadata& meta, int index = 0);

// ---- running --------------------------------------------------------------------------------------------------------

struct RunOptions {
    std::string engine_path;
    std::string plugin_path;  // empty: none
    int iters = 200;
    int warmup = 20;
    int batch = 1;
    std::map<std::string, int64_t> dims;                 // --dim NAME=VALUE: every input axis named NAME
    std::map<std::string, std::vector<int64_t>> shapes;  // --shape INPUT=D0xD1x...: one input's whole shape
    int device = 0;
    std::string json_path;  // empty: no JSON report
    bool verbose = false;   // print TensorRT warnings
};

struct LatencyStats {
    size_t count = 0;
    double mean = 0, median = 0, p90 = 0, p99 = 0, min = 0, max = 0;  // milliseconds
};

// Percentiles by linear interpolation between order statistics (numpy's default).
LatencyStats summarize_latencies(std::vector<double> ms);

struct TopEntry {
    int64_t index = 0;
    double value = 0;
};

// The k largest values of `values` (ties: lower index first).
std::vector<TopEntry> top_k(const std::vector<double>& values, size_t k);

struct TensorBinding {
    std::string name;
    bool is_input = false;
    std::string dtype;
    std::vector<int64_t> shape;  // resolved for this run
    uint64_t bytes = 0;
};

struct BenchmarkResult {
    LatencyStats latency;
    double wall_seconds = 0;  // timed loop, host clock
    double throughput = 0;    // samples_per_second(Preflight::batch, iters, wall_seconds)
    std::vector<TensorBinding> bindings;
    std::string first_output;
    std::vector<TopEntry> top5;  // of the first output, batch item 0, flattened
    CudaDevice device;
    std::string tensorrt_version;
    uint64_t device_memory_bytes = 0;  // engine device memory + I/O buffers
};

// Everything checks 1-8 produce, ready to run. Owns the dlopen()ed libraries.
struct Preflight {
    RunOptions options;
    uint64_t engine_size = 0;
    EngineMetadata metadata;
    SharedLibrary plugins;
    TensorRTLibrary tensorrt;
    CudaDevice device;
    std::map<std::string, std::vector<int64_t>> input_shapes;  // check 5b, by input name
    int64_t batch = 1;  // check 5c: the batch the run uses (reported, and the throughput's), not always --batch
};

// Runs checks 1-8 in order; throws UsageError on the first failure.
Preflight preflight(const RunOptions& options);

using LogFn = std::function<void(const std::string&)>;

// mmap + deserialize + allocate + warm-up + timed enqueueV3 loop. UsageError for a plan TensorRT rejects,
// RuntimeFailure for CUDA/TensorRT errors while running.
BenchmarkResult run_benchmark(Preflight& pf, const LogFn& log);

// The report `--json` writes.
std::string report_json(const Preflight& pf, const BenchmarkResult& r);

}  // namespace tokensieve
