// Check 5b: --batch, --dim NAME=VALUE and --shape INPUT=D0xD1x... -> the shape each input runs at; check 5c: the batch
// those shapes run (what tokensieve-run reports and counts samples by). Pure (metadata in, shapes out), so the selftest
// covers it without a GPU. Dim names are the ONNX dim_params the builder records in
// `<engine>.json` ("input_dim_names"); TensorRT keeps them on the network's tensors but not on a deserialized engine.
#include <algorithm>
#include <cctype>
#include <climits>
#include <set>

#include "tokensieve/runtime.h"

namespace tokensieve {

namespace {

constexpr int64_t kMaxDim = INT32_MAX;

std::string q(const std::string& s) { return quoted(s); }

std::string dims_str(const std::vector<int64_t>& d) {
    std::string s = "[";
    for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
    return s + "]";
}

std::string shape_text(const std::vector<int64_t>& d) {
    std::string s;
    for (size_t i = 0; i < d.size(); ++i) s += (i ? "x" : "") + std::to_string(d[i]);
    return s;
}

std::string trim(const std::string& s) {
    size_t a = s.find_first_not_of(" \t"), b = s.find_last_not_of(" \t");
    return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// Digits only (no sign, no spaces), at most kMaxDim.
bool parse_dim_value(const std::string& s, int64_t& out) {
    if (s.empty() || s.size() > 10) return false;
    int64_t v = 0;
    for (char c : s) {
        if (c < '0' || c > '9') return false;
        v = v * 10 + (c - '0');
    }
    if (v > kMaxDim) return false;
    out = v;
    return true;
}

bool is_identifier(const std::string& s) {
    if (s.empty() || !(std::isalpha(static_cast<unsigned char>(s[0])) || s[0] == '_')) return false;
    for (char c : s)
        if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_')) return false;
    return true;
}

// "NAME + K" -> (NAME, K): torch.export's name for a dim derived from another, e.g. the decode mask's
// "past_sequence + 1" (targets/tensorrt/builder.py _OFFSET_DIM, which gives it NAME's range shifted by K).
bool split_offset(const std::string& name, std::string& base, int64_t& k) {
    size_t plus = name.find('+');
    if (plus == std::string::npos) return false;
    std::string b = trim(name.substr(0, plus));
    if (!is_identifier(b) || !parse_dim_value(trim(name.substr(plus + 1)), k)) return false;
    base = b;
    return true;
}

std::string join(const std::vector<std::string>& items) {
    std::string s;
    for (size_t i = 0; i < items.size(); ++i) s += (i ? ", " : "") + items[i];
    return s;
}

std::vector<const TensorMeta*> input_tensors(const EngineMetadata& meta) {
    std::vector<const TensorMeta*> inputs;
    for (const auto& t : meta.io_tensors)
        if (t.is_input) inputs.push_back(&t);
    return inputs;
}

const std::string& dim_name(const TensorMeta& t, size_t j) {
    static const std::string none;
    return j < t.dim_names.size() ? t.dim_names[j] : none;
}

// The builder's rule: dim 0, and any axis named like a dynamic dim 0, is the batch (one --batch for all).
std::set<std::string> batch_axis_names(const std::vector<const TensorMeta*>& inputs) {
    std::set<std::string> names;
    for (const TensorMeta* t : inputs)
        if (!t->shape.empty() && t->shape[0] < 0 && !dim_name(*t, 0).empty()) names.insert(dim_name(*t, 0));
    return names;
}

bool is_batch_axis(const TensorMeta& t, size_t j, const std::set<std::string>& batch_names) {
    return j < t.shape.size() && t.shape[j] < 0 && (j == 0 || batch_names.count(dim_name(t, j)));
}

}  // namespace

void parse_dim_option(const std::string& text, std::map<std::string, int64_t>& dims) {
    size_t eq = text.find('=');
    std::string name = eq == std::string::npos ? "" : trim(text.substr(0, eq));
    if (name.empty())
        throw UsageError("--dim " + q(text) + " is not NAME=VALUE; e.g. --dim past_sequence=128");
    std::string value = text.substr(eq + 1);
    int64_t v = 0;
    if (!parse_dim_value(value, v))
        throw UsageError("--dim " + q(text) + ": VALUE must be an integer in 0.." +
                         std::to_string(kMaxDim) + "; e.g. --dim " + name + "=128");
    if (auto it = dims.find(name); it != dims.end())
        throw UsageError("--dim " + name + " is given twice (" + std::to_string(it->second) + " and " +
                         std::to_string(v) + "); give each dim once");
    dims[name] = v;
}

void parse_shape_option(const std::string& text, std::map<std::string, std::vector<int64_t>>& shapes) {
    size_t eq = text.rfind('=');  // input names may hold '.' or ':' (past.0.key); a shape never holds '='
    if (eq == std::string::npos || eq == 0 || eq + 1 == text.size())
        throw UsageError("--shape " + q(text) + " is not INPUT=D0xD1x...; e.g. --shape input_ids=1x128");
    std::string name = text.substr(0, eq), spec = text.substr(eq + 1);
    std::vector<int64_t> shape;
    size_t start = 0;
    while (true) {
        size_t x = spec.find('x', start);
        std::string part = spec.substr(start, x == std::string::npos ? std::string::npos : x - start);
        int64_t v = 0;
        if (!parse_dim_value(part, v))
            throw UsageError("--shape " + text + ": " + q(part) + " is not a dimension; give integers in 0.." +
                             std::to_string(kMaxDim) + " joined by 'x', e.g. --shape " + name + "=1x128");
        shape.push_back(v);
        if (x == std::string::npos) break;
        start = x + 1;
    }
    if (shapes.count(name))
        throw UsageError("--shape " + q(name) + " is given twice (" + shape_text(shapes[name]) + " and " + spec +
                         "); give each input once");
    shapes[name] = std::move(shape);
}

std::map<std::string, std::vector<int64_t>> resolve_input_shapes(
    const EngineMetadata& meta, int batch, const std::map<std::string, int64_t>& dims,
    const std::map<std::string, std::vector<int64_t>>& shapes) {
    std::vector<const TensorMeta*> inputs = input_tensors(meta);
    if (inputs.empty()) {
        if (!dims.empty() || !shapes.empty())
            throw UsageError("Engine metadata " + q(meta.path) + " records no input tensors, so --dim/--shape cannot "
                             "be checked; rebuild the engine with `tokensieve build`");
        return {};
    }
    std::set<std::string> batch_names = batch_axis_names(inputs), known;
    for (const TensorMeta* t : inputs) {
        for (size_t j = 0; j < t->shape.size(); ++j) {
            const std::string& nm = dim_name(*t, j);
            if (t->shape[j] >= 0 || nm.empty() || batch_names.count(nm)) continue;
            std::string base;
            int64_t k = 0;
            if (split_offset(nm, base, k)) {
                if (!batch_names.count(base)) known.insert(base);
            } else {
                known.insert(nm);
            }
        }
    }

    for (const auto& [name, value] : dims) {
        std::string v = std::to_string(value);
        if (batch_names.count(name))
            throw UsageError("--dim " + name + "=" + v + ": " + q(name) + " is the batch axis; set it with --batch " + v);
        if (known.count(name)) continue;
        std::string base;
        int64_t k = 0;
        if (split_offset(name, base, k) && (known.count(base) || batch_names.count(base)))
            throw UsageError("--dim " + q(name + "=" + v) + ": the axis " + q(name) + " follows " + q(base) +
                             (batch_names.count(base) ? "; it runs at --batch + " + std::to_string(k)
                                                      : "; set --dim " + base + "=N instead (that axis then runs at N + " +
                                                            std::to_string(k) + ")"));
        std::vector<std::string> listed;
        for (const auto& n : known) {
            auto r = meta.dims.find(n);
            listed.push_back(r == meta.dims.end() ? n
                                                  : n + " (" + std::to_string(r->second.min) + ".." +
                                                        std::to_string(r->second.max) + ")");
        }
        throw UsageError("--dim " + name + "=" + v + ": the engine has no input axis named " + q(name) +
                         (listed.empty() ? std::string(" (its inputs have no named dynamic axes besides the batch, "
                                                       "which is --batch; such axes come from `tokensieve build --dims`)")
                                         : " (named axes: " + join(listed) + "; the batch is --batch)"));
    }

    std::vector<std::string> input_names;
    for (const TensorMeta* t : inputs) input_names.push_back(t->name);
    for (const auto& [name, shape] : shapes) {
        auto it = std::find_if(inputs.begin(), inputs.end(), [&](const TensorMeta* t) { return t->name == name; });
        if (it == inputs.end())
            throw UsageError("--shape " + name + "=" + shape_text(shape) + ": the engine has no input " + q(name) +
                             " (inputs: " + join(input_names) + ")");
        const TensorMeta& t = **it;
        if (shape.size() != t.shape.size())
            throw UsageError("--shape " + name + "=" + shape_text(shape) + ": input " + q(name) + " has rank " +
                             std::to_string(t.shape.size()) + " (shape " + dims_str(t.shape) + "), not " +
                             std::to_string(shape.size()) + "; give " + std::to_string(t.shape.size()) +
                             " dimensions joined by 'x'");
    }

    std::map<std::string, std::vector<int64_t>> out;
    for (const TensorMeta* tp : inputs) {
        const TensorMeta& t = *tp;
        auto pit = meta.optimization_profile.find(t.name);
        const ProfileShapes* prof = pit == meta.optimization_profile.end() ? nullptr : &pit->second;
        // Refuses `value` on axis j when it is outside the profile (no profile: TensorRT checks it later).
        // `what` is the option that chose it; `shift` the K of a "NAME + K" axis set through --dim NAME.
        auto check_range = [&](size_t j, int64_t value, const std::string& what, int64_t shift, bool is_batch) {
            if (!prof || j >= prof->min.size() || j >= prof->max.size()) return;
            int64_t lo = prof->min[j], hi = prof->max[j];
            if (value >= lo && value <= hi) return;
            const std::string& nm = dim_name(t, j);
            std::string base = nm;  // "past_sequence + 1" -> past_sequence: the name `tokensieve build --dims` takes
            int64_t k = 0;
            split_offset(nm, base, k);
            std::string axis = "input " + q(t.name) + " axis " + std::to_string(j) + (nm.empty() ? "" : " (" + nm + ")");
            std::string so = shift ? ", so " + base + " allows " + std::to_string(lo - shift) + ".." +
                                         std::to_string(hi - shift)
                                   : "";
            std::string fix = is_batch ? "--max-batch" : "--dims " + (base.empty() ? "NAME" : base) + "=MIN:OPT:MAX";
            throw UsageError(what + " is outside the engine's profile: " + axis + " allows " + std::to_string(lo) +
                             ".." + std::to_string(hi) + so + "; pick one in range or rebuild with a wider "
                             "`tokensieve build " + fix + "`");
        };

        if (auto s = shapes.find(t.name); s != shapes.end()) {
            const std::string what = "--shape " + t.name + "=" + shape_text(s->second);
            for (size_t j = 0; j < t.shape.size(); ++j) {
                if (t.shape[j] >= 0) {
                    if (s->second[j] != t.shape[j])
                        throw UsageError(what + ": axis " + std::to_string(j) + " of input " + q(t.name) +
                                         " is static " + std::to_string(t.shape[j]) + " (shape " + dims_str(t.shape) +
                                         "), not " + std::to_string(s->second[j]));
                    continue;
                }
                check_range(j, s->second[j], what, 0, j == 0 || batch_names.count(dim_name(t, j)));
            }
            out[t.name] = s->second;
            continue;
        }
        std::vector<int64_t> shape = t.shape;
        for (size_t j = 0; j < shape.size(); ++j) {
            if (shape[j] >= 0) continue;
            const std::string& nm = dim_name(t, j);
            std::string base;
            int64_t k = 0;
            bool offset = split_offset(nm, base, k);
            if (j == 0 || batch_names.count(nm)) {
                shape[j] = batch;
                check_range(j, batch, "--batch " + std::to_string(batch), 0, true);
            } else if (auto d = dims.find(nm); d != dims.end()) {
                shape[j] = d->second;
                check_range(j, d->second, "--dim " + nm + "=" + std::to_string(d->second), 0, false);
            } else if (offset && batch_names.count(base)) {
                shape[j] = batch + k;
                check_range(j, shape[j], "--batch " + std::to_string(batch), k, true);
            } else if (auto b = offset ? dims.find(base) : dims.end(); b != dims.end()) {
                shape[j] = b->second + k;
                check_range(j, shape[j], "--dim " + base + "=" + std::to_string(b->second), k, false);
            } else {  // as before named dims existed: the profile's opt value
                shape[j] = prof && j < prof->opt.size() && prof->opt[j] >= 0 ? prof->opt[j] : 1;
            }
        }
        out[t.name] = std::move(shape);
    }
    return out;
}

int64_t resolve_batch(const EngineMetadata& meta, int batch, const std::map<std::string, std::vector<int64_t>>& shapes,
                      const std::map<std::string, std::vector<int64_t>>& input_shapes) {
    std::vector<const TensorMeta*> inputs = input_tensors(meta);
    if (inputs.empty()) return batch;
    std::set<std::string> batch_names = batch_axis_names(inputs);
    // "input 'x' at batch 2 (axis 0, from --batch 2)": where a batch axis got its value, for the disagreement message.
    auto where = [&](const TensorMeta& t, size_t j, int64_t v) {
        auto s = shapes.find(t.name);
        return "input " + q(t.name) + " at batch " + std::to_string(v) + " (axis " + std::to_string(j) + ", from " +
               (s == shapes.end() ? "--batch " + std::to_string(batch)
                                  : "--shape " + t.name + "=" + shape_text(s->second)) + ")";
    };
    bool found = false;
    int64_t run_batch = 0;
    std::string first;
    for (const TensorMeta* t : inputs) {
        auto r = input_shapes.find(t->name);
        if (r == input_shapes.end()) continue;
        for (size_t j = 0; j < t->shape.size() && j < r->second.size(); ++j) {
            if (!is_batch_axis(*t, j, batch_names)) continue;
            int64_t v = r->second[j];
            if (!found) {
                found = true;
                run_batch = v;
                first = where(*t, j, v);
            } else if (v != run_batch) {
                throw UsageError("The inputs' batch axes disagree: " + first + " but " + where(*t, j, v) +
                                 "; an engine runs at one batch, so make --batch and every --shape agree on it");
            }
        }
    }
    if (found) return run_batch;
    // No dynamic batch axis: the engine's static batch, the dim 0 most inputs share (the earliest on a tie), so that
    // Qwen2-VL's position_ids [3, 1, T] does not count as batch 3 next to input_ids [1, T] and the cache [1, ...].
    std::map<int64_t, int> count;
    int64_t best = 1;
    int best_count = 0;
    for (const TensorMeta* t : inputs) {
        if (t->shape.empty()) continue;
        int c = ++count[t->shape[0]];
        if (c > best_count) {
            best = t->shape[0];
            best_count = c;
        }
    }
    return best;
}

double samples_per_second(int64_t batch, int iters, double seconds) {
    return seconds > 0 ? static_cast<double>(batch) * static_cast<double>(iters) / seconds : 0;
}

}  // namespace tokensieve
