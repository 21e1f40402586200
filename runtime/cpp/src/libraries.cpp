// Checks 3, 6, 7: the plugin library and libnvinfer, found and dlopen()ed without calling into TensorRT.
#include <dlfcn.h>
#include <sys/stat.h>

#include <cstdlib>
#include <utility>

#include "NvInferVersion.h"  // macros only: the major version these headers describe
#include "tokensieve/runtime.h"

#ifndef TOKENSIEVE_DEFAULT_TENSORRT_LIB_DIR
#define TOKENSIEVE_DEFAULT_TENSORRT_LIB_DIR ""
#endif

namespace tokensieve {

namespace {

std::string q(const std::string& s) { return quoted(s); }

std::string last_dlerror() {
    const char* e = dlerror();
    return e ? e : "unknown dlopen error";
}

bool is_dir(const std::string& p) {
    struct stat st {};
    return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool exists(const std::string& p) {
    struct stat st {};
    return ::stat(p.c_str(), &st) == 0;
}

// Sonames tried in a folder or on the loader path. The runtime is compiled against 10.x headers.
const char* const kNvinferNames[] = {"libnvinfer.so.10", "libnvinfer.so"};

const char* const kFix = "set TOKENSIEVE_TENSORRT_LIB to libnvinfer.so.10 (or TENSORRT_LIB_DIR to its folder)";
const size_t kWhy = 48;  // bytes of the loader's reason quoted in a message

// dlopen + the three C entry points the runtime uses. Empty optional-like result on failure, with `why` set.
bool try_open(const std::string& path, TensorRTLibrary& out, std::string& why) {
    if (path.find("tensorrt_rtx") != std::string::npos) {
        why = "TensorRT-RTX: not TensorRT 10.x's C++ ABI";
        return false;
    }
    dlerror();
    // RTLD_GLOBAL: plugin libraries linked against libnvinfer resolve its symbols from this copy.
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (!h) {
        why = last_dlerror();  // "PATH: reason": the message quotes the path already
        if (why.rfind(path + ": ", 0) == 0) why = why.substr(path.size() + 2);
        return false;
    }
    SharedLibrary lib(h, path);
    for (const char* sym : {"createInferRuntime_INTERNAL", "getPluginRegistry", "getInferLibVersion"}) {
        if (!lib.symbol(sym)) {
            why = q(path) + " loads but does not export " + sym + " (not libnvinfer?)";
            return false;
        }
    }
    auto version = reinterpret_cast<int32_t (*)()>(lib.symbol("getInferLibVersion"));
    out.version = version();
    out.lib = std::move(lib);
    return true;
}

bool try_folder(const std::string& dir, TensorRTLibrary& out, std::string& why) {
    std::string tried;
    for (const char* name : kNvinferNames) {
        std::string p = dir + "/" + name;
        if (!exists(p)) continue;
        if (try_open(p, out, why)) return true;
        return false;  // it is there but broken: report that, not "not found"
    }
    why = "no libnvinfer.so.10 or libnvinfer.so in " + q(dir);
    return false;
}

}  // namespace

SharedLibrary::~SharedLibrary() {
    if (handle_) dlclose(handle_);
}
SharedLibrary::SharedLibrary(SharedLibrary&& o) noexcept
    : handle_(std::exchange(o.handle_, nullptr)), path_(std::move(o.path_)) {}
SharedLibrary& SharedLibrary::operator=(SharedLibrary&& o) noexcept {
    if (this != &o) {
        if (handle_) dlclose(handle_);
        handle_ = std::exchange(o.handle_, nullptr);
        path_ = std::move(o.path_);
    }
    return *this;
}
void* SharedLibrary::symbol(const char* name) const { return handle_ ? dlsym(handle_, name) : nullptr; }

SharedLibrary open_plugin_library(const std::string& path) {
    if (!exists(path))
        throw UsageError("--plugins " + q(path) + " does not exist; pass libtokensieve_plugins.so built from "
                         "targets/tensorrt/plugins");
    if (is_dir(path)) throw UsageError("--plugins " + q(path) + " is a folder; pass the .so file itself");
    dlerror();
    // A path without '/' would be searched on the loader path instead of taken as given.
    std::string p = path.find('/') == std::string::npos ? "./" + path : path;
    void* h = dlopen(p.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        std::string why = last_dlerror();  // "PATH: reason": the path is quoted already
        if (why.rfind(path + ": ", 0) == 0) why = why.substr(path.size() + 2);
        throw UsageError("--plugins " + q(path) + " cannot be loaded: " + why);
    }
    SharedLibrary lib(h, p);
    if (!lib.symbol("getCreators") && !lib.symbol("getPluginCreators"))
        throw UsageError("--plugins " + q(path) + " exports neither getCreators nor getPluginCreators, so TensorRT "
                         "cannot register its plugins; build it with the extern \"C\" getCreators entry point");
    return lib;
}

std::string TensorRTLibrary::version_string() const {
    return std::to_string(version / 10000) + "." + std::to_string(version / 100 % 100) + "." +
           std::to_string(version % 100);
}

TensorRTLibrary open_tensorrt_library() {
    TensorRTLibrary out;
    std::string why;
    if (const char* env = std::getenv("TOKENSIEVE_TENSORRT_LIB"); env && *env) {
        std::string p = env;
        bool ok = is_dir(p) ? try_folder(p, out, why) : try_open(p, out, why);
        if (!ok)
            throw UsageError("libnvinfer not found at TOKENSIEVE_TENSORRT_LIB=" + quoted(p, 40) + " (" +
                             elide_middle(why, kWhy) + "); point it at libnvinfer.so.10");
        out.how_found = "TOKENSIEVE_TENSORRT_LIB";
        return out;
    }
    if (const char* env = std::getenv("TENSORRT_LIB_DIR"); env && *env) {
        if (!try_folder(env, out, why))
            throw UsageError(std::string("libnvinfer not found in TENSORRT_LIB_DIR=") + quoted(env, 40) + " (" +
                             elide_middle(why, kWhy) + "); point it at libnvinfer.so.10's folder");
        out.how_found = "TENSORRT_LIB_DIR";
        return out;
    }
    std::string built_in = TOKENSIEVE_DEFAULT_TENSORRT_LIB_DIR;
    if (!built_in.empty() && is_dir(built_in) && try_folder(built_in, out, why)) {
        out.how_found = "build-time TENSORRT_LIB_DIR";
        return out;
    }
    std::string errors;
    for (const char* name : kNvinferNames) {
        if (try_open(name, out, why)) {
            out.how_found = "loader path";
            return out;
        }
        errors += (errors.empty() ? "" : "; ") + why;
    }
    throw UsageError("libnvinfer not found on the loader path (" + elide_middle(errors, 2 * kWhy) + "); " + kFix);
}

void check_tensorrt_version(const EngineMetadata& meta, const TensorRTLibrary& trt) {
    int major = trt.version / 10000;
    if (major != NV_TENSORRT_MAJOR)
        throw UsageError(trt.lib.path() + " is TensorRT " + trt.version_string() + " but tokensieve-run was compiled "
                         "against TensorRT " + std::to_string(NV_TENSORRT_MAJOR) + ".x headers; rebuild runtime/cpp "
                         "with TENSORRT_INCLUDE_DIR from that TensorRT");
    // Plans are tied to the TensorRT build that wrote them; the library exports major.minor.patch only.
    std::string lib = trt.version_string();
    const std::string& built = meta.tensorrt_version;
    bool same = built == lib || (built.size() > lib.size() && built.compare(0, lib.size(), lib) == 0 &&
                                 built[lib.size()] == '.');
    if (!same)
        throw UsageError("Engine was built with TensorRT " + built + " but " + trt.lib.path() + " is TensorRT " + lib +
                         "; rebuild it here with `tokensieve build --target local`");
}

}  // namespace tokensieve
