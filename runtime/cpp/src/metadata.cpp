// Checks 1, 2, 4, 5a: the engine file and its `<engine>.json`, before anything touches TensorRT or CUDA.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "tokensieve/json.h"
#include "tokensieve/runtime.h"

namespace tokensieve {

namespace {

const char* const kRebuild = "rebuild with `tokensieve build`";

std::string q(const std::string& s) { return quoted(s); }

std::vector<int64_t> dims(const json::Value& v, const std::string& what) {
    std::vector<int64_t> out;
    for (const auto& d : v.as_array()) {
        if (!d.is_integer()) throw std::runtime_error(what + " has a non-integer dimension");
        out.push_back(d.as_int());
    }
    return out;
}

std::string dims_str(const std::vector<int64_t>& d) {
    std::string s = "[";
    for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
    return s + "]";
}

}  // namespace

std::string metadata_path_for(const std::string& engine_path) { return engine_path + ".json"; }

std::string elide_middle(const std::string& text, size_t limit) {
    if (text.size() <= limit) return text;
    auto cont = [&](size_t i) { return i < text.size() && (static_cast<unsigned char>(text[i]) & 0xC0) == 0x80; };
    size_t keep = limit > 3 ? limit - 3 : 0, head = keep / 4, tail = text.size() - (keep - head);
    while (head > 0 && cont(head)) --head;     // cut before a character, not inside one
    while (tail < text.size() && cont(tail)) ++tail;
    return text.substr(0, head) + "..." + text.substr(tail);
}

std::string quoted(const std::string& text, size_t limit) { return "'" + elide_middle(text, limit) + "'"; }

namespace {

// The metadata file's text: a regular file of at most kMaxMetadataBytes. A FIFO or device (/dev/zero) is refused
// without reading from it (opened non-blocking: a FIFO without a writer cannot hang), and no more than the limit + 1
// bytes are ever read (a file growing meanwhile cannot exhaust memory).
std::string read_metadata_text(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT || errno == ENOTDIR)
            throw UsageError("No engine metadata " + q(path) + " next to the engine (written with it, needed to "
                             "check it); " + kRebuild);
        throw UsageError("Engine metadata " + q(path) + " cannot be opened (" + std::strerror(errno) + "); " +
                         kRebuild);
    }
    struct Closer {
        int fd;
        ~Closer() { ::close(fd); }
    } closer{fd};
    struct stat st {};
    if (::fstat(fd, &st) != 0)
        throw UsageError("Engine metadata " + q(path) + " cannot be read (" + std::strerror(errno) + ")");
    if (!S_ISREG(st.st_mode)) {
        const char* kind = S_ISDIR(st.st_mode) ? "a folder" : S_ISFIFO(st.st_mode) ? "a FIFO"
                           : (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)) ? "a device" : "not a file";
        throw UsageError("Engine metadata " + q(path) + " is " + kind + ", not a regular file; " + kRebuild);
    }
    const std::string too_big = "Engine metadata " + q(path) + " is more than 16 MiB, too large for engine metadata; " +
                                kRebuild;
    if (static_cast<uint64_t>(st.st_size) > kMaxMetadataBytes) throw UsageError(too_big);
    std::string text;
    char chunk[1 << 16];
    while (text.size() <= kMaxMetadataBytes) {
        ssize_t n = ::read(fd, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0)
            throw UsageError("Engine metadata " + q(path) + " cannot be read (" + std::strerror(errno) + ")");
        if (n == 0) break;
        text.append(chunk, static_cast<size_t>(n));
    }
    if (text.size() > kMaxMetadataBytes) throw UsageError(too_big);  // it grew while being read
    return text;
}

}  // namespace

uint64_t check_engine_file(const std::string& engine_path) {
    struct stat st {};
    if (::stat(engine_path.c_str(), &st) != 0) {
        if (errno == ENOENT || errno == ENOTDIR)
            throw UsageError("Engine file " + q(engine_path) + " does not exist; pass the model.engine written by "
                             "`tokensieve build`");
        throw UsageError("Engine file " + q(engine_path) + " cannot be read (" + std::strerror(errno) + ")");
    }
    if (!S_ISREG(st.st_mode)) throw UsageError("Engine path " + q(engine_path) + " is not a regular file");
    if (st.st_size == 0) throw UsageError("Engine file " + q(engine_path) + " is empty; " + kRebuild);
    std::ifstream probe(engine_path, std::ios::binary);
    if (!probe) throw UsageError("Engine file " + q(engine_path) + " cannot be opened (" + std::strerror(errno) + ")");
    return static_cast<uint64_t>(st.st_size);
}

