// GPU-free checks of the runtime's pure parts, driven by tests/runtime/test_cpp_runtime.py:
//   tokensieve-runtime-selftest stats V...       -> {"count":..,"mean":..,"median":..,"p90":..,"p99":..,"min":..,"max":..}
//   tokensieve-runtime-selftest topk K V...      -> [i0, i1, ...]
//   tokensieve-runtime-selftest parse FILE       -> the document re-serialized (canonical), or exit 1 + message
//   tokensieve-runtime-selftest metadata ENGINE  -> the fields read_engine_metadata extracted, as JSON
//   tokensieve-runtime-selftest report           -> report_json() of a synthetic run
//   tokensieve-runtime-selftest dim TEXT...      -> {"NAME": VALUE, ...} from parse_dim_option (in order)
//   tokensieve-runtime-selftest shape TEXT...    -> {"INPUT": [D0, ...], ...} from parse_shape_option
//   tokensieve-runtime-selftest resolve ENGINE [--batch N] [--dim T]... [--shape T]...
//                                                -> {"INPUT": [D0, ...], ...}: check_batch + resolve_input_shapes
//                                                   (+ resolve_batch, which preflight runs next)
//   tokensieve-runtime-selftest batch ENGINE [--batch N] [--dim T]... [--shape T]...
//                                                -> {"batch": B, "samples_per_s": S}: preflight's batch (checks 5a-5c)
//                                                   and the throughput run_benchmark reports for 10 iterations in 2 s
// Errors (UsageError included): "error: MESSAGE" on stdout, exit 1.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "tokensieve/json.h"
#include "tokensieve/runtime.h"

using namespace tokensieve;

