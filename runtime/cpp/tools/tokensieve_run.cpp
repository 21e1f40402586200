// tokensieve-run: time a `tokensieve build` engine with TensorRT enqueueV3 and print latency percentiles.
// Exit codes: 0 ok, 2 argument/file/environment error (one line on stderr), 1 failure while running.
#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "tokensieve/runtime.h"

namespace {

const char* const kUsage =
    "usage: tokensieve-run MODEL.engine [--plugins LIB.so] [--iters N] [--warmup N] [--batch N] [--device N]\n"
    "                      [--dim NAME=VALUE ...] [--shape INPUT=D0xD1x... ...] [--json OUT.json] [--verbose]\n"
    "\n"
    "Run an engine written by `tokensieve build` (MODEL.engine + MODEL.engine.json) on standard TensorRT 10.x and\n"
    "print latency percentiles (enqueueV3, CUDA events) and the top-5 of the first output.\n"
    "\n"
    "  --plugins LIB.so  tokensieve TensorRT plugin library (libtokensieve_plugins.so), loaded before the engine\n"
    "  --iters N         timed iterations (default 200)\n"
    "  --warmup N        untimed warm-up iterations (default 20)\n"
    "  --batch N         batch size for inputs with a dynamic batch dimension (default 1).\n"
    "                    The batch reported (and throughput = batch x iterations / s) is the one the run used:\n"
    "                    --batch, or the batch axis a --shape gives (all inputs' batch axes must agree). An engine\n"
    "                    without a dynamic batch axis runs at its static batch: the dim 0 most of its inputs share\n"
    "                    (the earliest input's on a tie)\n"
    "  --dim NAME=VALUE  run every input axis whose ONNX dim name is NAME at VALUE (repeatable), e.g.\n"
    "                    --dim past_sequence=512; an axis named \"NAME + K\" runs at VALUE + K. The names and their\n"
    "                    ranges are in MODEL.engine.json (set by `tokensieve build --dims`); dynamic axes not set run\n"
    "                    at the profile's opt value. The batch axis is --batch\n"
    "  --shape INPUT=D0xD1x...\n"
    "                    the whole shape of one input (repeatable), e.g. --shape input_ids=1x128; overrides --batch\n"
    "                    and --dim for that input\n"
    "  --device N        CUDA device index (default 0)\n"
    "  --json OUT.json   also write the results as JSON (with the shape every tensor ran at)\n"
    "  --verbose         print TensorRT warnings and the bound tensors\n"
    "\n"
    "libnvinfer is loaded at run time from $TOKENSIEVE_TENSORRT_LIB (file or folder), $TENSORRT_LIB_DIR, the\n"
    "TENSORRT_LIB_DIR given to CMake, or the loader path. TensorRT-RTX engines are not supported.\n"
    "Exit status: 0 ok, 2 bad argument/file/missing library or GPU, 1 failure while running.\n";

// The line `PREFIX: MESSAGE` of at most 200 characters: newlines become spaces, and a longer message is elided in the
// middle (its start says what failed, its end how to fix it). Paths and values in messages are quoted short already.
void print_line(const char* prefix, std::string s) {
    for (char& c : s)
        if (c == '\n' || c == '\r') c = ' ';
    std::fprintf(stderr, "%s%s\n", prefix, tokensieve::elide_middle(s, 200 - std::strlen(prefix)).c_str());
}

int parse_int(const std::string& flag, const std::string& v) {
    errno = 0;
    char* end = nullptr;
    long x = std::strtol(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || errno == ERANGE || x < -1000000000L || x > 1000000000L)
        throw tokensieve::UsageError(flag + " expects an integer, got " + tokensieve::quoted(v));
    return static_cast<int>(x);
}

// `tokensieve build --dims` sets the ranges an engine accepts; tokensieve-run picks one value per name.
std::string hint(const std::string& flag) {
    return flag == "--dims" ? " (--dims NAME=MIN:OPT:MAX is for `tokensieve build`; here use --dim NAME=VALUE)" : "";
}

struct Args {
    tokensieve::RunOptions options;
    bool help = false;
};

Args parse_args(int argc, char** argv) {
    Args a;
    std::string engine;
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i], value;
        if (arg == "-h" || arg == "--help") {
            a.help = true;
            return a;
        }
        if (arg == "-v" || arg == "--verbose") {
            a.options.verbose = true;
            continue;
        }
        if (arg.rfind("--", 0) == 0) {
            std::string flag = arg;
            if (auto eq = arg.find('='); eq != std::string::npos) {
                flag = arg.substr(0, eq);
                value = arg.substr(eq + 1);
            } else {
                if (flag != "--plugins" && flag != "--iters" && flag != "--warmup" && flag != "--batch" &&
                    flag != "--device" && flag != "--json" && flag != "--dim" && flag != "--shape")
                    throw tokensieve::UsageError("unknown option " + tokensieve::quoted(arg) + hint(flag) + "; see --help");
                if (i + 1 >= argc) throw tokensieve::UsageError(flag + " needs a value");
                value = argv[++i];
            }
            if (flag == "--plugins") {
                if (value.empty()) throw tokensieve::UsageError("--plugins needs a library path");
                a.options.plugin_path = value;
            } else if (flag == "--iters") a.options.iters = parse_int(flag, value);
            else if (flag == "--warmup") a.options.warmup = parse_int(flag, value);
            else if (flag == "--batch") a.options.batch = parse_int(flag, value);
            else if (flag == "--device") a.options.device = parse_int(flag, value);
            else if (flag == "--dim") tokensieve::parse_dim_option(value, a.options.dims);
            else if (flag == "--shape") tokensieve::parse_shape_option(value, a.options.shapes);
            else if (flag == "--json") {
                if (value.empty()) throw tokensieve::UsageError("--json needs an output path");
                a.options.json_path = value;
            } else throw tokensieve::UsageError("unknown option " + tokensieve::quoted(flag) + hint(flag) + "; see --help");
            continue;
        }
        if (!engine.empty()) throw tokensieve::UsageError("unexpected argument " + tokensieve::quoted(arg) + " (one engine at a time)");
        engine = arg;
    }
    if (engine.empty()) throw tokensieve::UsageError("missing MODEL.engine; see --help");
    a.options.engine_path = engine;
    if (!a.options.json_path.empty()) {
        auto slash = a.options.json_path.rfind('/');
        std::string dir = slash == std::string::npos ? "." : a.options.json_path.substr(0, slash + 1);
        struct stat st {};
        if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
            throw tokensieve::UsageError("--json " + tokensieve::quoted(a.options.json_path) + ": folder " +
                                         tokensieve::quoted(dir) + " does not exist");
    }
    return a;
}