EngineMetadata read_engine_metadata(const std::string& engine_path, uint64_t engine_size) {
    EngineMetadata meta;
    meta.path = metadata_path_for(engine_path);
    const std::string text = read_metadata_text(meta.path);
    json::Value root;
    try {
        root = json::parse(text);
    } catch (const json::ParseError& e) {
        throw UsageError("Engine metadata " + q(meta.path) + " is not valid JSON (" + e.what() + "); " + kRebuild);
    }
    if (!root.is_object())
        throw UsageError("Engine metadata " + q(meta.path) + " is a JSON " + json::type_name(root.type()) +
                         ", not an object; " + kRebuild);
    for (const char* key : {"schema", "flavor", "tensorrt_version"}) {
        const json::Value* v = root.find(key);
        if (!v || !v->is_string())
            throw UsageError(q(meta.path) + " is not tokensieve engine metadata (no string '" + key + "'); " +
                             kRebuild);
    }
    try {
        meta.schema = root.find("schema")->as_string();
        meta.flavor = root.find("flavor")->as_string();
        meta.tensorrt_version = root.find("tensorrt_version")->as_string();
        if (meta.schema.rfind(kMetadataSchemaPrefix, 0) != 0)
            throw std::runtime_error("schema " + q(meta.schema) + " is not " + kMetadataSchemaPrefix + "N");
        for (auto [key, field] : {std::pair{"target", &meta.target}, {"compute_capability", &meta.compute_capability},
                                  {"precision", &meta.precision}}) {
            const json::Value* v = root.find(key);
            if (v && v->is_string()) *field = v->as_string();
        }
        if (const json::Value* v = root.find("engine_size_bytes"); v && !v->is_null()) {
            if (!v->is_integer() || v->as_int() < 0) throw std::runtime_error("engine_size_bytes is not a size");
            meta.engine_size_bytes = v->as_int();
        }
        if (const json::Value* io = root.find("io_tensors"); io && !io->is_null()) {
            for (const auto& t : io->as_array()) {
                TensorMeta tm;
                tm.name = t.find("name") ? t.find("name")->as_string() : "";
                if (tm.name.empty()) throw std::runtime_error("an io_tensors entry has no name");
                if (const json::Value* s = t.find("shape")) tm.shape = dims(*s, "io_tensors " + q(tm.name));
                if (const json::Value* d = t.find("dtype"); d && d->is_string()) tm.dtype = d->as_string();
                const json::Value* mode = t.find("mode");
                std::string m = mode && mode->is_string() ? mode->as_string() : "";
                if (m != "input" && m != "output")
                    throw std::runtime_error("io_tensors " + q(tm.name) + " has mode " + q(m) + ", not input/output");
                tm.is_input = m == "input";
                meta.io_tensors.push_back(std::move(tm));
            }
        }
        if (const json::Value* prof = root.find("optimization_profile"); prof && !prof->is_null()) {
            for (const auto& [name, sel] : prof->as_object()) {
                ProfileShapes p;
                for (auto [key, field] : {std::pair{"min", &p.min}, {"opt", &p.opt}, {"max", &p.max}}) {
                    const json::Value* v = sel.find(key);
                    if (!v) throw std::runtime_error("optimization_profile " + q(name) + " has no '" + key + "'");
                    *field = dims(*v, "optimization_profile " + q(name));
                }
                meta.optimization_profile[name] = std::move(p);
            }
        }
        // Written only for engines with a dynamic axis other than batch (`tokensieve build --dims`).
        if (const json::Value* names = root.find("input_dim_names"); names && !names->is_null()) {
            for (const auto& [name, list] : names->as_object()) {
                auto t = std::find_if(meta.io_tensors.begin(), meta.io_tensors.end(),
                                      [&](const TensorMeta& m) { return m.is_input && m.name == name; });
                if (t == meta.io_tensors.end()) continue;  // TensorRT's view (io_tensors) is authoritative
                std::vector<std::string> dn;
                for (const auto& v : list.as_array()) {
                    if (!v.is_null() && !v.is_string())
                        throw std::runtime_error("input_dim_names " + q(name) + " has a name that is not a string");
                    dn.push_back(v.is_null() ? "" : v.as_string());
                }
                if (dn.size() != t->shape.size())
                    throw std::runtime_error("input_dim_names " + q(name) + " names " + std::to_string(dn.size()) +
                                             " axes but the input has shape " + dims_str(t->shape));
                t->dim_names = std::move(dn);
            }
        }
        if (const json::Value* dr = root.find("dims"); dr && !dr->is_null()) {
            for (const auto& [name, r] : dr->as_object()) {
                DimRange range;
                for (auto [key, field] : {std::pair{"min", &range.min}, {"opt", &range.opt}, {"max", &range.max}}) {
                    const json::Value* v = r.find(key);
                    if (!v || !v->is_integer()) throw std::runtime_error("dims " + q(name) + " has no integer '" + key + "'");
                    *field = v->as_int();
                }
                meta.dims[name] = range;
            }
        }
    } catch (const UsageError&) {
        throw;
    } catch (const std::exception& e) {
        throw UsageError(quoted(meta.path, 36) + " is malformed: " + elide_middle(e.what(), 96) + "; " + kRebuild);
    }
    if (meta.engine_size_bytes >= 0 && static_cast<uint64_t>(meta.engine_size_bytes) != engine_size) {
        throw UsageError("Engine " + q(engine_path) + " has " + std::to_string(engine_size) + " bytes but its .json "
                         "says engine_size_bytes=" + std::to_string(meta.engine_size_bytes) + " (truncated?); " +
                         kRebuild);
    }
    return meta;
}