namespace {

std::string num(double v) {
    char buf[40];
    std::snprintf(buf, sizeof buf, "%.17g", v);
    return buf;
}

std::string dump(const json::Value& v) {
    switch (v.type()) {
        case json::Value::Type::Null: return "null";
        case json::Value::Type::Bool: return v.as_bool() ? "true" : "false";
        case json::Value::Type::Number: return num(v.as_double());
        case json::Value::Type::String: return json::quote(v.as_string());
        case json::Value::Type::Array: {
            std::string s = "[";
            for (size_t i = 0; i < v.as_array().size(); ++i) s += (i ? "," : "") + dump(v.as_array()[i]);
            return s + "]";
        }
        case json::Value::Type::Object: {
            std::string s = "{";
            bool first = true;
            for (const auto& [k, m] : v.as_object()) {
                s += (first ? "" : ",") + json::quote(k) + ":" + dump(m);
                first = false;
            }
            return s + "}";
        }
    }
    return "?";
}

std::string ints(const std::vector<int64_t>& d) {
    std::string s = "[";
    for (size_t i = 0; i < d.size(); ++i) s += (i ? "," : "") + std::to_string(d[i]);
    return s + "]";
}

std::string shape_map(const std::map<std::string, std::vector<int64_t>>& m) {
    std::string s = "{";
    bool first = true;
    for (const auto& [name, d] : m) {
        s += (first ? "" : ",") + json::quote(name) + ":" + ints(d);
        first = false;
    }
    return s + "}";
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) return 2;
    std::string cmd = argv[1];
    try {
        if (cmd == "stats") {
            std::vector<double> v;
            for (int i = 2; i < argc; ++i) v.push_back(std::strtod(argv[i], nullptr));
            LatencyStats s = summarize_latencies(v);
            std::printf("{\"count\":%zu,\"mean\":%s,\"median\":%s,\"p90\":%s,\"p99\":%s,\"min\":%s,\"max\":%s}\n",
                        s.count, num(s.mean).c_str(), num(s.median).c_str(), num(s.p90).c_str(), num(s.p99).c_str(),
                        num(s.min).c_str(), num(s.max).c_str());
        } else if (cmd == "topk" && argc >= 3) {
            std::vector<double> v;
            for (int i = 3; i < argc; ++i) v.push_back(std::strtod(argv[i], nullptr));
            std::vector<int64_t> idx;
            for (const auto& t : top_k(v, std::strtoul(argv[2], nullptr, 10))) idx.push_back(t.index);
            std::printf("%s\n", ints(idx).c_str());
        } else if (cmd == "parse" && argc == 3) {
            std::ifstream in(argv[2], std::ios::binary);
            std::stringstream buf;
            buf << in.rdbuf();
            std::printf("%s\n", dump(json::parse(buf.str())).c_str());
        } else if (cmd == "metadata" && argc == 3) {
            EngineMetadata m = read_engine_metadata(argv[2], check_engine_file(argv[2]));
            std::string s = "{\"flavor\":" + json::quote(m.flavor) + ",\"tensorrt_version\":" +
                            json::quote(m.tensorrt_version) + ",\"compute_capability\":" +
                            json::quote(m.compute_capability) + ",\"engine_size_bytes\":" +
                            std::to_string(m.engine_size_bytes) + ",\"io_tensors\":[";
            for (size_t i = 0; i < m.io_tensors.size(); ++i) {
                const auto& t = m.io_tensors[i];
                s += std::string(i ? "," : "") + "{\"name\":" + json::quote(t.name) + ",\"shape\":" + ints(t.shape) +
                     ",\"dtype\":" + json::quote(t.dtype) + ",\"mode\":" + (t.is_input ? "\"input\"" : "\"output\"") + "}";
            }
            s += "],\"optimization_profile\":{";
            bool first = true;
            for (const auto& [name, p] : m.optimization_profile) {
                s += (first ? "" : ",") + json::quote(name) + ":{\"min\":" + ints(p.min) + ",\"opt\":" + ints(p.opt) +
                     ",\"max\":" + ints(p.max) + "}";
                first = false;
            }
            s += "}";
            if (!m.dims.empty()) {  // only engines built with --dims have these keys
                s += ",\"dims\":{";
                first = true;
                for (const auto& [name, r] : m.dims) {
                    s += (first ? "" : ",") + json::quote(name) + ":{\"min\":" + std::to_string(r.min) + ",\"opt\":" +
                         std::to_string(r.opt) + ",\"max\":" + std::to_string(r.max) + "}";
                    first = false;
                }
                s += "},\"input_dim_names\":{";
                first = true;
                for (const auto& t : m.io_tensors) {
                    if (t.dim_names.empty()) continue;
                    s += std::string(first ? "" : ",") + json::quote(t.name) + ":[";
                    for (size_t i = 0; i < t.dim_names.size(); ++i)
                        s += std::string(i ? "," : "") + (t.dim_names[i].empty() ? "null" : json::quote(t.dim_names[i]));
                    s += "]";
                    first = false;
                }
                s += "}";
            }
            std::printf("%s}\n", s.c_str());
        } else if (cmd == "report") {
            Preflight pf;
            pf.options.engine_path = "dir/\"quoted\".engine";
            pf.options.batch = 1;  // --batch as given; the run's batch (pf.batch) came from the --shape below
            pf.batch = 2;
            pf.options.dims = {{"past_sequence", 128}, {"sequence", 1}};
            pf.options.shapes = {{"position_ids", {3, 2, 7}}};
            pf.metadata.tensorrt_version = "10.3.0.30";
            BenchmarkResult r;
            r.latency = summarize_latencies({1.0, 2.0, 3.0});
            r.tensorrt_version = "10.3.0";
            r.device.name = "Orin";
            r.device.cc_major = 8;
            r.device.cc_minor = 7;
            r.bindings = {{"pixel_values", true, "float16", {2, 3, 224, 224}, 0}, {"logits", false, "float32", {2, 1000}, 0}};
            r.first_output = "logits";
            r.top5 = {{7, 1.5}, {3, -0.25}};
            std::fputs(report_json(pf, r).c_str(), stdout);
        } else if (cmd == "dim" || cmd == "shape") {
            std::map<std::string, int64_t> dims;
            std::map<std::string, std::vector<int64_t>> shapes;
            for (int i = 2; i < argc; ++i) {
                if (cmd == "dim") parse_dim_option(argv[i], dims);
                else parse_shape_option(argv[i], shapes);
            }
            if (cmd == "shape") {
                std::printf("%s\n", shape_map(shapes).c_str());
            } else {
                std::string s = "{";
                bool first = true;
                for (const auto& [name, v] : dims) {
                    s += (first ? "" : ",") + json::quote(name) + ":" + std::to_string(v);
                    first = false;
                }
                std::printf("%s}\n", s.c_str());
            }
        } else if ((cmd == "resolve" || cmd == "batch") && argc >= 3) {
            RunOptions o;
            for (int i = 3; i + 1 < argc; i += 2) {
                std::string flag = argv[i], value = argv[i + 1];
                if (flag == "--batch") o.batch = std::stoi(value);
                else if (flag == "--dim") parse_dim_option(value, o.dims);
                else if (flag == "--shape") parse_shape_option(value, o.shapes);
                else return 2;
            }
            if ((argc - 3) % 2) return 2;
            EngineMetadata m = read_engine_metadata(argv[2], check_engine_file(argv[2]));
            check_batch(m, o.batch, o.shapes);
            auto shapes = resolve_input_shapes(m, o.batch, o.dims, o.shapes);
            int64_t batch = resolve_batch(m, o.batch, o.shapes, shapes);
            if (cmd == "resolve")
                std::printf("%s\n", shape_map(shapes).c_str());
            else
                std::printf("{\"batch\":%lld,\"samples_per_s\":%s}\n", static_cast<long long>(batch),
                            num(samples_per_second(batch, 10, 2.0)).c_str());
        } else {
            return 2;
        }
    } catch (const std::exception& e) {
        std::printf("error: %s\n", e.what());
        return 1;
    }
    return 0;
}