void print_result(const tokensieve::Preflight& pf, const tokensieve::BenchmarkResult& r) {
    const auto& l = r.latency;
    std::printf("engine   %s (TensorRT %s, %s %s)\n", pf.options.engine_path.c_str(), r.tensorrt_version.c_str(),
                r.device.name.c_str(), r.device.compute_capability().c_str());
    std::printf("batch %lld, warm-up %d, iterations %zu\n", static_cast<long long>(pf.batch), pf.options.warmup,
                l.count);  // the run's batch (check 5c), which the throughput counts
    bool named = !pf.options.dims.empty() || !pf.options.shapes.empty();
    for (const auto& t : pf.metadata.io_tensors) named = named || !t.dim_names.empty();
    if (named) {  // engines with axes other than batch: the shapes this run used
        std::printf("inputs  ");
        for (const auto& b : r.bindings) {
            if (!b.is_input) continue;
            std::printf(" %s[", b.name.c_str());
            for (size_t i = 0; i < b.shape.size(); ++i) std::printf("%s%lld", i ? "x" : "", static_cast<long long>(b.shape[i]));
            std::printf("]");
        }
        std::printf("\n");
    }
    std::printf("latency  mean %.4f ms  median %.4f ms  p90 %.4f ms  p99 %.4f ms  (min %.4f, max %.4f)\n", l.mean,
                l.median, l.p90, l.p99, l.min, l.max);
    std::printf("throughput %.1f samples/s, device memory %.1f MiB\n", r.throughput,
                static_cast<double>(r.device_memory_bytes) / (1 << 20));
    std::printf("top-5 of '%s' (batch item 0):", r.first_output.c_str());
    for (const auto& t : r.top5) std::printf(" %lld:%.6g", static_cast<long long>(t.index), t.value);
    std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
    try {
        Args args = parse_args(argc, argv);
        if (args.help) {
            std::fputs(kUsage, stdout);
            return 0;
        }
        tokensieve::Preflight pf = tokensieve::preflight(args.options);
        bool verbose = args.options.verbose;
        auto log = [verbose](const std::string& m) {
            if (verbose) std::fprintf(stderr, "%s\n", m.c_str());
        };
        tokensieve::BenchmarkResult r = tokensieve::run_benchmark(pf, log);
        print_result(pf, r);
        if (!args.options.json_path.empty()) {
            std::ofstream out(args.options.json_path);
            out << tokensieve::report_json(pf, r);
            if (!out) throw tokensieve::UsageError("cannot write --json " + tokensieve::quoted(args.options.json_path));
        }
        return 0;
    } catch (const tokensieve::UsageError& e) {
        print_line("tokensieve-run: error: ", e.what());
        return 2;
    } catch (const tokensieve::RuntimeFailure& e) {
        print_line("tokensieve-run: failed: ", e.what());
        return 1;
    } catch (const std::exception& e) {
        print_line("tokensieve-run: internal error: ", e.what());
        return 1;
    }
}