void check_flavor(const EngineMetadata& meta) {
    if (meta.flavor == kFlavorStandard) return;
    if (meta.flavor == kFlavorRtx)
        throw UsageError("Engine " + q(meta.path.substr(0, meta.path.size() - 5)) + " is for TensorRT-RTX (" +
                         (meta.target.empty() ? "?" : meta.target) + "), not standard TensorRT; rebuild with "
                         "`tokensieve build --target local` or run it from Python");
    throw UsageError("Engine metadata " + q(meta.path) + " names unknown TensorRT flavor " + q(meta.flavor) +
                     " (expected 'tensorrt'); " + kRebuild);
}

void check_batch(const EngineMetadata& meta, int batch, const std::map<std::string, std::vector<int64_t>>& shapes) {
    if (batch < 1) throw UsageError("--batch must be >= 1, got " + std::to_string(batch));
    for (const auto& t : meta.io_tensors) {
        if (!t.is_input || t.shape.empty() || shapes.count(t.name)) continue;
        if (t.shape[0] >= 0) {
            // With dim names recorded, the batch axes are the ones named like a dynamic dim 0 (Qwen2-VL's
            // position_ids [3, batch, sequence]); resolve_input_shapes checks those.
            if (!t.dim_names.empty()) continue;
            if (t.shape[0] != batch)
                throw UsageError("--batch " + std::to_string(batch) + " does not match input " + q(t.name) +
                                 " with static shape " + dims_str(t.shape) + "; use --batch " +
                                 std::to_string(t.shape[0]) + " or rebuild with a batch profile");
            continue;
        }
        auto it = meta.optimization_profile.find(t.name);
        if (it == meta.optimization_profile.end() || it->second.min.empty()) continue;  // TensorRT checks it later
        int64_t lo = it->second.min[0], hi = it->second.max.empty() ? lo : it->second.max[0];
        if (batch < lo || batch > hi)
            throw UsageError("--batch " + std::to_string(batch) + " is outside the engine's profile for input " +
                             q(t.name) + " (batch " + std::to_string(lo) + ".." + std::to_string(hi) +
                             "); pick a batch in range or rebuild with a wider --max-batch");
    }
}

}  // namespace tokensieve
